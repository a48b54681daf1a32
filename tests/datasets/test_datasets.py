"""Loaders against hand-built fixtures; the miniature generator; the HF ``datasets`` shadowing.

Expected masks are drawn here with PIL ``ImageDraw`` (never with the loaders' code). COCO polygon
semantics: a rectangle with corners (x0, y0), (x1, y1) covers pixels x0..x1-1, y0..y1-1 (pixel
centres inside); LabelMe/cv2 semantics (outline + fill): it covers x0..x1, y0..y1 inclusive.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from datasets import (
    AnnotationError,
    DatasetLayoutError,
    MiniatureSpec,
    UnknownSplitError,
    load_groups,
    load_split,
    valid_splits,
    write_miniature,
)

REPO = Path(__file__).resolve().parents[2]


def draw(height: int, width: int, rects: list[tuple[tuple[int, int, int, int], int]]) -> np.ndarray:
    """``H x W`` uint8 with each ``((x0, y0, x1, y1) inclusive, value)`` painted in order with PIL."""
    canvas = Image.new("L", (width, height), 0)
    painter = ImageDraw.Draw(canvas)
    for box, value in rects:
        painter.rectangle(box, fill=value)
    return np.array(canvas)


def save_jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


def rect_poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ---------------------------------------------------------------- refer (RefCOCO family)

def write_refer_fixture(root: Path) -> dict[str, list[str]]:
    """refcoco (unc): 2 images, 4 annotations, refs in val/testA/train. Returns texts per split."""
    ds = root / "refer_seg" / "refcoco"
    ds.mkdir(parents=True)
    image_dir = root / "refer_seg/images/mscoco/images/train2014"
    save_jpeg(image_dir / "COCO_train2014_000000000007.jpg", 30, 40)
    save_jpeg(image_dir / "COCO_train2014_000000000009.jpg", 20, 25)
    rle_mask = np.zeros((20, 25), dtype=np.uint8)
    rle_mask[4:9, 10:20] = 1
    rle = coco_mask.encode(np.asfortranarray(rle_mask))
    anns = [
        {"id": 11, "image_id": 7, "segmentation": [rect_poly(2, 3, 12, 10)], "bbox": [2, 3, 10, 7]},
        # two polygons: a rectangle and an L (rectangle 20..30 x 15..25 minus its 25..30 x 20..25 corner)
        {"id": 12, "image_id": 7, "bbox": [0, 0, 1, 1],
         "segmentation": [rect_poly(30, 0, 35, 5), [20, 15, 30, 15, 30, 20, 25, 20, 25, 25, 20, 25]]},
        {"id": 13, "image_id": 9, "segmentation": {"size": [20, 25], "counts": rle["counts"].decode()},
         "bbox": [10, 4, 10, 5]},
        {"id": 14, "image_id": 9, "segmentation": "not a segmentation", "bbox": [0, 0, 1, 1]},
    ]
    images = [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 30, "width": 40},
              {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 20, "width": 25}]
    (ds / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))

    def ref(ref_id: int, ann_id: int, image_id: int, split: str, texts: list[str]) -> dict:
        sentences = [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": 100 * ref_id + k}
                     for k, t in enumerate(texts)]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                "sentences": sentences, "file_name": "COCO_train2014_000000000007_11.jpg"}

    refs = [ref(1, 11, 7, "val", ["left box", "small box"]), ref(2, 13, 9, "val", ["right thing"]),
            ref(3, 12, 7, "val", ["two parts"]), ref(4, 11, 7, "train", ["unused"]),
            ref(5, 13, 9, "testA", ["a", "b", "c"]), ref(6, 14, 9, "testA", ["broken"]),
            ref(7, 99, 9, "testA", ["missing annotation"])]
    with open(ds / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)
    return {"val": ["left box", "small box", "right thing", "two parts"],
            "testA": ["a", "b", "c", "broken", "missing annotation"]}


def test_refer_counts_order_and_groups(tmp_path: Path) -> None:
    texts = write_refer_fixture(tmp_path)
    for split in ("val", "testA"):
        samples = load_split(f"refcoco|unc|{split}", tmp_path)
        assert [s.text for s in samples] == texts[split]
        assert all(not s.is_sentence for s in samples)
        assert len({s.sample_id for s in samples}) == len(samples)
    assert load_split("refcoco|unc|testB", tmp_path) == []
    groups = load_groups("refcoco|unc|val", tmp_path)
    image_dir = tmp_path / "refer_seg/images/mscoco/images/train2014"
    assert [g.image_path for g in groups] == [image_dir / "COCO_train2014_000000000007.jpg",
                                             image_dir / "COCO_train2014_000000000009.jpg"]
    assert [[s.text for s in g.samples] for g in groups] == [["left box", "small box", "two parts"], ["right thing"]]
    assert [s.text for g in load_groups("refcoco|unc|val", tmp_path, max_samples=2) for s in g.samples] == \
        ["left box", "small box"]
    # ids are deterministic
    assert [s.sample_id for s in load_split("refcoco|unc|val", tmp_path)] == \
        [s.sample_id for s in load_split("refcoco|unc|val", tmp_path)]


def test_refer_masks_equal_drawn_polygons(tmp_path: Path) -> None:
    write_refer_fixture(tmp_path)
    by_text = {s.text: s for s in load_split("refcoco|unc|val", tmp_path)}
    np.testing.assert_array_equal(by_text["left box"].gt_mask(), draw(30, 40, [((2, 3, 11, 9), 1)]))
    two_parts = draw(30, 40, [((30, 0, 34, 4), 1), ((20, 15, 29, 19), 1), ((20, 20, 24, 24), 1)])
    np.testing.assert_array_equal(by_text["two parts"].gt_mask(), two_parts)
    np.testing.assert_array_equal(by_text["right thing"].gt_mask(), draw(20, 25, [((10, 4, 19, 8), 1)]))
    assert by_text["right thing"].gt_mask().dtype == np.uint8


def test_refer_malformed_annotations_fail_per_sample(tmp_path: Path) -> None:
    write_refer_fixture(tmp_path)
    by_text = {s.text: s for s in load_split("refcoco|unc|testA", tmp_path)}
    assert by_text["a"].gt_mask().sum() == 50
    with pytest.raises(AnnotationError, match="malformed|unsupported"):
        by_text["broken"].gt_mask()
    with pytest.raises(AnnotationError, match="ann_id 99"):
        by_text["missing annotation"].gt_mask()


# ---------------------------------------------------------------- ReasonSeg

def write_reason_seg_fixture(root: Path) -> Path:
    split_dir = root / "reason_seg" / "ReasonSeg" / "val"
    save_jpeg(split_dir / "b_image.jpg", 20, 30)
    shapes = [
        {"label": "flag", "points": [[0, 0], [29, 0], [29, 19], [0, 19]]},          # skipped
        {"label": "target", "points": [[5, 5], [14, 5], [14, 14], [5, 14]]},        # area 100
        {"label": "ignore", "points": [[0, 0], [19, 0], [19, 9], [0, 9]]},          # area 200: painted first
        {"label": "Ignore_hole", "points": [[8, 8], [9, 8], [9, 9], [8, 9]]},       # area 4: painted last
    ]
    anno = {"text": ["Which part of the café is for sitting?", "chair"], "is_sentence": True, "shapes": shapes}
    (split_dir / "b_image.json").write_bytes(json.dumps(anno, ensure_ascii=False).encode("cp1252"))
    save_jpeg(split_dir / "a_image.jpg", 12, 16)
    plain = {"text": ["the cup"], "is_sentence": False,
             "shapes": [{"label": "cup", "points": [[1, 2], [6, 2], [6, 4], [1, 4]]}]}
    (split_dir / "a_image.json").write_text(json.dumps(plain))
    save_jpeg(split_dir / "c_broken.jpg", 12, 16)
    (split_dir / "c_broken.json").write_text("{not json")
    save_jpeg(split_dir / "d_no_json.jpg", 12, 16)
    save_jpeg(split_dir / "e_bad_points.jpg", 12, 16)
    (split_dir / "e_bad_points.json").write_text(json.dumps(
        {"text": ["x"], "is_sentence": True, "shapes": [{"label": "t", "points": "abc"}]}))
    return split_dir


def test_reason_seg_samples_and_masks(tmp_path: Path) -> None:
    write_reason_seg_fixture(tmp_path)
    samples = load_split("ReasonSeg|val", tmp_path)
    assert [s.sample_id for s in samples] == ["a_image", "b_image", "c_broken", "d_no_json", "e_bad_points"]
    a, b = samples[0], samples[1]
    assert (a.text, a.is_sentence) == ("the cup", False)
    assert (b.text, b.is_sentence) == ("Which part of the café is for sitting?", True)
    np.testing.assert_array_equal(a.gt_mask(), draw(12, 16, [((1, 2, 6, 4), 1)]))
    expected = draw(20, 30, [((0, 0, 19, 9), 255), ((5, 5, 14, 14), 1), ((8, 8, 9, 9), 255)])
    np.testing.assert_array_equal(b.gt_mask(), expected)
    # ignore block (10 x 20) minus its overlap with the target (5 x 10), plus the 2 x 2 hole
    assert (b.gt_mask() == 255).sum() == 200 - 50 + 4
    for broken in samples[2:]:
        with pytest.raises(AnnotationError, match=broken.sample_id):
            broken.gt_mask()


# ---------------------------------------------------------------- RIO

def write_rio_fixture(root: Path) -> None:
    image_dir = root / "rio" / "val2014"
    save_jpeg(image_dir / "COCO_val2014_000000000042.jpg", 16, 20)
    save_jpeg(image_dir / "COCO_val2014_000000000043.jpg", 10, 10)
    rle_mask = np.zeros((16, 20), dtype=np.uint8)
    rle_mask[10:14, 15:19] = 1
    rle = coco_mask.encode(np.asfortranarray(rle_mask))
    entries = [
        {"height": 16, "width": 20, "image_id": 42, "task_id": 7, "expressions": "something to cut with",
         "bbox_list": [[1, 1, 4, 3]], "mask_list": [[rect_poly(1, 1, 5, 4)]]},
        {"height": 16, "width": 20, "image_id": 42, "task_id": 8, "expressions": ["to sit on", "to rest"],
         "bbox_list": [[0, 8, 6, 4], [15, 10, 4, 4]],
         "mask_list": [[rect_poly(0, 8, 6, 12)], {"size": [16, 20], "counts": rle["counts"].decode()}]},
        {"height": 10, "width": 10, "image_id": 43, "task_id": 9, "expressions": "broken",
         "bbox_list": [], "mask_list": "nope"},
    ]
    (root / "rio" / "RIO_common_all_thing.json").write_text(json.dumps(entries))


def test_rio_samples_and_masks(tmp_path: Path) -> None:
    write_rio_fixture(tmp_path)
    samples = load_split("RIO|common", tmp_path)
    assert [s.text for s in samples] == ["something to cut with", "to sit on", "to rest", "broken"]
    assert all(s.is_sentence for s in samples)
    assert len({s.sample_id for s in samples}) == 4
    np.testing.assert_array_equal(samples[0].gt_mask(), draw(16, 20, [((1, 1, 4, 3), 1)]))
    union = draw(16, 20, [((0, 8, 5, 11), 1), ((15, 10, 18, 13), 1)])
    np.testing.assert_array_equal(samples[1].gt_mask(), union)
    np.testing.assert_array_equal(samples[2].gt_mask(), union)
    with pytest.raises(AnnotationError):
        samples[3].gt_mask()
    groups = load_groups("RIO|common", tmp_path)
    assert [len(g.samples) for g in groups] == [3, 1]


# ---------------------------------------------------------------- errors

def test_missing_directory_shows_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError) as info:
        load_split("refcoco+|unc|val", tmp_path)
    assert str(tmp_path) in str(info.value) and "refs(<splitBy>).p" in str(info.value)
    assert "instances.json" in str(info.value) and "train2014" in str(info.value)
    with pytest.raises(DatasetLayoutError, match=r"ReasonSeg/<split>/<name>\.json"):
        load_split("ReasonSeg|test", tmp_path)
    with pytest.raises(DatasetLayoutError, match="RIO_uncommon_all_thing.json"):
        load_split("RIO|uncommon", tmp_path)


def test_unknown_split_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownSplitError) as info:
        load_split("refcoco|unc|test", tmp_path)
    for name in ("refcoco|unc|testA", "refcoco+|unc|testB", "refcocog|umd|test", "ReasonSeg|val", "RIO|uncommon"):
        assert name in str(info.value)
    assert len(valid_splits()) == 12


# ---------------------------------------------------------------- miniature generator

def test_miniature_counts_and_formats(tmp_path: Path) -> None:
    spec = MiniatureSpec(seed=3, images_per_split=2, refs_per_image=3, sentences_per_ref=2,
                         reason_seg_per_split=4, rio_entries_per_split=3, expressions_per_entry=2)
    root = write_miniature(tmp_path / "mini", spec)
    refer = 2 * 3 * 2
    rio = 2 * 1 + 1 * 2  # entries 0 and 2 carry one string, entry 1 a list of two
    expected = {name: refer for name in valid_splits() if name.startswith("ref")}
    expected.update({"ReasonSeg|val": 4, "ReasonSeg|test": 4, "RIO|common": rio, "RIO|uncommon": rio})
    for name in valid_splits():
        samples = load_split(name, root)
        assert len(samples) == expected[name], name
        for sample in samples:
            mask = sample.gt_mask()
            with Image.open(sample.image_path) as image:
                assert image.format == "JPEG" and mask.shape == (image.height, image.width)
            assert (mask == 1).any()
    raw = [p.read_bytes() for p in (root / "reason_seg/ReasonSeg/val").glob("*.json")]
    assert any(not _is_utf8(b) for b in raw), "one ReasonSeg file is cp1252"
    assert any((s.gt_mask() == 255).any() for s in load_split("ReasonSeg|val", root))


def test_miniature_is_deterministic(tmp_path: Path) -> None:
    a, b = write_miniature(tmp_path / "a"), write_miniature(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.slow
def test_third_party_imports_work_from_repo_root() -> None:
    """Our ``datasets`` shadows Hugging Face ``datasets``; transformers, peft and wandb must not care."""
    code = ("import transformers, transformers.trainer, peft, wandb, datasets; "
            "assert datasets.__file__.endswith('datasets/__init__.py'), datasets.__file__; "
            "assert hasattr(datasets, 'load_split'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
