"""Opening an image as evaluation and training read it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from model.sam import to_rgb_array


def open_image(path: Any) -> Image.Image:
    """The image as RGB, fully decoded (so that a truncated file fails here), upright as cv2 reads
    it (EXIF orientation applied) and 16-bit scaled as cv2 does (model.sam.to_rgb_array)."""
    with _opened(path) as image:
        image.load()
        return Image.fromarray(to_rgb_array(image))


def image_size(path: Any) -> tuple[int, int]:
    """(width, height) from the file's header only (nothing decoded): to refuse a huge image cheaply."""
    with _opened(path) as image:
        return image.size


@contextmanager
def _opened(path: Any) -> Iterator[Image.Image]:
    try:
        with Image.open(path) as image:
            yield image
    except ImportError as err:
        # ultralytics (seg_first's detector), once imported, replaces PIL's Image.open in every module with a
        # version that retries an unreadable file as HEIF and raises ModuleNotFoundError without pi_heif: the
        # file is still just not an image
        raise OSError(f"cannot identify image file {path} ({type(err).__name__}: {err})") from err
