"""ReasonSeg (LISA's reasoning segmentation benchmark), LabelMe-style annotations.

Layout under ``dataset_dir`` (see :data:`REASON_SEG_LAYOUT`)::

    reason_seg/ReasonSeg/<split>/<name>.jpg
    reason_seg/ReasonSeg/<split>/<name>.json   {"text": [...], "is_sentence": bool,
                                                "shapes": [{"label": str, "points": [[x, y], ...]}]}

One sample per image (sample_id = ``<name>``), query ``text[0]`` as LISA evaluates it. Ground truth
as LISA's ``get_mask_from_json``: "flag" shapes are skipped, polygons are painted largest area
first (cv2 outline + fill, integer points) with 255 for labels containing "ignore" and 1 otherwise.
The JSON may be cp1252 rather than UTF-8.
"""

from __future__ import annotations

import glob
import json
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from datasets.base import IGNORE_LABEL, AnnotationError, Sample, check_unique_ids, require_paths

REASON_SEG_LAYOUT = """\
  reason_seg/
    ReasonSeg/<split>/<name>.jpg     (split: train, val, test)
    ReasonSeg/<split>/<name>.json    (LabelMe: text list, is_sentence, shapes [{label, points}])"""


def load_reason_seg(dataset_dir: Path, *, split: str, name: str) -> list[Sample]:
    """One sample per ``<name>.jpg`` or ``<name>.json`` of ``reason_seg/ReasonSeg/<split>``, sorted by name.

    LISA's loader globs ``*.jpg`` only, so an annotation whose image is missing, or is another
    format (``.png``, ``.jpeg``, ...), would silently leave the split. Here it stays in the split as a
    failed sample with the reason; it is not evaluated, as in LISA (so scores stay comparable).
    """
    split_dir = Path(dataset_dir) / "reason_seg" / "ReasonSeg" / split
    require_paths(name, REASON_SEG_LAYOUT, Path(dataset_dir), split_dir)
    images = {p.stem: p for p in split_dir.glob("*.jpg")}
    samples = []
    for stem in sorted(set(images) | {p.stem for p in split_dir.glob("*.json")}):
        if stem in images:
            samples.append(_sample(images[stem], name))
            continue
        expected = split_dir / f"{stem}.jpg"
        others = sorted(p.name for p in split_dir.glob(f"{glob.escape(stem)}.*") if p.suffix.lower() != ".json")
        reason = (f"{name} {stem}: image is {others[0]}, but ReasonSeg images must be .jpg (LISA's loader reads "
                  f"only *.jpg, so it never evaluates this sample); convert it to {expected.name}" if others
                  else f"{name} {stem}: annotation {expected.with_suffix('.json').name} has no image {expected}")
        samples.append(_failed(expected, name, reason))
    check_unique_ids(samples, name)
    return samples


def read_labelme(path: Path) -> dict[str, Any]:
    """Parse a LabelMe JSON that may be UTF-8 or cp1252."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _sample(image_path: Path, name: str) -> Sample:
    json_path = image_path.with_suffix(".json")
    sample_id = image_path.stem
    try:
        anno = read_labelme(json_path)
        texts, is_sentence, shapes = anno["text"], anno["is_sentence"], anno["shapes"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not isinstance(texts[0], str):
            raise AnnotationError(f"'text' must be a non-empty list of strings, got {texts!r}")
        if not isinstance(shapes, list):
            raise AnnotationError(f"'shapes' must be a list, got {type(shapes).__name__}")
    except FileNotFoundError:
        return _failed(image_path, name, f"{name} {sample_id}: annotation {json_path} not found")
    except (AnnotationError, KeyError, ValueError, UnicodeDecodeError) as exc:
        return _failed(image_path, name, f"{name} {sample_id}: malformed annotation {json_path}: {exc!r}")
    return Sample(split=name, sample_id=sample_id, image_path=image_path, text=texts[0].strip(),
                  is_sentence=bool(is_sentence), mask_source=partial(labelme_mask, shapes, image_path))


def _failed(image_path: Path, name: str, reason: str) -> Sample:
    return Sample(split=name, sample_id=image_path.stem, image_path=image_path, text="", is_sentence=True,
                  load_error=reason)


#: EXIF orientation tag and the orientations that swap width and height (rotations by 90/270).
ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def labelme_mask(shapes: list[dict[str, Any]], image_path: Path) -> np.ndarray:
    """``H x W`` uint8 ground truth of LabelMe ``shapes`` at the size of ``image_path``."""
    with Image.open(image_path) as image:
        width, height = image.size
        if image.getexif().get(ORIENTATION_TAG) in TRANSPOSING_ORIENTATIONS:
            width, height = height, width  # annotated in the upright (EXIF-applied) frame, as cv2 reads it
    return paint_shapes(shapes, height, width)


def paint_shapes(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Paint polygons largest-area first: 255 for "ignore" labels, 1 otherwise; skip "flag".

    Ties in area keep LISA's order (``argsort(areas)[::-1]``: the later shape is painted first).
    """
    polygons, values, areas = [], [], []
    for shape in shapes:
        label = str(shape["label"])
        if label.lower() == "flag":
            continue
        points = np.array([shape["points"]], dtype=np.int32)
        if points.ndim != 3 or points.shape[2] != 2 or points.shape[1] < 1:
            raise AnnotationError(f"shape {label!r}: points must be a list of [x, y], got shape {points.shape[1:]}")
        polygons.append(points)
        values.append(IGNORE_LABEL if "ignore" in label.lower() else 1)
        areas.append(_draw(np.zeros((height, width), dtype=np.uint8), points, 1).sum())
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in np.argsort(np.array(areas, dtype=np.int64), kind="stable")[::-1]:
        _draw(mask, polygons[index], values[index])
    return mask


def _draw(canvas: np.ndarray, points: np.ndarray, value: int) -> np.ndarray:
    cv2.polylines(canvas, points, True, value, 1)
    cv2.fillPoly(canvas, points, value)
    return canvas
