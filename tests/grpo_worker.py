"""Worker body for the two-process GRPO tests (spawned through tests/distributed_worker.run; importable top level):
one GRPO stage of the tiny policy under TP=2 or DP=2 on gloo, every rank writing the problems it graded."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import build_chat_mix
from nemo_plugins.data.mix import Cursor, SourceSpec
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.rl.grpo import GRPOStage, run_grpo_stage


class GradedProblems:
    """The planted short-response reward, also appending every graded problem (its question) with this process's
    rank to ``<log>.rank<r>``: which problems each DP rank sampled."""

    def __init__(self, log: str) -> None:
        from tests.test_grpo import ShortReward

        self.reward, self.log = ShortReward(), log

    def __call__(self, items):
        with open(f"{self.log}.rank{dist.get_rank()}", "a") as out:
            out.writelines(json.dumps(item.messages[-1]["content"]) + "\n" for item in items)
        return self.reward(items)


def grpo_stage(root: str, stage: GRPOStage, out_dir: str, log: str, tp: int) -> None:
    """``stage`` on the tiny policy under ``root`` (the chat mix of ``tests/test_odpo.chat``,
    already rendered there) with TP=tp over the world's two processes (tp=1: DP=2)."""
    parallel = ParallelConfig(tp=tp)
    initialize(parallel)
    source = ModelSource.parse(f"megatron:{Path(root) / 'policy'}")
    tok = tokenizer_dir(source)
    chat_format = load_chat_format("hf_template", tok)
    mix = build_chat_mix(chat_format, [SourceSpec("arithmetic", ["builtin:arithmetic?count=100"], 1.0),
                                       SourceSpec("tools", ["builtin:arithmetic_tools?count=20"], 0.5)],
                         Path(root) / "chat", 0.2)
    run_grpo_stage(stage, source, source, {"rewards": "short"},
                   lambda: GradedProblems(log), mix, chat_format, tok, tok, Cursor(), Path(out_dir), parallel)
