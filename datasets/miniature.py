"""Miniature data sets in exactly the on-disk formats of :mod:`datasets` (tests and the demo).

``write_miniature(root)`` writes, deterministically from ``MiniatureSpec.seed``:

- ``refer_seg/{refcoco,refcoco+,refcocog}/refs(<splitBy>).p`` + ``instances.json`` (rectilinear
  polygons, one two-polygon annotation and one RLE annotation per data set) and the JPEGs under
  ``refer_seg/images/mscoco/images/train2014``; every split of the registry plus a ``train`` split
  (``train_images`` images);
- ``reason_seg/ReasonSeg/{val,test}/<name>.{jpg,json}`` (LabelMe: target, "ignore" and "flag"
  shapes; one file encoded in cp1252);
- ``rio/RIO_{common,uncommon}_all_thing.json`` + ``rio/val2014`` JPEGs (string and list
  expressions, polygon and RLE instances).

Sizes: refer splits have ``images_per_split * refs_per_image * sentences_per_ref`` sentences,
ReasonSeg splits ``reason_seg_per_split`` samples, RIO subsets
``rio_entries_per_split * expressions_per_entry`` samples (entries with one string expression
alternate with list entries of that many expressions; see :func:`expected_counts`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from datasets.refer import REFER_IMAGE_DIR
from datasets.rio import RIO_IMAGE_DIR

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 20),
          "purple": (150, 40, 190), "orange": (250, 140, 10)}
NOUNS = ("box", "block", "panel", "tile", "sign")
REFER_DATASETS = {"refcoco": ("unc", ("val", "testA", "testB")), "refcoco+": ("unc", ("val", "testA", "testB")),
                  "refcocog": ("umd", ("val", "test"))}
MARKER = ".miniature.json"


@dataclass(frozen=True)
class MiniatureSpec:
    """How much to write; every count is per split."""

    seed: int = 0
    images_per_split: int = 2
    refs_per_image: int = 2
    sentences_per_ref: int = 2
    reason_seg_per_split: int = 3
    rio_entries_per_split: int = 3
    expressions_per_entry: int = 2
    min_side: int = 40
    max_side: int = 96
    #: images of the refer ``train`` splits (``refs_per_image * sentences_per_ref`` samples each)
    train_images: int = 1


def expected_counts(spec: MiniatureSpec) -> dict[str, int]:
    """Samples per split that :func:`write_miniature` writes for ``spec``."""
    counts = {}
    refer = spec.images_per_split * spec.refs_per_image * spec.sentences_per_ref
    for dataset, (split_by, splits) in REFER_DATASETS.items():
        counts.update({f"{dataset}|{split_by}|{split}": refer for split in splits})
    counts.update({f"ReasonSeg|{split}": spec.reason_seg_per_split for split in ("val", "test")})
    list_entries = spec.rio_entries_per_split // 2  # odd entries carry a list of expressions
    rio = spec.rio_entries_per_split - list_entries + list_entries * spec.expressions_per_entry
    counts.update({f"RIO|{subset}": rio for subset in ("common", "uncommon")})
    return counts


def write_miniature(root: str | Path, spec: MiniatureSpec = MiniatureSpec()) -> Path:
    """Write all miniature data sets under ``root`` (skipped if ``root`` already holds ``spec``)."""
    root = Path(root)
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return root
    rng = np.random.default_rng(spec.seed)
    _write_refer(root, spec, rng)
    _write_reason_seg(root, spec, rng)
    _write_rio(root, spec, rng)
    marker.write_text(json.dumps(asdict(spec)))
    return root


def _size(spec: MiniatureSpec, rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(spec.min_side, spec.max_side + 1)), int(rng.integers(spec.min_side, spec.max_side + 1))


def _box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """An integer box ``x0, y0, x1, y1`` (exclusive ends) inside the image, at least 4 pixels wide."""
    x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
    return x0, y0, int(rng.integers(x0 + 4, width + 1)), int(rng.integers(y0 + 4, height + 1))


def _rect_poly(box: tuple[int, int, int, int]) -> list[float]:
    x0, y0, x1, y1 = box
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _l_poly(box: tuple[int, int, int, int]) -> list[float]:
    """An L shape in ``box``: the box minus its bottom-right quarter (rectilinear, integer vertices)."""
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    return [float(v) for v in (x0, y0, x1, y0, x1, ym, xm, ym, xm, y1, x0, y1)]


def _rle(box: tuple[int, int, int, int], height: int, width: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(60, 200, 3)
    noise = rng.integers(-20, 21, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _paint(pixels: np.ndarray, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = color


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def _phrase(rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
    color = str(rng.choice(list(COLORS)))
    return f"{color} {rng.choice(NOUNS)}", COLORS[color]


def _write_refer(root: Path, spec: MiniatureSpec, rng: np.random.Generator) -> None:
    image_dir = root / REFER_IMAGE_DIR
    image_id, ann_id, ref_id, sent_id = 1, 1, 1, 1
    for dataset, (split_by, splits) in REFER_DATASETS.items():
        images, anns, refs = [], [], []
        for split in (*splits, "train"):
            for _ in range(spec.images_per_split if split != "train" else spec.train_images):
                height, width = _size(spec, rng)
                pixels = _image(height, width, rng)
                file_name = f"COCO_train2014_{image_id:012d}.jpg"
                images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
                for k in range(max(spec.refs_per_image, 1)):
                    box = _box(height, width, rng)
                    phrase, color = _phrase(rng)
                    _paint(pixels, box, color)
                    if k == 0 and image_id % 3 == 0:
                        segmentation = _rle(box, height, width)
                    elif k == 1:
                        segmentation = [_l_poly(box), _rect_poly(_box(height, width, rng))]
                    else:
                        segmentation = [_rect_poly(box)]
                    x0, y0, x1, y1 = box
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                 "segmentation": segmentation, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                    sentences = []
                    for s in range(spec.sentences_per_ref):
                        text = phrase if s == 0 else f"the {phrase} number {s}"
                        sentences.append({"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id})
                        sent_id += 1
                    refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                                 "split": split, "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                                 "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
                    ann_id, ref_id = ann_id + 1, ref_id + 1
                _save_jpeg(pixels, image_dir / file_name)
                image_id += 1
        ds_dir = root / "refer_seg" / dataset
        ds_dir.mkdir(parents=True, exist_ok=True)
        with open(ds_dir / f"refs({split_by}).p", "wb") as handle:
            pickle.dump(refs, handle)
        instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
        (ds_dir / "instances.json").write_text(json.dumps(instances))


def _triangle(height: int, width: int, rng: np.random.Generator) -> list[list[int]]:
    return [[int(rng.integers(0, width)), int(rng.integers(0, height))] for _ in range(3)]


def _write_reason_seg(root: Path, spec: MiniatureSpec, rng: np.random.Generator) -> None:
    for split in ("val", "test"):
        split_dir = root / "reason_seg" / "ReasonSeg" / split
        for i in range(spec.reason_seg_per_split):
            height, width = _size(spec, rng)
            pixels = _image(height, width, rng)
            box = _box(height, width, rng)
            phrase, color = _phrase(rng)
            _paint(pixels, box, color)
            x0, y0, x1, y1 = box
            target = [[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]]
            shapes = [{"label": "target", "points": target, "shape_type": "polygon"},
                      {"label": "ignore", "points": _triangle(height, width, rng), "shape_type": "polygon"},
                      {"label": "flag", "points": _triangle(height, width, rng), "shape_type": "polygon"}]
            if i % 2:
                shapes.append({"label": "target", "points": _triangle(height, width, rng), "shape_type": "polygon"})
            cafe = i == 1  # one file in cp1252 with non-ASCII text, as some ReasonSeg files are
            question = f"Where would you put the {'café ' if cafe else ''}cup? It is the {phrase}."
            anno = {"text": [question, f"the {phrase}"], "is_sentence": i % 2 == 0, "shapes": shapes,
                    "imageHeight": height, "imageWidth": width}
            name = f"{split}_{i:03d}_{int(rng.integers(0, 1 << 30)):08x}"
            _save_jpeg(pixels, split_dir / f"{name}.jpg")
            payload = json.dumps(anno, ensure_ascii=False)
            (split_dir / f"{name}.json").write_bytes(payload.encode("cp1252" if cafe else "utf-8"))


def _write_rio(root: Path, spec: MiniatureSpec, rng: np.random.Generator) -> None:
    image_dir = root / RIO_IMAGE_DIR
    image_id = 500001
    for subset in ("common", "uncommon"):
        entries = []
        for i in range(spec.rio_entries_per_split):
            height, width = _size(spec, rng)
            pixels = _image(height, width, rng)
            boxes = [_box(height, width, rng) for _ in range(2)]
            phrase, color = _phrase(rng)
            for box in boxes:
                _paint(pixels, box, color)
            masks = [[_rect_poly(boxes[0])], _rle(boxes[1], height, width) if i % 2 else [_l_poly(boxes[1])]]
            texts = [f"something to hold like the {phrase} {k}" for k in range(spec.expressions_per_entry)]
            entries.append({"height": height, "width": width, "image_id": image_id, "task_id": i % 3,
                            "expressions": texts if i % 2 else texts[0],
                            "bbox_list": [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes],
                            "mask_list": masks})
            _save_jpeg(pixels, image_dir / f"COCO_val2014_{image_id:012d}.jpg")
            image_id += 1
        (root / "rio").mkdir(parents=True, exist_ok=True)
        (root / "rio" / f"RIO_{subset}_all_thing.json").write_text(json.dumps(entries))
