"""Interleaved image-text documents as a source of the single-pass mix (``kind: interleaved``).

Format: a ``.jsonl`` file, one document per line, ``{"parts": [{"text": "..."}, {"image": "pics/0.png"}, ...]}``;
image paths are relative to the JSONL file (or absolute); ``builtin:captions?count=N&seed=S&size=P`` is a generated
set (``vision/synthetic.py``: shapes, colours, digits drawn with Pillow, captions from the generator), written once
under the cache directory. Parts keep their order: each image becomes its
``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` layout (``vision/tokens.py``) at its place between the text tokens, so the
text after an image follows it as in the document.

Storage: the tokens go to an ordinary token file (the mix reads it as any other, by offset, so cursors, budgets and
the held-out tail work unchanged), and a side record ``<prefix>.images.json`` lists per image the token offset of its
layout, its path, where it was referenced (``file:line``) and its preprocessed size. The pixels are re-read with
Pillow when a row holding the image is read, not stored: the token store stays small and memory-mapped, and
preprocessing a few images per row is cheap beside a training step. An image changed after tokenisation (its
preprocessed size differs from the record) is a DataError naming ``file:line``, not a silent misalignment.

A row of the mix may cut an image's layout at either end (rows are fixed-length windows of the token stream): the
row then carries that image with the range of its ``[IMG]`` features that fall inside the row (``RowImage``); the
encoder still sees the whole image. Targets that are image tokens are masked out of the loss and KL
(``text_target_mask``): the KL is on text tokens, including those right after an image.

Bad input fails at tokenisation with ``file:line`` (missing / corrupt / not-an-image file, an image larger than
``max_input_side``, image token ids typed in the text, a malformed record); nothing is written then.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nemo_plugins.data.text_files import resolve
from nemo_plugins.data.token_store import TokenFile, built_once, sibling, store_prefix, write_token_file
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.vision.config import VisionConfig
from nemo_plugins.vision.images import ImageProcessing, open_image, preprocess
from nemo_plugins.vision.tokens import RowImage, image_token_mask, image_tokens

IMAGES_SUFFIX = ".images.json"
BUILTIN_CAPTIONS = "builtin:captions"


@dataclass(frozen=True)
class ImageInputs:
    """What turns images into tokens and pixels: the model's vision config (token ids, pixels per token) and its
    processor settings (``ImageProcessing``, including the largest accepted input side)."""

    vision: VisionConfig
    processing: ImageProcessing

    def __post_init__(self) -> None:
        if self.processing.token_pixels != self.vision.token_pixels:
            raise ConfigError(f"vision processing token_pixels={self.processing.token_pixels} but the model's image "
                              f"token is {self.vision.token_pixels} px (patch_size x spatial_merge_size)")

    def key(self) -> str:
        """Part of the token file's name: another layout or resize gives other tokens."""
        ids = (self.vision.image_token_id, self.vision.image_break_token_id, self.vision.image_end_token_id)
        return f"img{self.vision.token_pixels}-{self.processing.longest_edge}-{'.'.join(map(str, ids))}"


def _jsonl_files(paths: list[str]) -> list[Path]:
    files = []
    for raw in paths:
        root = resolve(raw)
        found = [root] if root.is_file() else sorted(root.rglob("*.jsonl"))
        if not found or any(f.suffix != ".jsonl" for f in found):
            raise ConfigError(f"interleaved source path {raw!r}: give .jsonl files (or directories holding them)")
        files += found
    return files


def _document(record, where: str, base: Path, tokenizer, images: ImageInputs) -> tuple[list[int], list[dict]]:
    """Token ids of one record and its images (offsets inside the document)."""
    parts = record.get("parts") if isinstance(record, dict) else None
    if not isinstance(parts, list) or not parts:
        raise DataError(f"{where}: an interleaved record is "
                        '{"parts": [{"text": ...}, {"image": path}, ...]}')
    ids: list[int] = []
    found: list[dict] = []
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str) and len(part) == 1:
            text = tokenizer(part["text"], add_special_tokens=False)["input_ids"]
            if bool(image_token_mask(torch.tensor(text, dtype=torch.long), images.vision).any()):
                raise DataError(f"{where}: the text holds an image token ([IMG]/[IMG_BREAK]/[IMG_END]) without an "
                                "image: give images as {\"image\": path} parts, never as tokens in text")
            ids += text
        elif isinstance(part, dict) and isinstance(part.get("image"), str) and len(part) == 1:
            path = Path(part["image"]) if Path(part["image"]).is_absolute() else base / part["image"]
            image = open_image(path, where, images.processing)
            height, width = images.processing.output_size(image.height, image.width)
            found.append({"offset": len(ids), "path": str(path), "where": where, "size": [height, width]})
            ids += image_tokens(height, width, images.vision)
        else:
            raise DataError(f"{where}: each part is {{\"text\": str}} or {{\"image\": path}}, got {part!r}")
    return ids, found


