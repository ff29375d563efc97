"""cascade's library: Mistral-family models on megatron-core, conversion, pruning, distillation."""
