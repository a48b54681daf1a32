"""Find (Lc, Nc, Ls, Np) settings for an efficiency target; optionally calibrate them.

    python -m scripts.search_schedule --model llava7b_224 --reduction 0.7
    python -m scripts.search_schedule --model llava13b_224 --tflops 3.0 --top 12
    python -m scripts.search_schedule --dims 32,256,4096,11008 --reduction 0.8 --base +exp=llava7b_224_p80
    python -m scripts.search_schedule --model tiny --reduction 0.7 --top 4 --calibrate \\
        --base data=reasonseg --base max_samples_per_split=4

Enumerates the settings meeting the target by the evaluation's calculator (csp.accounting), ranks
them by the paper's heuristics (csp/search.py says which), and writes into ``--out-dir``:
``table.md`` (the ranked top candidates; with ``--calibrate`` also their measured gIoU mean and
TFLOPs on the calibration data and the Pareto front) and ``sweep.yaml`` (a wandb grid over the top
candidates, ``wandb sweep <out-dir>/sweep.yaml``; ``--sweep PATH`` writes it elsewhere too).
``--calibrate`` runs ``evaluate(cfg)`` for each top candidate on the data that the base overrides
select (default for the tiny model: the miniature data sets).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from csp.accounting import DEFAULT_TEXT_TOKENS, ModelDims
from csp.search import MODEL_SHAPES, Candidate, Target, calibrate, search, table
from csp.sweeps import schedule_override, sweep_config, write_sweep

ROOT = Path(__file__).resolve().parents[1]

#: Hydra overrides that select each model's experiment (model, data, a schedule node to tune).
DEFAULT_BASE = {
    "tiny": ["+exp=demo", "baseline=null"],
    "llava7b_224": ["+exp=llava7b_224_p70"],
    "llava7b_336": ["+exp=llava7b_336_p70"],
    "llava13b_224": ["+exp=llava13b_224_p70"],
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), help="a configs/model name")
    parser.add_argument("--dims", help="L,N,d,m of another model (needs --base to select it)")
    parser.add_argument("--reduction", type=float, help="image-token reduction to reach, e.g. 0.7")
    parser.add_argument("--tflops", type=float, help="TFLOPs per sample to stay under")
    parser.add_argument("--tolerance", type=float, default=0.03, help="largest overshoot kept (default 0.03)")
    parser.add_argument("--nc", help="comma list of Nc values (default: multiples of 8 up to N/2)")
    parser.add_argument("--np", dest="np_values", help="comma list of Np values (default: 2,4,8,16,32)")
    parser.add_argument("--min-ls", type=int, default=1)
    parser.add_argument("--clustering", default="uniform")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument("--top", type=int, default=8, help="candidates in the table, sweep and calibration")
    parser.add_argument("--base", action="append", default=None, metavar="KEY=VALUE",
                        help="Hydra override for the sweep and the calibration (repeatable; default per model)")
    parser.add_argument("--calibrate", action="store_true", help="evaluate the top candidates (evaluate(cfg))")
    parser.add_argument("--out-dir", default=None, help="default: outputs/search/<name>")
    parser.add_argument("--sweep", default=None, help="also write the sweep file here (e.g. sweeps/<name>.yaml)")
    parser.add_argument("--name", default=None, help="sweep / run name (default: search_<model>_<target>)")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.dims is None):
        parser.error("give exactly one of --model or --dims")
    if (args.reduction is None) == (args.tflops is None):
        parser.error("give exactly one of --reduction or --tflops")
    if args.top < 1:
        parser.error("--top must be >= 1")
    return args


def model_shape(args: argparse.Namespace) -> tuple[ModelDims, int]:
    if args.model:
        return MODEL_SHAPES[args.model]
    try:
        layers, tokens, hidden, inter = (int(v) for v in args.dims.split(","))
    except ValueError as err:
        raise SystemExit(f"--dims {args.dims!r}: expected L,N,d,m integers, e.g. 32,256,4096,11008") from err
    return ModelDims(hidden_size=hidden, intermediate_size=inter, num_layers=layers), tokens


def int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated integers") from err


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    dims, tokens = model_shape(args)
    target = Target(reduction=args.reduction, tflops=args.tflops)
    base = args.base if args.base is not None else DEFAULT_BASE.get(args.model or "")
    if not base:
        raise SystemExit("--base is required with --dims (Hydra overrides that select the model, e.g. "
                         "+exp=llava7b_224_p70)")
    tag = f"r{round(100 * args.reduction)}" if args.reduction is not None else f"t{args.tflops:g}"
    name = args.name or f"search_{args.model or 'custom'}_{tag}"
    out_dir = Path(args.out_dir or ROOT / "outputs" / "search" / name)
    candidates = search(dims, tokens, target, nc_values=int_list(args.nc, "--nc"),
                        np_values=int_list(args.np_values, "--np"), min_ls=args.min_ls, tolerance=args.tolerance,
                        text_tokens=args.text_tokens, clustering=args.clustering)
    top: list[Candidate] = candidates[: args.top]
    front: list[Candidate] = []
    if args.calibrate:
        if args.base is None and args.model == "tiny":
            base = [*base, f"miniature.dir={out_dir / 'miniature'}"]  # written once, shared by the candidates
        from evaluation.evaluate import evaluate

        front = calibrate(top, base, out_dir / "calibration", config_dir=ROOT / "configs", evaluate_fn=evaluate)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(top, tokens, front)
    header = (f"Schedule search: {target.describe()} for L={dims.num_layers}, N={tokens}, d={dims.hidden_size}, "
              f"m={dims.intermediate_size}; {len(candidates)} settings meet it (tolerance {args.tolerance}), "
              f"top {len(top)} by the heuristics of csp/search.py.")
    (out_dir / "table.md").write_text(f"{header}\n\n{text}\n")
    sweep = sweep_config(base, {"schedule": [schedule_override(c.schedule) for c in top]}, name=name,
                         description=header)
    comment = (f"Written by scripts/search_schedule.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
               f"{header}\nRun: wandb sweep <this file>; wandb agent <sweep id> (from the repository root).")
    paths = [write_sweep(out_dir / "sweep.yaml", sweep, comment)]
    if args.sweep:
        paths.append(write_sweep(args.sweep, sweep, comment))
    print(header)
    print(text)
    print("written: " + ", ".join(str(p) for p in [out_dir / "table.md", *paths]))
    return {"candidates": top, "front": front, "all": candidates, "out_dir": out_dir, "sweeps": paths}


if __name__ == "__main__":
    from runs.cli import user_errors_in_one_line

    user_errors_in_one_line(main)()
