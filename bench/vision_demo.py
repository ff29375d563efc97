"""CPU demonstration of the vision mechanics (issue 17), honestly labelled: NOT a trained vision model.

The demo parent has no vision tower, so this uses a tiny randomly initialised Pixtral encoder (frozen) and a tiny
randomly initialised language model standing in for a demo child (frozen too); only a fresh Mistral3 projector is
trained, on generated captioned images (``nemo_plugins.vision.synthetic``: colour, shape, digit), and scored on a
held-out split drawn from another seed. It prints caption word accuracy before / after (chance: colour 1/4, shape
1/3, digit 1/5) and checks that the encoder's and language model's weights are bit-identical after training.

    python bench/vision_demo.py [--steps 150] [--train 512] [--heldout 128]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nemo_plugins import cpu_compat
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.vision.captioning import VOCAB_SIZE, caption_accuracy, train_projector
from nemo_plugins.vision.config import VisionConfig
from nemo_plugins.vision.images import ImageProcessing
from nemo_plugins.vision.model import build_vision_language_model
from nemo_plugins.vision.synthetic import make_split

IMAGE_SIZE = 48
VISION = VisionConfig(encoder=dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, head_dim=16, image_size=IMAGE_SIZE, patch_size=8))
TEXT = MistralConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, head_dim=16,
                     ffn_hidden_size=128, vocab_size=VOCAB_SIZE, max_position_embeddings=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=128)
    args = parser.parse_args()
    cpu_compat.install()
    initialize(ParallelConfig())
    torch.manual_seed(0)
    model = build_vision_language_model(TEXT, VISION, ParallelConfig())
    processing = ImageProcessing(token_pixels=VISION.token_pixels, longest_edge=IMAGE_SIZE)
    train, heldout = make_split(args.train, 1, IMAGE_SIZE), make_split(args.heldout, 2, IMAGE_SIZE)
    frozen = {n: t.clone() for n, t in model.state_dict().items()
              if isinstance(t, torch.Tensor) and not n.startswith("multi_modal_projector.")}
    before = caption_accuracy(model, heldout, VISION, processing)
    start = time.perf_counter()
    losses = train_projector(model, train, VISION, processing, args.steps, args.batch, args.lr)
    seconds = time.perf_counter() - start
    after = caption_accuracy(model, heldout, VISION, processing)
    unchanged = all(torch.equal(model.state_dict()[n], t) for n, t in frozen.items())
    print(json.dumps({"heldout_accuracy_before": before, "heldout_accuracy_after": after,
                      "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)], "steps": args.steps,
                      "batch": args.batch, "train_seconds": round(seconds, 1),
                      "encoder_and_language_model_bit_identical": unchanged}, indent=1))


if __name__ == "__main__":
    main()
