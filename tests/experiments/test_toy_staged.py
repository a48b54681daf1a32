"""experiments/toy_staged.py: the staged toy recipe (questions first, then segmentation) runs end to end on
a small toy data set, its question stage lowers the held-out question loss, and bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets import toy
from experiments import toy_staged

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m "not slow" skips them

SPEC = toy.ToySpec(seed=3, train_images=8, val_images=2, testA_images=0)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_staged")
    toy.write_toyref(root, SPEC)
    return root


def test_curriculum_scenes_ask_where_and_which_about_each_shape() -> None:
    for count in (1, 2):
        pool = toy_staged.scenes(5, count, seed=4)
        assert len(pool) == 5
        for image, turns in pool:
            assert image.size == (SPEC.image_size, SPEC.image_size)
            assert len(turns) <= 2 * count and len(turns) % 2 == 0
            for (where_q, where_a), (which_q, which_a) in zip(turns[::2], turns[1::2]):
                assert where_q.startswith("where is ") and which_q.startswith("which object is ")
                assert where_q[len("where is "):] == which_q[len("which object is "):]
                row, col = where_a.rstrip(".").split()
                assert row in toy.THIRDS[0] and col in toy.THIRDS[1]
                article, color, kind = which_a.rstrip(".").split()
                assert article == "a" and color in toy.COLORS and kind in toy.KINDS


def test_staged_run_reports_every_stage_and_the_questions_are_learnt(toy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = toy_staged.main(["--dataset-dir", str(toy_dir), "--out", str(out), "--scenes", "30", "--a1", "25",
                              "--a2", "1", "--a3", "1", "--a-images", "4", "--b", "4", "--silent", "2",
                              "--val-samples", "4", "--log-every", "5", "--hidden", "32", "--layers", "2",
                              "--lr", "3e-3", "--llm-lr-scale", "1.0"])
    first = report["stage_a"][0]
    assert [row["stage"] for row in report["stage_a"]] == ["A:one", "A:two", "A:full"]
    assert [row["step"] for row in report["stage_b"]] == [2, 3, 4]  # after the silent phase, half-way, the end
    for row in report["stage_b"] + [report["final_zero_image_tokens"]]:
        assert 0.0 <= row["gIoU"] <= 1.0 and 0.0 <= row["cIoU"] <= 1.0
    # 25 steps on one-shape scenes: their held-out answers cost far less than at initialisation
    # (about ln |V| per token there, over 3 nats)
    assert report["initial"]["held_out_ce/one"] > 3.0
    assert first["held_out_ce/one"] < 0.6 * report["initial"]["held_out_ce/one"]
    assert report["val_samples"] == 4 and report["final"] == report["stage_b"][-1]
    lines = [json.loads(line) for line in (out / "toy_staged.jsonl").read_text().splitlines()]
    assert lines[-1]["stage"] == "end" and all("elapsed_s" in line for line in lines)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))


def test_bad_input_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        toy_staged.main(["--b", "10", "--silent", "20"])
    with pytest.raises(SystemExit):
        toy_staged.main(["--a-images", "0"])
    with pytest.raises(Exception, match="missing"):
        toy_staged.main(["--dataset-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
