"""Build transformers reference models from a MistralConfig, and load our exports as a user would (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from nemo_plugins.bridges import config_to_hf
from nemo_plugins.model.config import MistralConfig

CLASSES = {
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM"),
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    "Ministral3ForCausalLM": ("Ministral3Config", "Ministral3ForCausalLM"),
}


def hf_model(config: MistralConfig, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised transformers model of exactly this config, fp32, eval mode, eager attention."""
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[config.architecture])
    not_arguments = ("architectures", "model_type", "torch_dtype")
    hf_config = config_cls(**{k: v for k, v in config_to_hf(config).items() if k not in not_arguments})
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


def load_in_transformers(hf_dir: str | Path) -> torch.nn.Module:
    """The directory as a user loads it (AutoModelForCausalLM, fp32, eager attention): raises what they would see."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def assert_loads_with_our_logits(hf_dir: str | Path, ours: str | None = None, length: int = 40,
                                 atol: float = 1e-4) -> str:
    """transformers loads ``hf_dir`` under the class its config.json names and gives the logits of our model
    (``ours``: a source string such as ``megatron:<checkpoint>``, the HF directory itself by default); returns
    that class name."""
    from nemo_plugins.convert.sources import ModelSource, load_model
    from nemo_plugins.distributed import ParallelConfig

    declared = json.loads((Path(hf_dir) / "config.json").read_text())["architectures"][0]
    reference = load_in_transformers(hf_dir)
    assert type(reference).__name__ == declared, (type(reference).__name__, declared)
    config, model = load_model(ModelSource.parse(ours or f"hf:{hf_dir}"), ParallelConfig())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model.eval()(tokens, torch.arange(length).expand(2, -1))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol * max(1.0, expected.abs().max().item()), f"{hf_dir}: logits differ from ours by {diff}"
    return declared
