"""A local rehearsal of the exact Slurm job: `slurm/cascade.sbatch` as committed, run by bash the way Slurm runs a
batch script, with the fake `srun` / `scontrol` of tests/fake_slurm first on PATH: two "nodes" of one CPU process
each, gloo, a tiny parent on the data mount, the base cascade of one child (prune, distill_short, distill_long,
export, report). Then USR1 to the batch shell mid-stage, and the rerun Slurm would make.

What it would catch (issue 12's list): a log directory Slurm does not create (the log is opened from `#SBATCH
--output` relative to the submit directory, a copy of the committed slurm/); the plan run on the host (the batch
host's PATH has no python of ours: tests/fake_slurm/python fails); an output_dir relative to the container's
workdir, or any write off the mounts (the fake container is a directory of links: files left in it would be lost,
and on several nodes scattered over their disks); mounts that do not exist; a USR1 that never reaches the
trainer or a trainer that does not save on it (the stage's only checkpoint must be the signal's, with the requeue
recorded by the fake scontrol); a rerun that does not resume bit-identically (the stage's metrics equal an
uninterrupted run of its logged step command).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_plugins.convert import hf_io
from nemo_plugins.convert.sources import ModelSource, hf_dir
from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.train.metrics import MetricsLog
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state

REPO = Path(__file__).resolve().parents[1]
FAKE_SLURM = REPO / "tests" / "fake_slurm"
JOB_ID = "4242"
SHORT_STEPS = 6

TINY = [  # one child, the base cascade (prune -> distill_short -> distill_long, export, report), tiny budgets
    "model.architecture=null", "model.source=hf:/data/parent", "posttrain=false",
    "data.sources=[{name: json, paths: ['stdlib:json'], weight: 1.0}]",
    "cascade.children=[{name: a, num_layers: 3, hidden_size: 40, ffn_hidden_size: 80, tie_embeddings: true}]",
    "stage.prune.calibration.tokens=256", "stage.prune.calibration.seq_len=64",
    "stage.prune.eval.seq_len=64", "stage.prune.eval.max_windows=2",
    "stage.distill_short.train.seq_len=64", f"stage.distill_short.train.train_tokens={SHORT_STEPS * 128}",
    "stage.distill_short.train.global_batch_size=2", "stage.distill_short.train.micro_batch_size=1",
    "stage.distill_short.train.save_interval=1000", "stage.distill_short.optimizer.lr=3e-3",
    "stage.distill_long.train.seq_len=128", "stage.distill_long.train.train_tokens=256",
    "stage.distill_long.train.global_batch_size=2",
    "stage.distill_long.context.original_context=64", "stage.distill_long.context.yarn_factor=2.0",
    "stage.distill_long.long_eval.windows=2", "stage.distill_long.long_eval.passkey_lengths=[64,128]",
    "stage.distill_long.long_eval.paths=['stdlib:json']", "report.sample_tokens=4",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A temp directory playing the cluster: the user's checkout (submit dir), the shared host directories, the
    fake Slurm's record of scontrol calls; and the directory playing the image's container (the same for two
    clusters of one test, so that their processes see the same paths, as from the same image)."""

    def __init__(self, root: Path, parent_files: Path, container: Path):
        self.root, self.container = root, container
        self.submit = root / "checkout"
        for tracked in subprocess.run(["git", "ls-files", "slurm"], cwd=REPO, capture_output=True, text=True,
                                      check=True).stdout.split():
            (self.submit / tracked).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / tracked, self.submit / tracked)
        self.runs, self.cache, self.data, self.slurm = (root / "lustre" / d for d in ("runs", "cache", "data", "slurm"))
        for d in (self.runs, self.cache, self.data, self.slurm, root / "home"):
            d.mkdir(parents=True)
        shutil.copytree(parent_files, self.data / "parent")
        self.port = _free_port()

    def overrides(self) -> list[str]:
        return ["cluster=slurm_h100", "cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.shutdown_timeout_s=120",
                f"cluster.host_runs_dir={self.runs}", f"cluster.host_cache_dir={self.cache}",
                f"cluster.mounts=[{self.data}:/data:ro]", f"cluster.rdzv_port={self.port}", *TINY]

    def submit_job(self) -> subprocess.Popen:
        """`sbatch slurm/cascade.sbatch ...` as Slurm runs it: the log is opened where `#SBATCH --output` says,
        relative to the submit directory, and must be in a directory that exists."""
        script = self.submit / "slurm" / "cascade.sbatch"
        output = re.search(r"^#SBATCH --output=(\S+)", script.read_text(), re.M).group(1)
        log = self.submit / output.replace("%x", "cascade").replace("%j", JOB_ID)
        assert log.parent.is_dir(), f"Slurm does not create {log.parent}: the job would die without a log"
        self.log = log
        with open(log, "a") as out:
            return subprocess.Popen(["bash", str(script), *self.overrides()], cwd=self.submit, env=self.environment(),
                                    stdout=out, stderr=subprocess.STDOUT)

    def environment(self) -> dict[str, str]:
        """What a batch script finds: Slurm's variables, the host's PATH (fake srun / scontrol, no python of ours)."""
        return {"PATH": f"{FAKE_SLURM}:/usr/bin:/bin", "HOME": str(self.root / "home"), "SLURM_JOB_ID": JOB_ID,
                "SLURM_JOB_NAME": "cascade", "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_NUM_NODES": "2",
                "SLURM_SUBMIT_DIR": str(self.submit), "CASCADE_IMAGE": "cascade:rehearsal",
                "FAKE_SLURM_ROOT": str(self.slurm), "FAKE_SLURM_CONTAINER": str(self.container),
                "FAKE_SLURM_IMAGE_BIN": str(Path(sys.executable).parent),
                "OMP_NUM_THREADS": "1"}

    def requeues(self) -> list[str]:
        record = self.slurm / "scontrol.log"
        return record.read_text().splitlines() if record.exists() else []

    def leaked(self) -> list[str]:
        """Files written inside the fake container (not through a mount): on a cluster, lost with the container
        and, on several nodes, scattered over their local disks."""
        return [os.path.join(d, f) for d, _, files in os.walk(self.container) for f in files
                if not os.path.islink(os.path.join(d, f))]


