"""Perplexity of a checkpoint on real text; writes a JSON result.

    python -m recipes.evaluate                                  # the embedded SmolLM2 parent
    python -m recipes.evaluate model.source=megatron:runs/x/ckpt model.architecture=null
    torchrun --nproc-per-node 2 -m recipes.evaluate parallel.tp=2

The output path is checked before the model is loaded, and the result is printed (one JSON line on stdout) before
it is written, so an unwritable output never costs the evaluation. A non-finite perplexity is an error.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from nemo_plugins.convert.sources import ModelSource, check_declared, declared_architecture, load_model, tokenizer_dir
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, torch_dtype, typed
from nemo_plugins.eval.perplexity import evaluate_perplexity, token_windows
from recipes._entry import hydra_entry

logger = logging.getLogger("recipes.evaluate")


def check_writable(path: Path) -> None:
    """Fail before the work, not after it: ``path``'s folder exists (or is created) and takes a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}."):
            pass
    except OSError as err:
        raise ConfigError(f"output={path}: cannot write there ({err.strerror or err}): set output= to a writable "
                          "path") from None


def run(cfg: DictConfig) -> dict:
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the weights are, e.g. model.source=hf:/path/to/dir")
    out = Path(cfg.output)
    check_writable(out)
    parallel = typed(ParallelConfig, cfg.parallel, "parallel")
    source = ModelSource.parse(cfg.model.source)
    initialize(parallel)
    config, model = load_model(source, parallel, torch_dtype(cfg.dtype))
    check_declared(declared_architecture(cfg.model.architecture), config, cfg.model.source)
    tokenizer = load_tokenizer(tokenizer_dir(source))
    check_vocab(tokenizer, config)
    windows = token_windows(tokenizer, iter_documents(list(cfg.data.paths)), cfg.data.seq_len, cfg.data.max_windows)
    result = evaluate_perplexity(model, windows, cfg.micro_batch_size)
    report = {"source": cfg.model.source, "data": list(cfg.data.paths), "seq_len": cfg.data.seq_len, **result.to_dict()}
    if dist.get_rank() == 0:
        print(json.dumps(report), flush=True)
        try:
            out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            raise ConfigError(f"output={out}: cannot write the result ({err.strerror or err}); it is printed "
                              "above") from None
        logger.info("perplexity %.3f over %d tokens -> %s", result.perplexity, result.tokens, out)
    return report


main = hydra_entry("evaluate", run)


if __name__ == "__main__":
    main()
