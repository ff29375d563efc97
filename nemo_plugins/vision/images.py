"""Images in: read with Pillow, resized and normalised as the model's processor config says.

Follows transformers' Pixtral processor (the reference the released checkpoints are evaluated with): RGB, an image
whose longer side exceeds ``longest_edge`` is scaled down (aspect kept, floor), then each side is rounded *up* to a
multiple of one image token's pixels (patch size x spatial merge) with a bicubic resize, values scaled by 1/255 and
normalised per channel. Inputs that cannot be used (missing, corrupt, not an image, larger than
``max_input_side``) are a ``DataError`` naming where the image was referenced (``file:line``), raised before any
pixel is decoded where the header suffices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.manifest import read_json

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Pixtral's defaults (transformers' PixtralImageProcessor)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessing:
    """Preprocessing settings; ``token_pixels`` = patch size x spatial merge (pixels per side of one [IMG])."""

    token_pixels: int
    longest_edge: int = 1024
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    max_input_side: int = 16384

    def __post_init__(self) -> None:
        if self.token_pixels <= 0 or self.longest_edge < self.token_pixels:
            raise ConfigError(f"vision.longest_edge={self.longest_edge} must be at least one image token "
                              f"({self.token_pixels} px)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError("vision.image_mean / image_std need 3 values (RGB), std > 0")
        if self.max_input_side < self.token_pixels:
            raise ConfigError(f"max_input_side={self.max_input_side} (data.max_image_side) is smaller than one image "
                              f"token ({self.token_pixels} px)")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, token_pixels: int, **changes) -> "ImageProcessing":
        """From a model directory's processor config (``size.longest_edge``, mean, std, rescale), else defaults."""
        for name in PROCESSOR_FILES:
            path = Path(model_dir) / name
            if path.is_file():
                raw = read_json(path)
                raw = raw.get("image_processor", raw)
                values = {"longest_edge": (raw.get("size") or {}).get("longest_edge", cls.longest_edge),
                          "image_mean": tuple(raw.get("image_mean", CLIP_MEAN)),
                          "image_std": tuple(raw.get("image_std", CLIP_STD)),
                          "rescale_factor": raw.get("rescale_factor", cls.rescale_factor)}
                return cls(token_pixels, **{**values, **changes})
        return cls(token_pixels, **changes)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: within ``longest_edge``, each side a whole number of image tokens."""
        ratio = max(height / self.longest_edge, width / self.longest_edge)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        step = self.token_pixels
        return (-(-height // step)) * step, (-(-width // step)) * step


def open_image(path: str | Path, where: str, processing: ImageProcessing):
    """The RGB Pillow image at ``path``; ``where`` (``file:line``) is what every error names first."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{where}: {path} is not an image Pillow can read") from None
    except OSError as err:
        raise DataError(f"{where}: cannot open image {path} ({err})") from None
    if max(image.size) > processing.max_input_side:
        raise DataError(f"{where}: image {path} is {image.size[0]}x{image.size[1]}, larger than "
                        f"max_input_side={processing.max_input_side} (data.max_image_side): "
                        "shrink it or raise the limit")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{where}: image {path} is corrupt or truncated ({err})") from None
    return image.convert("RGB")


def preprocess(image, processing: ImageProcessing) -> torch.Tensor:
    """``[3, H, W]`` float32 pixels of a Pillow image, resized and normalised (see the module docstring)."""
    from PIL import Image

    image = image.convert("RGB")
    height, width = processing.output_size(image.height, image.width)
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) * np.float32(processing.rescale_factor)
    pixels = (pixels - np.asarray(processing.image_mean, np.float32)) / np.asarray(processing.image_std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_image(path: str | Path, where: str, processing: ImageProcessing) -> torch.Tensor:
    """``preprocess(open_image(...))``: the pixels of an image file referenced at ``where``."""
    return preprocess(open_image(path, where, processing), processing)
