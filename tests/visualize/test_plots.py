"""Schedule-search calibration on the tiny model + miniature data, and the plots made from real
runs: mIoU vs TFLOPs (Pareto front) from the calibration's metrics.json files, speed-up vs FLOPs
ratio from scripts/benchmark.py reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from csp.accounting import static_row
from csp.search import MODEL_SHAPES, Candidate
from csp.sweeps import grid_points, load_sweep
from scripts import benchmark, search_schedule
from scripts import plot as plot_cli
from visualize.plots import load_runs

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m "not slow" skips them


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("search")
    out = search_schedule.main([
        "--model", "tiny", "--reduction", "0.7", "--top", "2", "--calibrate", "--out-dir", str(root / "s"),
        "--base", "+exp=demo_tiny", "--base", "baseline=null", "--base", "data=reasonseg",
        "--base", "max_samples_per_split=1", "--base", f"miniature.dir={root / 'mini'}",
        "--sweep", str(root / "sweep.yaml")])
    out["root"] = root
    return out


def test_calibration_on_the_tiny_model_returns_a_pareto_front(calibrated: dict[str, Any]) -> None:
    top: list[Candidate] = calibrated["candidates"]
    root = calibrated["root"]
    assert len(top) == 2 and all(c.metrics is not None for c in top)
    dims, tokens = MODEL_SHAPES["tiny"]
    for cand in top:
        summary = cand.metrics["summary"]
        assert summary["evaluated"] == 2 and summary["gIoU_mean"] is not None  # one sample per ReasonSeg split
        # measured image tokens per layer = the schedule's (Nc, Np exact): the same Navg as the calculator
        assert summary["Navg"] == pytest.approx(static_row(dims, cand.schedule, tokens)["Navg"])
        assert (root / "s" / "calibration" / cand.label / "metrics.json").is_file()
    front = calibrated["front"]
    assert front and all(any(f is c for c in top) for f in front)
    costs = [c.metrics["summary"]["TFLOPs"] for c in front]
    assert costs == sorted(costs)
    table = (root / "s" / "table.md").read_text()
    assert "| Pareto |" in table and table.count("| yes |") == len(front)
    sweep = load_sweep(root / "sweep.yaml")
    assert [p["schedule"] for p in grid_points(sweep)] == [
        f"{{Lc:{c.schedule.Lc},Nc:{c.schedule.Nc},Ls:{c.schedule.Ls},Np:{c.schedule.Np}}}" for c in top]


def is_front(points: list[tuple[float, float]], i: int) -> bool:
    """By definition: no other point is at most as costly and at least as accurate, one strictly."""
    c, a = points[i]
    return not any((c2 <= c and a2 >= a and (c2 < c or a2 > a)) for j, (c2, a2) in enumerate(points) if j != i)


def test_pareto_plot_from_the_calibration_runs(calibrated: dict[str, Any]) -> None:
    root = calibrated["root"]
    png = root / "pareto.png"
    plot_cli.main(["pareto", str(root / "s" / "calibration"), "--out", str(png), "--title", "tiny, 70%"])
    runs = load_runs([root / "s" / "calibration"])
    metrics = [json.loads(p.read_text()) for p in sorted((root / "s" / "calibration").rglob("metrics.json"))]
    assert sorted((r.tflops, r.miou) for r in runs) == sorted(
        (m["summary"]["TFLOPs"], 100 * m["summary"]["gIoU_mean"]) for m in metrics)
    points = [(r.tflops, r.miou) for r in runs]
    expected = {points[i] for i in range(len(points)) if is_front(points, i)}
    from visualize.plots import pareto_plot

    front = pareto_plot(runs, root / "again.png")
    assert {(r.tflops, r.miou) for r in front} == expected
    assert {r.label for r in front} == {f"({c.schedule.Lc},{c.schedule.Nc},{c.schedule.Ls},{c.schedule.Np})"
                                        for c in calibrated["front"]}
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (420, 640, 3)
    red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)  # the front's line and markers
    assert red.sum() > 20


def test_speedup_plot_from_benchmark_reports(tmp_path: Path) -> None:
    out = tmp_path / "p90.json"
    report = benchmark.main(["--shape", "tiny", "--preset", "llava7b_224_p90", "--repeats", "1", "--warmup", "0",
                             "--rounds", "1", "--output", str(out)])
    png = plot_cli.main(["speedup", str(out), "--out", str(tmp_path / "speedup.png")])
    from visualize.plots import load_benchmarks

    assert load_benchmarks([out]) == [json.loads(json.dumps(report))]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (420, 520, 3) and (image != 255).any()
    with pytest.raises(ValueError, match="not a scripts/benchmark.py report"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"speedup": 1.0}))
        plot_cli.main(["speedup", str(bad), "--out", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="no such metrics.json"):
        plot_cli.main(["pareto", str(tmp_path / "nothing"), "--out", str(tmp_path / "y.png")])


def test_run_labels_name_the_method_of_any_run() -> None:
    from visualize.plots import schedule_label

    assert schedule_label({"method": "csp", "schedule": {"Lc": 7, "Nc": 80, "Ls": 7, "Np": 8}}) == "(7,80,7,8)"
    assert schedule_label({"method": {"name": "fastv", "layer": 2, "keep": 64}, "schedule": None}) == \
        "fastv(layer=2,keep=64)"
    assert schedule_label({"method": None, "schedule": None}) == "plain"