def tokenize_interleaved(tokenizer, paths: list[str], images: ImageInputs) -> tuple[list[list[int]], list[dict]]:
    """Every document's ids and every image's record (offset in the token file, counting each document's EOS)."""
    documents, records, offset = [], [], 0
    for file in _jsonl_files(paths):
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from None
                ids, found = _document(record, where, file.parent, tokenizer, images)
                if not ids:  # the token file skips empty documents: so do the offsets
                    continue
                records += [{**r, "offset": offset + r["offset"]} for r in found]
                documents.append(ids)
                offset += len(ids) + 1
    return documents, records


def build_interleaved_file(tokenizer, paths: list[str], prefix: Path, key: str, images: ImageInputs) -> None:
    """Tokenise and write the side record first, the token file (whose ``.json`` marks it built) last."""
    documents, records = tokenize_interleaved(tokenizer, paths, images)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    partial = prefix.with_name(f".{prefix.name}{IMAGES_SUFFIX}.{os.getpid()}.partial")
    partial.write_text(json.dumps(records))
    os.replace(partial, sibling(prefix, IMAGES_SUFFIX))
    write_token_file(documents, prefix, len(tokenizer), tokenizer.eos_token_id,
                     {"paths": list(paths), "key": key, "kind": "interleaved", "images": len(records)})


class ImageIndex:
    """The images of one interleaved token file, found by token offset."""

    def __init__(self, file: TokenFile, images: ImageInputs) -> None:
        path = sibling(file.prefix, IMAGES_SUFFIX)
        if not path.is_file():
            raise DataError(f"interleaved token file {file.prefix} has no {path.name}: delete {file.prefix}.* to "
                            "rebuild it")
        self.records = json.loads(path.read_text())
        self.file, self.images = file, images
        self.offsets = np.asarray([r["offset"] for r in self.records], dtype=np.int64)
        self.lengths = np.asarray([len(image_tokens(*r["size"], images.vision)) for r in self.records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def row_images(self, start: int, end: int) -> list[RowImage]:
        """The images with ``[IMG]`` tokens in ``[start, end)``, each with the range of its features in the row."""
        image_id = self.images.vision.image_token_id
        first = int(np.searchsorted(self.offsets + self.lengths, start, side="right"))
        found = []
        for i in range(first, int(np.searchsorted(self.offsets, end, side="left"))):
            record, offset, length = self.records[i], int(self.offsets[i]), int(self.lengths[i])
            layout = np.asarray(self.file.tokens[offset: offset + length])
            skipped = int((layout[: max(0, start - offset)] == image_id).sum())
            inside = int((layout[max(0, start - offset): end - offset] == image_id).sum())
            if not inside:  # only a cut image's [IMG_BREAK] / [IMG_END] in the row: no feature to place
                continue
            pixels = preprocess(open_image(record["path"], record["where"], self.images.processing),
                                self.images.processing)
            if list(pixels.shape[1:]) != record["size"]:
                raise DataError(f"{record['where']}: image {record['path']} changed since it was tokenised "
                                f"({list(pixels.shape[1:])} px, recorded {record['size']}): rebuild the token file")
            found.append(RowImage(pixels, skipped, inside))
        return found


def materialize_captions(raw: str, cache_dir: str | Path) -> str:
    """``builtin:captions?count=N&seed=S&size=P`` written once as PNGs + JSONL under ``cache_dir``; its JSONL path."""
    from urllib.parse import parse_qsl

    from nemo_plugins.vision.synthetic import write_interleaved

    options = {"count": 256, "seed": 0, "size": 64}
    for key, value in parse_qsl(raw.removeprefix(BUILTIN_CAPTIONS).removeprefix("?")):
        if key not in options or not value.isdigit() or int(value) < (key != "seed"):
            raise ConfigError(f"{raw}: options are count, size (positive integers) and seed (>= 0), got "
                              f"{key}={value!r}")
        options[key] = int(value)
    out = Path(cache_dir) / "builtin" / "captions-{count}-{seed}-{size}".format(**options)
    if not (out / "captions.jsonl").is_file():
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        write_interleaved(partial, **options)
        os.replace(partial, out)
    return str(out / "captions.jsonl")


def interleaved_file(tokenizer, paths: list[str], cache_dir: str | Path, name: str, images: ImageInputs | None,
                     prebuilt_by: str | None = None) -> tuple[TokenFile, ImageIndex]:
    """The cached token file and image index of an interleaved source (built once by rank 0, like text sources)."""
    if images is None:
        raise ConfigError(f"data source {name!r} is interleaved (images) but the model has no vision part: use a "
                          "Mistral3 (vision-language) parent, or drop the source")

    def locate():
        files = [materialize_captions(p, cache_dir) if p.startswith(BUILTIN_CAPTIONS) else p for p in paths]
        prefix, key = store_prefix(tokenizer, files, cache_dir, f"{name}-{images.key()}")
        return prefix, lambda: build_interleaved_file(tokenizer, files, prefix, key, images)

    file = TokenFile(built_once(locate, f"interleaved token file of source {name!r}", prebuilt_by))
    return file, ImageIndex(file, images)


def text_target_mask(tokens: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """``[b, s]`` float: 1 where the next token is text (a target of the loss and KL), 0 where it is an image token."""
    return (~image_token_mask(tokens.roll(-1, dims=1), vision)).to(torch.float32)
