"""Online DPO of one SFT model on the chat mix's prompts, judged by a pairwise judge; resumable, single-pass data.

    python -m recipes.odpo policy=megatron:runs/sft/sft_kd/checkpoints/step_00000008 \
        'judge={_target_: <module>.<callable>, <arg>: ...}' chat_cursor=runs/sft/sft_kd/manifest.json
    torchrun --nproc-per-node 2 -m recipes.odpo parallel.tp=2 policy=... judge=...

The reference is ``reference``, else the policy's starting model. Running the same command again after a kill
resumes from the newest checkpoint under output_dir and samples what the uninterrupted run sampled; with other
settings it is refused, naming them, unless resume_with_changes=true. A finished stage is skipped.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate

from nemo_plugins.config.schemas import ODPOConfig
from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.from_config import load_chat_data
from nemo_plugins.data.mix import cursor_from_manifest
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.output_lock import output_lock
from nemo_plugins.rl.odpo import run_odpo_stage
from recipes._entry import hydra_entry


def run(cfg: ODPOConfig) -> dict:
    if not cfg.policy:
        raise ConfigError("policy is null: say which SFT model to train, "
                          "e.g. policy=megatron:runs/sft/sft_kd/checkpoints/...")
    if not isinstance(cfg.judge, dict) or "_target_" not in cfg.judge:
        raise ConfigError("judge is not set: give 'judge={_target_: <module>.<callable>}' building an object with "
                          "prob_first_wins(conversations, responses_a, responses_b) (the calibrated PWRM)")
    stage, parallel = cfg.stage.odpo, cfg.parallel
    policy = ModelSource.parse(cfg.policy)
    reference = ModelSource.parse(cfg.reference) if cfg.reference else policy
    initialize(parallel, stage.train.seed)
    policy_tokenizer = tokenizer_dir(policy)
    chat_format, chat = load_chat_data(cfg, policy_tokenizer)
    cursor = cursor_from_manifest(cfg.chat_cursor, chat.identity(), "chat_cursor")
    with output_lock(cfg.output_dir):
        return run_odpo_stage(stage, policy, reference, cfg.judge,
                              lambda: instantiate(cfg.judge), chat, chat_format, policy_tokenizer,
                              tokenizer_dir(reference), cursor, Path(cfg.output_dir), parallel,
                              resume_with_changes=cfg.resume_with_changes)


main = hydra_entry("odpo", run)


if __name__ == "__main__":
    main()
