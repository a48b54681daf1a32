"""Token maps like the paper's Figure 5: which image tokens each stage keeps, and the final mask.

One panel per entry of the runner's ``kept_image_tokens`` (clustering / input, scattering,
pruning), optionally one per clustering strategy for comparison, and one with the mask. Each
panel is the original image (scaled so that its longest side is at most ``max_side``) on which:

- the pixels of a kept token's patch are the image itself, with a 1-pixel ``KEPT_EDGE`` outline;
- the pixels of a token the stage does not keep are washed toward white:
  ``round(DROP_ALPHA * 255 + (1 - DROP_ALPHA) * pixel)``;
- the pixels CLIP never sees (cut off by the center crop) are ``OUTSIDE`` (solid).

Token ``i``'s patch on the original image comes from :class:`csp.geometry.TokenGeometry`
(the CLIP processor's resize + center crop), so a kept cell is exactly where the token's pixels
came from. The mask panel tints mask pixels ``MASK_COLOR`` at ``MASK_ALPHA``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from csp.geometry import TokenGeometry
from csp.tokens import KeptImageTokens

DROP_ALPHA = 0.75
KEPT_EDGE = (255, 200, 0)
OUTSIDE = (64, 64, 64)
MASK_COLOR = (255, 32, 32)
MASK_ALPHA = 0.5
TITLE_HEIGHT = 14
GAP = 4
BACKGROUND = (255, 255, 255)


@dataclass
class Panel:
    """One picture of the token map: ``image`` is ``H x W x 3`` uint8; ``kept`` the token indices
    it shows as kept (None for the mask panel)."""

    title: str
    image: np.ndarray
    kept: np.ndarray | None = None


@dataclass
class TokenMap:
    """The panels of one sample and the base picture they are drawn on."""

    base: np.ndarray  # H x W x 3 uint8: the original image at ``scale``
    scale: float
    geometry: TokenGeometry
    caption: str = ""
    panels: list[Panel] = field(default_factory=list)
    kept_entries: list[KeptImageTokens] = field(default_factory=list)  # the runner's, as drawn

    def panel_origins(self) -> list[tuple[int, int]]:
        """``(x, y)`` of each panel's top-left pixel in :meth:`figure`."""
        width = self.base.shape[1]
        return [(GAP + i * (width + GAP), TITLE_HEIGHT + GAP) for i in range(len(self.panels))]

    def figure(self) -> Image.Image:
        """All panels side by side, each under its title, the caption (query) at the bottom."""
        height, width = self.base.shape[:2]
        total_w = GAP + len(self.panels) * (width + GAP)
        total_h = TITLE_HEIGHT + GAP + height + GAP + (TITLE_HEIGHT if self.caption else 0)
        canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for panel, (x, y) in zip(self.panels, self.panel_origins(), strict=True):
            canvas.paste(Image.fromarray(panel.image), (x, y))
            draw.text((x, 1), panel.title, fill=(0, 0, 0))
        if self.caption:
            draw.text((GAP, GAP + TITLE_HEIGHT + height + 1), self.caption, fill=(0, 0, 0))
        return canvas

    def save(self, path: str) -> None:
        self.figure().save(path)


def display_scale(height: int, width: int, max_side: int | None) -> float:
    """Scale that brings the longest side to ``max_side`` (small images are enlarged so that the
    token cells stay visible); ``None``: 1.0, the original size."""
    if max_side is None:
        return 1.0
    return max_side / max(height, width)


def new_token_map(image: Image.Image | np.ndarray, geometry: TokenGeometry, *, max_side: int | None = 448,
                  caption: str = "") -> TokenMap:
    """An empty token map for ``image`` (RGB) whose token geometry is ``geometry``."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if rgb.shape[:2] != (geometry.height, geometry.width):
        raise ValueError(f"image is {rgb.shape[0]}x{rgb.shape[1]} but the geometry is for "
                         f"{geometry.height}x{geometry.width}")
    scale = display_scale(geometry.height, geometry.width, max_side)
    if scale != 1.0:
        size = (max(1, round(geometry.width * scale)), max(1, round(geometry.height * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    return TokenMap(base=np.ascontiguousarray(rgb), scale=scale, geometry=geometry, caption=caption)


def kept_indices(entry: KeptImageTokens | torch.Tensor | np.ndarray, sample: int = 0) -> np.ndarray:
    """Sample ``sample``'s kept token indices (padding dropped) as a sorted int64 array (host copy)."""
    indices = entry.indices if isinstance(entry, KeptImageTokens) else entry
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    indices = np.asarray(indices)
    row = indices[sample] if indices.ndim == 2 else indices
    return np.sort(row[row >= 0]).astype(np.int64)


