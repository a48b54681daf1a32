"""The benchmark runs and reports consistent numbers (no timing assertions: speed is measured
by scripts/benchmark.py, not asserted in tests). The FLOPs and roofline figures must be the shared
calculator's (csp.accounting) applied to the report's own token counts and measured device roofs."""

from __future__ import annotations

import json

import pytest
import torch

from csp.accounting import MODEL_DIMS, ModelDims, roofline, static_row, total_flops
from csp.schedule import StageSchedule
from scripts.benchmark import SHAPES, format_table, load_preset, main, spread

TINY = ModelDims(hidden_size=SHAPES["tiny"]["hidden_size"], intermediate_size=SHAPES["tiny"]["intermediate_size"],
                 num_layers=SHAPES["tiny"]["num_hidden_layers"])


def roofs_kw(report: dict) -> dict:
    r = report["device_roofs"]
    return {"flops_per_s": r["matmul_flops_per_s"], "bytes_per_s": r["bandwidth_bytes_per_s"],
            "element_bytes": r["element_bytes"]}


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
    assert methods["table1_prumerge_plus"]["navg"] == 22 + 85 + 1  # the upper bound: no overlap
    assert methods["table1_prumerge_plus"]["data_dependent"] is not None
    for row in methods.values():
        assert row["ms_median"] > 0
        assert row["speedup"] == report["plain_ms_median"] / row["ms_median"]
        assert row["speedup_over_roofline_speedup"] == pytest.approx(row["speedup"] / row["roofline_speedup"])
    # the roofline is the accounting's, with the measured roofs
    schedule = StageSchedule(Lc=7, Nc=80, Ls=7, Np=8)
    plain = roofline([static_row(TINY, None, 256, 62)["total_tokens"]], TINY, **roofs_kw(report))
    mine = roofline([static_row(TINY, schedule, 256, 62)["total_tokens"]], TINY, **roofs_kw(report))
    assert report["roofline_ms"] == pytest.approx(mine["seconds"] * 1e3, rel=1e-12)
    assert report["roofline_speedup"] == pytest.approx(plain["seconds"] / mine["seconds"], rel=1e-12)
    assert report["speedup_over_roofline_speedup"] == pytest.approx(report["speedup"] / report["roofline_speedup"])
    assert [s["num_layers"] for s in report["roofline_stages"]] == [7, 7, 18]
    roofs = report["device_roofs"]
    assert roofs["matmul_flops_per_s"] == max(g["flops_per_s"] for g in roofs["matmul"])
    assert report["peak_mb_plain"] is None and report["cuda_syncs_per_forward"] is None  # CPU: not measured


def test_suite_report_structure_and_shared_calculator(tmp_path, capsys) -> None:
    out = tmp_path / "suite.json"
    report = main(["--suite", "--shape", "tiny", "--only", "p70,p90", "--batches", "1,2", "--rounds", "1",
                   "--warmup", "0", "--seg-first", "", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "suite" and report["settings"]["batches"] == [1, 2]
    assert report["settings"]["components"] == ["vision", "reduce", "llm", "sam_encoder", "sam_decoder"]
    rows = {(r["name"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(n, b) for n in ("plain", "p70", "p90") for b in (1, 2)}
    for (name, batch), row in rows.items():
        assert set(row["components_ms"]) == set(report["settings"]["components"])
        assert all(c["median"] >= 0 and len(c["all"]) == 1 for c in row["components_ms"].values())
        assert row["samples_per_s"] == pytest.approx(batch / (row["e2e_ms"]["median"] / 1e3))
        assert row["peak_mb"] is None  # CPU
        tokens = row["total_tokens_per_layer"]
        assert len(tokens) == batch
        # FLOPs and roofline: the shared calculator on this row's runtime token counts
        plain_tokens = rows[("plain", batch)]["total_tokens_per_layer"]
        flops = sum(total_flops(t, TINY) for t in tokens)
        assert row["tflops"] == pytest.approx(flops / 1e12, rel=1e-12)
        assert row["flops_ratio"] == pytest.approx(sum(total_flops(t, TINY) for t in plain_tokens) / flops, rel=1e-12)
        roof, plain_roof = roofline(tokens, TINY, **roofs_kw(report)), roofline(plain_tokens, TINY, **roofs_kw(report))
        assert row["roofline_ms"] == pytest.approx(roof["seconds"] * 1e3, rel=1e-12)
        assert row["roofline_speedup"] == pytest.approx(plain_roof["seconds"] / roof["seconds"], rel=1e-12)
        assert row["speedup"] == pytest.approx(rows[("plain", batch)]["llm_ms"] / row["llm_ms"])
        assert name in printed
    # batch 1 has the static table's 62 text tokens, so the runtime FLOPs equal the static row
    for name in ("p70", "p90"):
        static = static_row(TINY, load_preset(f"llava7b_224_{name}").method, 256, 62)
        assert rows[(name, 1)]["tflops"] == pytest.approx(static["TFLOPs"], rel=1e-12)
        assert rows[(name, 1)]["image_tokens_per_layer"] == [static["image_tokens"]]
    assert format_table(report) in printed


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_benchmark_cpu_prepack_is_recorded_and_runs_prepacked(capsys) -> None:
    report = main(["--shape", "tiny", "--repeats", "1", "--warmup", "0", "--rounds", "1", "--threads", "1",
                   "--methods", "none", "--cpu-prepack"])
    capsys.readouterr()
    assert report["cpu_prepack"] is True and report["plain_ms_median"] > 0 and report["csp_ms_median"] > 0
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        main(["--shape", "tiny", "--repeats", "1", "--rounds", "1", "--dtype", "bf16", "--cpu-prepack",
              "--methods", "none"])


def test_benchmark_flops_ratio_for_7b_shape_matches_table6() -> None:
    """The 7B shape the GPU benchmark uses has the paper's 4.12 -> 1.83 TFLOPs for p70 (within 3%)."""
    dims = MODEL_DIMS["llama7b"]
    base = static_row(dims, None, 256, 62)["TFLOPs"]
    p70 = static_row(dims, StageSchedule(Lc=7, Nc=80, Ls=7, Np=8), 256, 62)["TFLOPs"]
    assert abs(base / 4.12 - 1) < 0.03 and abs(p70 / 1.83 - 1) < 0.03


def test_spread_is_reported_and_wide_spread_warns(capsys) -> None:
    """(max - min) / median of the repeats is in the JSON; above --max-spread a warning is printed."""
    assert spread([10.0, 11.0, 12.0, 13.0, 100.0]) == pytest.approx(90.0 / 12.0)
    assert spread([10.0, 11.0, 10.5, 10.0, 11.0]) == pytest.approx(1.0 / 10.5)
    report = main(["--shape", "tiny", "--repeats", "3", "--warmup", "0", "--rounds", "1", "--max-spread", "-1",
                   "--methods", "none"])
    assert report["plain_spread"] >= 0 and len(report["warnings"]) == 2  # any spread exceeds -1
    assert capsys.readouterr().err.count("WARNING: ") == 2