def _train_steps(stage_dir: Path) -> int:
    return sum(r["kind"] == "train" for r in MetricsLog.read(stage_dir / "metrics.jsonl"))


@pytest.fixture(scope="module")
def parent_files(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=49_152, tie_embeddings=True, num_layers=4)
    return hf_io.write_model_dir(hf_state(hf_model(config)), config, tmp_path_factory.mktemp("parent") / "hf",
                                 extra_files=tokenizer_files(hf_dir(ModelSource.parse("embedded:smollm2"))))


@pytest.mark.slow
@pytest.mark.distributed
def test_the_sbatch_script_runs_the_cascade_requeues_on_usr1_and_resumes_bit_identically(parent_files, tmp_path):
    assert not Path("/workspace").exists(), "a leftover /workspace on this machine would hide container-path leaks"
    cluster = Cluster(tmp_path / "job", parent_files, tmp_path / "container")
    out = cluster.runs / "demo"
    short = out / "a" / "distill_short"
    job = cluster.submit_job()
    deadline = time.monotonic() + 900
    while job.poll() is None and time.monotonic() < deadline and _train_steps(short) < 2:
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` does: to the batch shell only
    assert job.wait(timeout=600) == 0, cluster.log.read_text()[-4000:]
    log = cluster.log.read_text()
    assert cluster.requeues() == [f"requeue {JOB_ID}"], log[-4000:]
    assert "every rank saved its state and stopped" in log, log[-4000:]
    reached = _train_steps(short)
    assert 2 <= reached < SHORT_STEPS, "the signal must stop the stage mid-way"
    assert json.loads((short / "requeue").read_text())["step"] == reached
    saved = sorted(p.name for p in (short / "checkpoints").glob("step_*"))
    assert saved == [f"step_{reached:08d}"], f"the signal's save at step {reached} is the stage's only one: {saved}"
    assert cluster.leaked() == [], "written inside a container, not on a mount"

    # the same stage uninterrupted: its step command from the job's log, on a copy of its input (the pruned child)
    reference = Cluster(tmp_path / "reference", parent_files, tmp_path / "container")
    shutil.copytree(out / "a" / "prune", reference.runs / "demo" / "a" / "prune")
    command = re.search(r"^=== a/distill_short: (.*)$", log, re.M).group(1)
    command = command.replace(str(cluster.root), str(reference.root))
    done = subprocess.run(["bash", "-c", command], env={**reference.environment(), "MASTER_ADDR": "127.0.0.1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    job = cluster.submit_job()  # Slurm runs the requeued job again: same script, same id, same arguments
    assert job.wait(timeout=900) == 0, cluster.log.read_text()[-4000:]
    assert cluster.requeues() == [f"requeue {JOB_ID}"]
    assert (out / "report.md").is_file() and (out / "a" / "hf" / "config.json").is_file()
    assert not (short / "requeue").exists(), "the resumed stage answered the requeue"
    assert MetricsLog.read(short / "metrics.jsonl") == MetricsLog.read(reference.runs / "demo" / "a" / "distill_short"
                                                                        / "metrics.jsonl")
    assert cluster.leaked() == [], "written inside a container, not on a mount"
    assert not Path("/workspace").exists(), "a container path escaped the fake container"
