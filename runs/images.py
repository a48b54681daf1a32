"""Opening an image as evaluation and training read it."""

from __future__ import annotations

from typing import Any

from PIL import Image

from model.sam import to_rgb_array


def open_image(path: Any) -> Image.Image:
    """The image as RGB, fully decoded (so that a truncated file fails here), upright as cv2 reads
    it (EXIF orientation applied) and 16-bit scaled as cv2 does (model.sam.to_rgb_array)."""
    with Image.open(path) as image:
        image.load()
        return Image.fromarray(to_rgb_array(image))
