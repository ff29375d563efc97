"""Offline tokenisation throughput: tokens/s per worker process and the speed-up of N workers over one, on real
text (this Python's standard library, the demo corpus) with SmolLM2's real tokenizer, in one run.

Each worker count builds the same store from scratch in its own temporary cache; the stores must be the same
bytes, which is checked. Spawned workers first import torch and transformers (seconds each: a fixed cost that a
cluster-size corpus amortises and a 4 MiB one does not), so the start-up of a pool of N is measured on its own and
printed: per-worker tokens/s = tokens / (wall - start-up) / N; speed-up = one worker's wall time / N workers' (wall,
and once started). On a shared machine the figures depend on what else runs: say so with them.

    python bench/tokenize_workers.py [--workers 1 2] [--paths stdlib:email stdlib:asyncio ...] [--parts-per-worker 2]

(Not bench/tokenize.py: a script of that name shadows the standard library's ``tokenize`` module, which
``linecache`` imports, so it could not even start.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# light on purpose: spawned workers import this module again (only the token store and the tokenizer after it)
from nemo_plugins.data.text_files import path_files
from nemo_plugins.data.token_store import SUFFIXES, BuildOptions, TokenFile, build_token_file

DEMO_PATHS = ["stdlib:email", "stdlib:http", "stdlib:urllib", "stdlib:xml", "stdlib:html", "stdlib:json",
              "stdlib:logging", "stdlib:asyncio", "stdlib:concurrent", "stdlib:importlib", "stdlib:multiprocessing",
              "stdlib:unittest", "stdlib:collections", "stdlib:pydoc_data"]


def _ready(tokenizer) -> int:
    return len(tokenizer)


def startup_seconds(tokenizer, workers: int) -> float:
    """Wall time for ``workers`` spawned processes to start and receive the tokenizer: the pool's fixed cost."""
    if workers == 1:
        return 0.0  # one worker tokenises in-process
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_ready, [tokenizer] * workers))
    return time.perf_counter() - start


def main() -> None:
    from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
    from nemo_plugins.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", default=DEMO_PATHS)
    parser.add_argument("--parts-per-worker", type=int, default=2, help="part files per worker (load balance)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(tokenizer_dir(ModelSource.parse("embedded:smollm2")))
    corpus_bytes = sum(f.stat().st_size for raw in args.paths for f in path_files(raw))
    print(f"corpus: {corpus_bytes / 2**20:.1f} MiB of text ({len(args.paths)} stdlib paths); tokenizer SmolLM2 "
          f"(vocabulary {len(tokenizer):,}); machine: {os.cpu_count()} CPU cores")
    results, reference = {}, None
    for workers in args.workers:
        start_up = startup_seconds(tokenizer, workers)
        with tempfile.TemporaryDirectory() as cache:
            options = BuildOptions(workers=workers, parts=workers * args.parts_per_worker)
            start = time.perf_counter()
            prefix = build_token_file(tokenizer, args.paths, cache, "bench", options)
            seconds = time.perf_counter() - start
            tokens = len(TokenFile(prefix))
            stored = {s: Path(f"{prefix}{s}").read_bytes() for s in SUFFIXES}
        if reference is not None and stored != reference:
            raise SystemExit(f"{workers} workers wrote other bytes than {args.workers[0]}: the build is not deterministic")
        reference = stored
        results[workers] = seconds
        working = max(seconds - start_up, 1e-9)
        print(f"workers {workers:>2}: {tokens:,} tokens in {seconds:6.2f} s wall ({start_up:5.2f} s of it starting the "
              f"workers) = {tokens / seconds:>8,.0f} tokens/s; per worker once started {tokens / working / workers:>8,.0f} "
              f"tokens/s; speed-up {results[args.workers[0]] / seconds:.2f}x wall, "
              f"{results[args.workers[0]] / working:.2f}x once started")
    print(f"stores byte-identical across {args.workers} workers: yes")


if __name__ == "__main__":
    main()
