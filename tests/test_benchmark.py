"""The benchmark runs and reports consistent numbers (no timing assertions: speed is measured
by scripts/benchmark.py, not asserted in tests)."""

from __future__ import annotations

import json

from csp.accounting import MODEL_DIMS, static_row
from csp.schedule import StageSchedule
from scripts.benchmark import main, spread, spread_warnings


def test_benchmark_reports_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    report = main(["--shape", "tiny", "--repeats", "1", "--warmup", "0", "--rounds", "1", "--output", str(out),
                   "--threads", "1", "--methods", "table1_fastv,table1_visionzip,table1_prumerge_plus"])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert report["schedule"] == {"Lc": 7, "Nc": 80, "Ls": 7, "Np": 8}
    assert report["plain_ms_median"] > 0 and report["csp_ms_median"] > 0
    assert report["speedup"] == report["plain_ms_median"] / report["csp_ms_median"]
    # the FLOPs ratio is the accounting's, for the benchmark's own (tiny) dims
    assert report["navg"] == 78.0
    assert abs(report["flops_ratio"] - report["tflops_plain"] / report["tflops_csp"]) < 1e-12
    # every other method is timed in the same run; Navg is what its runner processed
    methods = report["methods"]
    assert sorted(methods) == ["table1_fastv", "table1_prumerge_plus", "table1_visionzip"]
    assert methods["table1_fastv"]["navg"] == (2 * 256 + 30 * 64) / 32
    assert methods["table1_visionzip"]["navg"] == 68 + 12
    assert methods["table1_prumerge_plus"]["navg"] == 13 + 85 + 1  # the upper bound: no overlap
    assert methods["table1_prumerge_plus"]["data_dependent"] is not None
    for row in methods.values():
        assert row["ms_median"] > 0
        assert row["speedup"] == report["plain_ms_median"] / row["ms_median"]


def test_benchmark_flops_ratio_for_7b_shape_matches_table6() -> None:
    """The 7B shape the GPU benchmark uses has the paper's 4.12 -> 1.83 TFLOPs for p70 (within 3%)."""
    dims = MODEL_DIMS["llama7b"]
    base = static_row(dims, None, 256, 62)["TFLOPs"]
    p70 = static_row(dims, StageSchedule(Lc=7, Nc=80, Ls=7, Np=8), 256, 62)["TFLOPs"]
    assert abs(base / 4.12 - 1) < 0.03 and abs(p70 / 1.83 - 1) < 0.03


def test_spread_is_reported_and_wide_spread_warns(capsys) -> None:
    # inclusive quartiles of 10, 11, 12, 13, 100: Q1 = 11, Q3 = 13 -> IQR 2, median 12, 2/12 = 16.7%
    wide = spread([10.0, 11.0, 12.0, 13.0, 100.0])
    assert wide == {"median": 12.0, "iqr": 2.0, "iqr_over_median": 2.0 / 12.0}
    # 10, 10, 10.5, 11, 11: Q1 = 10, Q3 = 11 -> 1/10.5 = 9.5%
    narrow = spread([10.0, 11.0, 10.5, 10.0, 11.0])
    assert narrow["iqr_over_median"] == 1.0 / 10.5
    warnings = spread_warnings({"plain_ms": wide, "csp_ms": narrow}, 0.10)
    assert len(warnings) == 1 and warnings[0].startswith("plain_ms: repeats spread widely (IQR / median = 17% > 10%)")
    report = main(["--shape", "tiny", "--repeats", "3", "--warmup", "0", "--rounds", "1", "--max-spread", "-1"])
    assert report["plain_ms_iqr_over_median"] >= 0 and len(report["warnings"]) == 2  # any spread exceeds -1
    assert capsys.readouterr().err.count("WARNING: ") == 2
