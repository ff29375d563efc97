"""Generated captioned images for the vision mechanics demonstration and tests (no image data set is reachable).

Each image is a coloured shape (circle / square / triangle in one of four colours) at a random position and size on a
noisy grey background, with a black digit drawn on it; its caption is the generator's own ``(colour, shape, digit)``,
so labels are exact. Splits are drawn from independent seeds: a held-out split shares no image with the training one.
``write_interleaved`` saves a split as PNG files plus an interleaved image-text JSONL (``data/interleaved.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DIGITS = ("0", "1", "2", "3", "4")
FIELDS = (tuple(COLOURS), SHAPES, DIGITS)  # the caption's words, field by field


@dataclass(frozen=True)
class Sample:
    image: object  # PIL.Image.Image
    caption: tuple[str, str, str]  # (colour, shape, digit)


def render(colour: str, shape: str, digit: str, rng: np.random.Generator, size: int):
    """One image of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    background = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size * 5 // 8, size * 7 // 8))
    x0, y0 = (int(rng.integers(0, size - extent + 1)) for _ in range(2))
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill)
    font = ImageFont.load_default(size=max(8, extent // 2))
    draw.text((x0 + extent // 2, y0 + extent * 3 // 5), digit, fill=(0, 0, 0), font=font, anchor="mm")
    return image


def make_split(count: int, seed: int, size: int) -> list[Sample]:
    """``count`` samples with uniformly drawn captions, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        caption = tuple(str(words[int(rng.integers(len(words)))]) for words in FIELDS)
        samples.append(Sample(render(*caption, rng, size), caption))  # type: ignore[arg-type]
    return samples


def write_interleaved(out_dir: str | Path, count: int, seed: int, size: int) -> Path:
    """``count`` generated images as PNGs under ``out_dir/images`` and ``out_dir/captions.jsonl``, one document per
    image: a sentence, the image, its caption and a sentence after it (text follows the image, as in web data)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as jsonl:
        for i, sample in enumerate(make_split(count, seed, size)):
            name = f"images/{i:05d}.png"
            sample.image.save(out / name)
            colour, shape, digit = sample.caption
            parts = [{"text": "Here is a picture."}, {"image": name},
                     {"text": f" It shows a {colour} {shape} with the digit {digit} on it."}]
            jsonl.write(json.dumps({"parts": parts}) + "\n")
    return out / "captions.jsonl"
