"""Reasoning online DPO: the preset is the ODPO stage with the thinking stripped for the judge only; the policy's
log-prob rows keep every thinking token as a target."""


from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_prompts import Prompt
from nemo_plugins.generation.engine import Response
from nemo_plugins.rl.logprobs import sample_rows
from nemo_plugins.rl.odpo import ODPOStage, Pair, _row_samples, judged
from recipes._entry import compose_typed


def _stage(name: str) -> ODPOStage:
    return compose_typed("odpo", f"stage@stage.odpo={name}").stage.odpo


class RecordingJudge:
    def __init__(self):
        self.seen = []

    def prob_first_wins(self, conversations, responses_a, responses_b):
        self.seen += [*responses_a, *responses_b]
        return [0.5] * len(conversations)


def test_the_preset_is_the_odpo_stage_with_thinking_stripped():
    plain, reasoning = _stage("odpo"), _stage("odpo_reasoning")
    assert not plain.sampling.strip_thinking and reasoning.sampling.strip_thinking
    assert reasoning.name == "odpo_reasoning"
    assert reasoning.train == plain.train and reasoning.dpo == plain.dpo
    assert {k: v for k, v in vars(reasoning.sampling).items() if k != "strip_thinking"} == \
        {k: v for k, v in vars(plain.sampling).items() if k != "strip_thinking"}


def test_the_judge_never_sees_thinking_but_the_log_probs_keep_its_tokens():
    chat_format = load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2")))
    stage = _stage("odpo_reasoning")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = Prompt(tuple(chat_format.prompt_ids(messages)), messages)

    def response(text: str) -> Response:
        ids = chat_format.tokenizer.encode(text, add_special_tokens=False) + [chat_format.end_of_turn_id]
        return Response(list(prompt.ids), ids, [0.0] * len(ids), [1] * len(ids))

    a, b = response("<think>secret plan: add two and two</think>It is 4."), response("<think>unfinished secret")
    judge = RecordingJudge()
    judged(judge, chat_format, stage.sampling, [(prompt, a, b)])
    assert len(judge.seen) == 2 and not any("secret" in text or "think>" in text for text in judge.seen)
    assert "It is 4." in judge.seen[0]
    tokens, _, mask = sample_rows(_row_samples(Pair(prompt, a, b)), 128, chat_format.pad_id)
    for row, r in enumerate((a, b)):
        start = len(prompt.ids)
        assert tokens[row, start : start + len(r.token_ids)].tolist() == r.token_ids
        assert mask[row].sum() == len(r.token_ids), "every thinking token is scored by the log-probs"
        assert "secret" in chat_format.decode(tokens[row, start : start + len(r.token_ids)].tolist())
