"""Offline tokenisation throughput: tokens/s per worker process and the speed-up of N workers over one, on real
text (this Python's standard library, the demo corpus) with SmolLM2's real tokenizer, in one run.

Each worker count builds the same store from scratch in its own temporary cache; the stores must be the same
bytes, which is checked. Spawned workers first import torch and transformers (seconds each: a fixed cost that a
cluster-size corpus amortises and a 4 MiB one does not), so besides the wall-clock speed-up (one worker's wall time
/ N workers') the workers' own rate is printed: tokens / the seconds they spent reading, tokenising and writing.
On a shared machine the figures depend on what else runs: say so with them.

    python bench/tokenize_workers.py [--workers 1 2] [--paths stdlib:email stdlib:asyncio ...] [--parts-per-worker 2]

(Not bench/tokenize.py: a script of that name shadows the standard library's ``tokenize`` module, which
``linecache`` imports, so it could not even start.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# light on purpose: spawned workers import this module again (only the token store and the tokenizer after it)
from nemo_plugins.data.text_files import path_files
from nemo_plugins.data.token_store import SUFFIXES, BuildOptions, TokenFile, build_token_file

DEMO_PATHS = ["stdlib:email", "stdlib:http", "stdlib:urllib", "stdlib:xml", "stdlib:html", "stdlib:json",
              "stdlib:logging", "stdlib:asyncio", "stdlib:concurrent", "stdlib:importlib", "stdlib:multiprocessing",
              "stdlib:unittest", "stdlib:collections", "stdlib:pydoc_data"]


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
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            result = build_token_file(tokenizer, args.paths, cache, "bench",
                                      BuildOptions(workers=workers, parts=workers * args.parts_per_worker))
            seconds = time.perf_counter() - start
            tokens = len(TokenFile(result.prefix))
            stored = {s: Path(f"{result.prefix}{s}").read_bytes() for s in SUFFIXES}
        if reference is not None and stored != reference:
            raise SystemExit(f"{workers} workers wrote other bytes than {args.workers[0]}: "
                             "the build is not deterministic")
        reference = stored
        results[workers] = seconds
        print(f"workers {workers:>2}: {tokens:,} tokens in {seconds:6.2f} s wall = {tokens / seconds:>8,.0f} tokens/s, "
              f"speed-up {results[args.workers[0]] / seconds:.2f}x; inside the workers "
              f"{result.tokens_built / result.worker_seconds:>8,.0f} tokens/s per worker "
              f"({seconds - result.worker_seconds / workers:5.2f} s of the wall time outside them: start-up, merge)")
    print(f"stores byte-identical across {args.workers} workers: yes")


if __name__ == "__main__":
    main()
