"""Convert weights between Hugging Face / GGUF and megatron-core checkpoints.

    python -m recipes.convert --src embedded:smollm2 --to-megatron runs/parent/megatron
    python -m recipes.convert --src hf:/data/Mistral-Small-3.1-24B --to-megatron ckpt --tp 8   # under torchrun
    python -m recipes.convert --src megatron:runs/parent/megatron --to-hf runs/parent/hf
    python -m recipes.convert --src nemo2:/checkpoints/my-nemo2-model --to-hf hf_out   # a NeMo 2 checkpoint, no NeMo

Megatron checkpoints are megatron-core dist_checkpointing directories, loadable at any TP/PP. The output path must
be new, an empty directory, or (with --overwrite) an earlier output of the same kind written by this project;
anything else is refused before the model is read, and nothing is deleted. Each rank reads only its own slices of
the source; an HF export is streamed tensor by tensor to rank 0, which writes the shards.

A Mistral3ForConditionalGeneration source (Mistral Small 3.1, Ministral 3), or a megatron checkpoint written from
one, is converted whole (``nemo_plugins.vision``): ``--to-megatron`` stores the frozen vision tower and the projector
beside the text weights (with vision_config.json), ``--to-hf`` writes a Mistral3ForConditionalGeneration directory
that transformers loads and runs on images.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

from nemo_plugins import cpu_compat
from nemo_plugins.convert import megatron_checkpoint, output_dir
from nemo_plugins.convert.model_io import export_hf
from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import torch_dtype
from nemo_plugins.logs import setup_logging
from nemo_plugins.vision.checkpoint import export_mistral3, load_vision_language_model, save_megatron, source_vision
from recipes._entry import project_errors

logger = logging.getLogger("recipes.convert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="embedded:NAME | gguf:FILE | hf:DIR | megatron:DIR | nemo2:DIR")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-megatron", metavar="DIR", help="write a megatron dist checkpoint")
    target.add_argument("--to-hf", metavar="DIR", help="write a Hugging Face directory (safetensors)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="HF safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this project there")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    source = ModelSource.parse(args.src)
    output_dir.claim(args.to_megatron or args.to_hf, "megatron" if args.to_megatron else "hf", args.overwrite)
    initialize(parallel)
    vision = source_vision(source)
    if vision is not None:
        config, vision, model = load_vision_language_model(source, parallel, torch_dtype(args.dtype))
    else:
        config, model = load_model(source, parallel, torch_dtype(args.dtype))
    tokenizer = tokenizer_dir(source)
    if args.to_megatron and vision is not None:
        out = save_megatron(model, config, vision, args.to_megatron, tokenizer_dir=tokenizer, overwrite=args.overwrite)
    elif args.to_megatron:
        out = megatron_checkpoint.save_model(model, config, args.to_megatron, tokenizer_dir=tokenizer,
                                             overwrite=args.overwrite)
    else:
        shards, extra = int(args.max_shard_gb * 2**30), tokenizer_files(tokenizer)
        out = (export_mistral3(model, config, vision, args.to_hf, shards, extra, args.overwrite) if vision is not None
               else export_hf(model, config, args.to_hf, shards, extra, args.overwrite))
    summary = {
        "src": args.src,
        "dst": str(out),
        "parameters": config.num_parameters(),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # ru_maxrss is KiB
    }
    logger.info("converted: %s", json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cpu_compat.install()
    with project_errors():
        run(parse_args(argv))


if __name__ == "__main__":
    main()
