"""Post-training stages and their losses: SFT with logit distillation, pairwise reward model, online DPO, GRPO."""
