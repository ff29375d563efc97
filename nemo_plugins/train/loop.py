"""The one training loop every stage runs on: resume, evaluation, atomic saves, NaN/inf skip-and-stop, metrics,
signal-driven saves. What a stage learns is its step function; what it reads is its data stream.

Resuming is exact: the checkpoint holds model, optimizer, schedule, every rank's RNG and the data cursor, and
each step's rows depend only on the cursor, so a killed run continues the uninterrupted run's trajectory.

A stage plugs in three things:
- ``data``: anything with ``next_rows(cursor, rows, seq_len) -> (*batch, next_cursor)`` (``DataMix`` for text,
  ``ChatMix`` for conversations); the loop never looks inside the batch.
- ``step``: ``step(ddp_model, batch) -> mean loss``; it runs forward + backward (through megatron's schedules)
  into the zeroed gradient buffers. The loop checks finiteness, steps the optimizer and the schedule.
- ``evaluate``: ``evaluate() -> dict`` of held-out numbers, logged at step 0, every ``eval_interval`` and at the end.

Saves: at the end, every ``save_interval`` steps, every ``save_interval_minutes`` of wall time (rank 0's clock
decides: ranks never disagree about saving, which would leave some in the save's collectives and others in the
next step's), and when SIGUSR1 or SIGTERM reaches any rank (see ``SaveTriggers``): every rank finishes the current
step, saves, writes ``<out_dir>/requeue`` and exits with ``REQUEUE_EXIT_CODE``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn, Protocol

import torch
import torch.distributed as dist

from nemo_plugins.data.mix import Cursor
from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError, NonFiniteError
from nemo_plugins.manifest import write_json_atomic
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.train.checkpoint import intact_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.disk_space import checkpoint_bytes, space_for_checkpoint
from nemo_plugins.train.facts import RunFacts, resume_changes, run_fingerprint
from nemo_plugins.train.metrics import MetricsLog
from nemo_plugins.train.optimizer import build_optimizer, wrap_for_training

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*\blayers\.)\d+(\..*)$")

# What a preempted run exits with after its checkpoint is written (EX_TEMPFAIL): "run me again", not "failed".
# torchrun reports any non-zero worker code as its own exit code 1, so rank 0 also writes REQUEUE_MARKER in the
# stage's folder (JSON: step, signal, checkpoint) for the job script; a rerun of the stage removes it.
REQUEUE_EXIT_CODE = 75
REQUEUE_MARKER = "requeue"
SAVE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# How long a signalled rank waits for the others to agree to save before it takes the group for broken.
SIGNAL_AGREEMENT_TIMEOUT = timedelta(seconds=60)


class NonFiniteLossError(NonFiniteError):
    """Too many steps in a row had a NaN/inf loss or gradient; the last checkpoint is still clean."""


class Preempted(RuntimeError):
    """A save signal arrived: the current step finished, a checkpoint was written, the job should be re-run."""

    exit_code = REQUEUE_EXIT_CODE


class GroupLost(RuntimeError):
    """A signalled rank could not reach the other ranks: a peer died (torchrun then SIGTERMs the survivors) or is
    stuck; nothing can be saved, and the process group cannot even be torn down (its destructor waits for them)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # what the signal's default action would have left


class DataStream(Protocol):
    def next_rows(self, cursor: Cursor, rows: int, seq_len: int) -> tuple[Any, ...]: ...


StepFunction = Callable[[torch.nn.Module, tuple], float]
Evaluate = Callable[[], dict]
Clock = Callable[[], float]


