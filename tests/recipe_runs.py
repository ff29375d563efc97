"""Running a recipe as a user does and interrupting it mid-run: what the resume tests share."""

import os
import subprocess
import time
from pathlib import Path

from nemo_plugins.train.metrics import MetricsLog


def recipe_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd()}


def train_records(out_dir: Path) -> list[dict]:
    return [r for r in MetricsLog.read(out_dir / "metrics.jsonl") if r["kind"] == "train"]


def interrupt_after_step(command: list[str], out_dir: Path, step: int, sig: int) -> tuple[int, str]:
    """Start ``command``, send it ``sig`` once it has logged ``step`` training steps, wait for it to end;
    returns (return code, stderr). stderr goes to a file, so a chatty run never blocks on a full pipe."""
    log = out_dir.with_name(out_dir.name + ".stderr")
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, env=recipe_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while len(train_records(out_dir)) < step and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        job.send_signal(sig)
        job.wait(timeout=300)
    return job.returncode, log.read_text()
