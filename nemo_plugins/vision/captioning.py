"""Projector-only captioning on generated images: the mechanics of "a fresh projector per child" made measurable.

A caption prompt is ``[BOS] <image tokens> colour shape digit [EOS]``; the scored positions are the three that
predict the caption's words (the image tokens themselves are never targets). ``train_projector`` trains the
projector alone (the encoder is frozen, the language model is frozen here too) with AdamW, a plain torch loop over
micro-batches: the demonstration isolates the projector, it is not the cascade's training loop. ``caption_accuracy``
is greedy per-word accuracy on a split, per field and overall.
"""

from __future__ import annotations

import torch

from nemo_plugins.vision.config import VisionConfig
from nemo_plugins.vision.images import ImageProcessing, preprocess
from nemo_plugins.vision.model import MistralVisionLanguageModel
from nemo_plugins.vision.synthetic import FIELDS, Sample
from nemo_plugins.vision.tokens import interleave

BOS, EOS = 1, 2
FIRST_WORD_ID = 16  # clear of BOS/EOS and Tekken's image ids (10, 12, 13)
WORD_IDS = {word: FIRST_WORD_ID + i for i, word in enumerate(w for words in FIELDS for w in words)}
VOCAB_SIZE = FIRST_WORD_ID + len(WORD_IDS)


def caption_batch(samples: list[Sample], vision: VisionConfig, processing: ImageProcessing,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Tokens ``[b, s]``, next-token targets, the mask of positions predicting a caption word, and the images."""
    rows, images = [], []
    for sample in samples:
        pixels = preprocess(sample.image, processing)
        ids, _ = interleave([[BOS], pixels, [WORD_IDS[w] for w in sample.caption], [EOS]], vision)
        rows.append(ids)
        images.append(pixels)
    tokens = torch.tensor(rows)
    targets = tokens.roll(-1, dims=1)
    words = len(FIELDS)
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, -words - 2:-2] = True  # the positions before each caption word: [IMG_END], colour, shape
    return tokens, targets, scored, images


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)


def train_projector(model: MistralVisionLanguageModel, samples: list[Sample], vision: VisionConfig,
                    processing: ImageProcessing, steps: int, batch_size: int, lr: float, seed: int = 0) -> list[float]:
    """Train only ``model.multi_modal_projector`` on caption loss; returns the per-step mean loss."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.multi_modal_projector.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        picked = torch.randint(len(samples), (batch_size,), generator=generator).tolist()
        tokens, targets, scored, images = caption_batch([samples[i] for i in picked], vision, processing)
        per_token = model(tokens, _positions(tokens), labels=targets, images=images)
        loss = per_token[scored].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def caption_accuracy(model: MistralVisionLanguageModel, samples: list[Sample], vision: VisionConfig,
                     processing: ImageProcessing, batch_size: int = 64) -> dict[str, float]:
    """Greedy next-word accuracy on each caption field and overall (chance: 1/4, 1/3, 1/5)."""
    model.eval()
    hits = torch.zeros(len(FIELDS))
    for start in range(0, len(samples), batch_size):
        tokens, targets, scored, images = caption_batch(samples[start:start + batch_size], vision, processing)
        predicted = model(tokens, _positions(tokens), images=images).argmax(-1)
        hits += (predicted == targets)[scored].reshape(-1, len(FIELDS)).float().sum(0)
    per_field = hits / len(samples)
    names = ("colour", "shape", "digit")
    return {**{name: float(a) for name, a in zip(names, per_field)}, "overall": float(per_field.mean())}