def draw_stage(tmap: TokenMap, kept: np.ndarray) -> np.ndarray:
    """The base picture with the tokens ``kept`` (indices into the N grid tokens) highlighted."""
    geometry = tmap.geometry
    if kept.size and (kept.min() < 0 or kept.max() >= geometry.num_tokens):
        raise ValueError(f"token indices must be in [0, {geometry.num_tokens}), got {kept.min()}..{kept.max()}")
    base = tmap.base
    washed = np.rint(DROP_ALPHA * 255.0 + (1.0 - DROP_ALPHA) * base.astype(np.float64)).astype(np.uint8)
    out = np.empty_like(base)
    out[...] = OUTSIDE
    boxes = geometry.token_pixel_boxes(tmap.scale)
    is_kept = np.zeros(geometry.num_tokens, dtype=bool)
    is_kept[kept] = True
    for token, (x0, y0, x1, y1) in enumerate(boxes):
        source = base if is_kept[token] else washed
        out[y0:y1, x0:x1] = source[y0:y1, x0:x1]
    for x0, y0, x1, y1 in boxes[kept]:  # outlines last: they sit on the kept cells' own border pixels
        if x1 > x0 and y1 > y0:
            out[y0, x0:x1] = out[y1 - 1, x0:x1] = KEPT_EDGE
            out[y0:y1, x0] = out[y0:y1, x1 - 1] = KEPT_EDGE
    return out


def draw_mask(tmap: TokenMap, mask: np.ndarray | None) -> np.ndarray:
    """The base picture with ``mask`` (``H x W`` bool at the original size) tinted."""
    out = tmap.base.copy()
    if mask is None:
        return out
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (tmap.geometry.height, tmap.geometry.width):
        raise ValueError(f"mask is {mask.shape} but the image is {tmap.geometry.height}x{tmap.geometry.width}")
    if tmap.scale != 1.0:
        size = (tmap.base.shape[1], tmap.base.shape[0])
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    tint = np.asarray(MASK_COLOR, dtype=np.float64)
    out[mask] = np.rint(MASK_ALPHA * tint + (1.0 - MASK_ALPHA) * out[mask].astype(np.float64)).astype(np.uint8)
    return out


def stage_title(entry: KeptImageTokens, next_layer: int, count: int) -> str:
    last = next_layer - 1
    layers = f"L{entry.first_layer}" if last == entry.first_layer else f"L{entry.first_layer}-{last}"
    return f"{entry.stage} {layers}: {count}"


def token_map(image: Image.Image | np.ndarray, geometry: TokenGeometry, kept: Sequence[KeptImageTokens], *,
              num_layers: int, sample: int = 0, masks: np.ndarray | None = None,
              strategies: dict[str, np.ndarray] | None = None, caption: str = "",
              max_side: int | None = 448) -> TokenMap:
    """Figure 5 for one sample: one panel per clustering strategy in ``strategies`` (name ->
    kept indices), one per runner stage in ``kept`` (sample ``sample`` of each entry), and one per
    mask in ``masks`` (``K x H x W`` bool; a single empty-mask panel when there is none)."""
    tmap = new_token_map(image, geometry, max_side=max_side, caption=caption)
    tmap.kept_entries = [KeptImageTokens(e.stage, e.first_layer, e.indices[sample: sample + 1], e.num_extra)
                         for e in kept]
    for name, indices in (strategies or {}).items():
        indices = kept_indices(indices)
        tmap.panels.append(Panel(f"{name}: {indices.size}", draw_stage(tmap, indices), indices))
    bounds = [entry.first_layer for entry in kept[1:]] + [num_layers]
    for entry, next_layer in zip(kept, bounds, strict=True):
        indices = kept_indices(entry, sample)
        tmap.panels.append(Panel(stage_title(entry, next_layer, indices.size), draw_stage(tmap, indices), indices))
    if masks is None or len(masks) == 0:
        tmap.panels.append(Panel("mask: none", draw_mask(tmap, None)))
    else:
        for k, mask in enumerate(masks):
            tmap.panels.append(Panel(f"mask [SEG] {k}" if len(masks) > 1 else "mask", draw_mask(tmap, mask)))
    return tmap


def strategy_selections(pipe: object, image: Image.Image, names: Sequence[str], num_keep: int, *,
                        sample_id: str = "chat", kwargs: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """What each clustering strategy in ``names`` would keep (``1 x num_keep`` indices) for ``image``
    under ``pipe`` (a :class:`model.pipeline.SegmentationPipeline`): the comparison row of Figure 5.

    Each strategy gets the CLIP features (and, when it asks, the CLS attention of its layer) of
    the image preprocessed as the pipeline does.
    """
    from csp.strategies import ClusteringInputs, build_strategy

    tower = pipe.model.vision_tower
    device = pipe.bundle.device
    pixels = tower.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"].to(device)
    out = {}
    with torch.no_grad():
        for name in names:
            strategy = build_strategy(name, **(kwargs or {}).get(name, {}))
            features, cls_row = tower(pixels, cls_attention_layer=strategy.cls_attention_layer)
            inputs = ClusteringInputs(features=features, grid=tower.grid, crop_size=tower.config.image_size,
                                      images=[image], sample_ids=[sample_id], cls_attention=cls_row)
            out[name] = strategy.select(inputs, num_keep)
    return out
