"""``hf:`` sources that are Mistral3ForConditionalGeneration directories (Mistral Small 3.1, the Ministral 3 releases),
built and saved by transformers itself: the text model's config and weights, in both weight layouts transformers
writes, give transformers' text-path logits; conversion keeps the vision part; evaluate runs on such a source."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from nemo_plugins.bridges import config_from_hf, config_to_hf
from nemo_plugins.convert import hf_io
from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model, multimodal_part, source_config
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import load_tokenizer, tokenizer_files
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.eval.perplexity import token_windows
from nemo_plugins.model.config import MistralConfig, YarnScaling
from recipes import convert
from recipes import evaluate as evaluate_recipe
from recipes._entry import CONF_DIR, compose_typed
from tests.conftest import tiny_config

VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              head_dim=16, image_size=56, patch_size=14)
TEXT = {
    # Mistral Small 3.1 24B's text model: a plain Mistral (rope_theta 1e9, no YaRN), untied
    "mistral": tiny_config(rope_theta=1e9, max_position_embeddings=256),
    # a Ministral 3 child: ministral3 with YaRN, attention temperature, tied (as the 3B)
    "ministral3": tiny_config(architecture="Ministral3ForCausalLM", tie_embeddings=True, max_position_embeddings=64,
                              rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=16),
                              attention_temperature_beta=0.1, rope_theta=1e6),
}


def mistral3_model(text: MistralConfig, seed: int = 0) -> torch.nn.Module:
    """A random transformers Mistral3ForConditionalGeneration whose text model has exactly ``text``'s shape."""
    text_config = {k: v for k, v in config_to_hf(text).items() if k not in ("architectures", "torch_dtype")}
    config = transformers.Mistral3Config(text_config=text_config, vision_config=dict(VISION),
                                         tie_word_embeddings=text.tie_embeddings)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def image_tokenizer(vocab_size: int, image_ids: tuple[int, int, int] = (10, 12, 13)):
    """A word-level tokenizer of ``vocab_size`` ids with ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` at ``image_ids``
    (Tekken's by default), as a released Mistral3 directory carries its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size)]
    words[:3] = ["<unk>", "<s>", "</s>"]
    for token, index in zip(("[IMG]", "[IMG_BREAK]", "[IMG_END]"), image_ids):
        words[index] = token
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", additional_special_tokens=["[IMG]", "[IMG_BREAK]",
                                                                                         "[IMG_END]"])


def save(model, path, original_format: bool = True, drop_outer_tie: bool = False, image_ids=(10, 12, 13)):
    model.save_pretrained(path, save_original_format=original_format)
    image_tokenizer(model.config.text_config.vocab_size, image_ids).save_pretrained(path)
    if drop_outer_tie:  # the released 24B config.json has no outer tie_word_embeddings
        raw = json.loads((path / "config.json").read_text())
        raw.pop("tie_word_embeddings")
        (path / "config.json").write_text(json.dumps(raw))
    return path


def stored_names(path):
    with safe_open(str(path / hf_io.SINGLE_NAME), "pt") as f:
        return set(f.keys())


def text_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("kind", sorted(TEXT))
def test_config_is_the_text_model(kind, tmp_path):
    text = TEXT[kind]
    path = save(mistral3_model(text), tmp_path / "m3", drop_outer_tie=not text.tie_embeddings)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert source_config(ModelSource.parse(f"hf:{path}")) == text


@pytest.mark.parametrize("original_format", [True, False], ids=["language_model.model", "model.language_model"])
@pytest.mark.parametrize("kind", sorted(TEXT))
def test_logits_equal_transformers_text_path(kind, original_format, tmp_path):
    text = TEXT[kind]
    reference = mistral3_model(text)
    path = save(reference, tmp_path / "m3", original_format, drop_outer_tie=not text.tie_embeddings)
    prefix = "language_model.model." if original_format else "model.language_model."
    assert any(n.startswith(prefix) for n in stored_names(path)), "the layout under test is the one transformers wrote"
    config, model = load_model(ModelSource.parse(f"hf:{path}"), ParallelConfig())
    length = 3 * 16 + 5  # past the ministral3 temperature period
    tokens = torch.randint(0, text.vocab_size, (2, length))
    with torch.no_grad():
        ours = model.eval()(tokens, torch.arange(length).expand(2, -1))
    assert (ours - text_logits(reference, tokens)).abs().max().item() <= 1e-4


def test_outer_tie_flag_never_discards_the_real_lm_head(tmp_path):
    """transformers 5.x defaults Mistral3's outer tie_word_embeddings to True; the 24B's text model is untied."""
    text = TEXT["mistral"]
    reference = mistral3_model(text)
    path = save(reference, tmp_path / "m3", drop_outer_tie=True)
    config, model = load_model(ModelSource.parse(f"hf:{path}"), ParallelConfig())
    assert not config.tie_embeddings
    assert torch.equal(model.output_layer.weight, reference.lm_head.weight)
    assert not torch.equal(model.output_layer.weight, reference.model.language_model.embed_tokens.weight)


def test_an_earlier_export_with_the_vision_part_aside_converts_to_mistral3(tmp_path):
    """Exports of Mistral3 sources written before the vision work (text CausalLM + multimodal.safetensors) are read
    whole: converting one gives the Mistral3 model back, every tensor unchanged."""
    text = TEXT["mistral"]
    reference = mistral3_model(text)
    src = save(reference, tmp_path / "m3")
    aside = tmp_path / "aside"
    reader = hf_io.HFReader(src)
    hf_io.write_streamed(((n, reader.read(n)) for n in reader.names()),
                         {n: (reader.shape(n), torch.float32) for n in reader.names()}, source_config(
                             ModelSource.parse(f"hf:{src}")), aside, extra_files=tokenizer_files(src),
                         multimodal=reader.multimodal)
    assert (aside / hf_io.MULTIMODAL_NAME).is_file()
    out = tmp_path / "out"
    shard_gb = str(20_000 / 2**30)
    convert.run(convert.parse_args(["--src", f"hf:{aside}", "--to-hf", str(out), "--max-shard-gb", shard_gb]))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert (out / hf_io.INDEX_NAME).is_file(), "sharded"
    back = transformers.Mistral3ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert back.keys() == reference.state_dict().keys()
    assert all(torch.equal(back[n], t) for n, t in reference.state_dict().items())
    assert multimodal_part(ModelSource.parse(f"hf:{out}")).tensors.keys() == {
        n.removeprefix("model.") for n in back if "vision_tower" in n or "multi_modal_projector" in n}


def test_evaluate_on_a_mistral3_source_matches_transformers_perplexity(tmp_path):
    text = tiny_config(vocab_size=49_152)
    reference = mistral3_model(text)
    src = save(reference, tmp_path / "m3", drop_outer_tie=True)
    for name, file in tokenizer_files(hf_dir(ModelSource.parse("embedded:smollm2"))).items():
        (src / name).write_bytes(file.read_bytes())
    overrides = [f"model.source=hf:{src}", "model.architecture=null", "data.seq_len=32", "data.max_windows=3",
                 "micro_batch_size=3", f"output={tmp_path / 'ppl.json'}"]
    report = evaluate_recipe.run(compose_typed("evaluate", *overrides))
    windows = token_windows(load_tokenizer(src), iter_documents(["stdlib:json", "stdlib:email"]), 32, 3)
    logits = text_logits(reference, windows[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert report["tokens"] == windows[:, 1:].numel()
    assert abs(report["mean_nll"] - expected) <= 1e-4


# Mistral-Small-3.1-24B-Base-2503's config.json (text part as released; vision_config abridged), as quoted by the
# vLLM and transformers test fixtures of that checkpoint.
MISTRAL_SMALL_3_1 = {
    "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
    "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
    "text_config": {"attention_dropout": 0.0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
                    "initializer_range": 0.02, "intermediate_size": 32768, "max_position_embeddings": 131072,
                    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
                    "sliding_window": None, "use_cache": True, "vocab_size": 131072},
    "torch_dtype": "bfloat16", "vision_config": {"model_type": "pixtral", "hidden_size": 1024},
    "vision_feature_layer": -1,
}


def test_the_parent_preset_is_the_released_24b_text_model():
    from omegaconf import OmegaConf

    preset = OmegaConf.load(f"{CONF_DIR}/model/mistral_small_3_1_24b.yaml")
    assert MistralConfig.from_dict(preset.architecture) == config_from_hf(MISTRAL_SMALL_3_1)
