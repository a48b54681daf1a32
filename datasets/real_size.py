"""One refer split of real size in the real format (load, overhead and resume measurements; a slow test).

    python -m datasets.real_size <dataset_dir> --preset refcoco_val      # or refcoco_testA, refcocog_val

writes ``refer_seg/<ds>/refs(<splitBy>).p`` + ``instances.json`` and the split's JPEGs under
``refer_seg/images/mscoco/images/train2014`` in the layout :mod:`datasets.refer` reads, with the counts of
the real split (:data:`PRESETS`: images, refs, sentences; from the refer toolkit's statistics). The
files around the split are of real size too: ``instances.json`` holds ``total_images`` images and
``total_annotations`` annotations (about RefCOCO's: ~20k images, ~50k referred annotations), and
``refs`` holds one ``train`` ref per further annotation (their images are listed, not written), so that
reading the pickle and the JSON costs what it costs on the real files. Images are small (``side``
pixels, painted boxes); the split's masks are rectangles (polygons, every seventh an RLE),
the others 24-point polygons as COCO's. Deterministic from ``seed``; a second call with the same spec is skipped.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datasets.miniature import COLORS, NOUNS, _box, _rect_poly, _rle, _save_jpeg
from datasets.refer import REFER_IMAGE_DIR

MARKER = ".real_size.json"


@dataclass(frozen=True)
class RealSizeSpec:
    dataset: str
    split_by: str
    split: str
    images: int
    refs: int
    sentences: int
    total_images: int = 20000
    total_annotations: int = 50000
    side: int = 64
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.dataset}|{self.split_by}|{self.split}"


#: The real splits' sizes: RefCOCO val / testA (unc) and RefCOCOg val (umd).
PRESETS = {
    "refcoco_val": RealSizeSpec("refcoco", "unc", "val", images=1500, refs=3811, sentences=10834),
    "refcoco_testA": RealSizeSpec("refcoco", "unc", "testA", images=750, refs=1975, sentences=5657),
    "refcocog_val": RealSizeSpec("refcocog", "umd", "val", images=1300, refs=2573, sentences=4896),
}


def _spread(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` counts that differ by at most one (the larger ones first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _ellipse_poly(box: tuple[int, int, int, int], vertices: int = 24) -> list[float]:
    """A polygon of ``vertices`` points on the ellipse inscribed in ``box`` (two decimals, as COCO's)."""
    x0, y0, x1, y1 = box
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    xs = (x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(t)
    ys = (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(t)
    return [round(float(v), 2) for v in np.stack([xs, ys], 1).ravel()]


def write_real_size(root: str | Path, spec: RealSizeSpec) -> Path:
    """Write ``spec``'s split (and the real-size files around it) under ``root``; returns ``root``."""
    if spec.refs < spec.images or spec.sentences < spec.refs or spec.total_images < spec.images \
            or spec.total_annotations < spec.refs:
        raise ValueError(f"{spec}: expected images <= refs <= sentences, images <= total_images, "
                         "refs <= total_annotations")
    root = Path(root)
    ds_dir = root / "refer_seg" / spec.dataset
    marker = ds_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return root
    rng = np.random.default_rng(spec.seed)
    image_dir = root / REFER_IMAGE_DIR
    colors = list(COLORS)
    side = spec.side
    images, anns, refs = [], [], []
    refs_per_image = _spread(spec.refs, spec.images)
    sentences_per_ref = _spread(spec.sentences, spec.refs)
    ann_id = ref_id = sent_id = 1
    for i in range(spec.total_images):
        image_id = i + 1
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "height": side, "width": side})
        in_split = i < spec.images
        pixels = rng.integers(60, 200, 3).astype(np.uint8) * np.ones((side, side, 3), np.uint8) if in_split else None
        n_refs = refs_per_image[i] if in_split else 0
        for _ in range(n_refs):
            box = _box(side, side, rng)
            color = colors[ann_id % len(colors)]
            phrase = f"{color} {NOUNS[ann_id % len(NOUNS)]}"
            x0, y0, x1, y1 = box
            pixels[y0:y1, x0:x1] = COLORS[color]
            segmentation = _rle(box, side, side) if ann_id % 7 == 0 else [_rect_poly(box)]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": segmentation, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0)})
            sentences = []
            for k in range(sentences_per_ref[ref_id - 1]):
                text = phrase if k == 0 else f"the {phrase} number {k} from the left"
                sentences.append({"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id})
                sent_id += 1
            refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                         "split": spec.split, "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
            ann_id, ref_id = ann_id + 1, ref_id + 1
        if in_split:
            _save_jpeg(pixels, image_dir / file_name)
    # the rest of the annotations, on the images outside the split, each referred to by a train ref
    outside = spec.total_images - spec.images
    for j in range(spec.total_annotations - len(anns)):
        image_id = spec.images + 1 + (j % outside if outside else 0)
        box = _box(side, side, rng)
        x0, y0, x1, y1 = box
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "segmentation": [_ellipse_poly(box)], "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0)})
        text = f"{colors[j % len(colors)]} {NOUNS[j % len(NOUNS)]}"
        sentences = [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": sent_id + k}
                     for k, t in enumerate((text, f"the {text} on the right"))]
        sent_id += len(sentences)
        refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": "train",
                     "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                     "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
        ann_id, ref_id = ann_id + 1, ref_id + 1
    ds_dir.mkdir(parents=True, exist_ok=True)
    with open(ds_dir / f"refs({spec.split_by}).p", "wb") as handle:
        pickle.dump(refs, handle)
    instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (ds_dir / "instances.json").write_text(json.dumps(instances))
    marker.write_text(json.dumps(asdict(spec)))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = PRESETS[args.preset]
    spec = RealSizeSpec(**{**asdict(spec), "side": args.side, "seed": args.seed})
    write_real_size(args.dataset_dir, spec)
    print(f"{spec.name}: {spec.images} images, {spec.refs} refs, {spec.sentences} sentences under {args.dataset_dir}")


if __name__ == "__main__":
    main()
