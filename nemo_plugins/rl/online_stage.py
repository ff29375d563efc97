"""What the on-policy stages (online DPO, GRPO) share around the one training loop: the layouts the generation
engine can sample in, the checks on their inputs before any weight is loaded, the frozen reference, the per-step
metrics file, and the run summary their manifests carry. The algorithms themselves (pairs and a judge, groups and
rewards) stay in their own modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nemo_plugins.convert.sources import ModelSource, load_model, source_config
from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.tokenizer import same_tokenizer
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.train.metrics import MetricsLog


def check_sampling_layout(parallel: ParallelConfig, stage: str) -> None:
    """The policy samples with the generation engine, which decodes one token per step on one pipeline stage."""
    if parallel.pp > 1 or parallel.cp > 1 or parallel.sequence_parallel:
        raise ConfigError(f"{stage} samples from the policy it trains, and the generation engine runs on one "
                          f"pipeline stage without context or sequence parallelism: parallel.pp={parallel.pp}, "
                          f"cp={parallel.cp}, sequence_parallel={parallel.sequence_parallel}; use tp (and data "
                          "parallelism) only")


def _check_reference_tokenizer(reference_dir: Path, policy_dir: Path, key: str) -> None:
    """Log-ratios compare the same token ids under both models."""
    if not same_tokenizer(reference_dir, policy_dir):
        raise ConfigError(f"the reference's tokenizer ({reference_dir}) differs from the policy's ({policy_dir}): "
                          f"the reference must be the policy's starting model ({key})")


def _check_chat_vocab(chat_format: ChatFormat, config: MistralConfig) -> None:
    """A format whose control ids lie past the model's vocabulary would index outside its embedding."""
    if chat_format.vocab_size > config.vocab_size:
        raise ConfigError(f"the chat format {chat_format.name} emits ids up to {chat_format.vocab_size} but the "
                          f"model's vocabulary has {config.vocab_size}: set chat_data.format to the model's own "
                          "(hf_template)")


def checked_policy(stage: str, reference_key: str, parallel: ParallelConfig, policy_source: ModelSource,
                   chat_format: ChatFormat, tokenizer_dir: Path, reference_tokenizer_dir: Path) -> MistralConfig:
    """The policy's config once the stage's inputs fit together: a layout the engine samples in, a reference with
    the policy's tokenizer, a chat format inside its vocabulary. Nothing is loaded before these pass."""
    check_sampling_layout(parallel, stage)
    _check_reference_tokenizer(reference_tokenizer_dir, tokenizer_dir, reference_key)
    config = source_config(policy_source)
    _check_chat_vocab(chat_format, config)
    return config


def frozen_model(source: ModelSource, parallel: ParallelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """A model run forward-only next to the policy (the reference): no gradients, hence no optimizer state."""
    _, model = load_model(source, parallel, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class StepMetrics:
    """Rank 0 appends one JSON record per step to ``path`` (the numbers the loop's metrics do not hold)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, values: dict) -> None:
        if dist.get_rank() == 0:
            with self.path.open("a") as out:
                out.write(json.dumps(values) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        """One record per step, the last written (a resumed run repeats the steps after its checkpoint)."""
        by_step = {r["step"]: r for r in MetricsLog.read(path)}
        return [by_step[s] for s in sorted(by_step)]


def run_summary(out_dir: Path, step_metrics: Path) -> dict:
    """The manifest's view of a finished run: the first evaluation (the start) and each step metric's mean."""
    evals = [r for r in MetricsLog.read(Path(out_dir) / "metrics.jsonl") if r["kind"] == "eval"]
    steps = StepMetrics.read(step_metrics)
    return {"eval_start": {k: v for k, v in evals[0].items() if k not in ("step", "kind")} if evals else None,
            "step_means": {key: float(np.mean([r[key] for r in steps])) for key in steps[0] if key != "step"}
            if steps else {}}
