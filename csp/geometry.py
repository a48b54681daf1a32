"""Where each image token comes from: CLIP preprocessing geometry and the patch grid.

The CLIP image processor (LLaVA's, and transformers' ``CLIPImageProcessor``) resizes the image so
that its shortest side becomes ``crop_size`` (the longest becomes ``int(crop_size * long /
short)``), then center crops ``crop_size x crop_size`` starting at ``(resized - crop_size) // 2``
on each axis. The crop is cut into a ``rows x cols`` grid of patches; image token ``i`` is the
patch at row ``i // cols``, column ``i % cols`` (row-major, as CLIP flattens its patch grid).

This module is the one place that knows this: ``csp.strategies.seg_first`` maps detector masks
onto tokens with it, and the token maps draw kept tokens onto the original image with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def clip_crop_geometry(height: int, width: int, crop_size: int) -> tuple[int, int, int, int]:
    """CLIP preprocessing geometry: (resized_h, resized_w, crop_top, crop_left), in pixels.

    Same arithmetic as transformers' ``CLIPImageProcessor``: the shortest side becomes
    ``crop_size``, the longest ``int(crop_size * long / short)``; the crop starts at
    ``(resized - crop_size) // 2`` on each axis.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if width <= height:
        new_h, new_w = int(crop_size * height / width), crop_size
    else:
        new_h, new_w = crop_size, int(crop_size * width / height)
    return new_h, new_w, (new_h - crop_size) // 2, (new_w - crop_size) // 2


@dataclass(frozen=True)
class TokenGeometry:
    """Image token <-> pixel mapping for one ``height x width`` original image.

    Attributes:
        height, width: original image size (pixels).
        crop_size: CLIP input side (224 or 336).
        grid: ``(rows, cols)`` of the patch grid (16 x 16 at 224/14, 24 x 24 at 336/14).
    """

    height: int
    width: int
    crop_size: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if rows < 1 or cols < 1 or self.crop_size % rows or self.crop_size % cols:
            raise ValueError(f"crop size {self.crop_size} is not a multiple of the token grid {self.grid}")

    @classmethod
    def for_tower(cls, tower: Any, height: int, width: int) -> TokenGeometry:
        """The geometry of a ``height x width`` image under a CLIP tower (``config.image_size`` and
        ``grid``, as :class:`model.vision.CLIPVisionTower` has them)."""
        return cls(height=height, width=width, crop_size=int(tower.config.image_size), grid=tuple(tower.grid))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def resized(self) -> tuple[int, int]:
        """(height, width) after the shortest-side resize."""
        new_h, new_w, _, _ = clip_crop_geometry(self.height, self.width, self.crop_size)
        return new_h, new_w

    @property
    def crop_offset(self) -> tuple[int, int]:
        """(top, left) of the crop in resized pixels."""
        _, _, top, left = clip_crop_geometry(self.height, self.width, self.crop_size)
        return top, left

    def token_boxes(self) -> np.ndarray:
        """``N x 4`` float64 boxes ``(x0, y0, x1, y1)`` of every token on the ORIGINAL image.

        Token ``i`` covers crop pixels ``[c * pw, (c + 1) * pw) x [r * ph, (r + 1) * ph)``; a crop
        pixel edge ``u`` is the resized edge ``u + offset`` and the original edge
        ``(u + offset) * original / resized`` (resizing maps pixel edges linearly).
        """
        rows, cols = self.grid
        new_h, new_w = self.resized
        top, left = self.crop_offset
        ph, pw = self.crop_size // rows, self.crop_size // cols
        r, c = np.divmod(np.arange(self.num_tokens), cols)
        sx, sy = self.width / new_w, self.height / new_h
        return np.stack([(left + c * pw) * sx, (top + r * ph) * sy,
                         (left + (c + 1) * pw) * sx, (top + (r + 1) * ph) * sy], axis=1)

    def token_pixel_boxes(self, scale: float = 1.0) -> np.ndarray:
        """``N x 4`` int64 pixel ranges ``[x0, x1) x [y0, y1)`` of every token on the original image
        drawn at ``scale`` (rounded edges: neighbouring tokens share an edge, never overlap)."""
        return np.rint(self.token_boxes() * scale).astype(np.int64)

    def crop_pixel_box(self, scale: float = 1.0) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the region CLIP sees (the crop), on the original image at ``scale``."""
        boxes = self.token_pixel_boxes(scale)
        return int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())
