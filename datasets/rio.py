"""RIO (Qu et al., NeurIPS 2023): reasoning intention-oriented objects on COCO val2014.

Layout under ``dataset_dir`` (this project's choice; RIO ships only the JSON files, see
:data:`RIO_LAYOUT`)::

    rio/RIO_common_all_thing.json      JSON list of entries
    rio/RIO_uncommon_all_thing.json
    rio/val2014/COCO_val2014_%012d.jpg  (a copy of or a symlink to COCO val2014)

Entry: ``height``, ``width``, ``image_id`` (COCO id), ``task_id``, ``expressions`` (a string or a
list of strings), ``bbox_list`` ([x, y, w, h] per instance), ``mask_list`` (per instance: COCO
polygons or RLE). One sample per expression (sample_id ``<entry index>_t<task_id>_e<k>``), always a
sentence; the target is the union of all instances; no ignore label.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from datasets.base import AnnotationError, DatasetLayoutError, Sample, check_unique_ids, require_paths
from datasets.refer import coco_segmentation_mask

RIO_IMAGE_DIR = Path("rio/val2014")

RIO_LAYOUT = """\
  rio/
    RIO_common_all_thing.json
    RIO_uncommon_all_thing.json
    val2014/COCO_val2014_%012d.jpg   (COCO val2014 images; a symlink to your copy works)"""


def load_rio(dataset_dir: Path, *, subset: str, name: str) -> list[Sample]:
    """One sample per expression of ``rio/RIO_<subset>_all_thing.json``, in file order."""
    json_path = Path(dataset_dir) / "rio" / f"RIO_{subset}_all_thing.json"
    image_dir = Path(dataset_dir) / RIO_IMAGE_DIR
    require_paths(name, RIO_LAYOUT, Path(dataset_dir), json_path, image_dir)
    try:
        entries = json.loads(json_path.read_bytes())
    except Exception as exc:
        raise DatasetLayoutError(f"{json_path}: cannot parse the RIO JSON ({exc!r})") from exc
    if not isinstance(entries, list):
        raise DatasetLayoutError(f"{json_path}: expected a JSON list of entries, got {type(entries).__name__}")
    samples = [s for index, entry in enumerate(entries) for s in _entry_samples(entry, index, image_dir, name)]
    check_unique_ids(samples, name)
    return samples


def _entry_samples(entry: Any, index: int, image_dir: Path, name: str) -> list[Sample]:
    if not isinstance(entry, dict):
        return [_failed(index, image_dir, name, f"entry {index} is a {type(entry).__name__}, not an object")]
    image_id, task_id = entry.get("image_id"), entry.get("task_id", "")
    if not isinstance(image_id, int):
        return [_failed(index, image_dir, name, f"entry {index}: image_id must be an integer, got {image_id!r}")]
    expressions = entry.get("expressions")
    if isinstance(expressions, str):
        expressions = [expressions]
    image_path = image_dir / f"COCO_val2014_{image_id:012d}.jpg"
    if not isinstance(expressions, list) or not expressions:
        return [_failed(index, image_dir, name, f"entry {index}: no expressions", image_path)]
    samples = []
    for k, text in enumerate(expressions):
        reason = None if isinstance(text, str) else f"{name} entry {index}: expression {k} is not a string"
        samples.append(Sample(
            split=name, sample_id=f"{index}_t{task_id}_e{k}", image_path=image_path,
            text=text.strip() if isinstance(text, str) else "", is_sentence=True,
            mask_source=None if reason else partial(rio_mask, entry), load_error=reason,
        ))
    return samples


def _failed(index: int, image_dir: Path, name: str, reason: str, image_path: Path | None = None) -> Sample:
    return Sample(split=name, sample_id=f"{index}_invalid", image_path=image_path or image_dir / f"entry{index}",
                  text="", is_sentence=True, load_error=f"{name}: {reason}")


def rio_mask(entry: dict[str, Any]) -> np.ndarray:
    """``height x width`` uint8 0/1: union over the instances of ``mask_list``."""
    height, width = int(entry["height"]), int(entry["width"])
    instances = entry["mask_list"]
    if not isinstance(instances, list):
        raise AnnotationError(f"mask_list must be a list, got {type(instances).__name__}")
    mask = np.zeros((height, width), dtype=np.uint8)
    for instance in instances:
        mask |= coco_segmentation_mask(instance, height, width)
    return mask
