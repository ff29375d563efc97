"""Every branch of `slurm/cascade.sbatch`'s stage loop, in seconds: the committed script run by bash with the fake
`srun` / `scontrol` of tests/fake_slurm first on PATH, as in the slow rehearsal (tests/test_slurm_rehearsal.py),
but with a stand-in plan whose steps are small shell scripts instead of torchrun.

The stand-in is the image's `python` (FAKE_SLURM_IMAGE_BIN, first on the fake container's PATH): it answers the
two planning calls the script makes in the container (`-m recipes.plan --container-flags` / `--commands`) with
fixed lines, so the script's own code — the planning steps through srun, the signal traps, the marker clean-up,
the wait loop, the requeue — runs unchanged. Each step records that it ran (and whether it found a requeue marker
at its start) and then exits 0, exits with a code, leaves the trainer's marker, or waits for a signal and answers
it the way the trainer does (marker + REQUEUE_EXIT_CODE).
"""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nemo_plugins.train.loop import REQUEUE_EXIT_CODE, REQUEUE_MARKER

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "cascade.sbatch"
FAKE_SLURM = REPO / "tests" / "fake_slurm"
JOB_ID = "777"
STAGES = ("one", "two", "three")
USER_ARGS = ("cascade=ministral3", "model.source=hf:/data/parent")
WAIT_S = 20  # the most any step or job may take here; they take well under a second

PLANNER = """#!/bin/sh
# the image's python, as far as slurm/cascade.sbatch asks it anything: the plan, from fixed files
echo "$*" >> "$STAND_IN_DIR/planner.log"
case "$1 $2 $3" in
  "-m recipes.plan --container-flags") cat "$STAND_IN_DIR/flags";;
  "-m recipes.plan --commands") cat "$STAND_IN_DIR/plan";;
  *) echo "stand-in python: unexpected '$*'" >&2; exit 127;;
esac
"""
FLAGS = ["--container-image=cascade:branches", "--container-workdir=/workspace/cascade", "--no-container-mount-home"]

RECORD = f"""#!/bin/bash
set -u
STAGE_DIR=$1  # the stage's output directory on the host; STAND_IN_DIR comes with srun's --export=ALL
echo "$(basename "$STAGE_DIR")$([ -e "$STAGE_DIR/{REQUEUE_MARKER}" ] && echo ' found-marker')" \
  >> "$STAND_IN_DIR/ran.log"
mkdir -p "$STAGE_DIR"
"""
BEHAVIOUR = {
    "ok": "exit 0\n",
    "fail": "exit 3\n",
    "requeue_code": f"exit {REQUEUE_EXIT_CODE}\n",
    # torchrun's view of a trainer that saved and stopped: its own exit 1, the marker left by rank 0
    "marker_then_1": f'echo saved > "$STAGE_DIR/{REQUEUE_MARKER}"\nexit 1\n',
    # the trainer on a forwarded signal: finish, save, marker (naming the signal here), REQUEUE_EXIT_CODE
    "await_signal": f"""sleep {WAIT_S} & SLEEPER=$!
on() {{ kill $SLEEPER; echo "$1" > "$STAGE_DIR/{REQUEUE_MARKER}"; exit {REQUEUE_EXIT_CODE}; }}
trap 'on USR1' USR1
trap 'on TERM' TERM
touch "$STAGE_DIR/ready"
wait $SLEEPER
exit 9
""",
    # a signal that reaches the step but is not answered with a save: the step ends with 1, no marker
    "signal_then_1": f"""sleep {WAIT_S} & SLEEPER=$!
trap 'kill $SLEEPER; exit 1' USR1 TERM
touch "$STAGE_DIR/ready"
wait $SLEEPER
exit 9
""",
    # a step that notes the signal, does not save on it, and finishes normally once the test lets it
    "ignore_signal": f"""trap 'echo "$STAGE_DIR" >> "$STAND_IN_DIR/ignored.log"' USR1 TERM
touch "$STAGE_DIR/ready"
for _ in $(seq {WAIT_S * 10}); do [ -e "$STAGE_DIR/release" ] && exit 0; sleep 0.1; done
exit 9
""",
}


