"""One pruning stage (Algorithm 2) from a model source to artefacts: megatron checkpoint, HF dir, report.

A vision-language parent (Mistral3) prunes its language model only: the child keeps the parent's frozen encoder bit
for bit and gets a fresh projector sized for its hidden size (``vision.checkpoint.vision_child``); its checkpoint
carries both and its HF export is a Mistral3 directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.convert.model_io import export_hf
from nemo_plugins.convert.sources import ModelSource, check_declared, tokenizer_dir
from nemo_plugins.data.packing import pack_text
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer, tokenizer_files
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.eval.perplexity import evaluate_perplexity, token_windows
from nemo_plugins.manifest import write_manifest
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.prune.megatron_calibrator import megatron_calibrator, model_from_state
from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
from nemo_plugins.prune.report import write_report
from nemo_plugins.prune.shards import read_slice
from nemo_plugins.vision.checkpoint import export_mistral3, source_vision, vision_child

logger = logging.getLogger(__name__)

MEGATRON_DIR = "megatron"
HF_DIR = "hf"


@dataclass
class CalibrationData:
    paths: list[str] = field(default_factory=lambda: ["stdlib:asyncio", "stdlib:email", "stdlib:http"])
    tokens: int = 8192
    seq_len: int = 512
    micro_batch_size: int = 4


@dataclass
class PruneEval:
    """Held-out perplexity of parent and child (paths disjoint from the calibration paths)."""

    paths: list[str] = field(default_factory=lambda: ["stdlib:json", "stdlib:logging"])
    seq_len: int = 512
    max_windows: int = 8


def prune_stage_config(target: PruneTarget, options: PruneOptions, calibration: CalibrationData,
                       evaluation: PruneEval) -> dict:
    """What the stage's manifest records as its config (and what a rerun must match to reuse it)."""
    return {"target": dataclasses.asdict(target), "options": dataclasses.asdict(options),
            "calibration": dataclasses.asdict(calibration), "eval": dataclasses.asdict(evaluation)}


def run_prune_stage(parent: ModelSource, target: PruneTarget, options: PruneOptions, calibration: CalibrationData,
                    evaluation: PruneEval, out_dir: Path, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                    declared: MistralConfig | None = None, manifest_extra: dict | None = None) -> dict:
    """Prune ``parent`` to ``target``; writes ``out_dir/{megatron,hf}``, the report and ``manifest.json``.

    Every rank holds its TP slice of the parent and child (``prune/shards.py``), never the whole model.
    """
    started = time.monotonic()
    parent_state = read_slice(parent, parallel)
    config = parent_state.config
    check_declared(declared, config, str(parent))
    target.check_against(config, parallel.tp)
    tok_dir = tokenizer_dir(parent)
    tokenizer = load_tokenizer(tok_dir)
    check_vocab(tokenizer, config)
    calib_tokens, calib_positions = pack_text(tokenizer, list(calibration.paths), calibration.seq_len,
                                              max(1, calibration.tokens // calibration.seq_len))
    windows = token_windows(tokenizer, iter_documents(list(evaluation.paths)), evaluation.seq_len,
                            evaluation.max_windows)

    before = evaluate_perplexity(model_from_state(parent_state, parallel, dtype), windows)
    calibrator = megatron_calibrator(parallel, calib_tokens, calib_positions, calibration.micro_batch_size, dtype)
    child, report = prune(parent_state, target, options, calibrator)
    child_model = model_from_state(child, parallel, dtype)
    after = evaluate_perplexity(child_model, windows)
    report["perplexity"] = {"parent": before.to_dict(), "child": after.to_dict(), "eval_paths": list(evaluation.paths)}

    out_dir = Path(out_dir)
    vision = source_vision(parent)
    if vision is not None:
        child_model = vision_child(child_model, child.config, parent, parallel, dtype)
    # the stage owns these folders: a rerun after a kill (no manifest yet) replaces its own earlier outputs
    megatron_checkpoint.save_model(child_model, child.config, out_dir / MEGATRON_DIR, tokenizer_dir=tok_dir,
                                   overwrite=True)
    manifest = {**(manifest_extra or {}), "stage": "prune", "parent": str(parent),
                "config": prune_stage_config(target, options, calibration, evaluation),
                "child_config": child.config.to_dict(),
                "parameters": {"parent": config.num_parameters(), "child": child.config.num_parameters()},
                "perplexity": report["perplexity"], "checkpoint": str(out_dir / MEGATRON_DIR),
                "wall_seconds": time.monotonic() - started}
    if vision is not None:
        export_mistral3(child_model, child.config, vision, out_dir / HF_DIR, extra_files=tokenizer_files(tok_dir),
                        overwrite=True)
    else:
        export_hf(child_model, child.config, out_dir / HF_DIR, extra_files=tokenizer_files(tok_dir), overwrite=True)
    if dist.get_rank() == 0:
        write_report(report, out_dir)
        write_manifest(out_dir, manifest)
        logger.info("child %s: %d -> %d parameters, held-out perplexity %.2f -> %.2f; wrote %s",
                    json.dumps(report["target"]), report["parameters"]["parent"], report["parameters"]["child"],
                    before.perplexity, after.perplexity, out_dir)
    dist.barrier()
    return {**manifest, "report": report}
