"""Referring expressions reach the prompt as LISA's refer_seg reader leaves them: stripped and
lower-cased (``sent.strip().lower()``); ReasonSeg and RIO queries only stripped."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from datasets import load_split
from tests.test_datasets import write_reason_seg_fixture, write_refer_fixture


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
