"""Interleaved image-text data in the single-pass mix (``data/interleaved.py``): the token layout and side record,
rows that cut an image, the text-target mask, bad inputs with file:line and nothing written; image token ids read
from the tokenizer; the projector trained through megatron's DDP and optimizer while the encoder stays frozen."""

import json

import pytest
import torch
from PIL import Image

from nemo_plugins.convert.sources import ModelSource, hf_dir
from nemo_plugins.data.interleaved import ImageInputs, text_target_mask
from nemo_plugins.data.mix import Cursor, SourceSpec, build_mix
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.step import DistillationStep, use_per_token_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.optimizer import build_optimizer, wrap_for_training
from nemo_plugins.vision.checkpoint import load_vision_language_model, source_vision
from nemo_plugins.vision.config import VisionConfig, token_ids
from nemo_plugins.vision.images import ImageProcessing
from nemo_plugins.vision.tokens import image_token_mask, row_features
from tests.test_mistral3_source import TEXT, VISION, image_tokenizer, mistral3_model, save

VISION_CONFIG = VisionConfig(encoder=dict(VISION))  # ids 10 / 12 / 13, as image_tokenizer spells them
PX = VISION_CONFIG.token_pixels
IMG, BREAK, END, EOS = 10, 12, 13, 2


def inputs(**changes) -> ImageInputs:
    return ImageInputs(VISION_CONFIG, ImageProcessing(PX, **changes))


def picture(path, height, width, seed=0):
    torch.manual_seed(seed)
    Image.fromarray(torch.randint(0, 255, (height, width, 3), dtype=torch.uint8).numpy()).save(path)
    return path.name


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tokenizer(tmp_path):
    image_tokenizer(128).save_pretrained(tmp_path / "tok")
    return load_tokenizer(tmp_path / "tok")


def interleaved_mix(tokenizer, path, cache, images=None, text=None):
    sources = [SourceSpec("pics", [str(path)], 1.0, "interleaved")]
    sources += [SourceSpec("text", [str(text)])] if text else []
    return build_mix(tokenizer, sources, str(cache), 0.0, images=images or inputs())


def test_a_record_is_its_text_and_image_layouts_in_order(tokenizer, tmp_path):
    tall, wide = picture(tmp_path / "tall.png", 2 * PX, PX), picture(tmp_path / "wide.png", PX - 3, 2 * PX, 1)
    path = jsonl(tmp_path / "d.jsonl", [{"parts": [{"text": "w20 w21"}, {"image": tall}, {"text": "w22"}]},
                                        {"parts": [{"image": str(tmp_path / wide)}, {"text": "w23"}]}])
    mix = interleaved_mix(tokenizer, path, tmp_path / "cache")
    source = mix.sources[0]
    expected = [20, 21, IMG, BREAK, IMG, END, 22, EOS, IMG, IMG, END, 23, EOS]  # 2x1 tokens, then 1x2 (rounded up)
    assert source.file.tokens.tolist() == expected
    assert [r["offset"] for r in source.images.records] == [2, 8]
    assert [r["size"] for r in source.images.records] == [[2 * PX, PX], [PX, 2 * PX]]
    assert [r["where"] for r in source.images.records] == [f"{path}:1", f"{path}:2"]


def image_spans(tokens: list[int]) -> list[tuple[int, int]]:
    """Naive: each image's layout as [first token, one past its [IMG_END])."""
    spans, begin = [], None
    for t, token in enumerate(tokens):
        if token in (IMG, BREAK, END) and begin is None:
            begin = t
        if token == END:
            spans.append((begin, t + 1))
            begin = None
    return spans


