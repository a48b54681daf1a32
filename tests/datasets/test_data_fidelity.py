"""Details where evaluation must read the data exactly as LISA does."""

from __future__ import annotations

import numpy as np
from PIL import Image

from datasets.reason_seg import labelme_mask
from datasets.refer import coco_segmentation_mask
from evaluation.report import t_lvlm
from runs.images import open_image


def test_degenerate_polygons_are_dropped_not_fatal() -> None:
    """COCO has polygons of < 3 points; they cover nothing and must not fail the sample."""
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    mask = coco_segmentation_mask([square, [5, 5, 6, 6]], 40, 50)
    assert mask.shape == (40, 50)
    assert mask[10:30, 10:30].all() and mask.sum() == mask[10:31, 10:31].sum()  # only the square
    assert coco_segmentation_mask([[1, 1, 2, 2]], 8, 8).sum() == 0


def rotated_jpeg(path, width: int, height: int) -> None:
    """A JPEG stored ``width x height`` with EXIF orientation 6 (shown rotated by 90 degrees)."""
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def test_exif_rotated_image_and_labelme_canvas_are_upright(tmp_path) -> None:
    """cv2 (LISA) applies the EXIF rotation and LabelMe annotates the upright image."""
    path = tmp_path / "rotated.jpg"
    rotated_jpeg(path, width=80, height=40)
    assert open_image(path).size == (40, 80)  # (w, h) upright
    shapes = [{"label": "target", "points": [[2, 2], [30, 2], [30, 70], [2, 70]]}]
    assert labelme_mask(shapes, path).shape == (80, 40)


def test_t_lvlm_prefers_single_query_samples() -> None:
    ok = [{"llm_ms": 10.0, "batch_size": 1}, {"llm_ms": 30.0, "batch_size": 1},
          {"llm_ms": 2.0, "batch_size": 4}, {"llm_ms": 2.0, "batch_size": 4}]
    assert t_lvlm(ok) == {"T_LVLM_ms": 20.0, "T_LVLM_kind": "single query"}
    batched = t_lvlm(ok[2:])
    assert batched["T_LVLM_ms"] == 2.0 and batched["T_LVLM_kind"].startswith("amortised")