class SaveTriggers:
    """The saves a step count cannot schedule: a signal on any rank (save, then stop) and wall time since the last
    save, decided by one all-reduce per step so every rank reaches the same answer.

    SIGUSR1 is Slurm's warning ahead of the end (``--signal=USR1@<seconds>``, forwarded by the job script).
    SIGTERM means two things under torchrun, which forwards the signals it gets itself (SIGTERM by default, USR1
    with ``--signals-to-handle``) to every worker and SIGTERMs the survivors when a worker fails. A worker cannot
    tell which from the signal, but the agreement tells it: if every rank answers, the group is whole and saves;
    if a signalled rank's agreement fails or gets no answer within ``timeout``, a peer is gone, so it leaves
    without saving (``GroupLost``) instead of hanging in a collective until torchrun's SIGKILL. The last
    periodic checkpoint is then the resume point. torchrun SIGKILLs its workers ``--shutdown-timeout`` seconds
    (default 30) after forwarding a signal: the job must give it the time of a step plus a save.
    """

    def __init__(self, interval_minutes: float, clock: Clock = time.monotonic,
                 timeout: timedelta = SIGNAL_AGREEMENT_TIMEOUT) -> None:
        self.received: int | None = None
        self.interval_seconds = interval_minutes * 60.0
        self.clock = clock
        self.timeout = timeout
        self.last_save = clock()
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SaveTriggers":
        for sig in SAVE_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        """Handlers back as they were, except after a stop: the checkpoint is written and the process is on its
        way out; the first rank to exit makes torchrun SIGTERM the others, which must still exit with the
        requeue code, not die of the signal."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.stopping else handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def saved(self) -> None:
        """A checkpoint was just written: the wall-time interval counts from now."""
        self.last_save = self.clock()

    def decide(self) -> tuple[bool, bool]:
        """``(stop, due)``, the same on every rank: a signal reached some rank; rank 0's clock says a save is due."""
        due = (dist.get_rank() == 0 and self.interval_seconds > 0
               and self.clock() - self.last_save >= self.interval_seconds)
        flags = torch.tensor([float(self.received is not None), float(due)], device=device())
        if self.received is None:
            dist.all_reduce(flags)
        else:
            self._agree(flags)
        self.stopping = bool(flags[0].item())
        return self.stopping, bool(flags[1].item())

    def _agree(self, flags: torch.Tensor) -> None:
        """The all-reduce of a signalled rank, bounded by ``timeout``."""
        work = dist.all_reduce(flags, async_op=True)
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as err:  # gloo and NCCL alike: with a timeout, wait() blocks the CPU and raises on expiry
            raise GroupLost(f"signal {self.received} arrived but the other ranks did not answer within "
                            f"{self.timeout.total_seconds():.0f} s ({' '.join(str(err).split())[:200]}): "
                            "leaving without a checkpoint", self.received) from err


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients for parameters whose name matches a glob in ``patterns`` (before the DDP wrap, so they
    get no gradient buffer and no optimizer state); returns the frozen names. A pattern matching nothing is a
    typo, not a no-op."""
    if not patterns:
        return []
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"train.frozen_parameters: {pattern!r} matches no parameter of the model "
                              f"(names look like {names[0]!r})")
    frozen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if len(frozen) == len(names):
        raise ConfigError("train.frozen_parameters freezes every parameter: nothing would train")
    _check_whole_layer_stacks(names, set(frozen))
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


def _check_whole_layer_stacks(names: list[str], frozen: set[str]) -> None:
    """megatron's sharded checkpoints stack a parameter over the layers (``decoder.layers.<i>.x`` -> one tensor
    ``x`` of [layers, ...]); optimizer state for some layers only would be a tensor with holes, which
    dist_checkpointing refuses at save time. So a parameter is frozen in every layer or in none."""
    stacks: dict[str, set[bool]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            stacks.setdefault(match.group(1) + match.group(2), set()).add(name in frozen)
    partial = sorted(stack for stack, states in stacks.items() if len(states) == 2)
    if partial:
        raise ConfigError(f"train.frozen_parameters freezes {partial[0]} in some layers only: freeze a parameter in "
                          "every layer or in none (megatron checkpoints store it as one tensor over the layers)")


@dataclass
class TrainingRun:
    """One stage's training of ``model``; ``run`` returns what the stage's manifest records. ``clock`` measures
    ``save_interval_minutes`` (tests inject one)."""

    model: torch.nn.Module
    model_config: MistralConfig
    train: TrainSettings
    optimizer: OptimizerSettings
    out_dir: Path
    tokenizer_dir: Path | None = None
    name: str = "train"
    facts: RunFacts = field(default_factory=RunFacts)
    clock: Clock = time.monotonic

    def run(self, step_fn: StepFunction, data: DataStream, evaluate: Evaluate, cursor_start: Cursor) -> dict:
        frozen = freeze_parameters(self.model, list(self.train.frozen_parameters))
        if frozen:
            logger.info("%s: %d parameter tensors frozen (%s)", self.name, len(frozen),
                        ", ".join(self.train.frozen_parameters))
        total_steps = self.train.steps
        ddp, distributed = wrap_for_training(self.model)
        optimizer, scheduler = build_optimizer(ddp, self.optimizer, total_steps, distributed)
        checkpoints = Path(self.out_dir) / "checkpoints"
        fingerprint = run_fingerprint(self.train, self.optimizer, cursor_start, self.facts.fingerprint)
        history: list[dict] = []
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if dist.get_rank() == 0:  # this run answers an earlier requeue
            (Path(self.out_dir) / REQUEUE_MARKER).unlink(missing_ok=True)

        step, cursor, nonfinite_in_a_row = 0, cursor_start, 0
        resume_from = intact_checkpoint(checkpoints)  # the newest one whose files match their record
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, optimizer)
            changes = resume_changes(state.get("fingerprint", {}), fingerprint, resume_from, state["step"],
                                     self.facts.resume_with_changes)
            history = list(state.get("history", []))
            if changes:
                history.append({"step": state["step"], "changes": {k: list(v) for k, v in changes.items()}})
                _apply_settings(optimizer, scheduler, settings)
            scheduler.load_state_dict(state["scheduler"])
            step, cursor = state["step"], Cursor.from_dict(state["cursor"])
            nonfinite_in_a_row = state["nonfinite_in_a_row"]
            logger.info("%s: resumed from %s (step %d/%d, %d tokens read)", self.name, resume_from, step, total_steps,
                        cursor.tokens())

        log = MetricsLog(self.out_dir, step, total_steps, self.train.tokens_per_step, self.name)

        def evaluate_at(at_step: int) -> dict:
            result = evaluate()
            log.record(at_step, "eval", result)
            logger.info("%s eval @ step %d: %s", self.name, at_step,
                        " | ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
            return result

        checkpoint_size = checkpoint_bytes(self.model_config, self.train.precision, self.tokenizer_dir)

        def save(at_step: int) -> None:
            _check_finite_parameters(self.model)
            with space_for_checkpoint(checkpoints, checkpoint_size):
                save_checkpoint(checkpoints, at_step, self.model, optimizer, self.model_config,
                                {"cursor": cursor.to_dict(), "cursor_start": cursor_start.to_dict(),
                                 "scheduler": scheduler.state_dict(), "nonfinite_in_a_row": nonfinite_in_a_row,
                                 "fingerprint": fingerprint, "history": history},
                                self.tokenizer_dir, self.train.keep_last)

        last_eval = evaluate_at(0) if step == 0 else log.last("eval", step)
        with SaveTriggers(self.train.save_interval_minutes, self.clock) as triggers:
            while step < total_steps:
                *batch, next_cursor = data.next_rows(cursor, self.train.global_batch_size, self.train.seq_len)
                ddp.train()
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                loss = step_fn(ddp, tuple(batch))
                finite = _all_finite(self.model, loss)
                if finite:
                    _, grad_norm, _ = optimizer.step()
                    scheduler.step(increment=1)
                    nonfinite_in_a_row = 0
                else:
                    nonfinite_in_a_row += 1
                    grad_norm = float("nan")
                    logger.warning("%s step %d: non-finite loss or gradient, step skipped (%d in a row, limit %d)",
                                   self.name, step + 1, nonfinite_in_a_row, self.train.max_nonfinite_steps)
                    if nonfinite_in_a_row >= self.train.max_nonfinite_steps:
                        last_good = latest_checkpoint(checkpoints)
                        raise NonFiniteLossError(
                            f"{self.name}: {nonfinite_in_a_row} steps in a row with a NaN/inf loss or gradient at step "
                            f"{step + 1}; nothing was saved from them. Lower optimizer.lr or check the data; "
                            + (f"the last good checkpoint is {last_good}" if last_good else
                               "no checkpoint was written yet (the stage's input model is unchanged)"))
                cursor, step = next_cursor, step + 1
                values = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
                          "tokens_read": cursor.tokens() - cursor_start.tokens()}
                log.record(step, "train", values)
                if step % self.train.log_interval == 0 or step == total_steps:
                    log.progress(step, {k: values[k] for k in ("loss", "lr", "grad_norm")})
                if step == total_steps or (self.train.eval_interval and step % self.train.eval_interval == 0):
                    last_eval = evaluate_at(step)
                stop, due = self._decide(triggers, log) if step < total_steps else (False, False)
                if step == total_steps or stop or (finite and (due or (self.train.save_interval
                                                                       and step % self.train.save_interval == 0))):
                    save(step)
                    triggers.saved()
                if stop:
                    log.close()
                    self._requeue(step, triggers.received, latest_checkpoint(checkpoints))
        log.close()
        if last_eval is None:  # resumed after a checkpoint that had no evaluation logged with it
            last_eval = evaluate_at(step)
        return {"steps": total_steps, "cursor_start": cursor_start.to_dict(), "cursor_end": cursor.to_dict(),
                "tokens": cursor.tokens() - cursor_start.tokens(), "eval": last_eval,
                "checkpoint": str(latest_checkpoint(checkpoints)), "fingerprint": fingerprint, "history": history}

    def _decide(self, triggers: SaveTriggers, log: MetricsLog) -> tuple[bool, bool]:
        """``triggers.decide()``; on a lost group this process leaves at once with the signal's exit code: raising
        would reach ``destroy_process_group``, which waits for the missing peer."""
        try:
            return triggers.decide()
        except GroupLost as lost:
            logger.error("%s: %s", self.name, lost)
            log.close()
            logging.shutdown()
            os._exit(lost.exit_code)

    def _requeue(self, step: int, signum: int | None, checkpoint: Path | None) -> NoReturn:
        """After the signal's save: the marker the job script reads (rank 0), then ``Preempted`` on every rank."""
        received = signal.Signals(signum).name if signum is not None else "a signal on another rank"
        if dist.get_rank() == 0:
            write_json_atomic(Path(self.out_dir) / REQUEUE_MARKER, {"stage": self.name, "step": step,
                                                                    "signal": received, "checkpoint": str(checkpoint)})
        dist.barrier()  # no rank exits (torchrun would then SIGTERM the rest) before the marker is written
        raise Preempted(f"{self.name}: {received} at step {step}/{self.train.steps}; checkpoint {checkpoint} "
                        "written, run the same command to continue")


