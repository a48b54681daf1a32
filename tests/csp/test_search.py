"""Schedule search: every returned setting meets the target by the evaluation's calculator
(csp.accounting.static_row), the enumeration and the ranking follow the documented rules. The
calibration run (tiny model + miniature data) is in tests/visualize/test_plots.py, whose plots use its runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from csp.accounting import ModelDims, static_row
from csp.schedule import StageSchedule
from csp.search import MODEL_SHAPES, Target, heuristic_key, pareto_front, search
from scripts import search_schedule

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", sorted(MODEL_SHAPES))
@pytest.mark.parametrize("reduction", [0.65, 0.75])
def test_every_setting_meets_the_reduction_by_the_calculator(model: str, reduction: float) -> None:
    dims, tokens = MODEL_SHAPES[model]
    found = search(dims, tokens, Target(reduction=reduction), tolerance=0.02)
    assert found
    for cand in found:
        s = cand.schedule
        row = static_row(dims, s, tokens)  # what evaluation's flops table and records use
        assert 1 - row["Navg"] / tokens >= reduction
        assert 1 - row["Navg"] / tokens <= reduction + 0.02
        assert row["TFLOPs"] == pytest.approx(cand.tflops) and row["Navg"] == pytest.approx(cand.navg)
        s.validate(dims.num_layers, tokens)
        assert s.Lc >= 1 and s.Ls >= 1 and s.Lc + s.Ls < dims.num_layers and s.Np <= s.Nc < tokens
    assert [c.key for c in found] == sorted(c.key for c in found)


def test_every_setting_meets_a_tflops_target() -> None:
    dims, tokens = MODEL_SHAPES["llava13b_224"]
    found = search(dims, tokens, Target(tflops=3.0), tolerance=0.05)
    for cand in found:
        tflops = static_row(dims, cand.schedule, tokens)["TFLOPs"]
        assert 3.0 * 0.95 <= tflops <= 3.0


def test_enumeration_by_hand() -> None:
    # Tiny (L = 6, N = 256), Nc = 64, Np = 8, 70% target: Navg <= 76.8, i.e. 64 Lc + 256 Ls + 8 (6 - Lc - Ls) <= 460.8,
    # 56 Lc + 248 Ls <= 412.8. Ls = 1: Lc <= 2.94 -> Lc = 1, 2; Ls = 2: 496 > 412.8. Navg: (64 + 256 + 32) / 6 and
    # (128 + 256 + 24) / 6.
    dims, tokens = MODEL_SHAPES["tiny"]
    found = search(dims, tokens, Target(reduction=0.7), nc_values=[64], np_values=[8], tolerance=1.0)
    assert sorted((c.schedule.Lc, c.schedule.Ls) for c in found) == [(1, 1), (2, 1)]
    assert sorted(c.navg for c in found) == pytest.approx([352 / 6, 408 / 6])
    with pytest.raises(ValueError, match="no setting meets 90% fewer image tokens"):
        search(dims, tokens, Target(reduction=0.9), nc_values=[64], np_values=[8])
    with pytest.raises(ValueError, match="exactly one target"):
        Target(reduction=0.7, tflops=1.0)


def test_ranking_follows_the_documented_heuristics() -> None:
    L = 32  # depth target 0.42 * 32 = 13.44, one layer either way free
    key = {s: heuristic_key(StageSchedule(*s), L, 0.0) for s in
           [(6, 64, 8, 8), (8, 64, 6, 8), (2, 64, 4, 8), (6, 64, 8, 2), (6, 128, 8, 8)]}
    # proxy (points): 1.25 Ls + 1.75 log2 Nc + 0.2 log2 min(Np, 8) - max(0, log2(4 / Np))
    assert key[(6, 64, 8, 8)][:2] == (0.0, -21.1)  # 10 + 10.5 + 0.6
    assert key[(8, 64, 6, 8)][:2] == (0.0, -18.6)  # 7.5 + 10.5 + 0.6
    assert key[(2, 64, 4, 8)][0] == pytest.approx(13.44 - 6 - 1)  # too shallow before pruning
    assert key[(6, 64, 8, 2)][1:3] == (-19.7, 2)  # 10 + 10.5 + 0.2 - 1; |log2(2 / 8)| = 2
    assert key[(6, 128, 8, 8)][1] == -22.9  # one more doubling of Nc: + 1.75 (rounded)
    order = sorted(key, key=key.get)
    assert order == [(6, 128, 8, 8), (6, 64, 8, 8), (6, 64, 8, 2), (8, 64, 6, 8), (2, 64, 4, 8)]


def test_pareto_front_by_hand() -> None:
    points = [(1.0, 0.5, "a"), (2.0, 0.4, "b"), (2.0, 0.6, "c"), (3.0, 0.6, "d"), (0.5, 0.2, "e"), (4.0, 0.7, "f")]
    assert [p[2] for p in pareto_front(points)] == ["e", "a", "c", "f"]


def test_search_cli_checks_its_arguments() -> None:
    with pytest.raises(SystemExit):
        search_schedule.main(["--model", "tiny"])  # no target
    with pytest.raises(SystemExit, match="--base is required with --dims"):
        search_schedule.main(["--dims", "32,256,4096,11008", "--reduction", "0.7"])
    with pytest.raises(SystemExit, match="expected L,N,d,m"):
        search_schedule.main(["--dims", "32,256", "--reduction", "0.7", "--base", "+exp=demo"])


def test_custom_dims_match_the_named_model(tmp_path: Path) -> None:
    named = search_schedule.main(["--model", "llava7b_224", "--reduction", "0.8", "--top", "3",
                                  "--out-dir", str(tmp_path / "a")])
    custom = search_schedule.main(["--dims", "32,256,4096,11008", "--reduction", "0.8", "--top", "3",
                                   "--base", "+exp=llava7b_224_p80", "--out-dir", str(tmp_path / "b")])
    assert [c.schedule for c in named["candidates"]] == [c.schedule for c in custom["candidates"]]
    assert MODEL_SHAPES["llava7b_224"][0] == ModelDims(4096, 11008, 32)
