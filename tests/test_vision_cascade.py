"""The cascade on a tiny multimodal parent: a random Mistral3ForConditionalGeneration built and saved by transformers
(with a tokenizer carrying the image tokens), pruned into two children that keep its encoder bit for bit and get
fresh projectors, distilled through the one megatron training loop, exported as Mistral3 directories that
transformers loads and runs on an image + text prompt with our logits."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from safetensors.torch import load_file

from nemo_plugins.bridges import config_to_hf
from nemo_plugins.cascade.plan import plan_from_config
from nemo_plugins.cascade.runner import CascadeInputs, run_cascade, sft_child
from nemo_plugins.convert.sources import ModelSource, hf_dir
from nemo_plugins.data.from_config import load_chat_data
from nemo_plugins.data.mix import Cursor, build_mix
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.manifest import read_json
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.vision.checkpoint import image_inputs, load_vision_language_model, source_vision
from nemo_plugins.vision.config import IMAGE_TOKENS
from nemo_plugins.vision.projector import build_projector
from recipes._entry import compose_typed
from recipes.tokenize import run as tokenize
from tests.conftest import tiny_config
from tests.test_mistral3_source import VISION
from tests.test_vision import TOKEN_PIXELS, our_logits, transformers_logits

SMOLLM2_VOCAB = 49_152
CHILDREN = {"a": (3, 40, 80), "b": (2, 32, 64)}
BASE = [
    "model.architecture=null", "posttrain=false",
    "data.sources=[{name: json, paths: ['stdlib:json'], weight: 1.0},"
    "{name: captions, kind: interleaved, paths: ['builtin:captions?count=64&seed=0&size=56'], weight: 1.0}]",
    "cascade.children=[" + ",".join(f"{{name: {n}, num_layers: {layers}, hidden_size: {h}, ffn_hidden_size: {f}, "
                                     "tie_embeddings: true}" for n, (layers, h, f) in CHILDREN.items()) + "]",
    "stage.prune.calibration.tokens=256", "stage.prune.calibration.seq_len=64",
    "stage.prune.eval.seq_len=64", "stage.prune.eval.max_windows=2",
    "stage.distill_short.train.seq_len=64", "stage.distill_short.train.train_tokens=512",
    "stage.distill_short.optimizer.lr=3e-3",
    "stage.distill_long.train.seq_len=128", "stage.distill_long.train.train_tokens=256",
    "stage.distill_long.context.original_context=64", "stage.distill_long.context.yarn_factor=2.0",
    "stage.distill_long.long_eval.passkey_lengths=[64,128]", "stage.distill_long.long_eval.paths=['stdlib:json']",
    "report.sample_tokens=4",
]


def mistral3_parent(path: Path, text: MistralConfig) -> Path:
    """A random Mistral3 directory saved by transformers, with SmolLM2's tokenizer plus the three image tokens
    (ids 49152..49154: the config's image_token_index is the tokenizer's [IMG])."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir(ModelSource.parse("embedded:smollm2"))))
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    text_config = {k: v for k, v in config_to_hf(text).items() if k not in ("architectures", "torch_dtype")}
    config = transformers.Mistral3Config(text_config=text_config, vision_config=dict(VISION),
                                         tie_word_embeddings=text.tie_embeddings,
                                         image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cascade_inputs(cfg) -> tuple:
    """The recipe's inputs (``recipes/cascade.py``), the mix built with the parent's image settings."""
    plan = plan_from_config(cfg)
    parent = ModelSource.parse(cfg.model.source)
    tok_dir = hf_dir(parent)
    tokenizer = load_tokenizer(tok_dir)
    stage = cfg.stage.prune
    mix = build_mix(tokenizer, cfg.data.sources, cfg.data.cache_dir, cfg.data.heldout_fraction,
                    images=image_inputs(parent))
    inputs = CascadeInputs(parent=parent, mix=mix, tokenizer=tokenizer, tokenizer_dir=tok_dir,
                           prune_options=stage.options, calibration=stage.calibration, prune_eval=stage.eval,
                           out_dir=Path(cfg.output_dir),
                           dtype=torch.float32, sample_prompt=cfg.report.sample_prompt,
                           sample_tokens=cfg.report.sample_tokens, seed=plan.short.train.seed,
                           resolved_config=OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return inputs, plan


def compose_tiny(parent: Path, out_dir: Path, *extra: str):
    return compose_typed("cascade", *BASE, f"model.source=hf:{parent}", f"output_dir={out_dir}",
                    f"data.cache_dir={out_dir / 'cache'}", *extra)


def image_prompt(vision):
    """An image of 2 x 1 tokens between text ids (clear of the image ids)."""
    from nemo_plugins.vision.tokens import interleave

    pixels = torch.randn(3, 2 * TOKEN_PIXELS, TOKEN_PIXELS, generator=torch.Generator().manual_seed(3))
    ids, images = interleave([[1, 200, 201], pixels, [300, 301, 302]], vision)
    return torch.tensor([ids]), images


@pytest.fixture(scope="module")
def multimodal_parent(tmp_path_factory):
    text = tiny_config(vocab_size=SMOLLM2_VOCAB + 8, tie_embeddings=True, num_layers=4)
    return mistral3_parent(tmp_path_factory.mktemp("m3parent") / "hf", text)


@pytest.mark.slow
def test_tiny_multimodal_cascade_keeps_the_encoder_and_trains_a_projector_per_child(multimodal_parent, tmp_path):
    cfg = compose_tiny(multimodal_parent, tmp_path / "run")
    assert 56 == 2 * TOKEN_PIXELS  # the generated images are 2 x 2 image tokens
    inputs, plan = cascade_inputs(cfg)
    results = run_cascade(inputs, plan)
    parent_tensors = load_file(str(multimodal_parent / "model.safetensors"))
    encoder = {k: v for k, v in parent_tensors.items() if k.startswith("vision_tower.")}
    parent_source = ModelSource.parse(f"hf:{multimodal_parent}")
    vision = source_vision(parent_source)
    assert vision.image_token_id == SMOLLM2_VOCAB and vision.image_end_token_id == SMOLLM2_VOCAB + 2
    for name, (_, hidden, _) in CHILDREN.items():
        done = results[name]
        # prune: the child's checkpoint is vision-language, its projector the fresh seeded one for its hidden size
        pruned = ModelSource("megatron", done["prune"]["checkpoint"])
        child_text, _, pruned_model = load_vision_language_model(pruned, ParallelConfig())
        fresh = build_projector(vision, child_text)
        assert all(torch.equal(t, fresh.state_dict()[n])
                   for n, t in pruned_model.multi_modal_projector.state_dict().items())
        assert pruned_model.multi_modal_projector.linear_1.in_features == VISION["hidden_size"]
        assert pruned_model.multi_modal_projector.linear_2.out_features == hidden
        # distillation read image rows and moved the projector (its gradients come from them), never the encoder
        assert done["distill_short"]["cursor_end"]["rows"]["captions"] > 0
        short = ModelSource("megatron", done["distill_short"]["checkpoint"])
        _, _, trained = load_vision_language_model(short, ParallelConfig())
        assert not torch.equal(trained.multi_modal_projector.linear_1.weight,
                               pruned_model.multi_modal_projector.linear_1.weight)
        assert all(torch.equal(t, encoder[f"vision_tower.{n}"]) for n, t in trained.vision_tower.state_dict().items())
        # export: a Mistral3 directory with the parent's encoder bit for bit and the child's own projector
        exported_dir = Path(done["export"]["hf_dir"])
        exported = load_file(str(exported_dir / "model.safetensors"))
        assert all(torch.equal(exported[k], t) for k, t in encoder.items())
        assert exported["multi_modal_projector.linear_2.weight"].shape[0] == hidden
        reference = transformers.Mistral3ForConditionalGeneration.from_pretrained(exported_dir, dtype=torch.float32)
        reference.eval()
        _, child_vision, ours = load_vision_language_model(ModelSource.parse(f"hf:{exported_dir}"), ParallelConfig())
        tokens, images = image_prompt(child_vision)
        torch.testing.assert_close(our_logits(ours, tokens, images), transformers_logits(reference, tokens, images),
                                   atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_cascade_command_on_a_mistral3_parent_distils_on_image_rows_tokenised_beforehand(
        multimodal_parent, tmp_path):
    """``python -m recipes.tokenize`` then ``python -m recipes.cascade ... data.require_prebuilt=true`` with the
    same overrides: the tokenize command writes the captions' token file and images side file exactly where the
    cascade's mix opens them (it may not build any), and the first child's distill_short reads image rows."""
    overrides = [*BASE, f"model.source=hf:{multimodal_parent}", f"data.cache_dir={tmp_path / 'tokens'}",
                 "data.heldout_fraction=0.1"]  # a held-out row of the captions
    built = tokenize(compose_typed("tokenize", *overrides))
    assert built["captions"]["images"] == 64 and Path(built["captions"]["prefix"] + ".images.json").is_file()
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CASCADE_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "recipes.cascade", *overrides, f"output_dir={run_dir}",
                           "until=a/distill_short", "data.require_prebuilt=true",
                           f"hydra.run.dir={tmp_path / 'hydra'}"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_json(run_dir / "a" / "distill_short" / "manifest.json")
    assert manifest["cursor_end"]["rows"]["captions"] > 0 and manifest["cursor_end"]["rows"]["json"] > 0
    assert manifest["eval"]["captions/tokens"] > 0, "the captions' held-out rows are evaluated with their images"
    # the student kept its vision part
    assert source_vision(ModelSource("megatron", manifest["checkpoint"])) is not None
    assert not (run_dir / "b").exists()


SFT = ["posttrain=true", "reasoning=false",
       "chat_data.sources=[{name: arithmetic, paths: ['builtin:arithmetic?count=300'], weight: 1.0}]",
       "stage.sft_kd.train.seq_len=256", "stage.sft_kd.train.train_tokens=1024", "stage.sft_kd.optimizer.lr=3e-3",
       "stage.sft_kd.train.eval_rows_per_source=2", "stage.sft_kd.sample.max_new_tokens=4"]


@pytest.mark.slow
def test_sft_of_a_vision_model_on_text_chat_exports_mistral3_with_its_encoder_and_projector(
        multimodal_parent, tmp_path):
    """The cascade's SFT stage (``runner.sft_child``) on a Mistral3 base with text-only conversations: the checkpoint
    stays vision-language and the export is a Mistral3 directory holding the base's encoder bit for bit and the
    projector the SFT checkpoint carries, which transformers loads."""
    run_dir = tmp_path / "run"
    cfg = compose_tiny(multimodal_parent, run_dir, *SFT, f"chat_data.cache_dir={tmp_path / 'chat'}")
    inputs, plan = cascade_inputs(cfg)
    chat_format, chat = load_chat_data(cfg, inputs.tokenizer_dir, plan.sft.data_screen())
    inputs = dataclasses.replace(inputs, chat=chat, chat_format=chat_format)
    base = ModelSource.parse(f"hf:{multimodal_parent}")
    done = sft_child(inputs, plan, plan.children[0], base, Cursor(), run_dir / "sft")
    assert done["steps"] > 0 and done["cursor_end"]["rows"]["arithmetic"] > 0
    _, _, trained = load_vision_language_model(ModelSource("megatron", done["checkpoint"]), ParallelConfig())
    parent_tensors = load_file(str(multimodal_parent / "model.safetensors"))
    exported_dir = run_dir / "sft" / "hf"
    architectures = json.loads((exported_dir / "config.json").read_text())["architectures"]
    assert architectures == ["Mistral3ForConditionalGeneration"]
    exported = load_file(str(exported_dir / "model.safetensors"))
    encoder = {k: v for k, v in parent_tensors.items() if k.startswith("vision_tower.")}
    assert encoder and all(torch.equal(exported[k], t) for k, t in encoder.items())
    assert all(torch.equal(t, encoder[f"vision_tower.{n}"]) for n, t in trained.vision_tower.state_dict().items())
    projector = trained.multi_modal_projector.state_dict()
    assert projector and all(torch.equal(exported[f"multi_modal_projector.{n}"], t) for n, t in projector.items())
    text = [k for k in exported if k.startswith("language_model.") and "mlp" in k and k in parent_tensors]
    assert text and any(not torch.equal(exported[k], parent_tensors[k]) for k in text), "SFT trained the language model"
    transformers.Mistral3ForConditionalGeneration.from_pretrained(exported_dir, dtype=torch.float32)


@pytest.mark.slow
def test_the_distill_command_distils_a_mistral3_student_on_image_rows(multimodal_parent, tmp_path):
    """``python -m recipes.distill`` with a Mistral3 teacher and student on the captions alone: image rows read,
    the student's checkpoint vision-language; an image larger than ``data.max_image_side`` stops it with one line."""
    captions = ("data.sources=[{name: captions, kind: interleaved, "
                "paths: ['builtin:captions?count=64&seed=0&size=56'], weight: 1.0}]")
    command = [sys.executable, "-m", "recipes.distill", f"model.source=hf:{multimodal_parent}",
               "model.architecture=null", f"student=hf:{multimodal_parent}", captions,
               f"data.cache_dir={tmp_path / 'tokens'}",
               "data.heldout_fraction=0.2", "stage.distill.train.seq_len=64", "stage.distill.train.train_tokens=512",
               "stage.distill.train.eval_rows_per_source=2", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CASCADE_CACHE_DIR": str(tmp_path)}
    refused = subprocess.run([*command, f"output_dir={tmp_path / 'small'}", "data.max_image_side=48"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "larger than max_input_side=48 (data.max_image_side)" in refused.stderr
    done = subprocess.run([*command, f"output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest["cursor_end"]["rows"]["captions"] > 0 and manifest["eval"]["captions/tokens"] > 0
    assert source_vision(ModelSource("megatron", manifest["checkpoint"])) is not None
