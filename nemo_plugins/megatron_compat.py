"""Every place the model leans on megatron-core beyond its documented API, in one module, behind one version guard.

Three overrides, each tested against megatron-core's behaviour in ``tests/test_megatron_compat.py`` (so an upgrade
that changes what one relies on fails there, not as wrong numbers) and read against 0.16.1 and 0.19.x:

* ``MistralTransformerConfig``: ``TransformerConfig`` has no YaRN fields; ``GPTModel`` reads them with ``getattr``
  when ``position_embedding_type="yarn"`` and the attention reads ``yarn_rotary_scaling_factor`` / ``yarn_mscale``
  / ``yarn_mscale_all_dim`` whenever they exist (``_yarn_get_concentration_factor_from_config``).
* ``HiddenOutputGPTModel``: ``GPTModel._postprocess`` (private) is the output stage after the final norm;
  overriding it lets a forward return the output layer's inputs, for losses fused with the output layer.
* ``carry_attention_bias``: ``GPTModel.forward(extra_block_kwargs=...)`` hands ``attention_bias`` untouched through
  every layer (and activation recomputation) to the core attention; Mistral models have no attention bias, so the
  attention temperature travels on that channel (``model.attention_temperature``).

The CPU patches (``cpu_compat``) import this module, so they sit behind the same guard.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Keep equal to pyproject.toml's megatron-core requirement (a test compares them).
SUPPORTED_MEGATRON_CORE = ">=0.16.1,<0.20"


class UnsupportedMegatronError(ImportError):
    """The installed megatron-core is outside the range these overrides were checked against."""


def installed_version() -> str:
    """megatron-core's version as its package metadata states it (a source checkout states it in package_info)."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        from megatron.core import package_info

        return package_info.__version__


def check_version(version: str) -> None:
    """Refuse a megatron-core outside ``SUPPORTED_MEGATRON_CORE`` (release candidates of a supported release pass)."""
    if not SpecifierSet(SUPPORTED_MEGATRON_CORE).contains(Version(version), prereleases=True):
        raise UnsupportedMegatronError(
            f"megatron-core {version} is installed; cascade supports megatron-core{SUPPORTED_MEGATRON_CORE} "
            f"(its private overrides are in nemo_plugins/megatron_compat.py): install a supported version, "
            f"e.g. pip install 'megatron-core{SUPPORTED_MEGATRON_CORE}'"
        )


check_version(installed_version())


@dataclass
class MistralTransformerConfig(TransformerConfig):
    """TransformerConfig plus the YaRN fields GPTModel and the attention read with getattr, and the attention
    temperature's two fields (read by ``MistralGPTModel`` and ``with_query_scale``, never by megatron)."""

    yarn_rotary_scaling_factor: float = 1.0  # megatron's attention reads it whenever it exists; 1.0 == no YaRN
    yarn_original_max_position_embeddings: int | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None
    yarn_correction_range_round_to_int: bool = True
    attention_temperature_beta: float | None = None
    attention_temperature_period: int | None = None


class HiddenOutputGPTModel(GPTModel):
    """GPTModel whose forward can return the final-norm hidden states instead of logits or losses.

    Overrides ``GPTModel._postprocess``, megatron's private output stage (called by ``forward`` with the decoder's
    output as ``hidden_states=``, same shape in 0.16 and 0.19): the decoder has already applied the final norm, so
    these are exactly the output layer's inputs.
    """

    _return_hidden: bool = False

    @contextlib.contextmanager
    def returning_hidden(self, enabled: bool) -> Iterator[None]:
        """Inside this block (when ``enabled``) this pipeline stage's forward ends before the output layer."""
        self._return_hidden = enabled
        try:
            yield
        finally:
            self._return_hidden = False

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self._return_hidden and self.post_process:
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)


def carry_attention_bias(kwargs: dict, bias: torch.Tensor) -> dict:
    """``GPTModel.forward``'s keyword arguments with ``bias`` as every core attention's ``attention_bias``: megatron
    passes ``extra_block_kwargs`` to the transformer block, which threads ``attention_bias`` to each layer's
    self-attention and on to its core attention (also under recompute and on every pipeline stage)."""
    extra = dict(kwargs.get("extra_block_kwargs") or {})
    extra["attention_bias"] = bias
    return {**kwargs, "extra_block_kwargs": extra}
