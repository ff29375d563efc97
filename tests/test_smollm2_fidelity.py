"""The real parent: SmolLM2-135M from its GGUF, megatron vs transformers on real text (fp32)."""

import math

import pytest
import torch

from nemo_plugins.convert import hf_io
from nemo_plugins.convert.gguf_reader import read_gguf
from nemo_plugins.convert.model_io import gather_hf_state
from nemo_plugins.convert.sources import ModelSource, embedded_gguf, hf_dir, load_model
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.eval.perplexity import evaluate_perplexity, token_windows

pytestmark = pytest.mark.slow
SOURCE = ModelSource.parse("embedded:smollm2")


@pytest.fixture(scope="module")
def parent():
    config, model = load_model(SOURCE, ParallelConfig())
    return config, model.eval()


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir(SOURCE)), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def windows():
    tokenizer = load_tokenizer(hf_dir(SOURCE))
    return token_windows(tokenizer, iter_documents(["stdlib:json"]), seq_len=256, max_windows=4)


def test_gguf_reader_matches_transformers_gguf_loader():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf("smollm2")
    _, ours = read_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = model.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_parent_logits_match_transformers(parent, reference, windows):
    config, model = parent
    tokens = windows[:2, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model(tokens, positions)
    diff = (actual - expected).abs().max().item()
    print(f"max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_parent_perplexity_matches_transformers(parent, reference, windows):
    _, model = parent
    ours = evaluate_perplexity(model, windows, micro_batch_size=2, progress=False)
    nll = []
    with torch.no_grad():
        for w in windows:  # the same targets: every token of the window after the first
            logits = reference(w[None, :-1]).logits[0]
            nll.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
    theirs = math.exp(torch.stack(nll).sum().item() / (windows.shape[0] * (windows.shape[1] - 1)))
    print(f"perplexity: megatron {ours.perplexity:.4f}, transformers {theirs:.4f}")
    assert abs(ours.perplexity - theirs) / theirs <= 0.005
    assert 2.0 < ours.perplexity < 30.0  # a working model on Python source, not noise


def test_exported_dir_roundtrips_and_generates(parent, tmp_path):
    from transformers import AutoModelForCausalLM

    config, model = parent
    state = gather_hf_state(model, config)
    original = hf_io.read_state(hf_dir(SOURCE))
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    out = hf_io.write_model_dir(state, config, tmp_path / "export", max_shard_bytes=100 * 2**20)
    assert (out / hf_io.INDEX_NAME).is_file(), "sharded export with an index"
    tokenizer = load_tokenizer(hf_dir(SOURCE))
    check_vocab(tokenizer, config)
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = tokenizer("import json\n\ndef load(path):\n    with open(path) as f:", return_tensors="pt")
    generated = exported.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(generated[0])
    print(text)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert text.startswith("import json")
