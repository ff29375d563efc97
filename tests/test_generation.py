"""Generation engine: KV-cached decoding equals full recomputation, sampling contracts, loops, tool injection."""

import socket
import types

import pytest
import torch
import torch.multiprocessing as mp

from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import Request, SamplingParams
from nemo_plugins.generation.loops import NO_STOP, REPEATED_NGRAM, LoopConfig, find_loop
from nemo_plugins.generation.sampling import RequestDraws, choose_tokens, filter_top_k_top_p
from nemo_plugins.generation.torch_engine import TorchEngine, check_layout, plan_batches
from nemo_plugins.model.builder import build_model
from nemo_plugins.model.config import YarnScaling
from tests import distributed_worker, generation_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state

PLAIN = tiny_config()
# Temperature period 8: the prompts and 20 new tokens cross three period boundaries.
YARN_TEMPERATURE = tiny_config(rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=8),
                               attention_temperature_beta=0.5, architecture="Ministral3ForCausalLM")
PROMPTS = [(5, 17, 3), (9, 2, 44, 81, 7, 120, 33, 64, 12), (100, 4, 56, 23, 77, 8)]
NO_LOOP_STOP = LoopConfig(stop_on_loop=False)


def _model(config, state=None):
    model = build_model(config, ParallelConfig())
    load_hf_state(model, state if state is not None else hf_state(hf_model(config)), config)
    return model.eval()


@torch.no_grad()
def _full_forward_logprobs(model, ids) -> torch.Tensor:
    """Training-style forward over the whole sequence: log-softmax of the logits at every position."""
    tokens, positions = torch.tensor([list(ids)]), torch.arange(len(ids))[None]
    return torch.log_softmax(model(tokens, positions)[0].float(), -1)


