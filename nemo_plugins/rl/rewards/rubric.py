"""The rubric reward: an LLM judge answers yes or no for each atomic item of ``meta["rubric"]``; reward = fraction
of items answered yes.

Each (problem, response, item) becomes one judge text by the config's template (``{prompt}``: the conversation
as ``[role]`` blocks, ``{response}``: the response with its thinking stripped, ``{item}``: the rubric item). The
judge does not generate: it is "yes" when the logit of the ``yes`` string's first token exceeds that of the
``no`` string's, as the next token after the text (a plain-text completion, so base and instruct models judge
alike; the default template ends in ``Reply:`` and the answers are `` yes`` / `` no``). All items of a batch
go through the judge in one call, micro-batched forward passes underneath (``pwrm.first_wins_logits``: the last
position's two label logits, in any TP/PP layout). A text longer than the judge's context is answered "no" and
counted in ``ModelJudge.too_long``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

import torch
from megatron.core import parallel_state

from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.thinking import strip_thinking
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.rl.pwrm import conversation_text, first_wins_logits
from nemo_plugins.rl.rewards import RewardItem, RubricRewardSettings

logger = logging.getLogger(__name__)


class Judge(Protocol):
    def margins(self, texts: Sequence[str], answers: tuple[str, str]) -> torch.Tensor:
        """[n] logit(answers[0]) - logit(answers[1]) as the next token after each text (> 0: the first answer)."""
        ...


class ModelJudge:
    """A causal LM as the judge: texts tokenized as plain text, the answers' first tokens compared."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, micro_batch_size: int, max_tokens: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.too_long = 0

    def label_ids(self, answers: tuple[str, str]) -> tuple[int, int]:
        ids = []
        for answer in answers:
            tokens = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ConfigError(f"rewards.rubric answer {answer!r} is no token in the judge's tokenizer")
            ids.append(tokens[0])
        if ids[0] == ids[1]:
            raise ConfigError(f"rewards.rubric.yes={answers[0]!r} and no={answers[1]!r} start with the same token "
                              f"({ids[0]}) in the judge's tokenizer: choose answers that differ in their first token")
        return ids[0], ids[1]

    def margins(self, texts: Sequence[str], answers: tuple[str, str]) -> torch.Tensor:
        labels = self.label_ids(answers)
        rows = [self.tokenizer(text)["input_ids"] for text in texts]
        fits = [i for i, row in enumerate(rows) if len(row) <= self.max_tokens]
        if len(fits) < len(rows):
            self.too_long += len(rows) - len(fits)
            logger.warning("rubric judge: %d of %d texts longer than its %d tokens answered 'no' (%d so far)",
                           len(rows) - len(fits), len(rows), self.max_tokens, self.too_long)
        margins = torch.full((len(rows),), -1.0)
        if fits:
            margins[fits] = first_wins_logits(self.model, [rows[i] for i in fits], labels, self.pad_id,
                                              self.micro_batch_size)
        return margins


def load_judge(source: str, settings: RubricRewardSettings, dtype: torch.dtype = torch.float32) -> ModelJudge:
    """The judge from any model source (``embedded:smollm2``, ``hf:``, ``megatron:``) in the running layout
    (``initialize`` has run: the judge is split like the policy); its context is its maximum positions."""
    parsed = ModelSource.parse(source)
    layout = ParallelConfig(tp=parallel_state.get_tensor_model_parallel_world_size(),
                            pp=parallel_state.get_pipeline_model_parallel_world_size())
    config, model = load_model(parsed, layout, dtype)
    tokenizer = load_tokenizer(tokenizer_dir(parsed))
    check_vocab(tokenizer, config)
    return ModelJudge(model, tokenizer, settings.micro_batch_size, config.max_position_embeddings)


class RubricReward:
    """Fraction of each response's rubric items the judge answers yes to; one judge call per batch."""

    def __init__(self, settings: RubricRewardSettings, judge: Judge) -> None:
        self.settings, self.judge = settings, judge

    def texts(self, item: RewardItem) -> list[str]:
        rubric = item.meta.get("rubric")
        if not isinstance(rubric, list) or not rubric or not all(isinstance(r, str) and r.strip() for r in rubric):
            raise DataError(f"a rubric problem's meta.rubric must be a non-empty list of items, got {rubric!r}")
        prompt, response = conversation_text(item.messages), strip_thinking(item.response).strip()
        return [self.settings.template.format(prompt=prompt, response=response, item=r.strip()) for r in rubric]

    def __call__(self, items: Sequence[RewardItem]) -> list[float]:
        per_item = [self.texts(item) for item in items]
        flat = [text for texts in per_item for text in texts]
        yes = (self.judge.margins(flat, (self.settings.yes, self.settings.no)) > 0).tolist()
        rewards, start = [], 0
        for texts in per_item:
            rewards.append(sum(yes[start : start + len(texts)]) / len(texts))
            start += len(texts)
        return rewards
