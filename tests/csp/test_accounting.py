"""Efficiency accounting (csp/accounting.py), the schedule presets and scripts/flops_table.py.

The expected Navg and TFLOPs are the paper's own numbers (Tables 1, 4, 5 and 6), written out.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from csp.accounting import (
    MODEL_DIMS,
    ModelDims,
    TokenRecord,
    layer_flops,
    navg,
    static_row,
    summarize_records,
    total_flops,
)
from csp.schedule import ScheduleError, StageSchedule
from csp.strategies import CLUSTERING_STRATEGIES

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEDULE_DIR = REPO_ROOT / "configs" / "schedule"
TFLOPS_REL_TOL = 0.03


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "flops_table", REPO_ROOT / "scripts" / "flops_table.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flops_table = _load_script()

RATIOS = (65, 70, 75, 80, 85, 90)

# Table 6: family -> (model, N, schedules for 65..90%, Navg for 0..90%, TFLOPs for 0..90%).
TABLE6: dict[str, tuple[str, int, list[tuple[int, int, int, int]], list[int], list[float]]] = {
    "llava7b_224": (
        "llama7b",
        256,
        [
            (6, 96, 8, 8),
            (7, 80, 7, 8),
            (8, 64, 6, 4),
            (10, 48, 4, 8),
            (11, 32, 3, 8),
            (12, 32, 2, 2),
        ],
        [256, 86, 78, 66, 51, 39, 29],
        [4.12, 1.93, 1.83, 1.68, 1.48, 1.33, 1.2],
    ),
    "llava7b_336": (
        "llama7b",
        576,
        [
            (6, 128, 9, 32),
            (6, 32, 9, 16),
            (7, 64, 7, 16),
            (8, 24, 6, 8),
            (9, 32, 4, 8),
            (11, 32, 3, 2),
        ],
        [576, 203, 176, 149, 118, 85, 66],
        [8.25, 3.44, 3.1, 2.74, 2.35, 1.92, 1.68],
    ),
    "llava13b_224": (
        "llama13b",
        256,
        [
            (5, 64, 11, 16),
            (6, 64, 10, 8),
            (7, 32, 9, 8),
            (9, 16, 7, 8),
            (11, 16, 5, 8),
            (12, 32, 2, 8),
        ],
        [256, 88, 78, 68, 53, 41, 27],
        [8.05, 3.83, 3.58, 3.32, 2.95, 2.65, 2.31],
    ),
}


def _table6_cases() -> list[tuple[str, str, int, tuple[int, int, int, int] | None, int, float]]:
    """(row name, model, N, schedule or None for the baseline, paper Navg, paper TFLOPs)."""
    cases = []
    for family, (model, n, schedules, navgs, tflops) in TABLE6.items():
        names = [f"{family}_baseline"] + [f"{family}_p{r}" for r in RATIOS]
        for name, sched, nv, tf in zip(names, [None, *schedules], navgs, tflops, strict=True):
            cases.append((name, model, n, sched, nv, tf))
    return cases


TABLE6_CASES = _table6_cases()

# Table 5 (Nc = 64, Lp = 18): (Lc, Np) -> (paper Navg, paper TFLOPs).
TABLE5 = {
    (6, 4): (78, 1.82),
    (6, 8): (80, 1.85),
    (6, 16): (85, 1.92),
    (6, 32): (94, 2.03),
    (7, 4): (72, 1.75),
    (7, 8): (74, 1.78),
    (7, 16): (79, 1.84),
    (7, 32): (88, 1.96),
    (8, 4): (66, 1.68),
    (8, 8): (68, 1.7),
    (8, 16): (73, 1.77),
    (8, 32): (82, 1.88),
}
# Table 4, Uniform rows (Lc = 8, Ls = 6, Np = 16): Nc -> (paper Navg, paper TFLOPs).
TABLE4_UNIFORM = {16: (61, 1.61), 32: (65, 1.66), 64: (73, 1.76)}
T4_STRATEGIES = ("random", "uniform", "cls_attention", "seg_first")


def _assert_paper(row: dict[str, Any], navg_floor: int, tflops: float) -> None:
    assert row["Navg_floor"] == navg_floor, row
    assert abs(row["TFLOPs"] - tflops) / tflops <= TFLOPS_REL_TOL, row


@pytest.fixture(scope="module")
def json_rows() -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in flops_table.build_rows()}


# --- Table 6 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model", "n", "sched", "paper_navg", "paper_tflops"), TABLE6_CASES
)
def test_table6_static_row(
    name: str,
    model: str,
    n: int,
    sched: tuple[int, int, int, int] | None,
    paper_navg: int,
    paper_tflops: float,
) -> None:
    schedule = None if sched is None else StageSchedule(*sched)
    _assert_paper(static_row(MODEL_DIMS[model], schedule, n), paper_navg, paper_tflops)


def test_table6_via_script_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert flops_table.main(["--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name, model, n, sched, paper_navg, paper_tflops in TABLE6_CASES:
        row = rows[name]
        assert (row["model"], row["N"]) == (model, n)
        assert (row["Lc"], row["Nc"], row["Ls"], row["Np"]) == (sched or (None,) * 4)
        _assert_paper(row, paper_navg, paper_tflops)


def test_table6_presets_match_paper_settings() -> None:
    presets = flops_table.load_presets()
    for family, (_, _, schedules, _, _) in TABLE6.items():
        for ratio, sched in zip(RATIOS, schedules, strict=True):
            preset = presets[f"{family}_p{ratio}"]
            assert (preset.Lc, preset.Nc, preset.Ls, preset.Np) == sched
            assert preset.clustering == "uniform"


# --- Tables 1, 4, 5 ----------------------------------------------------------------------------


def test_table1_row(json_rows: dict[str, dict[str, Any]]) -> None:
    row = json_rows["table1"]
    assert (row["Lc"], row["Nc"], row["Ls"], row["Np"]) == (8, 64, 6, 16)
    _assert_paper(row, 73, 1.76)


@pytest.mark.parametrize(("lc", "np_"), sorted(TABLE5))
def test_table5_rows(json_rows: dict[str, dict[str, Any]], lc: int, np_: int) -> None:
    row = json_rows[f"t5_lc{lc}_np{np_}"]
    assert (row["Lc"], row["Nc"], row["Ls"], row["Np"]) == (lc, 64, 32 - 18 - lc, np_)
    assert row["clustering"] == "uniform"
    _assert_paper(row, *TABLE5[(lc, np_)])


@pytest.mark.parametrize("nc", sorted(TABLE4_UNIFORM))
def test_table4_rows(json_rows: dict[str, dict[str, Any]], nc: int) -> None:
    _assert_paper(json_rows[f"t4_nc{nc}_uniform"], *TABLE4_UNIFORM[nc])
    for strategy in T4_STRATEGIES:
        row = json_rows[f"t4_nc{nc}_{strategy}"]
        assert (row["Lc"], row["Nc"], row["Ls"], row["Np"], row["clustering"]) == (
            8,
            nc,
            6,
            16,
            strategy,
        )


# --- preset files ------------------------------------------------------------------------------


def _expected_preset_names() -> set[str]:
    names = {f"{f}_p{r}" for f in TABLE6 for r in RATIOS} | {"table1"}
    names |= {f"t4_nc{nc}_{s}" for nc in TABLE4_UNIFORM for s in T4_STRATEGIES}
    names |= {f"t5_lc{lc}_np{np_}" for lc, np_ in TABLE5}
    names |= {"toy_mild", "toy_p70", "toy_aggressive"}  # the toy LISA's schedules (README "Toy world")
    return names


def test_preset_files_are_plain_group_files() -> None:
    paths = sorted(SCHEDULE_DIR.glob("*.yaml"))
    assert {p.stem for p in paths} == _expected_preset_names()
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert "@package" not in text
        assert text.startswith("# ")
        assert "Table" in text.splitlines()[1]
        assert "Navg" in text
        assert "TFLOPs" in text
        cfg = yaml.safe_load(text)
        assert set(cfg) == {"Lc", "Nc", "Ls", "Np", "clustering", "clustering_kwargs"}
        # every option of the strategy is a key, so that `schedule.clustering_kwargs.<option>=...` works as written
        options = {f.name for f in dataclasses.fields(CLUSTERING_STRATEGIES[cfg["clustering"]])} - {"segmenter"}
        assert set(cfg["clustering_kwargs"] or {}) == options, path.name
        if cfg["clustering"] == "seg_first":
            assert cfg["clustering_kwargs"]["weights"] is None  # no default weights: the user names the file


def test_every_preset_validates_against_its_model() -> None:
    for name, schedule in flops_table.load_presets().items():
        model, n = flops_table.PRESET_FAMILIES[flops_table.family_of(name)]
        schedule.validate(MODEL_DIMS[model].num_layers, n)


# --- formulas ----------------------------------------------------------------------------------


def test_layer_flops_by_hand() -> None:
    # n=3, d=2, m=5: 4*3*2^2 = 48, 2*3^2*2 = 36, 3*3*2*5 = 90 -> 174 multiply-adds = 348 FLOPs.
    assert layer_flops(3, 2, 5) == 348.0
    # n=1, d=1, m=1: 4 + 2 + 3 = 9 multiply-adds.
    assert layer_flops(1, 1, 1) == 18.0
    assert layer_flops(0, 4096, 11008) == 0.0


def test_llama7b_baseline_layer_by_hand() -> None:
    n, d, m = 318, 4096, 11008  # 62 text + 256 image tokens
    mult_adds = 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    assert layer_flops(n, d, m) == 2 * mult_adds
    assert total_flops([n] * 32, MODEL_DIMS["llama7b"]) == 32 * 2 * mult_adds


def test_navg_and_total_flops() -> None:
    assert navg([64, 64, 256, 16]) == 100.0
    with pytest.raises(ValueError, match="at least one layer"):
        navg([])
    dims = ModelDims(hidden_size=2, intermediate_size=5, num_layers=2)
    assert total_flops([3, 1], dims) == 348.0 + layer_flops(1, 2, 5)
    with pytest.raises(ValueError, match="layers"):
        total_flops([3, 3, 3], dims)


def test_model_dims_presets_and_from_config() -> None:
    assert MODEL_DIMS["llama7b"] == ModelDims(4096, 11008, 32)
    assert MODEL_DIMS["llama13b"] == ModelDims(5120, 13824, 40)
    cfg = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4}
    assert ModelDims.from_config(cfg) == ModelDims(64, 172, 4)
    assert ModelDims.from_config(SimpleNamespace(**cfg)) == ModelDims(64, 172, 4)


def test_static_row_lists_and_text_tokens() -> None:
    dims = ModelDims(hidden_size=2, intermediate_size=5, num_layers=4)
    row = static_row(dims, StageSchedule(1, 2, 1, 3), num_image_tokens=8, text_tokens=10)
    assert row["image_tokens"] == [2, 8, 3, 3]
    assert row["total_tokens"] == [12, 18, 13, 13]
    assert row["Navg"] == 4.0
    assert row["Navg_floor"] == 4
    assert row["TFLOPs"] == total_flops([12, 18, 13, 13], dims) / 1e12
    base = static_row(dims, None, num_image_tokens=8, text_tokens=0)
    assert base["image_tokens"] == base["total_tokens"] == [8] * 4
    with pytest.raises(ScheduleError):
        static_row(dims, StageSchedule(3, 2, 2, 3), num_image_tokens=8)


# --- runtime records ---------------------------------------------------------------------------


def test_token_record_summaries_by_hand() -> None:
    dims = ModelDims(hidden_size=2, intermediate_size=5, num_layers=3)
    # layer_flops(n, 2, 5) = 2 * (16n + 4n^2 + 30n): n=7 -> 1036, n=5 -> 660, n=4 -> 496.
    first = TokenRecord(image_tokens=[4, 2, 2], total_tokens=[7, 5, 5])
    second = TokenRecord(image_tokens=[1, 1, 1], total_tokens=[4, 4, 4])
    one = first.summarize(dims)
    assert one["Navg"] == pytest.approx(8 / 3)
    assert one["Navg_floor"] == 2
    assert one["TFLOPs"] == pytest.approx((1036 + 2 * 660) / 1e12)
    both = summarize_records([first, second], dims)
    assert both["num_samples"] == 2
    assert both["Navg"] == pytest.approx((8 / 3 + 1) / 2)
    assert both["TFLOPs"] == pytest.approx((2356 + 3 * 496) / 2 / 1e12)


def test_token_record_matches_static_row() -> None:
    dims = MODEL_DIMS["llama7b"]
    static = static_row(dims, StageSchedule(8, 64, 6, 16), 256)
    record = TokenRecord(image_tokens=static["image_tokens"], total_tokens=static["total_tokens"])
    summary = summarize_records([record, record], dims)
    assert summary["Navg"] == static["Navg"]
    assert summary["TFLOPs"] == pytest.approx(static["TFLOPs"])


def test_token_record_errors() -> None:
    dims = ModelDims(hidden_size=2, intermediate_size=5, num_layers=3)
    with pytest.raises(ValueError, match="image counts"):
        TokenRecord(image_tokens=[1, 1], total_tokens=[2, 2, 2])
    with pytest.raises(ValueError, match="more image tokens"):
        TokenRecord(image_tokens=[3], total_tokens=[2])
    with pytest.raises(ValueError, match="layers"):
        TokenRecord(image_tokens=[1, 1], total_tokens=[2, 2]).summarize(dims)
    with pytest.raises(ValueError, match="at least one record"):
        summarize_records([], dims)


# --- StageSchedule.image_tokens_per_layer and validation ---------------------------------------


@pytest.mark.parametrize(
    ("sched", "layers", "n", "expected"),
    [
        ((2, 4, 1, 2), 5, 8, [4, 4, 8, 2, 2]),  # all three stages
        ((2, 4, 0, 3), 4, 8, [4, 4, 3, 3]),  # Ls = 0: prune the Nc clustered tokens
        ((2, 4, 0, 6), 4, 8, [4, 4, 4, 4]),  # Ls = 0 keeps min(Np, Nc)
        ((0, 4, 2, 3), 4, 8, [8, 8, 3, 3]),  # Lc = 0: no clustering
        ((1, 4, 1, 8), 4, 8, [4, 8, 8, 8]),  # Np >= N: no pruning
        ((2, 8, 1, 3), 4, 8, [8, 8, 8, 3]),  # Nc = N: clustering keeps all
        ((2, 4, 2, 3), 4, 8, [4, 4, 8, 8]),  # Lp = 0
        ((0, 8, 4, 8), 4, 8, [8, 8, 8, 8]),  # plain model
    ],
)
def test_image_tokens_per_layer(
    sched: tuple[int, int, int, int], layers: int, n: int, expected: list[int]
) -> None:
    schedule = StageSchedule(*sched)
    schedule.validate(layers, n)
    assert schedule.image_tokens_per_layer(layers, n) == expected


@pytest.mark.parametrize(
    ("sched", "layers", "n"),
    [
        ((3, 4, 2, 2), 4, 8),  # Lc + Ls > L
        ((1, 9, 1, 2), 4, 8),  # Nc > N
        ((1, 4, 1, 9), 4, 8),  # Np > N
        ((0, 4, 0, 2), 4, 8),  # pruning with Lc + Ls = 0
    ],
)
def test_invalid_schedule_validate(sched: tuple[int, int, int, int], layers: int, n: int) -> None:
    with pytest.raises(ScheduleError):
        StageSchedule(*sched).validate(layers, n)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"Lc": 1, "Nc": 4, "Ls": 1, "Np": 0},
        {"Lc": -1, "Nc": 4, "Ls": 1, "Np": 2},
        {"Lc": 1, "Nc": 0, "Ls": 1, "Np": 2},
        {"Lc": 1, "Nc": 4, "Ls": -1, "Np": 2},
        {"Lc": 1.0, "Nc": 4, "Ls": 1, "Np": 2},
    ],
)
def test_invalid_schedule_construct(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ScheduleError):
        StageSchedule(**kwargs)


# --- script ------------------------------------------------------------------------------------


def test_script_text_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert flops_table.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "method", "Lc", "Nc", "Ls", "Np", "Navg", "TFLOPs"]
    assert lines[1].split() == ["llava7b_224_baseline", "-", "-", "-", "-", "-", "256.00", "4.172"]
    method_presets = sorted(p.stem for p in (REPO_ROOT / "configs" / "exp").glob("table*_*.yaml"))
    assert len(lines) == 1 + 3 + len(_expected_preset_names()) + len(method_presets)


def test_script_text_tokens_option(capsys: pytest.CaptureFixture[str]) -> None:
    flops_table.main(["--json", "--text-tokens", "0"])
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    expected = total_flops([256] * 32, MODEL_DIMS["llama7b"]) / 1e12
    assert rows["llava7b_224_baseline"]["TFLOPs"] == pytest.approx(expected)


def test_script_family_mapping() -> None:
    assert flops_table.family_of("llava7b_224_p65") == "llava7b_224"
    assert flops_table.family_of("llava13b_224_p90") == "llava13b_224"
    assert flops_table.family_of("t4_nc16_random") == "t4"
    assert flops_table.family_of("table1") == "table1"
    with pytest.raises(ValueError, match="no known family"):
        flops_table.family_of("my_llava7b_224_p65")
    with pytest.raises(ValueError, match="no known family"):
        flops_table.family_of("t4x_nc16")


def test_script_rejects_bad_presets(tmp_path: Path) -> None:
    (tmp_path / "t4_empty.yaml").write_text("# nothing\n")
    with pytest.raises(ScheduleError, match="empty"):
        flops_table.main(["--schedule-dir", str(tmp_path)])
    (tmp_path / "t4_empty.yaml").write_text("Lc: 1\nNc: 4\nLs: 1\nNp: 2\nextra: 1\n")
    with pytest.raises(ScheduleError, match="unknown"):
        flops_table.main(["--schedule-dir", str(tmp_path)])


# -- bytes and roofline (hand-computed from the documented model) ---------------------------------
def test_layer_bytes_by_hand() -> None:
    from csp.accounting import layer_activation_bytes, layer_weight_bytes

    # d=2, m=3, 2-byte elements: weights 2 * (4*4 + 3*2*3) = 68; activations n=5: 2 * 5 * (17*2 + 3*3) = 430
    assert layer_weight_bytes(2, 3, 2) == 68
    assert layer_activation_bytes(5, 2, 3, 2) == 430


def test_roofline_by_hand() -> None:
    from csp.accounting import roofline

    dims = ModelDims(hidden_size=2, intermediate_size=3, num_layers=3)
    # layer FLOPs 2 * (4 n d^2 + 2 n^2 d + 3 n d m): n=5 -> 2 * (80 + 100 + 90) = 540; n=1 -> 2 * (16 + 4 + 18) = 76
    # bytes (2-byte elements): n=5 -> 68 + 430 = 498; n=1 -> 68 + 86 = 154
    # at 10 FLOP/s and 100 B/s: n=5 -> max(54, 4.98) = 54 (compute); n=1 -> max(7.6, 1.54) = 7.6
    out = roofline([[5, 5, 1]], dims, flops_per_s=10.0, bytes_per_s=100.0, element_bytes=2)
    assert out["seconds"] == pytest.approx(54 + 54 + 7.6)
    assert out["flops"] == 540 * 2 + 76 and out["bytes"] == 498 * 2 + 154
    assert [(s["first_layer"], s["num_layers"], s["tokens"], s["bound"]) for s in out["stages"]] == [
        (0, 2, [5], "compute"), (2, 1, [1], "compute")]
    # batch of two: the weights are read once per layer; at 1e6 FLOP/s everything is memory-bound
    two = roofline([[1, 1, 1], [5, 5, 5]], dims, flops_per_s=1e6, bytes_per_s=100.0, element_bytes=2)
    assert two["bytes"] == 3 * (68 + 86 + 430)
    assert two["seconds"] == pytest.approx(3 * 5.84)
    assert [s["bound"] for s in two["stages"]] == ["memory"]


def test_roofline_rejects_bad_input() -> None:
    from csp.accounting import roofline

    dims = ModelDims(hidden_size=2, intermediate_size=3, num_layers=3)
    with pytest.raises(ValueError, match="3 layers"):
        roofline([[5, 5]], dims, flops_per_s=1.0, bytes_per_s=1.0, element_bytes=2)
    with pytest.raises(ValueError, match="positive"):
        roofline([[5, 5, 5]], dims, flops_per_s=0.0, bytes_per_s=1.0, element_bytes=2)