def _greedy_by_recomputation(model, prompt, new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(_full_forward_logprobs(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def _assert_logprobs_match_training_forward(model, response) -> None:
    logprobs = _full_forward_logprobs(model, response.prompt_ids + response.token_ids)
    start = len(response.prompt_ids) - 1
    expected = logprobs[start:-1].gather(-1, torch.tensor(response.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(response.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [PLAIN, YARN_TEMPERATURE], ids=["plain", "yarn_temperature"])
def test_kv_cache_greedy_equals_full_recomputation_for_a_batch_of_different_lengths(config):
    model = _model(config)
    params = SamplingParams(temperature=0.0, max_new_tokens=20, loop=NO_LOOP_STOP)
    responses = TorchEngine(model).generate([Request(p, params) for p in PROMPTS])
    for prompt, response in zip(PROMPTS, responses):
        assert response.token_ids == _greedy_by_recomputation(model, prompt, 20)
        assert response.policy_mask == [1] * 20
        _assert_logprobs_match_training_forward(model, response)


def test_a_decode_step_rotates_only_its_new_keys_not_the_whole_cache(monkeypatch):
    """megatron's static cache rotates every cached key again at each step; ours rotates each key once, when
    cached (that it rotates them right is the recomputation test above)."""
    import megatron.core.transformer.attention as megatron_attention

    from nemo_plugins.model import rotated_key_cache

    rotated_lengths = []
    for module in (megatron_attention, rotated_key_cache):
        rotate = module.apply_rotary_pos_emb
        monkeypatch.setattr(module, "apply_rotary_pos_emb",
                            lambda t, *a, rotate=rotate, **k: rotated_lengths.append(t.shape[0]) or rotate(t, *a, **k))
    model = _model(YARN_TEMPERATURE)
    TorchEngine(model).generate([Request(p, SamplingParams(temperature=0.0, max_new_tokens=6, loop=NO_LOOP_STOP))
                                 for p in PROMPTS])
    width = max(len(p) for p in PROMPTS)
    layers = YARN_TEMPERATURE.num_layers
    assert rotated_lengths == [width] * 2 * layers + [1] * 2 * layers * 5  # prefill, then 5 fed tokens: query, key


def test_sampled_logprobs_are_the_models_plain_logprobs():
    """Sampled at temperature 0.7 with top-k/top-p, yet the log-probs are those of the unfiltered distribution."""
    model = _model(YARN_TEMPERATURE)
    requests = [Request(p, SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=i, max_new_tokens=16))
                for i, p in enumerate(PROMPTS)]
    for response in TorchEngine(model).generate(requests):
        _assert_logprobs_match_training_forward(model, response)


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch():
    model = _model(PLAIN)
    engine = TorchEngine(model)
    request = Request(PROMPTS[0], SamplingParams(temperature=1.0, seed=7, max_new_tokens=16))
    alone = engine.generate([request])[0]
    others = [Request(p, SamplingParams(temperature=1.0, seed=100 + i, max_new_tokens=10))
              for i, p in enumerate(PROMPTS[1:])]
    in_batch = engine.generate([others[0], request, others[1]])[1]
    assert in_batch.token_ids == alone.token_ids
    torch.testing.assert_close(torch.tensor(in_batch.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
    reseeded = Request(PROMPTS[0], SamplingParams(temperature=1.0, seed=8, max_new_tokens=16))
    assert engine.generate([reseeded])[0].token_ids != alone.token_ids


def test_stop_tokens_and_max_new_tokens_apply_per_request():
    model = _model(PLAIN)
    greedy = _greedy_by_recomputation(model, PROMPTS[1], 12)
    stop = greedy[4]
    first_stop = greedy.index(stop)
    responses = TorchEngine(model).generate([
        Request(PROMPTS[1], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,))),
        Request(PROMPTS[1], SamplingParams(temperature=0.0, max_new_tokens=3)),
        Request(PROMPTS[1], SamplingParams(temperature=0.0, max_new_tokens=12)),
    ])
    stopped, short, full = responses
    assert (stopped.token_ids, stopped.finish_reason, stopped.loop) == (greedy[: first_stop + 1], "stop", None)
    assert (short.token_ids, short.finish_reason, short.loop.reason) == (greedy[:3], "length", NO_STOP)
    assert (full.token_ids, full.finish_reason) == (greedy, "length")


def test_find_loop_on_planted_sequences():
    prefix = [100, 101, 102, 103, 104]
    short_cycle = find_loop(prefix + [1, 2, 3] * 10, LoopConfig(ngram=4, repeats=3))
    # (1, 2, 3, 1) starts at 5, 8 and 11: the third occurrence ends at index 14.
    assert (short_cycle.reason, short_cycle.position, short_cycle.ngram, short_cycle.count) == (
        REPEATED_NGRAM, 14, (1, 2, 3, 1), 3)
    long_cycle = find_loop(prefix + list(range(10, 20)) * 4, LoopConfig(ngram=4, repeats=3))
    assert (long_cycle.position, long_cycle.ngram) == (28, (10, 11, 12, 13))
    twice_then_other = [1, 2, 3, 1, 2, 3, 9, 1, 2, 3]
    assert find_loop(twice_then_other, LoopConfig(ngram=3, repeats=4)) is None
    assert find_loop(twice_then_other, LoopConfig(ngram=3, repeats=3)).position == 9
    assert find_loop(list(range(200)), LoopConfig(ngram=1, repeats=2)) is None
    with pytest.raises(ConfigError, match="loop.repeats"):
        LoopConfig(repeats=1)


def test_the_engine_stops_a_looping_response_where_find_loop_flags_it():
    model = _model(PLAIN)
    loop = LoopConfig(ngram=2, repeats=3)
    engine = TorchEngine(model)
    flag_only = LoopConfig(ngram=2, repeats=3, stop_on_loop=False)
    free = engine.generate([Request(PROMPTS[2], SamplingParams(temperature=0.0, max_new_tokens=48, loop=flag_only))])[0]
    verdict = find_loop(free.token_ids, loop)
    assert verdict is not None, "precondition: the tiny model's greedy continuation repeats itself"
    assert (free.finish_reason, free.loop) == ("length", verdict)
    stopped = engine.generate([Request(PROMPTS[2], SamplingParams(temperature=0.0, max_new_tokens=48, loop=loop))])[0]
    assert (stopped.finish_reason, stopped.loop) == ("loop", verdict)
    assert stopped.token_ids == free.token_ids[: verdict.position + 1]


def test_top_k_and_top_p_keep_the_expected_tokens():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]] * 4)
    top_k, top_p = torch.tensor([0, 1, 0, 3]), torch.tensor([0.7, 1.0, 0.85, 0.7])
    kept = filter_top_k_top_p(probs.log(), top_k, top_p) > float("-inf")
    assert kept.tolist() == [[False, True, False, True], [False, True, False, False],
                             [True, True, False, True], [False, True, False, True]]


def test_sampling_draws_tokens_with_the_models_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.3])
    rows = 3000
    params = [SamplingParams(temperature=1.0)] * rows
    tokens, logprobs = choose_tokens(probs.log().expand(rows, -1).clone(), params,
                                     [RequestDraws(seed) for seed in range(rows)])
    frequencies = torch.bincount(tokens, minlength=3).float() / rows
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    top_2 = [SamplingParams(temperature=1.0, top_k=2)] * rows
    tokens, _ = choose_tokens(probs.log().expand(rows, -1).clone(), top_2,
                              [RequestDraws(seed) for seed in range(rows)])
    frequencies = torch.bincount(tokens, minlength=3).float() / rows
    torch.testing.assert_close(frequencies, torch.tensor([0.0, 2 / 3, 1 / 3]), atol=0.03, rtol=0)


