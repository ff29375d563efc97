"""The Mistral image-token layout: an image of R x C tokens is ``([IMG] x C + [IMG_BREAK]) x R`` with the last
``[IMG_BREAK]`` replaced by ``[IMG_END]`` (as mistral-common and transformers' Pixtral processor write it).

Only ``[IMG]`` positions receive projected features; ``[IMG_BREAK]`` / ``[IMG_END]`` stay ordinary embedded tokens
that tell the model where rows and images end. Losses never target any of the three (``image_token_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_plugins.errors import DataError
from nemo_plugins.vision.config import VisionConfig


def image_tokens(height: int, width: int, vision: VisionConfig) -> list[int]:
    """The token ids standing for one preprocessed image of ``height`` x ``width`` pixels."""
    rows, cols = height // vision.token_pixels, width // vision.token_pixels
    if rows * vision.token_pixels != height or cols * vision.token_pixels != width or rows == 0 or cols == 0:
        raise DataError(f"an image of {height}x{width} px is not a whole number of {vision.token_pixels}-px image "
                        "tokens: preprocess it first")
    layout = ([vision.image_token_id] * cols + [vision.image_break_token_id]) * rows
    layout[-1] = vision.image_end_token_id
    return layout


def interleave(parts: list[list[int] | torch.Tensor], vision: VisionConfig) -> tuple[list[int], list[torch.Tensor]]:
    """Token ids and the images, in order, of a prompt given as text token lists and ``[3, H, W]`` pixel tensors."""
    ids: list[int] = []
    images: list[torch.Tensor] = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            ids += image_tokens(part.shape[1], part.shape[2], vision)
            images.append(part)
        else:
            ids += list(part)
    return ids, images


def image_token_mask(tokens: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """True at ``[IMG]``, ``[IMG_BREAK]`` and ``[IMG_END]``: the positions a text loss or KL must leave out."""
    ids = torch.tensor([vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id],
                       device=tokens.device)
    return torch.isin(tokens, ids)


def check_image_count(tokens: torch.Tensor, features: int, vision: VisionConfig, where: str) -> None:
    """One projected feature per ``[IMG]``: an image token without its image (or an image without its tokens) is a
    data error naming ``where`` rather than features silently shifted onto the wrong positions."""
    found = int((tokens == vision.image_token_id).sum())
    if found != features:
        raise DataError(f"{where}: {found} [IMG] token(s) (id {vision.image_token_id}) in the text but the images "
                        f"give {features} image token(s): every [IMG] needs its image and every image its tokens")


@dataclass(frozen=True)
class RowImage:
    """An image as a packed row holds it: all its pixels (the encoder sees the whole image) and the ``count`` of its
    ``[IMG]`` features from ``first`` on that fall inside the row (a row may cut an image's layout at either end)."""

    pixels: torch.Tensor
    first: int
    count: int


def row_features(features: torch.Tensor, images: list[torch.Tensor | RowImage], vision: VisionConfig) -> torch.Tensor:
    """The projected features ``[image tokens, h]`` of whole images, narrowed to what each ``RowImage`` keeps."""
    kept, start = [], 0
    for image in images:
        pixels = image.pixels if isinstance(image, RowImage) else image
        total = (pixels.shape[1] // vision.token_pixels) * (pixels.shape[2] // vision.token_pixels)
        first, count = (image.first, image.count) if isinstance(image, RowImage) else (0, total)
        kept.append(features[start + first: start + first + count])
        start += total
    return torch.cat(kept)
