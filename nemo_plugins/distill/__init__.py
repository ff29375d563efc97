"""Logit distillation: the forward-KL loss against the parent's logits."""
