"""Peak host RAM (RSS) per rank of load / prune / export of a synthetic ~0.9B-parameter Mistral (bf16) at TP=2 on
gloo, measured against ``nemo_plugins.cascade.memory``'s prediction.

    python bench/memory.py [--workdir /tmp/cascade-memory]

Every phase runs in two fresh rank processes, so each peak is that phase's alone. The peak is of anonymous memory
(RssAnon, sampled every 2 ms by a thread): what must fit in the node's RAM. File pages that safetensors maps count
in RSS too but are page cache, shared by the ranks and dropped under pressure. The export phase loads the model
first and restarts the peak before exporting. The runtime term is measured once (an initialised rank that loaded
nothing); everything else is predicted from the shapes. Last line: ``worst relative error: <fraction>``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_plugins.cascade import memory  # noqa: E402
from nemo_plugins.distributed import ParallelConfig  # noqa: E402
from nemo_plugins.model.config import MistralConfig  # noqa: E402

PARENT = MistralConfig(num_layers=16, hidden_size=2048, num_attention_heads=16, num_kv_heads=8, head_dim=128,
                       ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=4096)
CHILD = PARENT.replace(num_layers=12, hidden_size=1536, ffn_hidden_size=4096)
PARALLEL = ParallelConfig(tp=2)
SEQ_LEN, ROWS = 128, 2
GIB = 2**30


class AnonymousPeak:
    """The largest RssAnon seen by a sampling thread, GiB."""

    def __init__(self, interval: float = 0.002):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024 / GIB
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.current())

    def restart(self) -> None:
        self.peak = self.current()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.current())


def write_parent(directory: Path) -> Path:
    from nemo_plugins.convert import hf_io
    from nemo_plugins.convert.mapping import hf_layout, hf_shape

    if (directory / "config.json").is_file():
        return directory
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name in hf_layout(PARENT):
        shape = hf_shape(name, PARENT)
        value = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        state[name] = value.bfloat16()
    hf_io.write_model_dir(state, PARENT, directory, max_shard_bytes=GIB)
    return directory


def rank_main(rank: int, phase: str, parent_dir: str, workdir: str, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from nemo_plugins import cpu_compat
    from nemo_plugins.convert.model_io import export_hf
    from nemo_plugins.convert.sources import ModelSource, load_model
    from nemo_plugins.distributed import initialize
    from nemo_plugins.prune.megatron_calibrator import megatron_calibrator, model_from_state
    from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
    from nemo_plugins.prune.shards import read_slice

    torch.set_num_threads(1)
    peak = AnonymousPeak()
    cpu_compat.install()
    initialize(PARALLEL)
    source = ModelSource.parse(f"hf:{parent_dir}")
    if phase == "load":
        load_model(source, PARALLEL, torch.bfloat16)
    elif phase == "prune":
        tokens = torch.randint(0, PARENT.vocab_size, (ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(SEQ_LEN).expand(ROWS, -1).clone()
        target = PruneTarget(CHILD.num_layers, CHILD.hidden_size, CHILD.ffn_hidden_size, CHILD.tie_embeddings)
        calibrator = megatron_calibrator(PARALLEL, tokens, positions, micro_batch_size=1,
                                         dtype=torch.bfloat16, progress=False)
        child, _ = prune(read_slice(source, PARALLEL), target, PruneOptions(), calibrator)
        model_from_state(child, PARALLEL, torch.bfloat16)
    elif phase == "export":
        config, model = load_model(source, PARALLEL, torch.bfloat16)
        peak.restart()
        export_hf(model, config, Path(workdir) / "export", overwrite=True)
    results.put((phase, rank, peak.stop()))


def run_phase(phase: str, parent_dir: Path, workdir: Path) -> float:
    """The larger of the two ranks' peaks, GiB."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_main, args=(phase, str(parent_dir), str(workdir), port, results), nprocs=2,
                       start_method="spawn")
    return max(results.get()[2] for _ in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/cascade-memory")
    workdir = Path(parser.parse_args().workdir)
    parent_dir = write_parent(workdir / "parent")
    runtime = run_phase("runtime", parent_dir, workdir)
    predicted = {
        "load": memory.load_memory(PARENT, PARALLEL, 2, 2, on_gpu=False, runtime=runtime),
        "prune": memory.prune_memory(PARENT, CHILD, PARALLEL, 2, 2, SEQ_LEN, 1, on_gpu=False, runtime=runtime),
        "export": memory.export_memory(PARENT, PARALLEL, 2, on_gpu=False, runtime=runtime),
    }
    print(f"synthetic parent {PARENT.num_parameters() / 1e9:.2f}B (bf16) -> child {CHILD.num_parameters() / 1e9:.2f}B, "
          f"TP=2 on gloo; runtime (initialised rank) {runtime:.2f} GiB")
    print(f"{'phase':<8}{'measured GiB':>14}{'predicted GiB':>15}{'error':>9}")
    worst = 0.0
    for phase, estimate in predicted.items():
        try:
            measured = run_phase(phase, parent_dir, workdir)
        except Exception as err:  # a phase whose code is broken in this tree: say so, keep measuring the others
            last = traceback.format_exception_only(err)[-1].strip().splitlines()[-1]
            print(f"{phase:<8}{'failed':>14}{estimate.host:>15.2f}     {last[:160]}")
            continue
        error = abs(estimate.host - measured) / measured
        worst = max(worst, error)
        print(f"{phase:<8}{measured:>14.2f}{estimate.host:>15.2f}{error:>9.1%}")
    print(f"worst relative error: {worst:.3f}")


if __name__ == "__main__":
    main()
