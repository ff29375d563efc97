"""Build transformers reference models from a MistralConfig (tests only)."""

from __future__ import annotations

import torch
import transformers

from nemo_plugins.model.config import MistralConfig

CLASSES = {
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM"),
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    "Ministral3ForCausalLM": ("Ministral3Config", "Ministral3ForCausalLM"),
}


def hf_model(config: MistralConfig, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised transformers model of exactly this config, fp32, eval mode, eager attention."""
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[config.architecture])
    hf_config = config_cls(**{k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights pin the mapping
            else:
                p.normal_(0.0, 0.05)
    return model


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state
