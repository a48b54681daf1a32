"""Plots from finished runs (PNG).

    python -m scripts.plot pareto multirun/2026-01-01/12-00-00 --out docs/pareto.png
    python -m scripts.plot pareto outputs/eval/*/*/metrics.json --out pareto.png --title "7B-224 sweep"
    python -m scripts.plot speedup bench_p65.json bench_p70.json --out docs/speedup.png

``pareto``: mIoU (gIoU mean over splits) against measured TFLOPs of every metrics.json found
under the given files / directories (a sweep's or multirun's runs, a table grid, the schedule
search's calibration), with the Pareto front. ``speedup``: ``scripts/benchmark.py`` JSON reports,
measured speed-up against the FLOPs ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from visualize.plots import load_benchmarks, load_runs, pareto_plot, speedup_plot

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    pareto = sub.add_parser("pareto", help="mIoU vs TFLOPs from metrics.json files")
    pareto.add_argument("paths", nargs="+", help="metrics.json files or run directories")
    pareto.add_argument("--out", required=True)
    pareto.add_argument("--title", default="mIoU vs TFLOPs")
    speed = sub.add_parser("speedup", help="speed-up vs FLOPs ratio from benchmark.py JSON")
    speed.add_argument("paths", nargs="+", help="benchmark.py --output files")
    speed.add_argument("--out", required=True)
    speed.add_argument("--title", default="measured speed-up vs FLOPs ratio")
    args = parser.parse_args(argv)
    if args.kind == "pareto":
        runs = load_runs(args.paths)
        front = pareto_plot(runs, args.out, title=args.title)
        listed = ", ".join(f"{r.label} {r.miou:.1f} @ {r.tflops:.4g}" for r in front)
        print(f"{len(runs)} runs, Pareto front: {listed}")
    else:
        speedup_plot(load_benchmarks(args.paths), args.out, title=args.title)
    print(f"written: {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main()
