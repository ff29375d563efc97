"""GRPO of one reasoning model on the chat mix's problems, rewarded by math / code / rubric graders; resumable,
single-pass data.

    python -m recipes.grpo policy=megatron:runs/reasoning_sft/checkpoints/step_... stage@stage.grpo=grpo_stem
    python -m recipes.grpo policy=megatron:runs/grpo/grpo_stem/checkpoints/step_... stage@stage.grpo=grpo_general \
        'judge={_target_: <module>.<callable>, ...}' chat_cursor=runs/grpo/grpo_stem/manifest.json
    torchrun --nproc-per-node 2 -m recipes.grpo parallel.tp=2 policy=...

The paper's two GRPO stages (STEM with verifiable rewards at 32K new tokens, then General with rubric rewards at
80K) are two invocations of this recipe with the two stage presets, the second starting from the first's
checkpoint and cursor: each stage is then resumable, skippable and fingerprinted on its own, as every other stage.

Responses are graded by ``rl.rewards.build_rewards(stage.grpo.rewards, judge)`` from each problem's
``meta.reward``; ``judge`` (instantiated once the process group exists) grades rubric items and may stay null
when the data has none. ``rewards={_target_: ...}`` replaces the graders altogether by any object with
``__call__(items) -> list[float]`` (a planted reward in tests). Running the same command again after a kill
resumes from the newest checkpoint under output_dir and samples what the uninterrupted run sampled.

Prompts are rendered as the policy was SFT'd to see them: ``stage.sft_kd`` is the SFT stage the policy comes from
(default: the ``reasoning_sft`` preset), and its ``prompt_screen`` (its system prompt first, no filter) screens the
problems, as the cascade screens its problem mix with its reasoning SFT stage's. A policy SFT'd without a system
prompt: ``stage.sft_kd.system_prompt=null`` (the same override as its SFT run's).
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate

from nemo_plugins.config.schemas import GRPOConfig
from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.from_config import load_chat_data
from nemo_plugins.data.mix import cursor_from_manifest
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.output_lock import output_lock
from nemo_plugins.rl.grpo import run_grpo_stage
from nemo_plugins.rl.rewards import Rewards, build_rewards
from recipes._entry import hydra_entry


def _targets(cfg: GRPOConfig, key: str) -> dict | None:
    node = getattr(cfg, key)
    if not node:
        return None
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{key} must be null or '{{_target_: <module>.<callable>, ...}}', got {node}")
    return node


def load_problems(cfg: GRPOConfig, tokenizer_path: Path) -> tuple[ChatFormat, ChatMix]:
    """The chat format and the problem mix, screened by the policy's SFT stage (``stage.sft_kd``): a policy asked
    without the system prompt it was trained with answers another distribution than the one it learnt."""
    return load_chat_data(cfg, tokenizer_path, cfg.stage.sft_kd.prompt_screen())


def run(cfg: GRPOConfig) -> dict:
    if not cfg.policy:
        raise ConfigError("policy is null: say which model to train, e.g. policy=megatron:runs/reasoning_sft/...")
    stage, parallel = cfg.stage.grpo, cfg.parallel
    custom, judge = _targets(cfg, "rewards"), _targets(cfg, "judge")
    policy = ModelSource.parse(cfg.policy)
    reference = ModelSource.parse(cfg.reference) if cfg.reference else policy
    initialize(parallel, stage.train.seed)
    policy_tokenizer = tokenizer_dir(policy)
    chat_format, chat = load_problems(cfg, policy_tokenizer)
    cursor = cursor_from_manifest(cfg.chat_cursor, chat.identity(), "chat_cursor")

    def make_rewards() -> Rewards:
        if custom is not None:
            return instantiate(cfg.rewards)
        return build_rewards(stage.rewards, instantiate(cfg.judge) if judge is not None else None)

    with output_lock(cfg.output_dir):
        return run_grpo_stage(stage, policy, reference, {"rewards": custom, "judge": judge}, make_rewards, chat,
                              chat_format, policy_tokenizer, tokenizer_dir(reference), cursor, Path(cfg.output_dir),
                              parallel, resume_with_changes=cfg.resume_with_changes)


main = hydra_entry("grpo", run)


if __name__ == "__main__":
    main()
