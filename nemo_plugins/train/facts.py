"""A training run's fingerprint (what decides its trajectory) and the refusal to resume it with other settings.

The fingerprint holds the training settings that change what is learnt (not log / eval / save intervals, which
only change what is written down), the optimizer settings, the data cursor the run started from, and whatever
the stage adds (model sources, the data mix's identity, loss settings). The parallel layout is left out on
purpose: checkpoints reshard on load and every layout reads the same global batches, so a requeue on another
allocation is the same run (its numerics differ only in reduction order).

Every checkpoint records the fingerprint; a resume with a different one is refused, naming the keys, unless
``resume_with_changes`` is set: then the new settings apply from the resumed step and the change is appended to
the run's ``history`` (kept in every later checkpoint and in the manifest).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from nemo_plugins.data.mix import Cursor
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.manifest import changed_keys, describe_changes, finished_stage, read_json
from nemo_plugins.train.checkpoint import TRAIN_STATE, complete_checkpoints
from nemo_plugins.train.config import OptimizerSettings, TrainSettings

logger = logging.getLogger(__name__)

# TrainSettings fields that change what is written down, never what is learnt
BOOKKEEPING = ("log_interval", "eval_interval", "eval_rows_per_source", "save_interval", "save_interval_minutes",
               "keep_last", "max_nonfinite_steps")


@dataclass(frozen=True)
class RunFacts:
    """What a stage tells the loop about itself: its fingerprint, and whether the user accepts changed settings."""

    fingerprint: dict = field(default_factory=dict)
    resume_with_changes: bool = False


def run_fingerprint(train: TrainSettings, optimizer: OptimizerSettings, cursor_start: Cursor, stage: dict) -> dict:
    """The whole fingerprint of a training run: the loop's settings plus the stage's own (``stage``)."""
    trajectory = {k: v for k, v in dataclasses.asdict(train).items() if k not in BOOKKEEPING}
    return {**stage, "train": trajectory, "optimizer": dataclasses.asdict(optimizer),
            "cursor_start": cursor_start.to_dict()}


def resume_changes(recorded: dict, current: dict, where: Path, step: int, resume_with_changes: bool) -> dict:
    """The keys that differ between a checkpoint's fingerprint and this run's; refused unless the user accepts
    them (a different starting cursor is always refused: it is another run's output dir)."""
    changes = changed_keys(recorded, current)
    moved = {k: v for k, v in changes.items() if k.startswith("cursor_start")}
    if moved:
        raise ConfigError(f"{where} was written by a run that started at another data cursor "
                          f"({describe_changes(moved)}): a different run's output dir; use another output_dir")
    if changes and not resume_with_changes:
        raise ConfigError(f"{where} (step {step}) was written with other settings than this run's "
                          f"({describe_changes(changes)}): rerun with the recorded settings, or set "
                          "resume_with_changes=true to continue with these from that step, or use another output_dir")
    if changes:
        logger.warning("%s: resuming at step %d with changed settings (%s); they apply from this step on", where, step,
                       describe_changes(changes))
    return changes


def check_stage_dir(out_dir: str | Path, fingerprint: dict, resume_with_changes: bool) -> dict | None:
    """Before any work: the manifest of the stage if it finished earlier (skip it), else None after checking that
    the newest readable checkpoint, if any, was written with this fingerprint (or ``resume_with_changes``). Damaged
    checkpoints are left to the loop's resume, which falls back past them."""
    done = finished_stage(out_dir, fingerprint, resume_with_changes)
    if done is not None:
        return done
    for checkpoint in reversed(complete_checkpoints(Path(out_dir) / "checkpoints")):
        try:
            state = read_json(checkpoint / TRAIN_STATE)
        except DataError:
            continue
        resume_changes(state.get("fingerprint", {}), fingerprint, checkpoint, state["step"], resume_with_changes)
        break
    return None