class Job:
    """A temp directory playing one job: the stand-in plan and its step scripts, the run's host output directory,
    the fake Slurm's records; `start` runs the committed script as Slurm's batch shell would."""

    def __init__(self, root: Path, behaviours: dict[str, str]):
        self.root = root
        self.image_bin, self.stand_in, self.steps = root / "image_bin", root / "stand_in", root / "steps"
        self.output, self.slurm, self.container = root / "runs" / "demo", root / "slurm", root / "container"
        for d in (self.image_bin, self.stand_in, self.steps, self.output, self.slurm, self.container):
            d.mkdir(parents=True)
        self.ran = self.stand_in / "ran.log"
        self.ignored = self.stand_in / "ignored.log"
        _executable(self.image_bin / "python", PLANNER)
        (self.stand_in / "flags").write_text("\n".join(FLAGS) + "\n")
        self.commands = []
        for stage in STAGES:
            script = self.steps / f"{stage}.sh"
            _executable(script, RECORD + BEHAVIOUR[behaviours.get(stage, "ok")])
            self.commands.append(shlex.join(["srun", "--nodes=1", "--ntasks=1", "bash", str(script),
                                             str(self.stage_dir(stage))]))
        table = ["# stage  layout  memory", *(f"# a/{stage}  TP=1 PP=1 CP=1 DP=1  1.0 GiB/GPU" for stage in STAGES)]
        rows = [f"a/{stage}\t{self.output}\t{command}" for stage, command in zip(STAGES, self.commands)]
        (self.stand_in / "plan").write_text("\n".join(table + rows) + "\n")
        self.log = root / "job.log"
        self.process: subprocess.Popen | None = None

    def stage_dir(self, stage: str) -> Path:
        return self.output / "a" / stage

    def environment(self, in_job: bool = True, path_first: Path | None = None) -> dict[str, str]:
        env = {"PATH": ":".join(str(p) for p in (path_first, FAKE_SLURM, "/usr/bin", "/bin") if p),
               "HOME": str(self.root), "STAND_IN_DIR": str(self.stand_in), "FAKE_SLURM_ROOT": str(self.slurm),
               "FAKE_SLURM_CONTAINER": str(self.container), "FAKE_SLURM_IMAGE_BIN": str(self.image_bin)}
        if in_job:
            env.update(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="cascade", SLURM_JOB_NODELIST="node[01-02]",
                       SLURM_JOB_NUM_NODES="2", CASCADE_IMAGE="cascade:branches")
        return env

    def start(self, *flags: str, **environment) -> subprocess.Popen:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(["bash", str(SCRIPT), *flags, *USER_ARGS], cwd=self.root,
                                            env=self.environment(**environment), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self.process

    def run(self, *flags: str, **environment) -> int:
        return self.start(*flags, **environment).wait(timeout=WAIT_S)

    def wait_for(self, what: Path, text: str | None = None) -> None:
        deadline = time.monotonic() + WAIT_S
        while not (what.exists() and (text is None or text in what.read_text())):
            assert self.process.poll() is None, f"the job ended before {what} showed {text!r}:\n{self.output_text()}"
            assert time.monotonic() < deadline, f"{what} never showed {text!r}:\n{self.output_text()}"
            time.sleep(0.02)

    def stop(self) -> None:
        """The job's whole session (srun, steps, their sleeps), should a test have failed with any of it running."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def output_text(self) -> str:
        return self.log.read_text()

    def ran_steps(self) -> list[str]:
        return self.ran.read_text().splitlines() if self.ran.exists() else []

    def requeues(self) -> list[str]:
        record = self.slurm / "scontrol.log"
        return record.read_text().splitlines() if record.exists() else []

    def markers(self) -> list[Path]:
        return sorted(self.output.glob(f"*/*/{REQUEUE_MARKER}"))


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def job(tmp_path):
    jobs = []

    def make(**behaviours: str) -> Job:
        jobs.append(Job(tmp_path / f"job{len(jobs)}", behaviours))
        return jobs[-1]

    yield make
    for made in jobs:
        made.stop()


def test_steps_that_exit_0_run_every_stage_in_order_and_the_plan_is_made_in_the_container(job):
    j = job()
    assert j.run() == 0, j.output_text()
    assert j.ran_steps() == list(STAGES)
    assert j.requeues() == []
    text = j.output_text()
    assert "a/two  TP=1 PP=1 CP=1 DP=1  1.0 GiB/GPU" in text, "the plan's table is printed without its '# '"
    for stage, command in zip(STAGES, j.commands):
        assert f"=== a/{stage}: {command}" in text
    planned = (j.stand_in / "planner.log").read_text().splitlines()
    assert planned == [" ".join(["-m recipes.plan --container-flags", *USER_ARGS]),
                       " ".join(["-m recipes.plan --commands", *USER_ARGS])]


def test_a_step_exiting_with_the_requeue_code_requeues_the_job_which_exits_0_and_runs_no_later_stage(job):
    j = job(two="requeue_code")
    assert j.run() == 0, j.output_text()
    assert j.ran_steps() == ["one", "two"]
    assert j.requeues() == [f"requeue {JOB_ID}"]
    assert f"every rank saved its state and stopped (exit {REQUEUE_EXIT_CODE})" in j.output_text()


def test_a_step_exiting_1_with_the_stages_marker_is_a_requeue(job):
    j = job(two="marker_then_1")
    assert j.run() == 0, j.output_text()
    assert j.ran_steps() == ["one", "two"]
    assert j.requeues() == [f"requeue {JOB_ID}"]
    assert "every rank saved its state and stopped (exit 1)" in j.output_text()
    assert j.markers() == [j.stage_dir("two") / REQUEUE_MARKER], "the marker is the rerun's to answer"


def test_a_plain_failure_fails_the_job_with_its_code_and_is_not_requeued(job):
    j = job(two="fail")
    assert j.run() == 3, j.output_text()
    assert j.ran_steps() == ["one", "two"]
    assert j.requeues() == []
    assert "=== a/two failed with exit code 3" in j.output_text()


def test_a_stale_marker_from_an_earlier_run_is_deleted_before_the_step_and_causes_no_requeue(job):
    j = job(two="fail")
    for stage in ("one", "two"):
        j.stage_dir(stage).mkdir(parents=True)
        (j.stage_dir(stage) / REQUEUE_MARKER).write_text('{"step": 1}\n')
    assert j.run() == 3, j.output_text()
    assert j.ran_steps() == ["one", "two"], "no step may find a marker from an earlier run at its start"
    assert j.requeues() == []
    assert j.markers() == []


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_while_a_step_runs_is_forwarded_to_it_and_its_save_requeues_the_job(job, sig):
    j = job(two="await_signal")
    j.start()
    j.wait_for(j.stage_dir("two") / "ready")
    j.process.send_signal(sig)  # `--signal=B:USR1@300` / preemption: to the batch shell only
    assert j.process.wait(timeout=WAIT_S) == 0, j.output_text()
    assert (j.stage_dir("two") / REQUEUE_MARKER).read_text().strip() == sig.name[3:], "the step got the same signal"
    assert j.ran_steps() == ["one", "two"]
    assert j.requeues() == [f"requeue {JOB_ID}"]
    saved = f"every rank saved its state and stopped (exit {REQUEUE_EXIT_CODE} after SIG{sig.name[3:]})"
    assert saved in j.output_text(), "the script waits for the step to end after forwarding the signal"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_during_a_step_that_then_finishes_lets_no_later_step_start_and_requeues(job, sig):
    j = job(two="ignore_signal")
    j.start()
    j.wait_for(j.stage_dir("two") / "ready")
    j.process.send_signal(sig)
    j.wait_for(j.ignored, str(j.stage_dir("two")))  # forwarded: the step saw it, and goes on to finish with 0
    (j.stage_dir("two") / "release").touch()
    assert j.process.wait(timeout=WAIT_S) == 0, j.output_text()
    assert j.ran_steps() == ["one", "two"], "the signal came before stage three: it must not start"
    assert j.requeues() == [f"requeue {JOB_ID}"]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_between_steps_starts_no_further_step_and_requeues(job, sig):
    """The signal lands while the batch shell clears stage two's markers (its `find`, which sends it), after stage
    one ended and before stage two starts: no step is there to forward it to, so stage two must not start (it would
    run unwarned into the time limit)."""
    j = job()
    clearing = j.root / "signalling_find"
    clearing.mkdir()
    _executable(clearing / "find", f"""#!/bin/sh
case " $* " in *" -delete "*)
  echo cleared >> "{j.stand_in}/clearings"
  [ "$(wc -l < "{j.stand_in}/clearings")" -eq 2 ] && kill -{sig.name[3:]} $PPID;;  # the batch shell
