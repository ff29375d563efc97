"""Prune a parent into one child (Algorithm 2) and write a checkpoint, an HF directory and a report.

    python -m recipes.prune                                       # SmolLM2-135M -> the first demo child shape
    python -m recipes.prune stage.prune.target.hidden_size=256 stage.prune.options.hidden_method=magnitude
    torchrun --nproc-per-node 2 -m recipes.prune parallel.tp=2
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.convert.sources import ModelSource, check_declared, declared_architecture, read_model_state, tokenizer_dir
from nemo_plugins.data.packing import pack_text
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer, tokenizer_files
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.eval.perplexity import evaluate_perplexity, token_windows
from nemo_plugins.errors import ConfigError, torch_dtype, typed
from recipes._entry import hydra_entry
from nemo_plugins.prune.megatron_calibrator import megatron_calibrator, model_from_state
from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
from nemo_plugins.prune.report import write_report
from nemo_plugins.prune.state import ModelState

logger = logging.getLogger("recipes.prune")


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage.prune
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the parent's weights are, e.g. model.source=hf:/path")
    parallel = typed(ParallelConfig, cfg.parallel, "parallel")
    target = typed(PruneTarget, stage.target, "stage.prune.target")
    options = typed(PruneOptions, stage.options, "stage.prune.options")
    dtype = torch_dtype(cfg.dtype)
    source = ModelSource.parse(cfg.model.source)
    initialize(parallel)
    config, tensors = read_model_state(source, parallel)
    check_declared(declared_architecture(cfg.model.architecture), config, cfg.model.source)
    target.check_against(config, parallel.tp)
    tokenizer = load_tokenizer(tokenizer_dir(source))
    check_vocab(tokenizer, config)
    calib_tokens, calib_positions = pack_text(tokenizer, list(stage.calibration.paths), stage.calibration.seq_len,
                                              max(1, stage.calibration.tokens // stage.calibration.seq_len))
    windows = token_windows(tokenizer, iter_documents(list(stage.eval.paths)), stage.eval.seq_len, stage.eval.max_windows)

    parent = ModelState(config, tensors)
    before = evaluate_perplexity(model_from_state(parent, parallel, dtype), windows)
    calibrator = megatron_calibrator(parallel, calib_tokens, calib_positions, stage.calibration.micro_batch_size, dtype)
    child, report = prune(parent, target, options, calibrator)
    child_model = model_from_state(child, parallel, dtype)
    after = evaluate_perplexity(child_model, windows)
    report["perplexity"] = {"parent": before.to_dict(), "child": after.to_dict(), "eval_paths": list(stage.eval.paths)}
    report["config"] = OmegaConf.to_container(cfg, resolve=True)

    out = Path(cfg.output_dir)
    megatron_checkpoint.save_model(child_model, child.config, out / "megatron", tokenizer_dir=tokenizer_dir(source))
    if dist.get_rank() == 0:
        hf_io.write_model_dir(child.tensors, child.config, out / "hf", extra_files=tokenizer_files(tokenizer_dir(source)))
        write_report(report, out)
        logger.info("child %s: %d -> %d parameters, held-out perplexity %.2f -> %.2f; wrote %s",
                    json.dumps(report["target"]), report["parameters"]["parent"], report["parameters"]["child"],
                    before.perplexity, after.perplexity, out)
    dist.barrier()
    return report


main = hydra_entry("prune", run)


if __name__ == "__main__":
    main()
