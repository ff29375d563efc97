"""The frozen vision encoder: transformers' ``PixtralVisionModel``, never trained, never sharded.

Why transformers' module rather than a megatron one: the paper keeps the parent's ~410M Pixtral ViT frozen for every
child, so it needs no tensor parallelism, no optimizer state and no gradients; transformers' implementation is the
reference the checkpoints are released against (patch conv, 2D RoPE, RMSNorm, gated MLP, block-diagonal attention
between images of different sizes), so reusing it removes a whole class of mismatch. Each first-stage rank holds a
full copy and runs it under ``no_grad`` on the same pixels, so its output is identical across TP ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_plugins.vision.config import VisionConfig


def build_encoder(config: VisionConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A Pixtral encoder of ``config.encoder``'s shape (random weights until loaded), frozen."""
    from transformers import PixtralVisionConfig, PixtralVisionModel

    hf_config = PixtralVisionConfig(**{k: v for k, v in config.encoder.items() if k != "model_type"})
    hf_config._attn_implementation = "sdpa"
    encoder = PixtralVisionModel(hf_config).to(dtype)
    freeze(encoder)
    return encoder


def freeze(encoder: torch.nn.Module) -> None:
    """No gradients, hence no optimizer state: megatron's optimizer only takes parameters that require grad."""
    encoder.requires_grad_(False)
    encoder.eval()


def pad_images(pixels: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``[n, 3, H, W]`` zero-padded to the largest image (bottom/right, as transformers' processor pads) and each
    image's own (height, width): the encoder crops every image back to its own patches."""
    height = max(p.shape[1] for p in pixels)
    width = max(p.shape[2] for p in pixels)
    batch = torch.stack([F.pad(p, (0, width - p.shape[2], 0, height - p.shape[1])) for p in pixels])
    return batch, [(p.shape[1], p.shape[2]) for p in pixels]


@torch.no_grad()
def encode(encoder: torch.nn.Module, pixels: list[torch.Tensor], feature_layer: int) -> torch.Tensor:
    """Patch features ``[sum of patches, vision hidden]`` of the images, in image then row-major patch order, from
    encoder layer ``feature_layer`` (Mistral3's ``vision_feature_layer``)."""
    batch, sizes = pad_images(pixels)
    weight = encoder.patch_conv.weight
    out = encoder(batch.to(weight.device, weight.dtype), image_sizes=sizes, output_hidden_states=True)
    return out.hidden_states[feature_layer].squeeze(0)