esac
exec {shutil.which("find")} "$@"
""")
    assert j.run(path_first=clearing) == 0, j.output_text()
    assert f"SIG{sig.name[3:]} received" in j.output_text()
    assert j.ran_steps() == ["one"], "a step started after the signal: nothing would ever warn it"
    assert j.requeues() == [f"requeue {JOB_ID}"]


def test_a_step_that_ends_non_zero_after_a_signal_without_a_save_is_still_requeued(job):
    j = job(two="signal_then_1")
    j.start()
    j.wait_for(j.stage_dir("two") / "ready")
    j.process.send_signal(signal.SIGUSR1)
    assert j.process.wait(timeout=WAIT_S) == 0, j.output_text()
    assert "=== a/two: ended with exit 1 after SIGUSR1 without confirming a save" in j.output_text()
    assert j.ran_steps() == ["one", "two"]
    assert j.requeues() == [f"requeue {JOB_ID}"]


def test_a_refused_requeue_fails_the_job_with_1_and_says_how_to_resume(job):
    j = job(one="requeue_code")
    refusing = j.root / "refusing_scontrol"
    refusing.mkdir()
    _executable(refusing / "scontrol", f"""#!/bin/sh
if [ "$1" = requeue ]; then echo "scontrol: error: Requested operation is presently disabled" >&2; exit 1; fi
exec {FAKE_SLURM / "scontrol"} "$@"
""")
    assert j.run(path_first=refusing) == 1, j.output_text()
    assert "Slurm refused the requeue: submit the same command again to resume" in j.output_text()
    assert j.ran_steps() == ["one"]


def test_dry_run_prints_the_plan_and_every_command_and_runs_nothing(job):
    j = job()
    with open(j.log, "w") as log:
        done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *USER_ARGS], cwd=j.root, stdout=log,
                              stderr=subprocess.STDOUT, timeout=WAIT_S,
                              env={**j.environment(in_job=False), "PYTHON": str(j.image_bin / "python")})
    assert done.returncode == 0, j.output_text()
    lines = j.output_text().splitlines()
    assert lines == ["stage  layout  memory", *(f"a/{s}  TP=1 PP=1 CP=1 DP=1  1.0 GiB/GPU" for s in STAGES),
                     *j.commands]
    assert j.ran_steps() == [] and j.requeues() == []
    assert (j.stand_in / "planner.log").read_text().split() == ["-m", "recipes.plan", "--commands", *USER_ARGS]


def test_outside_a_job_without_dry_run_the_script_refuses_and_runs_nothing(job):
    j = job()
    assert j.run(in_job=False) == 2
    assert "not inside a Slurm job" in j.output_text()
    assert j.ran_steps() == [] and not (j.stand_in / "planner.log").exists()

