"""Held-out perplexity right after pruning the real SmolLM2-135M parent to each demo child shape, per method.

Rows: the default (norm-ratio layers, token-normalised uncentred PCA, activation FFN scores, re-calibration)
and one change at a time: random / drop-last layers, magnitude channel slicing instead of PCA, raw (not
token-normalised) PCA statistics, random FFN channels, one calibration pass, and for the tied child the
ways of forming the single embedding matrix (the default keeps the output matrix) where the parent is untied (a
tied parent has one matrix: every way gives it back). Each child is pruned straight from the parent to the shape
``conf/cascade/demo.yaml`` gives it (the cascade prunes each from the one before; this table compares methods),
with the demo's calibration tokens and held-out windows unless told otherwise.
Variants that reach the same model before a calibration pass share that pass (``shared_passes``): the table is
the same as with one calibrator per variant, from 12 calibration passes per child instead of 19.
    python bench/prune_ablation.py [--calibration-tokens 4096] [--eval-windows 4] > table.md
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_plugins import cpu_compat
from nemo_plugins.convert.sources import ModelSource, read_model_state, tokenizer_dir
from nemo_plugins.data.packing import pack_text
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig, initialize, shutdown
from nemo_plugins.eval.perplexity import evaluate_perplexity, token_windows
from nemo_plugins.logs import setup_logging
from nemo_plugins.prune.calibration import CalibrationStats
from nemo_plugins.prune.megatron_calibrator import megatron_calibrator, model_from_state
from nemo_plugins.prune.pipeline import Calibrator, PruneOptions, PruneTarget, prune
from nemo_plugins.prune.state import ModelState

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": {},
    "random layers": {"layer_method": "random"},
    "drop-last layers": {"layer_method": "drop_last"},
    "magnitude slicing (no PCA)": {"hidden_method": "magnitude"},
    "raw PCA statistics": {"raw": True},
    "random FFN channels": {"ffn_method": "random"},
    "one calibration pass": {"recalibrate": False},
}
TIE_VARIANTS = {
    "tie: input embedding + fitted norm scale": {"tie_method": "embedding_fit"},
    "tie: input embedding": {"tie_method": "embedding"},
    "tie: mean": {"tie_method": "mean"},
}


def fingerprint(state: ModelState) -> str:
    """The exact model a calibration pass would see: its config and every tensor's bytes."""
    digest = hashlib.blake2b(repr(state.config).encode())
    for name in sorted(state.tensors):
        digest.update(name.encode())
        digest.update(memoryview(state.tensors[name].detach().contiguous().view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def shared_passes(calibrate: Calibrator, cache: dict[tuple, CalibrationStats], key: object) -> Calibrator:
    """``calibrate``, answered from ``cache`` when the same model was calibrated for the same statistics before
    (``key`` names the calibrator's own settings: a raw and a token-normalised pass are not interchangeable)."""
    def run(state: ModelState, want: frozenset[str]) -> CalibrationStats:
        entry = (key, want, fingerprint(state))
        if entry not in cache:
            cache[entry] = calibrate(state, want)
        return cache[entry]
    return run


def main() -> None:
    demo = OmegaConf.load(ROOT / "conf/cascade/demo.yaml")
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibration-tokens", type=int, default=demo.stage.prune.calibration.tokens)
    parser.add_argument("--eval-windows", type=int, default=demo.stage.prune.eval.max_windows)
    parser.add_argument("--children", nargs="*", help="only these demo children (default: all)")
    parser.add_argument("--variants", nargs="*", help="only these rows (default: all)")
    args = parser.parse_args()
    setup_logging()
    parallel = ParallelConfig()
    cpu_compat.install()
    initialize(parallel)
    stage = OmegaConf.load(ROOT / "conf/stage/prune.yaml")
    children = [c for c in demo.cascade.children if not args.children or c.name in args.children]
    source = ModelSource.parse("embedded:smollm2")
    config, tensors = read_model_state(source, parallel)
    parent = ModelState(config, tensors)
    tokenizer = load_tokenizer(tokenizer_dir(source))
    seq_len = stage.calibration.seq_len
    calib = pack_text(tokenizer, list(stage.calibration.paths), seq_len, args.calibration_tokens // seq_len)
    windows = token_windows(tokenizer, iter_documents(list(stage.eval.paths)), stage.eval.seq_len, args.eval_windows)

    def perplexity(state: ModelState) -> float:
        return evaluate_perplexity(model_from_state(state, parallel), windows, progress=False).perplexity

    print(f"parent SmolLM2-135M: held-out perplexity {perplexity(parent):.2f} "
          f"({windows.numel() - len(windows)} tokens of {', '.join(stage.eval.paths)}); "
          f"calibration {calib[0].numel()} tokens of {', '.join(stage.calibration.paths)}\n")
    header = "| variant | " + " | ".join(
        f"{c.name} ({c.num_layers}L/{c.hidden_size}h/{c.ffn_hidden_size}f{'/tied' if c.tie_embeddings else ''})"
        for c in children) + " |"
    rows: dict[str, list[str]] = {}
    for child in children:
        cache: dict[tuple, CalibrationStats] = {}  # per child: the statistics of a whole model are large
        target = PruneTarget(child.num_layers, child.hidden_size, child.ffn_hidden_size, child.tie_embeddings)
        variants = {**VARIANTS, **(TIE_VARIANTS if child.tie_embeddings and not parent.config.tie_embeddings else {})}
        for name, change in variants.items():
            if args.variants and name not in args.variants:
                continue
            change = dict(change)
            raw = change.pop("raw", False)
            options = dataclasses.replace(PruneOptions(), **change)
            calibrator = shared_passes(megatron_calibrator(parallel, *calib, progress=False, token_normalized=not raw),
                                       cache, raw)
            start = time.perf_counter()
            state, report = prune(parent, target, options, calibrator)
            value = perplexity(state)
            rows.setdefault(name, ["n/a"] * len(children))[list(children).index(child)] = f"{value:,.1f}"
            print(f"  {child.name} / {name}: {value:,.1f} ({report['parameters']['child'] / 1e6:.1f}M params, "
                  f"{time.perf_counter() - start:.0f}s)", flush=True)
    print("\n" + header)
    print("|" + "---|" * (len(children) + 1))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(values) + " |")
    shutdown()


if __name__ == "__main__":
    main()
