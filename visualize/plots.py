"""Plots (matplotlib, PNG): accuracy against TFLOPs across runs, measured speed-up against FLOPs.

- :func:`pareto_plot`: every run's mean gIoU (the paper's mIoU: the mean over the evaluated
  splits, in points) against its measured TFLOPs per sample (from the runtime token records), with
  the Pareto front (no other run is cheaper and at least as accurate) drawn and labelled.
  Inputs are the ``metrics.json`` files of a sweep, a Hydra multirun, a table grid or the schedule
  search's calibration; a same-run baseline (``<run>/baseline/metrics.json``) is plain LISA.
- :func:`speedup_plot`: ``scripts/benchmark.py`` reports: measured speed-up against the FLOPs
  ratio of the same shapes, with the line speed-up = FLOPs ratio.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from csp.search import pareto_front  # noqa: E402


@dataclass(frozen=True)
class RunPoint:
    """One evaluated setting: where its metrics.json is, its label, TFLOPs and gIoU mean (points)."""

    path: Path
    label: str
    tflops: float
    miou: float
    navg: float | None = None


def schedule_label(metrics: dict[str, Any]) -> str:
    """``(Lc,Nc,Ls,Np)`` of the run's CSP schedule, ``<method>(<params>)`` of another method (the
    ``method`` a run records, ``csp.config.MethodConfig.record``), or ``plain`` when it had none."""
    schedule = metrics.get("schedule")
    if schedule:
        return f"({schedule['Lc']},{schedule['Nc']},{schedule['Ls']},{schedule['Np']})"
    method = metrics.get("method")
    if isinstance(method, dict) and method.get("name"):
        params = ",".join(f"{k}={v}" for k, v in method.items() if k != "name")
        return f"{method['name']}({params})"
    return "plain"


def find_metrics(paths: Iterable[str | Path]) -> list[Path]:
    """metrics.json files: given directly, or found (recursively) under the given directories."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob("metrics.json"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such metrics.json file or run directory")
    if not found:
        raise FileNotFoundError(f"no metrics.json under {[str(p) for p in paths]}")
    return found


def load_runs(paths: Iterable[str | Path]) -> list[RunPoint]:
    """One point per metrics.json with a gIoU mean and TFLOPs (runs with no ok sample are skipped)."""
    points = []
    for path in find_metrics(paths):
        metrics = json.loads(path.read_text())
        summary = metrics.get("summary")
        if not isinstance(summary, dict) or "TFLOPs" not in summary:
            raise ValueError(f"{path}: not an evaluation metrics.json (no summary.TFLOPs)")
        if summary.get("gIoU_mean") is None or summary.get("TFLOPs") is None:
            continue
        points.append(RunPoint(path, schedule_label(metrics), float(summary["TFLOPs"]),
                               100.0 * float(summary["gIoU_mean"]), summary.get("Navg")))
    if not points:
        raise ValueError("none of the metrics.json files has an evaluated sample")
    return points


def pareto_plot(runs: Sequence[RunPoint], out: str | Path, *, title: str = "mIoU vs TFLOPs") -> list[RunPoint]:
    """Scatter of all runs, the Pareto front as a labelled line; writes ``out`` (PNG), returns the front."""
    front = [p[2] for p in pareto_front((r.tflops, r.miou, r) for r in runs)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.scatter([r.tflops for r in runs], [r.miou for r in runs], s=18, color="0.6", label="runs", zorder=2)
    ax.plot([r.tflops for r in front], [r.miou for r in front], "-o", color="tab:red", ms=5,
            label="Pareto front", zorder=3)
    for run in front:
        ax.annotate(run.label, (run.tflops, run.miou), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _finish(fig, ax, out, title=title, xlabel="TFLOPs per sample (LLM, measured)",
            ylabel="mIoU (mean gIoU over splits, %)", legend="lower right")
    return front


def load_benchmarks(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """benchmark.py JSON reports (one object per file, or a list of them)."""
    reports = []
    for path in map(Path, paths):
        data = json.loads(path.read_text())
        for report in data if isinstance(data, list) else [data]:
            if not {"speedup", "flops_ratio", "schedule"} <= set(report):
                raise ValueError(f"{path}: not a scripts/benchmark.py report (needs speedup, flops_ratio, schedule)")
            reports.append(report)
    if not reports:
        raise ValueError("no benchmark reports given")
    return reports


def speedup_plot(reports: Sequence[dict[str, Any]], out: str | Path, *,
                 title: str = "measured speed-up vs FLOPs ratio") -> Path:
    """Measured speed-up against the FLOPs ratio, one point per report, with y = x; writes ``out``."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=100)
    ratios = [r["flops_ratio"] for r in reports]
    top = max(max(ratios), max(r["speedup"] for r in reports)) * 1.1
    ax.plot([1, top], [1, top], "--", color="0.5", label="speed-up = FLOPs ratio")
    groups: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        groups.setdefault(f"{report.get('shape')} {report.get('device')} {report.get('dtype')}", []).append(report)
    for name, items in groups.items():
        ax.plot([r["flops_ratio"] for r in items], [r["speedup"] for r in items], "o", label=name)
        for r in items:
            s = r["schedule"]
            ax.annotate(f"({s['Lc']},{s['Nc']},{s['Ls']},{s['Np']})", (r["flops_ratio"], r["speedup"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(1, top)
    ax.set_ylim(0.8, top)
    _finish(fig, ax, out, title=title, xlabel="FLOPs ratio plain / CSP (eqs. 10-11)",
            ylabel="measured speed-up (median LLM forward)", legend="upper left")
    return Path(out)


def _finish(fig: Any, ax: Any, out: str | Path, *, title: str, xlabel: str, ylabel: str, legend: str) -> None:
    """Labels, grid and legend of one plot; writes ``out`` (PNG) and closes the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