def _apply_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """Resuming with changed settings: the schedule takes this run's values (and the checkpoint's step count)
    instead of the checkpoint's, and the optimizer's parameter groups (max/min lr, betas, eps, restored from the
    checkpoint) get back this run's ``settings``, as built before the load."""
    scheduler.override_opt_param_scheduler = True
    for group, fresh in zip(optimizer.param_groups, settings, strict=True):
        group.update(fresh)


def _all_finite(model: torch.nn.Module, loss: float) -> bool:
    """The loss and every rank's gradients are finite (all ranks agree, so all skip or all step)."""
    grads_finite = all(bool(torch.isfinite(p.main_grad).all()) for p in model.parameters() if p.requires_grad)
    bad = torch.tensor([0.0 if grads_finite else 1.0], device=device())
    dist.all_reduce(bad)
    return bool(bad.item() == 0) and bool(torch.isfinite(torch.tensor(loss)))


def _check_finite_parameters(model: torch.nn.Module) -> None:
    """Raise on every rank (never a hang at the next barrier) if any rank holds a NaN/inf weight."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    flag = torch.tensor([float(len(bad))], device=device())
    dist.all_reduce(flag)
    if flag.item():
        raise NonFiniteLossError("refusing to save a checkpoint with non-finite weights "
                                 f"({', '.join(bad[:5]) or 'on another rank'})")
