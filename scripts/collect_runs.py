"""One table for many runs: every metrics.json under a directory (e.g. a Hydra multirun sweep).

    python -m scripts.collect_runs multirun/2026-01-01/12-00-00        # prints and writes sweep_table.txt there

A plain-LISA baseline evaluated by several jobs (``<job>/baseline/metrics.json``) appears once.
``eval_ds.py -m ...`` already rewrites ``<sweep dir>/sweep_table.txt`` after every job; this
script rebuilds it (or gathers runs from anywhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.report import collect_runs, table

SWEEP_TABLE = "sweep_table.txt"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory searched recursively for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help=f"table file (default: <root>/{SWEEP_TABLE})")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(f"{args.root} is not a directory (give the sweep or runs directory to search)")
    skipped: list = []
    rows = collect_runs(args.root, skipped)
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr, flush=True)
    if not rows:
        found = f" ({len(skipped)} skipped, named above)" if skipped else ""
        raise SystemExit(f"no readable metrics.json under {args.root}{found}")
    text = table(rows)
    (args.out or args.root / SWEEP_TABLE).write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    from runs.cli import user_errors_in_one_line

    user_errors_in_one_line(main)()
