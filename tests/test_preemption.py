"""Preemption that makes progress: time-based saves, and SIGUSR1 / SIGTERM making every rank finish its step, save,
write the requeue marker and exit with REQUEUE_EXIT_CODE, after which the same command continues the trajectory.

The clock of ``save_interval_minutes`` is injected (each step "takes" one minute), never measured. The 2-process
cases run on gloo: the save decision is rank 0's whatever the other clocks say, a signal on one rank stops every
rank, and a signalled rank whose peer never answers gives up within the timeout instead of hanging.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_plugins.data.mix import Cursor
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.builder import build_model
from nemo_plugins.train.checkpoint import complete_checkpoints, latest_checkpoint
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.loop import REQUEUE_EXIT_CODE, REQUEUE_MARKER, GroupLost, SaveTriggers, TrainingRun
from nemo_plugins.train.metrics import MetricsLog
from tests import distributed_worker
from tests.conftest import save_tiny_teacher_and_student, tiny_config
from tests.recipe_runs import interrupt_after_step, recipe_env, train_records
from tests.test_distill_recipe import STEPS, _command


class StepClock:
    """A wall clock that only moves when a training step runs: one minute per step."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self, ddp, batch) -> float:
        self.now += 60.0
        return 1.0


def _saved_steps(minutes: float, every: int, tmp_path: Path, mix) -> list[int]:
    clock = StepClock()
    config = tiny_config()
    settings = TrainSettings(seq_len=16, micro_batch_size=2, global_batch_size=2, train_tokens=8 * 32,
                             save_interval=every, save_interval_minutes=minutes, keep_last=100)
    out = tmp_path / f"run_{minutes}_{every}"
    TrainingRun(build_model(config, ParallelConfig()), config, settings, OptimizerSettings(), out,
                clock=clock).run(clock.step, mix, lambda: {"held_out": 0.0}, Cursor())
    return [int(path.name.split("_")[1]) for path in complete_checkpoints(out / "checkpoints")]


def test_save_interval_minutes_saves_when_that_much_time_passed_since_the_last_save(tmp_path, mix):
    assert _saved_steps(0.0, 0, tmp_path, mix) == [8]
    assert _saved_steps(2.5, 0, tmp_path, mix) == [3, 6, 8]
    # a step-based save restarts the wall-time interval: 3 (time), 4 (step), 7 (time: 3 min after 4), 8
    assert _saved_steps(2.5, 4, tmp_path, mix) == [3, 4, 7, 8]


def test_save_interval_minutes_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.save_interval_minutes"):
        TrainSettings(save_interval_minutes=-1)


# ----------------------------------------------------------------------------- two ranks, one decision

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agreement_worker(out_dir: str) -> None:
    """Every case of the save decision on 2 gloo ranks; each rank writes what it decided."""
    initialize(ParallelConfig())
    rank = dist.get_rank()
    decided = {}
    for due_on in (0, 1):  # that rank's clock says two minutes have passed since the last save, the other's says none
        clock = iter([0.0, 120.0]).__next__ if rank == due_on else (lambda: 0.0)
        with SaveTriggers(1.0, clock=clock) as triggers:
            decided[f"rank{due_on}_clock_due"] = triggers.decide()
    with SaveTriggers(0.0, timeout=timedelta(seconds=1)) as triggers:
        if rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
            try:
                triggers.decide()
                decided["peer_silent"] = "decided"
            except GroupLost as lost:
                decided["peer_silent"] = lost.exit_code
        else:
            time.sleep(5)  # never answers in time; then drains the pending all-reduce so both ranks can shut down
            triggers.decide()
    with SaveTriggers(0.0) as triggers:  # last: after a stop the signals stay ignored
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        decided["sigterm_on_rank1"] = triggers.decide()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(decided))


@pytest.mark.distributed
def test_ranks_take_rank_0s_clock_stop_together_and_a_silent_peer_is_not_waited_for(tmp_path):
    mp.spawn(distributed_worker.run, args=(2, _port(), agreement_worker, (str(tmp_path),)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for decided in (zero, one):
        assert decided["rank0_clock_due"] == [False, True]
        assert decided["rank1_clock_due"] == [False, False], "only rank 0's clock decides"
        assert decided["sigterm_on_rank1"] == [True, False], "a signal on one rank stops every rank"
    assert zero["peer_silent"] == 128 + signal.SIGUSR1, "the signalled rank must give up, not wait for its peer"


# ----------------------------------------------------------------------------- the recipe, signalled

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    save_tiny_teacher_and_student(root)
    return root


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """The uninterrupted run every signalled one must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_command(checkpoints, out), check=True, env=recipe_env(), capture_output=True)
    return out


def _check_requeue(out: Path, stopped_at: int, name: str) -> None:
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and saved.name == f"step_{stopped_at:08d}", \
        "the signal must save the step it interrupted (not only the periodic saves)"
    marker = json.loads((out / REQUEUE_MARKER).read_text())
    assert marker["step"] == stopped_at and marker["signal"] == name and marker["checkpoint"] == str(saved)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_for_requeue_and_the_rerun_continues_bit_identically(
        checkpoints, reference, tmp_path):
    """SIGTERM as torchrun forwards it (SIGUSR1, the same path, is tested in test_distill_recipe.py)."""
    out = tmp_path / "preempted"
    code, stderr = interrupt_after_step(_command(checkpoints, out), out, 3, signal.SIGTERM)
    assert code == REQUEUE_EXIT_CODE, stderr[-2000:]
    stopped_at = len(train_records(out))
    assert 3 <= stopped_at < STEPS
    _check_requeue(out, stopped_at, "SIGTERM")
    subprocess.run(_command(checkpoints, out), check=True, env=recipe_env(), capture_output=True)
    assert not (out / REQUEUE_MARKER).exists(), "the rerun answers the requeue: its marker must go"
    assert train_records(out) == train_records(reference)
    assert MetricsLog.read(out / "metrics.jsonl")[-1] == MetricsLog.read(reference / "metrics.jsonl")[-1]


def _worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's workers (children of the launcher process)."""
    found = {}
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
            if rank:
                found[int(rank[0])] = int(pid)
    return found


def _torchrun(command: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *command[1:]]


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_on_one_torchrun_worker_makes_both_save_exit_75_and_write_the_requeue_marker(checkpoints, tmp_path):
    """Resuming the checkpoint is the single-process test's business; here: the other rank joins the save."""
    out = tmp_path / "preempted"
    log = tmp_path / "torchrun.log"
    with open(log, "w") as output:
        launcher = subprocess.Popen(_torchrun(_command(checkpoints, out)), env=recipe_env(), stdout=output,
                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while len(train_records(out)) < 2 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(_worker_pids(launcher)[1], signal.SIGTERM)  # rank 1 only: rank 0 hears of it from the agreement
        code = launcher.wait(timeout=300)
    text = log.read_text()
    assert code == 1, "torchrun reports a worker's non-zero code as 1: the marker is what says requeue"
    assert text.count(f"exitcode  : {REQUEUE_EXIT_CODE}") == 2, text[-3000:]
    stopped_at = len(train_records(out))
    assert 2 <= stopped_at < STEPS
    _check_requeue(out, stopped_at, "a signal on another rank")