class ScriptedModel(torch.nn.Module):
    """Stand-in for MistralGPTModel (no KV cache): the next token is a fixed function of the token just fed."""

    uses_transformer_engine = False

    def __init__(self, script: dict[int, int], vocab_size: int = 32) -> None:
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = types.SimpleNamespace(pipeline_model_parallel_size=1, context_parallel_size=1,
                                            sequence_parallel=False, params_dtype=torch.float32)
        self.decoder = types.SimpleNamespace(layers=[])
        self.fed: set[tuple[int, int]] = set()

    def forward(self, tokens, positions, attention_mask=None, inference_context=None, return_hidden=False):
        last = tokens[:, -1].tolist()
        self.fed.update(zip(last, positions[:, -1].tolist()))
        scripted = torch.tensor([self.script[t] for t in last])
        return 20.0 * torch.nn.functional.one_hot(scripted, self.vocab_size).float()[None]

    def output_weight(self) -> torch.Tensor:
        return torch.eye(self.vocab_size)


def test_tool_hook_output_is_injected_fed_to_the_model_and_masked():
    # 3 ends a "tool call" (and is also a stop token: the hook's answer wins); 10-11 are ignored model guesses
    # while the injected ids are fed; after the injected 12 the model says 4, then 5 (stop).
    model = ScriptedModel({1: 2, 2: 3, 3: 2, 10: 20, 11: 21, 12: 4, 4: 5, 5: 5, 7: 8, 8: 9, 9: 9})
    calls = []

    def hook(index: int, ids: list[int]) -> list[int] | None:
        calls.append((index, list(ids)))
        return [10, 11, 12] if ids[-1] == 3 else None

    stops = (3, 5)
    responses = TorchEngine(model).generate([
        Request((1,), SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=stops)),
        Request((7, 8), SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=stops)),
        Request((1,), SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=stops)),
    ], tool_hook=hook)
    tool, other, truncated = responses
    assert (tool.token_ids, tool.policy_mask, tool.finish_reason) == (
        [2, 3, 10, 11, 12, 4, 5], [1, 1, 0, 0, 0, 1, 1], "stop")
    assert [tool.logprobs[i] for i in (2, 3, 4)] == [0.0, 0.0, 0.0]
    assert max(abs(tool.logprobs[i]) for i in (0, 1, 5, 6)) < 1e-3
    assert [ids for index, ids in calls if index == 0] == [[2], [2, 3], [2, 3, 10, 11, 12, 4], [2, 3, 10, 11, 12, 4, 5]]
    assert {(12, 5), (4, 6)} <= model.fed  # the injected ids went through the model at their positions
    assert (other.token_ids, other.finish_reason) == ([9] * 6, "length")
    assert (truncated.token_ids, truncated.policy_mask, truncated.finish_reason) == (
        [2, 3, 10, 11], [1, 1, 0, 0], "length")


