"""CLIP vision tower (LLaVA conventions) with an optional CLS-attention probe for clustering."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel


class CLIPVisionTower(nn.Module):
    """Features from CLIP hidden layer ``select_layer`` (LLaVA: -2) with the CLS token dropped."""

    def __init__(self, *, model: CLIPVisionModel, processor: CLIPImageProcessorPil, select_layer: int = -2):
        super().__init__()
        self.clip = model
        self.processor = processor
        self.select_layer = select_layer

    @property
    def config(self) -> CLIPVisionConfig:
        return self.clip.config

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.patch_size
        return side, side

    @property
    def encoder_layers(self) -> nn.ModuleList:
        # transformers 5 flattens CLIPVisionModel (no ``vision_model`` wrapper); 4.x nests it.
        return getattr(self.clip, "vision_model", self.clip).encoder.layers

    def forward(
        self, pixel_values: torch.Tensor, cls_attention_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``B x 3 x S x S`` -> (``B x N x C`` patch features, ``B x N`` CLS attention or None)."""
        features, row, _ = self.encode(pixel_values, cls_attention_layer)
        return features, row

    def encode(
        self, pixel_values: torch.Tensor, cls_attention_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """Like ``forward``, plus CLIP's hidden states (entry i = input of encoder layer i, each
        ``B x (1 + N) x C``), which before-LLM reducers (PruMerge, VisionZip) read.

        The CLS attention row (eq. 3: softmax over the image keys of q_cls . K_img / sqrt(d_head),
        averaged over heads) is computed from the chosen layer's own projections by a forward
        pre-hook, so the tower keeps its fast attention kernel.
        """
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if cls_attention_layer is not None:
            layer = self.encoder_layers[cls_attention_layer]
            def probe(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured["row"] = cls_attention_row(module, args[0] if args else kwargs["hidden_states"])

            handle = layer.register_forward_pre_hook(probe, with_kwargs=True)
        try:
            out = self.clip(pixel_values=pixel_values.to(self.clip.dtype), output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        features = out.hidden_states[self.select_layer][:, 1:]
        return features, captured.get("row"), tuple(out.hidden_states)


def cls_attention_row(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax(q_cls . K_img / sqrt(d_head)) of one CLIP encoder layer.

    ``hidden_states``: ``B x (1 + N) x C`` input of the layer -> ``B x N``.
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_states)
    batch, _, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    q = attn.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(x[:, 1:]).view(batch, -1, heads, head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(head_dim)
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


def tiny_clip_config(image_size: int = 224, patch_size: int = 14, hidden_size: int = 32,
                     num_layers: int = 3, heads: int = 2) -> CLIPVisionConfig:
    """A CLIP ViT at tiny width; the defaults keep the real patch geometry (N = (224/14)^2 = 256)."""
    return CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    )


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """``grid^2 x dim`` 2-D sine-cosine position codes of a ``grid x grid`` patch grid in raster order
    (MAE's fixed embedding): the first half of the channels encodes the row, the second half the
    column, each as sin / cos pairs at ``dim / 4`` frequencies ``10000^(-k / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding: the width must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def code(v: torch.Tensor) -> torch.Tensor:
        angles = v.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1).float()


def clip_processor_for(image_size: int) -> CLIPImageProcessorPil:
    """CLIP's preprocessing: resize shortest side, center crop, CLIP mean/std (PIL backend)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )


def load_clip_processor(clip_dir: str | Path) -> CLIPImageProcessorPil:
    """The CLIP directory's preprocessor_config.json through transformers 5's PIL-backed class.

    LISA ran transformers 4.31's CLIPImageProcessor, which resizes and crops with PIL (bicubic on
    uint8). transformers 5's default ``CLIPImageProcessor`` is the torchvision backend and differs
    by up to one grey level on some pixels; its ``CLIPImageProcessorPil`` reproduces 4.31.
    """
    return CLIPImageProcessorPil.from_pretrained(str(clip_dir))
