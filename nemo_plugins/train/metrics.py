"""Training metrics to the console (rank 0), a JSON-lines file (the report's curves) and TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch.distributed as dist

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends ``{"step", "kind", ...}`` records; on resume, records past the resumed step are dropped
    (a killed run may have logged steps it never checkpointed), so the file matches an uninterrupted run."""

    def __init__(self, out_dir: str | Path, resume_step: int, total_steps: int, tokens_per_step: int,
                 name: str) -> None:
        self.enabled = dist.get_rank() == 0
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.name = name
        self.path = Path(out_dir) / "metrics.jsonl"
        self._start_time = time.monotonic()
        self._start_step = resume_step
        self._tb = None
        kept: list[dict] = []
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = [line for line in self.read(self.path) if line["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        shared = [kept]
        dist.broadcast_object_list(shared, src=0)
        self.kept = shared[0]
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)

    def last(self, kind: str, step: int) -> dict | None:
        """The record of ``kind`` logged at ``step`` before a resume (every rank gets rank 0's copy)."""
        found = [r for r in self.kept if r["kind"] == kind and r["step"] == step]
        return {k: v for k, v in found[-1].items() if k not in ("step", "kind")} if found else None

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        path = Path(path)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def record(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(f"{kind}/{key}", value, step)
        self._tb.flush()

    def progress(self, step: int, values: dict[str, float]) -> None:
        """One console line: step, tokens/s since start (or resume), ETA and the step's numbers."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        tokens_per_s = done * self.tokens_per_step / max(elapsed, 1e-9)
        eta = (self.total_steps - step) * elapsed / max(done, 1)
        numbers = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        logger.info("%s step %d/%d | %.0f tok/s | ETA %s | %s", self.name, step, self.total_steps, tokens_per_s,
                    _clock(eta), numbers)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
