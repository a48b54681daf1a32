"""Before/after of the runner: scripts/benchmark.py (one-preset mode) of two checkouts, run in
alternating processes (A, B, A, B, ...) so that the load of a shared machine affects both alike.

    git archive <old commit> | tar -x -C /tmp/before
    python -m scripts.ab_benchmark /tmp/before . --preset llava7b_224_p90 --shape tiny --pairs 3

Prints, per checkout, the median over all its repeats of the plain and CSP forward times. Each
checkout runs its own benchmark.py, so the old one must accept --preset/--shape/--repeats/--rounds/
--warmup/--threads and print JSON with plain_ms_all and csp_ms_all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def one_run(tree: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "scripts.benchmark", "--preset", args.preset, "--shape", args.shape,
           "--repeats", str(args.repeats), "--rounds", "1", "--warmup", str(args.warmup), "--threads", "1"]
    if "--methods" in (tree / "scripts" / "benchmark.py").read_text():
        cmd += ["--methods", "none"]  # plain and CSP only
    out = subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--preset", default="llava7b_224_p70")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[str, dict[str, list[float]]] = {"before": {"plain": [], "csp": []}, "after": {"plain": [], "csp": []}}
    for _ in range(args.pairs):
        for name, tree in (("before", args.before), ("after", args.after)):
            report = one_run(tree.resolve(), args)
            times[name]["plain"] += report["plain_ms_all"]
            times[name]["csp"] += report["csp_ms_all"]
    summary = {name: {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                      for k, v in t.items()} for name, t in times.items()}
    summary["settings"] = vars(args) | {"before": str(args.before), "after": str(args.after)}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