def test_rows_cutting_an_image_keep_exactly_the_features_of_their_img_tokens(tokenizer, tmp_path):
    """Against a naive reference: every window of the stream gets the features of exactly the [IMG] tokens inside
    it, in order (each [IMG]'s feature planted as its global index)."""
    names = [picture(tmp_path / f"{i}.png", (1 + i % 2) * PX, (2 - i % 2) * PX, i) for i in range(3)]
    path = jsonl(tmp_path / "d.jsonl", [{"parts": [{"text": "w30"}, {"image": n}, {"text": "w31 w32"}]} for n in names])
    index = interleaved_mix(tokenizer, path, tmp_path / "cache").sources[0].images
    stream = index.file.tokens.tolist()
    tokens = torch.tensor(stream)
    is_img = tokens == IMG
    global_index = torch.cumsum(is_img.long(), 0) - 1
    spans = image_spans(stream)
    cut = 0
    for length in (3, 5, 7):
        for start in range(len(stream) - length + 1):
            end = start + length
            row = index.row_images(start, end)
            held = [(a, b) for a, b in spans if bool(is_img[max(a, start):min(b, end)].any())]
            assert len(row) == len(held)
            whole = [global_index[a:b][is_img[a:b]] for a, b in held]  # what the projector gives for whole images
            features = torch.cat(whole).float()[:, None] if whole else torch.zeros(0, 1)
            kept = row_features(features, row, VISION_CONFIG) if row else torch.zeros(0, 1)
            assert kept[:, 0].tolist() == global_index[start:end][is_img[start:end]].tolist(), (start, length)
            cut += any(a < start or b > end for a, b in held)
    assert cut > 0, "some windows cut an image"


def test_mixed_rows_carry_their_images_and_mask_only_image_targets(tokenizer, tmp_path):
    names = [picture(tmp_path / f"{i}.png", PX, 2 * PX, i) for i in range(4)]
    path = jsonl(tmp_path / "d.jsonl", [{"parts": [{"text": "w40 w41"}, {"image": n}, {"text": "w42 w43 w44"}]}
                                        for n in names])
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text(" ".join(f"w{50 + i % 40}" for i in range(200)))
    mix = interleaved_mix(tokenizer, path, tmp_path / "cache", text=tmp_path / "t")
    tokens, positions, mask, row_images, cursor = mix.next_rows(Cursor(), 4, 9)
    assert cursor.rows == {"pics": 2, "text": 2}
    for r in range(4):
        images_in_row = int((tokens[r] == IMG).sum())
        assert sum(image.count for image in row_images[r]) == images_in_row
        for t in range(8):
            assert mask[r, t] == float(int(tokens[r, t + 1]) not in (IMG, BREAK, END)), (r, t)
    after_image = (tokens[:, :-1] == END) & ~image_token_mask(tokens[:, 1:], VISION_CONFIG)
    assert after_image.any() and bool((mask[:, :-1][after_image] == 1).all()), "text after an image is a KL target"
    assert torch.equal(text_target_mask(tokens, VISION_CONFIG), mask)


def test_a_text_only_mix_hands_out_rows_as_before(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"w{20 + i % 50}" for i in range(300)))
    mix = build_mix(tokenizer, [SourceSpec("text", [str(tmp_path / "a.txt")])], str(tmp_path / "cache"), 0.1,
                    images=inputs())
    out = mix.next_rows(Cursor(), 2, 16)
    assert len(out) == 3 and mix.images is None
    assert "images" not in mix.identity()["sources"]["text"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "not_an_image", "too_large", "image_token_in_text", "record"])
def test_bad_inputs_name_file_and_line_and_write_nothing(case, tokenizer, tmp_path):
    good = picture(tmp_path / "good.png", PX, PX)
    picture(tmp_path / "big.png", 3 * PX, 3 * PX)
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("not an image")
    bad = {"missing": {"parts": [{"image": "absent.png"}]}, "corrupt": {"parts": [{"image": "corrupt.png"}]},
           "not_an_image": {"parts": [{"image": "text.png"}]}, "too_large": {"parts": [{"image": "big.png"}]},
           "image_token_in_text": {"parts": [{"text": "w20 [IMG] w21"}]},
           "record": {"parts": [{"text": "w20", "image": good}]}}[case]
    path = jsonl(tmp_path / "d.jsonl", [{"parts": [{"text": "w20"}, {"image": good}]}, bad])
    with pytest.raises(DataError, match=f"{path}:2"):
        interleaved_mix(tokenizer, path, tmp_path / "cache", images=inputs(max_input_side=2 * PX))
    assert not any((tmp_path / "cache").glob("*")), "nothing written"


