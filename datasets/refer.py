"""RefCOCO, RefCOCO+ and RefCOCOg in the refer format that LISA reads.

Layout under ``dataset_dir`` (see :data:`REFER_LAYOUT`)::

    refer_seg/<ds>/refs(<splitBy>).p      pickled list of refs: ref_id, ann_id, image_id, split,
                                           sentences [{sent, raw, tokens, sent_id}], ...
    refer_seg/<ds>/instances.json          COCO: images (id, file_name, height, width),
                                           annotations (id, image_id, segmentation, bbox)
    refer_seg/images/mscoco/images/train2014/COCO_train2014_%012d.jpg

One sample per sentence (sample_id ``ref<ref_id>_s<k>``, k = index in the ref's sentence list);
images come from instances.json's ``file_name`` (not the ref's). Ground truth: the union of the
annotation's polygons (pycocotools ``frPyObjects`` + ``merge`` + ``decode``) or its RLE; no
ignore label. Short phrases: ``is_sentence = False``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from datasets.base import AnnotationError, DatasetLayoutError, Sample, check_unique_ids, require_paths
from datasets.safe_pickle import UnsafePickleError, load_data_pickle

REFER_IMAGE_DIR = Path("refer_seg/images/mscoco/images/train2014")

REFER_LAYOUT = """\
  refer_seg/
    <ds>/refs(<splitBy>).p        (refcoco: refs(unc).p, refcoco+: refs(unc).p, refcocog: refs(umd).p)
    <ds>/instances.json
    images/mscoco/images/train2014/COCO_train2014_%012d.jpg"""


def load_refer(dataset_dir: Path, *, dataset: str, split_by: str, split: str, name: str) -> list[Sample]:
    """All sentences of ``split`` in ``refer_seg/<dataset>/refs(<split_by>).p``, in ref order."""
    root = Path(dataset_dir) / "refer_seg" / dataset
    refs_path, instances_path = root / f"refs({split_by}).p", root / "instances.json"
    image_dir = Path(dataset_dir) / REFER_IMAGE_DIR
    require_paths(name, REFER_LAYOUT, Path(dataset_dir), root, refs_path, instances_path, image_dir)
    refs = _read_pickle(refs_path)
    instances = _read_json(instances_path)
    images = {img.get("id"): img for img in instances.get("images", []) if isinstance(img, dict)}
    anns = {ann.get("id"): ann for ann in instances.get("annotations", []) if isinstance(ann, dict)}
    samples = []
    for index, ref in enumerate(refs):
        if isinstance(ref, dict) and ref.get("split") == split:
            samples.extend(_ref_samples(ref, index, images, anns, image_dir, name))
    check_unique_ids(samples, name)
    return samples


def _ref_samples(ref: dict, index: int, images: dict, anns: dict, image_dir: Path, name: str) -> list[Sample]:
    ref_id = ref.get("ref_id", f"index{index}")
    image_id = ref.get("image_id")
    info = images.get(image_id)
    error = None
    if info is None or "file_name" not in info:
        error = f"{name} ref {ref_id}: image_id {image_id!r} not in instances.json images"
        image_path = image_dir / f"COCO_train2014_{image_id if isinstance(image_id, int) else 0:012d}.jpg"
    else:
        image_path = image_dir / info["file_name"]
    ann = anns.get(ref.get("ann_id"))
    if error is None and ann is None:
        error = f"{name} ref {ref_id}: ann_id {ref.get('ann_id')!r} not in instances.json annotations"
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        sentences = [None]
        error = error or f"{name} ref {ref_id}: no sentences"
    samples = []
    for k, sent in enumerate(sentences):
        text = sent.get("sent") if isinstance(sent, dict) else None
        reason = error or (None if isinstance(text, str) else f"{name} ref {ref_id}: sentence {k} has no 'sent'")
        source = None if reason else partial(refer_mask, ann, int(info["height"]), int(info["width"]))
        samples.append(Sample(split=name, sample_id=f"ref{ref_id}_s{k}", image_path=image_path,
                              text=text.strip().lower() if isinstance(text, str) else "", is_sentence=False,
                              mask_source=source, load_error=reason))
    return samples


def refer_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """``height x width`` uint8 0/1: the union of a COCO annotation's polygons or its RLE."""
    segmentation = ann["segmentation"]
    return coco_segmentation_mask(segmentation, height, width)


def coco_segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (polygon list, one flat polygon, or RLE dict / list) -> ``H x W`` 0/1 uint8."""
    if isinstance(segmentation, list) and len(segmentation) == 0:
        return np.zeros((height, width), dtype=np.uint8)
    if isinstance(segmentation, list) and all(isinstance(v, (int, float)) for v in segmentation):
        segmentation = [segmentation]  # one flat polygon
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        # Degenerate polygons (< 3 points) cover no area; drop them instead of failing the sample.
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rles = coco_mask.frPyObjects(polygons, height, width)
    elif isinstance(segmentation, dict):
        rles = [_rle(segmentation, height, width)]
    elif isinstance(segmentation, list) and all(isinstance(p, dict) for p in segmentation):
        rles = [_rle(p, height, width) for p in segmentation]
    else:
        raise AnnotationError(f"unsupported segmentation of type {type(segmentation).__name__}")
    mask = coco_mask.decode(coco_mask.merge(rles))
    if mask.shape != (height, width):
        raise AnnotationError(f"RLE size {mask.shape} differs from the image size {(height, width)}")
    return mask.astype(np.uint8)


def _rle(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return coco_mask.frPyObjects(rle, height, width)
    size = rle.get("size", [height, width])
    return {"size": list(size), "counts": counts.encode() if isinstance(counts, str) else counts}


def _read_pickle(path: Path) -> list:
    try:
        refs = load_data_pickle(path)
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise DatasetLayoutError(f"{path}: cannot read the refs pickle ({exc!r}); expected a list of refs") from exc
    if not isinstance(refs, list):
        raise DatasetLayoutError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    return refs


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_bytes())
    except Exception as exc:
        raise DatasetLayoutError(f"{path}: cannot parse the COCO instances JSON ({exc!r})") from exc
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{path}: expected a COCO instances object, got {type(data).__name__}")
    return data
