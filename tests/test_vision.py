"""The vision-language model against transformers' own Mistral3ForConditionalGeneration (tiny, random, built and saved
by transformers in a temp dir): image + text logits, preprocessing, the token layout, the frozen encoder, Mistral3
checkpoints through a megatron checkpoint and back, and the errors bad image inputs give."""

import json

import pytest
import torch
import transformers
from PIL import Image

from nemo_plugins.convert import hf_io
from nemo_plugins.convert.sources import ModelSource
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.vision.checkpoint import (
    VISION_CONFIG_NAME,
    export_mistral3,
    load_vision_language_model,
    save_megatron,
    source_vision,
)
from nemo_plugins.vision.config import VisionConfig
from nemo_plugins.vision.images import ImageProcessing, load_image, preprocess
from nemo_plugins.vision.tokens import image_token_mask, image_tokens, interleave
from tests.test_mistral3_source import TEXT, VISION, mistral3_model, save

TOKEN_PIXELS = VISION["patch_size"] * 2  # Mistral3Config's default spatial_merge_size


def source(path):
    return ModelSource.parse(f"hf:{path}")


def images_and_tokens(vision, seed=1):
    """Two images of different shapes (2x1 and 1x2 tokens) between text tokens (ids clear of the image ids)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 2 * TOKEN_PIXELS, TOKEN_PIXELS, generator=generator),
              torch.randn(3, TOKEN_PIXELS, 2 * TOKEN_PIXELS, generator=generator)]
    ids, images = interleave([[1, 20, 21], images[0], [30, 31], images[1], [40, 41, 42]], vision)
    return torch.tensor([ids]), images


def transformers_logits(model, tokens, images):
    """transformers' path: pixel batch zero-padded to the largest image, with each image's size."""
    sizes = torch.tensor([[p.shape[1], p.shape[2]] for p in images])
    pixels = torch.zeros(len(images), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    for i, p in enumerate(images):
        pixels[i, :, : p.shape[1], : p.shape[2]] = p
    with torch.no_grad():
        return model(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits


def our_logits(model, tokens, images):
    with torch.no_grad():
        return model.eval()(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1), images=images)


@pytest.fixture
def parent(tmp_path):
    reference = mistral3_model(TEXT["mistral"])
    return reference, save(reference, tmp_path / "m3")


@pytest.mark.parametrize("original_format", [True, False], ids=["language_model.model", "model.language_model"])
@pytest.mark.parametrize("kind", sorted(TEXT))
def test_image_and_text_logits_equal_transformers(kind, original_format, tmp_path):
    reference = mistral3_model(TEXT[kind])
    path = save(reference, tmp_path / "m3", original_format, drop_outer_tie=not TEXT[kind].tie_embeddings)
    text, vision, model = load_vision_language_model(source(path), ParallelConfig())
    tokens, images = images_and_tokens(vision)
    ours = our_logits(model, tokens, images)
    theirs = transformers_logits(reference, tokens, images)
    assert (ours - theirs).abs().max().item() <= 1e-4
    with torch.no_grad():
        text_only = reference(input_ids=tokens).logits
    assert (theirs - text_only).abs().max().item() > 1e-2, "the images change the logits (they were placed)"


def test_loaded_parts_are_the_checkpoints(parent):
    reference, path = parent
    _, vision, model = load_vision_language_model(source(path), ParallelConfig())
    assert vision.hidden_size == VISION["hidden_size"] and vision.image_token_id == reference.config.image_token_id
    for ours, theirs in ((model.vision_tower, reference.model.vision_tower),
                         (model.multi_modal_projector, reference.model.multi_modal_projector)):
        theirs = theirs.state_dict()
        assert ours.state_dict().keys() == theirs.keys()
        assert all(torch.equal(t, theirs[n]) for n, t in ours.state_dict().items())


def test_a_child_gets_a_fresh_projector_and_the_parents_encoder(parent):
    reference, path = parent
    _, _, one = load_vision_language_model(source(path), ParallelConfig(), fresh_projector=True)
    _, _, two = load_vision_language_model(source(path), ParallelConfig(), fresh_projector=True)
    parents = reference.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(one.multi_modal_projector.linear_1.weight, parents)
    assert torch.equal(one.multi_modal_projector.linear_1.weight, two.multi_modal_projector.linear_1.weight)
    assert torch.equal(one.vision_tower.patch_conv.weight, reference.model.vision_tower.patch_conv.weight)


def test_only_the_projector_and_language_model_get_gradients(parent):
    _, path = parent
    _, vision, model = load_vision_language_model(source(path), ParallelConfig())
    model.train()
    assert not model.vision_tower.training, "the frozen encoder stays in eval mode"
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    tokens, images = images_and_tokens(vision)
    positions = torch.arange(tokens.shape[1])[None]
    model(tokens, positions, labels=tokens.roll(-1, 1), images=images).sum().backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.multi_modal_projector.parameters())
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


def test_hf_to_megatron_to_hf_carries_encoder_and_projector(parent, tmp_path):
    reference, path = parent
    text, vision, model = load_vision_language_model(source(path), ParallelConfig())
    save_megatron(model, text, vision, tmp_path / "megatron")
    assert (tmp_path / "megatron" / VISION_CONFIG_NAME).is_file()
    megatron = ModelSource.parse(f"megatron:{tmp_path / 'megatron'}")
    assert source_vision(megatron) == vision
    text2, vision2, reloaded = load_vision_language_model(megatron, ParallelConfig())
    export_mistral3(reloaded, text2, vision2, tmp_path / "hf", max_shard_bytes=60_000)
    assert (tmp_path / "hf" / hf_io.INDEX_NAME).is_file(), "sharded"
    back = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                         attn_implementation="eager").eval()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "Mistral3ForConditionalGeneration"]
    original, exported = reference.state_dict(), back.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[n], t) for n, t in original.items()), "every tensor bit-identical"
    tokens, images = images_and_tokens(vision)
    assert torch.equal(transformers_logits(back, tokens, images), transformers_logits(reference, tokens, images))


def test_preprocessing_follows_transformers_pixtral_processor():
    processing = ImageProcessing(token_pixels=TOKEN_PIXELS, longest_edge=4 * TOKEN_PIXELS)
    theirs = transformers.PixtralImageProcessorPil(patch_size={"height": TOKEN_PIXELS, "width": TOKEN_PIXELS},
                                                   size={"longest_edge": 4 * TOKEN_PIXELS})
    generator = torch.Generator().manual_seed(0)
    for height, width in ((50, 30), (200, 90), (56, 56)):  # not multiples; over longest_edge; exact
        image = Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator,
                                              dtype=torch.uint8).numpy())
        ours = preprocess(image, processing)
        expected = theirs(image, return_tensors="pt")
        h, w = expected["image_sizes"][0].tolist()
        assert tuple(ours.shape) == (3, h, w)
        assert h % TOKEN_PIXELS == 0 and w % TOKEN_PIXELS == 0 and max(h, w) <= 4 * TOKEN_PIXELS
        torch.testing.assert_close(ours, expected["pixel_values"][0, :, :h, :w], rtol=0, atol=1e-5)


def test_token_layout_is_rows_of_img_with_breaks_and_an_end():
    vision = VisionConfig(encoder=dict(VISION))
    img, brk, end = 10, 12, 13
    assert image_tokens(2 * TOKEN_PIXELS, 3 * TOKEN_PIXELS, vision) == [img, img, img, brk, img, img, img, end]
    assert image_tokens(TOKEN_PIXELS, TOKEN_PIXELS, vision) == [img, end]
    with pytest.raises(DataError, match="not a whole number"):
        image_tokens(TOKEN_PIXELS + 1, TOKEN_PIXELS, vision)
    ids, _ = interleave([[5], torch.zeros(3, TOKEN_PIXELS, 2 * TOKEN_PIXELS), [6]], vision)
    assert image_token_mask(torch.tensor(ids), vision).tolist() == [False, True, True, True, False]


def test_vision_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="vision_config"):
        VisionConfig(encoder={"hidden_size": 8})
    with pytest.raises(ConfigError, match="distinct"):
        VisionConfig(encoder=dict(VISION), image_break_token_id=10)


def test_bad_image_files_name_where_they_were_referenced(tmp_path):
    processing = ImageProcessing(token_pixels=TOKEN_PIXELS, max_input_side=100)
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 20), "red").save(good)
    assert load_image(good, "data.jsonl:1", processing).shape == (3, TOKEN_PIXELS, 2 * TOKEN_PIXELS)
    (tmp_path / "text.png").write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    Image.new("RGB", (101, 20)).save(tmp_path / "big.png")
    cases = {"missing.png": "not found", "text.png": "not an image", "truncated.png": "corrupt|cannot open",
             "big.png": "max_input_side=100"}
    for line, (name, message) in enumerate(cases.items(), start=2):
        with pytest.raises(DataError, match=f"^data.jsonl:{line}: .*({message})"):
            load_image(tmp_path / name, f"data.jsonl:{line}", processing)


def test_image_tokens_without_images_are_refused(parent):
    _, path = parent
    _, vision, model = load_vision_language_model(source(path), ParallelConfig())
    tokens, images = images_and_tokens(vision)
    positions = torch.arange(tokens.shape[1])[None]
    with pytest.raises(DataError, match=r"\[IMG\] tokens .* but no images"):
        model(tokens, positions)
    with pytest.raises(DataError, match="every \\[IMG\\] needs its image"):
        model(tokens, positions, images=images[:1])


def test_convert_recipe_hf_to_megatron_to_hf_keeps_a_mistral3_model(parent, tmp_path):
    from recipes import convert

    reference, path = parent
    convert.run(convert.parse_args(["--src", f"hf:{path}", "--to-megatron", str(tmp_path / "megatron")]))
    convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'megatron'}", "--to-hf", str(tmp_path / "hf")]))
    back = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                         attn_implementation="eager").eval()
    original, exported = reference.state_dict(), back.state_dict()
    assert exported.keys() == original.keys() and all(torch.equal(exported[n], t) for n, t in original.items())
    tokens, images = images_and_tokens(source_vision(ModelSource.parse(f"hf:{tmp_path / 'hf'}")))
    assert torch.equal(transformers_logits(back, tokens, images), transformers_logits(reference, tokens, images))