def test_image_token_ids_are_the_tokenizers(tmp_path):
    path = save(mistral3_model(TEXT["mistral"]), tmp_path / "m3", image_ids=(20, 21, 22))
    with pytest.raises(ConfigError, match=r"config 10 vs tokenizer 20 \(\[IMG\]\)"):
        source_vision(ModelSource.parse(f"hf:{path}"))
    with pytest.raises(ConfigError, match=r"no \['\[IMG\]', '\[IMG_BREAK\]', '\[IMG_END\]'\] token"):
        token_ids(hf_dir(ModelSource.parse("embedded:smollm2")), "smollm2")
    (tmp_path / "m3" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "m3" / "config.json").read_text()), "image_token_index": 20}))
    vision = source_vision(ModelSource.parse(f"hf:{path}"))
    assert (vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id) == (20, 21, 22)


def test_the_projector_trains_in_megatrons_ddp_and_optimizer_and_the_encoder_stays_frozen(tokenizer, tmp_path):
    path = save(mistral3_model(TEXT["mistral"]), tmp_path / "m3")
    source = ModelSource.parse(f"hf:{path}")
    _, _, teacher = load_vision_language_model(source, ParallelConfig())
    _, _, student = load_vision_language_model(source, ParallelConfig(), fresh_projector=True)
    encoder_before = {n: t.clone() for n, t in student.vision_tower.state_dict().items()}
    projector_before = {n: t.clone() for n, t in student.multi_modal_projector.state_dict().items()}
    use_per_token_loss(student)
    ddp, distributed = wrap_for_training(student)
    optimizer, _ = build_optimizer(ddp, OptimizerSettings(lr=1e-2, warmup_fraction=0.0), 2, distributed)
    in_buffers = {id(p) for buffer in ddp.buffers for p in buffer.params}
    assert all(id(p) not in in_buffers and not p.requires_grad for p in student.vision_tower.parameters())
    assert all(id(p) in in_buffers for p in student.multi_modal_projector.parameters())
    names = [picture(tmp_path / f"{i}.png", PX, 2 * PX, i) for i in range(4)]
    data = jsonl(tmp_path / "d.jsonl", [{"parts": [{"text": "w40"}, {"image": n}, {"text": "w42 w43"}]} for n in names])
    mix = interleaved_mix(tokenizer, data, tmp_path / "cache")
    *batch, _ = mix.next_rows(Cursor(), 2, 12)
    train = TrainSettings(seq_len=12, micro_batch_size=1, global_batch_size=2, train_tokens=24)
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = DistillationStep(Teacher(teacher), KLOptions(), train)(ddp, tuple(batch))
    assert loss > 0
    assert all(float(p.main_grad.abs().sum()) > 0 for p in student.multi_modal_projector.parameters())
    optimizer.step()
    assert all(not torch.equal(t, projector_before[n]) for n, t in student.multi_modal_projector.state_dict().items()
               if n.endswith("weight"))
    assert all(torch.equal(t, encoder_before[n]) for n, t in student.vision_tower.state_dict().items())
    # the plain megatron optimizer (CPU) keeps Adam state per model parameter: the projector's, never the encoder's
    with_state = {id(p) for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for p in opt.optimizer.state}
    assert all(id(p) in with_state for p in student.multi_modal_projector.parameters())
    assert not any(id(p) in with_state for p in student.vision_tower.parameters())
