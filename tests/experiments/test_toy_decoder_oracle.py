"""experiments/toy_decoder_oracle.py: the oracle-prompt decoder run on a small toy data set, its dense
pretraining targets against the instance masks, and its refusals of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from datasets import toy
from datasets.refer import refer_mask
from experiments import toy_decoder_oracle as oracle

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m "not slow" skips them

SPEC = toy.ToySpec(seed=4, train_images=6, val_images=2, testA_images=0)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_oracle")
    toy.write_toyref(root, SPEC)
    return root


def test_dense_targets_are_the_painted_shapes(toy_dir: Path) -> None:
    scenes, anns = oracle.load_scenes(toy_dir)
    assert len(scenes) == len(anns) == SPEC.train_images + SPEC.val_images
    for name, shapes in scenes.items():
        kind, color, geometry = oracle.dense_targets(shapes, anns[name], SPEC.image_size)
        union = np.zeros((SPEC.image_size, SPEC.image_size), bool)
        for shape, ann in zip(shapes, anns[name]):
            visible = refer_mask(ann, SPEC.image_size, SPEC.image_size).astype(bool)
            assert not (union & visible).any()  # the visible parts of the shapes do not overlap
            union |= visible
            # kinds and colours by their names, the centre in pixels, independently of the script's tables
            assert {toy.KINDS[k - 1] for k in np.unique(kind.numpy()[visible])} == {shape["kind"]}
            assert {list(toy.COLORS)[c - 1] for c in np.unique(color.numpy()[visible])} == {shape["color"]}
            cx = (geometry[0].numpy()[visible] + 1) * SPEC.image_size / 2
            np.testing.assert_allclose(cx, shape["cx"], rtol=1e-5)
        assert np.array_equal(kind.numpy() > 0, union) and np.array_equal(color.numpy() > 0, union)
        assert not geometry.numpy()[:, ~union].any()


def test_oracle_run_trains_the_decoder_only_and_reports_every_type(toy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = oracle.main(["--dataset-dir", str(toy_dir), "--out", str(out), "--steps", "6", "--val-every", "3",
                          "--val-samples", "4", "--log-every", "2"])
    assert [row["step"] for row in report["val"]] == [3, 6]
    assert report["encoder_frozen"] is True and report["pretrain"] is None
    final = report["final"]
    assert final["samples"] == 4 and 0.0 <= final["gIoU"] <= 1.0 and 0.0 <= final["cIoU"] <= 1.0
    types = {key for key in final["gIoU_by_type"] if "/" not in key}
    assert types and types <= set(toy.EXPRESSION_TYPES)
    lines = [json.loads(line) for line in (out / "oracle.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3, 4, 6]
    assert all({"s_per_step", "eta_s", "elapsed_s"} <= set(line) for line in lines)
    assert lines[-1]["eta_s"] == 0.0
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))


def test_pretraining_stage_runs_then_freezes_the_encoder(toy_dir: Path, tmp_path: Path) -> None:
    report = oracle.main(["--dataset-dir", str(toy_dir), "--out", str(tmp_path / "pre"), "--steps", "2",
                          "--val-samples", "2", "--pretrain-steps", "2", "--pretrain-batch", "2", "--patch-size", "64",
                          "--width", "16", "--depth", "1", "--log-every", "1"])
    pre = report["pretrain"]
    assert pre["stage"] == "pretrain" and pre["step"] == 2
    assert 0.0 <= pre["kind_accuracy_fg"] <= 1.0 and np.isfinite(pre["geometry_loss"])
    assert report["encoder_frozen"] is True


def test_bad_input_is_refused_before_training(toy_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(toy_dir, broken)
    (broken / "refer_seg" / "toyref" / "scenes.json").unlink()
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        oracle.main(["--dataset-dir", str(broken), "--out", str(tmp_path / "o"), "--pretrain-steps", "1"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="--patch-size"):
        oracle.parse_args(["--dataset-dir", "x", "--out", "y", "--patch-size", "48"])
    with pytest.raises(ValueError, match="banana"):
        oracle.TextCode(toy.TOKENIZER_WORDS.split())(["the banana"])
