"""Data conventions LISA's readers follow (and the one documented deviation).

Referring expressions reach the prompt stripped and lower-cased (LISA's refer_seg reader:
``sent.strip().lower()``); ReasonSeg queries only stripped. Overlapping polygons of one COCO
annotation: LISA sums the decoded masks (2 where they overlap, dropped from its target), this
project takes their union (docs/design.md section 3: frPyObjects + decode + merge)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from datasets import load_split
from datasets.refer import refer_mask
from tests.datasets.test_datasets import draw, rect_poly, write_reason_seg_fixture, write_refer_fixture


def test_refer_expressions_are_stripped_and_lower_cased(tmp_path: Path) -> None:
    write_refer_fixture(tmp_path)
    refs_file = tmp_path / "refer_seg" / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    refs[0]["sentences"][0]["sent"] = "  The LEFT Box \n"
    refs_file.write_bytes(pickle.dumps(refs))
    assert load_split("refcoco|unc|val", tmp_path)[0].text == "the left box"


def test_reason_seg_query_is_stripped_not_lower_cased(tmp_path: Path) -> None:
    write_reason_seg_fixture(tmp_path)
    anno_file = tmp_path / "reason_seg" / "ReasonSeg" / "val" / "a_image.json"
    anno = json.loads(anno_file.read_text())
    anno["text"][0] = "  What Holds The Cup?\n"
    anno_file.write_text(json.dumps(anno))
    by_id = {s.sample_id: s.text for s in load_split("ReasonSeg|val", tmp_path)}
    assert by_id["a_image"] == "What Holds The Cup?"


def test_overlapping_polygons_of_one_annotation_give_their_union() -> None:
    ann = {"segmentation": [rect_poly(2, 3, 12, 10), rect_poly(8, 6, 16, 14)]}
    expected = draw(20, 24, [((2, 3, 11, 9), 1), ((8, 6, 15, 13), 1)])  # same edge rule as test_datasets
    mask = refer_mask(ann, 20, 24)
    assert mask.max() == 1
    np.testing.assert_array_equal(mask, expected)
