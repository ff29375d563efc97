"""The projector-only captioning mechanics at toy size: the caption prompt's layout, the projector learning while the
encoder and the language model stay bit-identical, and the generator's labels."""

import pytest
import torch

from bench.vision_demo import IMAGE_SIZE, TEXT, VISION
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.vision.captioning import BOS, EOS, WORD_IDS, caption_batch, train_projector
from nemo_plugins.vision.images import ImageProcessing
from nemo_plugins.vision.model import build_vision_language_model
from nemo_plugins.vision.synthetic import COLOURS, make_split

PROCESSING = ImageProcessing(token_pixels=VISION.token_pixels, longest_edge=IMAGE_SIZE)


def test_caption_prompt_scores_exactly_the_positions_before_each_word():
    samples = make_split(2, 0, IMAGE_SIZE)
    tokens, targets, scored, images = caption_batch(samples, VISION, PROCESSING)
    side = IMAGE_SIZE // VISION.token_pixels
    assert len(images) == 2 and tokens.shape == (2, 1 + side * (side + 1) + 3 + 1)
    for row, sample in zip(range(2), samples):
        assert tokens[row, 0] == BOS and tokens[row, -1] == EOS
        assert tokens[row, -5] == VISION.image_end_token_id
        assert targets[row][scored[row]].tolist() == [WORD_IDS[w] for w in sample.caption]


def test_generated_colours_are_the_captions():
    for sample in make_split(8, 3, IMAGE_SIZE):
        pixels = torch.tensor(list(sample.image.getdata()))
        assert (pixels == torch.tensor(COLOURS[sample.caption[0]])).all(-1).sum() > 100


@pytest.mark.slow
def test_training_moves_only_the_projector_and_lowers_the_caption_loss():
    torch.manual_seed(0)
    model = build_vision_language_model(TEXT, VISION, ParallelConfig())
    samples = make_split(32, 1, IMAGE_SIZE)
    frozen = {n: t.clone() for n, t in model.state_dict().items()
              if isinstance(t, torch.Tensor) and not n.startswith("multi_modal_projector.")}
    projector = {n: t.clone() for n, t in model.multi_modal_projector.state_dict().items()}
    losses = train_projector(model, samples, VISION, PROCESSING, steps=12, batch_size=8, lr=1e-2)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in frozen.items()), "encoder and LM bit-identical"
    assert not any(torch.equal(model.multi_modal_projector.state_dict()[n], t) for n, t in projector.items())
    assert sum(losses[-3:]) < sum(losses[:3]), "the caption loss falls when only the projector learns"