def test_batches_sort_by_length_and_hold_one_length_under_transformer_engine():
    assert plan_batches([3, 5, 3, 4], 2, equal_lengths=False) == [[0, 2], [3, 1]]
    assert plan_batches([3, 5, 3, 4], 8, equal_lengths=True) == [[0, 2], [3], [1]]


def test_layouts_and_settings_the_engine_cannot_run_are_refused():
    base = dict(pipeline_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False)
    for key, value, name in (("pipeline_model_parallel_size", 2, "parallel.pp"),
                             ("context_parallel_size", 2, "parallel.cp"),
                             ("sequence_parallel", True, "parallel.sequence_parallel")):
        with pytest.raises(ConfigError, match=name):
            check_layout(types.SimpleNamespace(**{**base, key: value}))
    with pytest.raises(ConfigError, match="sampling.temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ConfigError, match="sampling.top_p"):
        SamplingParams(top_p=0.0)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_tensor_parallel_2_generates_what_1_does(tmp_path):
    config = tiny_config()
    state = hf_state(hf_model(config))
    torch.save(state, tmp_path / "state.pt")
    requests = [Request(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=12)),
                Request(PROMPTS[1], SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_new_tokens=12)),
                Request(PROMPTS[2], SamplingParams(temperature=1.0, top_k=10, seed=6, max_new_tokens=12))]
    inject_after, injected = 3, [40, 41]
    torch.save((requests, inject_after, injected), tmp_path / "requests.pt")
    expected = TorchEngine(_model(config, state)).generate(
        requests, tool_hook=lambda index, ids: injected if index == 0 and len(ids) == inject_after else None)
    out = str(tmp_path / "tp2")
    mp.spawn(distributed_worker.run, nprocs=2, join=True,
             args=(2, _port(), generation_worker.tp_generate,
                   (config, str(tmp_path / "state.pt"), str(tmp_path / "requests.pt"), out, 2)))
    for rank in (0, 1):
        for got, want in zip(torch.load(f"{out}.rank{rank}", weights_only=False), expected):
            assert (got.token_ids, got.policy_mask, got.finish_reason) == (
                want.token_ids, want.policy_mask, want.finish_reason)
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
    assert expected[0].policy_mask[inject_after:inject_after + 2] == [0, 0]


@pytest.mark.slow
def test_smollm2_kv_cache_greedy_equals_full_recomputation():
    from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model
    from nemo_plugins.data.tokenizer import load_tokenizer
    from nemo_plugins.eval.generate import greedy_generate

    source = ModelSource.parse("embedded:smollm2")
    _, model = load_model(source, ParallelConfig())
    model.eval()
    tokenizer = load_tokenizer(hf_dir(source))
    texts = ["def fibonacci(n):", "The capital of France is",
             "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
    prompts = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, loop=NO_LOOP_STOP)
    responses = TorchEngine(model).generate([Request(p, params) for p in prompts])
    references = [_greedy_by_recomputation(model, p, 24) for p in prompts]
    for response, reference in zip(responses, references):
        assert response.token_ids == reference
    eos = tokenizer.eos_token_id
    first = references[0][: references[0].index(eos) + 1] if eos in references[0] else references[0]
    assert greedy_generate(model, tokenizer, texts[0], 24) == tokenizer.decode(first)


def test_backends_are_chosen_by_name_and_megatrons_needs_a_gpu():
    from nemo_plugins.generation import build_backend

    model = ScriptedModel({})
    assert isinstance(build_backend("torch", model), TorchEngine)
    with pytest.raises(ConfigError, match="generation.backend"):
        build_backend("vllm", model)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="generation.backend=megatron needs CUDA"):
            build_backend("megatron", model)
