"""Downstream evaluation of any checkpoint; writes a JSON result. ``task=``:

- ``perplexity`` (default): perplexity on real text (``data.paths``);
- ``problems``: pass@1 / pass@k on the held-out problems of a chat-data config (``chat_data``: the reasoning
  problems by default), answers sampled with the generation engine and graded by the rewards of each problem's
  ``meta`` (math answer, code tests in the sandbox, rubric items by the ``judge`` model, loaded only when a
  held-out problem is rubric-graded);
- ``humaneval``: HumanEval pass@1 (pass@k with ``humaneval.samples``), completions run in the project's sandbox.

    python -m recipes.evaluate                                  # perplexity of the embedded SmolLM2 parent
    python -m recipes.evaluate task=humaneval model.source=megatron:runs/x/ckpt model.architecture=null
    python -m recipes.evaluate task=problems problems.samples=8 problems.temperature=0.8 'problems.ks=[1,4,8]'
    torchrun --nproc-per-node 2 -m recipes.evaluate parallel.tp=2

The output path is checked before the model is loaded, and the result is printed (one JSON line on stdout) before
it is written, so an unwritable output never costs the evaluation. A non-finite perplexity is an error.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from nemo_plugins.config.schemas import EvaluateConfig, Task
from nemo_plugins.convert.sources import ModelSource, check_declared, load_model, tokenizer_dir
from nemo_plugins.data.chat_prompts import ChatPrompts
from nemo_plugins.data.from_config import load_chat_data
from nemo_plugins.data.mix import Cursor
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError, torch_dtype
from nemo_plugins.eval.humaneval import evaluate_humaneval
from nemo_plugins.eval.pass_at_k import evaluate_problems
from nemo_plugins.eval.perplexity import evaluate_perplexity, token_windows
from nemo_plugins.rl.rewards import build_rewards
from nemo_plugins.rl.rewards.rubric import load_judge
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


# each task checks its settings (before any model is loaded) and returns what evaluates the loaded model
Evaluation = Callable[[torch.nn.Module, Any, ModelSource], dict]


def perplexity(cfg: EvaluateConfig) -> Evaluation:
    def evaluate(model, tokenizer, source: ModelSource) -> dict:
        windows = token_windows(tokenizer, iter_documents(list(cfg.data.paths)), cfg.data.seq_len,
                                cfg.data.max_windows)
        result = evaluate_perplexity(model, windows, cfg.micro_batch_size)
        logger.info("perplexity %.3f over %d tokens", result.perplexity, result.tokens)
        return {"data": list(cfg.data.paths), "seq_len": cfg.data.seq_len, **result.to_dict()}

    return evaluate


def problems(cfg: EvaluateConfig) -> Evaluation:
    settings, reward_settings = cfg.problems, cfg.rewards

    def evaluate(model, tokenizer, source: ModelSource) -> dict:
        chat_format, chat = load_chat_data(cfg, tokenizer_dir(source))
        prompts = ChatPrompts(chat, seed=0, start=Cursor(), per_step=1).heldout(settings.problems)
        judge = None
        if any(prompt.meta.get("reward") == "rubric" for prompt in prompts):
            if not cfg.judge:
                raise ConfigError("the held-out problems include rubric-graded ones: set judge=<model source> (e.g. "
                                  "judge=embedded:smollm2), or evaluate data without them")
            judge = load_judge(cfg.judge, reward_settings.rubric, torch_dtype(cfg.dtype))
        report = evaluate_problems(model, chat_format, prompts, build_rewards(reward_settings, judge), settings)
        logger.info("problems: %s over %d held-out problems (%d samples each)", _pass_rates(report),
                    report["problems"], settings.samples)
        return {"data": [s.name for s in chat.sources], "judge": cfg.judge if judge else None, **report}

    return evaluate


def humaneval(cfg: EvaluateConfig) -> Evaluation:
    settings = cfg.humaneval

    def evaluate(model, tokenizer, source: ModelSource) -> dict:
        report = evaluate_humaneval(model, tokenizer, settings)
        logger.info("humaneval: %s over %d problems", _pass_rates(report), report["problems"])
        return {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, **report}

    return evaluate


def _pass_rates(report: dict) -> dict:
    return {k: round(v, 4) for k, v in report.items() if k.startswith("pass@")}


TASKS: dict[Task, Callable[[EvaluateConfig], Evaluation]] = {Task.perplexity: perplexity, Task.problems: problems,
                                                             Task.humaneval: humaneval}


def run(cfg: EvaluateConfig) -> dict:
    task = cfg.task
    evaluate = TASKS[task](cfg)
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the weights are, e.g. model.source=hf:/path/to/dir")
    out = Path(cfg.output)
    check_writable(out)
    parallel = cfg.parallel
    source = ModelSource.parse(cfg.model.source)
    initialize(parallel)
    config, model = load_model(source, parallel, torch_dtype(cfg.dtype))
    check_declared(cfg.model.architecture, config, cfg.model.source)
    tokenizer = load_tokenizer(tokenizer_dir(source))
    check_vocab(tokenizer, config)
    result = evaluate(model, tokenizer, source)
    report = {"source": cfg.model.source, **result} if task == "perplexity" else \
        {"task": task, "source": cfg.model.source, **result}
    if dist.get_rank() == 0:
        print(json.dumps(report), flush=True)
        try:
            out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            raise ConfigError(f"output={out}: cannot write the result ({err.strerror or err}); it is printed "
                              "above") from None
        logger.info("%s -> %s", task, out)
    return report


main = hydra_entry("evaluate", run)


if __name__ == "__main__":
    main()
