"""Re-export of :mod:`csp.geometry` (CLIP preprocessing geometry and the patch grid), which moved
to ``csp`` so that the clustering strategies need nothing from ``model``."""

from csp.geometry import TokenGeometry, clip_crop_geometry

__all__ = ["TokenGeometry", "clip_crop_geometry"]
