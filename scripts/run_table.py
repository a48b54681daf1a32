"""One command per paper table: plain LISA and every method's preset on that table's splits,
evaluated by the same code as eval_ds.py, printed in the paper's layout (method rows, split
columns, mIoU_drop, Navg, TFLOPs).

    python -m scripts.run_table table=1 dataset_dir=/data/lisa_dataset
    python -m scripts.run_table table=2 output_dir=outputs/tables/table2     # run again: resumes
    python -m scripts.run_table table=1 model=tiny model.num_layers=32 miniature.seed=0 max_samples_per_split=2

``table=<1|2|3|toy>`` (``toy``: Table 1's methods on the trained toy LISA, presets
``configs/exp/toy_table1_<method>.yaml``); ``output_dir=<dir>`` (default ``outputs/tables/table<k>``):
one sub-directory per setting (``baseline``, then the preset names, e.g. ``table1_fastv``) and
``table.txt``; every other argument is a Hydra override applied to every setting. Running the same
command again resumes: settings whose samples are all recorded are only re-scored, unfinished ones
continue where they stopped. The model is loaded once for the whole table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file, as the comments of configs/exp/toy_*.yaml still write it;
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the documented form is python -m scripts.run_table

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from evaluation.records import has_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "configs"

#: Method rows of each table in the paper's order: (label, configs/exp preset).
LABELS = {"prumerge": "PruMerge", "prumerge_plus": "PruMerge+", "visionzip": "VisionZip", "fastv": "FastV",
          "simignore": "Simignore", "sparsevlm": "SparseVLM", "pyramiddrop": "PyramidDrop", "feather": "FEATHER",
          "csp": "LVLM_CSP"}
TABLE1 = ["prumerge", "prumerge_plus", "visionzip", "fastv", "simignore", "sparsevlm", "pyramiddrop", "feather", "csp"]
TABLE2 = ["prumerge", "visionzip", "fastv", "pyramiddrop", "csp"]
TABLE3 = ["prumerge", "visionzip", "fastv", "csp"]
TABLES: dict[int | str, dict[str, Any]] = {
    1: {"baseline": "llava7b_224_baseline", "data": "all5",
        "rows": [(LABELS[m], f"table1_{m}") for m in TABLE1]},
    2: {"baseline": "llava7b_336_baseline", "data": "table2",
        "rows": [(f"{LABELS[m]} {r}%", f"table2_{m}_p{r}") for r in (70, 80, 90) for m in TABLE2]},
    3: {"baseline": "llava13b_224_baseline", "data": "table3",
        "rows": [(LABELS[m], f"table3_{m}") for m in TABLE3]},
    # Table 1's methods on the trained toy LISA (assets/toy_lisa, L = 8, N = 64), counts scaled to Navg ~19
    "toy": {"baseline": "toy_baseline", "data": "toy",
            "rows": [(LABELS[m], f"toy_table1_{m}") for m in TABLE1]},
}


def parse(argv: Sequence[str]) -> tuple[int | str, Path | None, list[str]]:
    """``table=K`` and ``output_dir=...`` from the arguments; the rest are Hydra overrides."""
    table, out, overrides = None, None, []
    for arg in argv:
        if arg.startswith("table="):
            table = arg.split("=", 1)[1]
        elif arg.startswith("output_dir="):
            out = Path(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    if table not in {str(k) for k in TABLES}:
        raise SystemExit(f"run_table.py needs table=<{'|'.join(map(str, TABLES))}>, got table={table}")
    return (int(table) if table.isdigit() else table), out, overrides


def compose_setting(preset: str, data: str, overrides: list[str], out_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"+exp={preset}", f"data={data}", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
        cfg.resume = has_results(out_dir)  # a finished or interrupted earlier run of this setting: resume it
        cfg.name = preset
    return cfg


def settings(table: int | str, root: Path, overrides: list[str]) -> list[tuple[str, DictConfig]]:
    """(label, config) of the baseline and every method row; composed and checked before any run."""
    from csp.config import method_from_config
    from runs.models import layers_and_image_tokens

    spec = TABLES[table]
    out = [("LISA", compose_setting(spec["baseline"], spec["data"], overrides, root / "baseline"))]
    out += [(label, compose_setting(preset, spec["data"], overrides, root / preset)) for label, preset in spec["rows"]]
    models = {OmegaConf.to_yaml(cfg.model) for _, cfg in out}
    if len(models) != 1:
        raise ValueError(f"table {table}: the settings compose to different models; override model.* for all")
    for _, cfg in out[1:]:
        method = method_from_config(cfg).method
        if method is None:
            raise ValueError(f"{cfg.name}: the preset configures no method")
        method.validate(*layers_and_image_tokens(cfg.model))
    return out


def run(argv: Sequence[str]) -> str:
    """Evaluate the table and return its printed text."""
    from evaluation.evaluate import evaluate
    from evaluation.report import table as format_table
    from runs.models import build_from_config

    table, out, overrides = parse(argv)
    root = out or Path("outputs") / "tables" / f"table{table}"
    configured = settings(table, root, overrides)
    baseline_metrics = root / "baseline" / "metrics.json"
    bundle = build_from_config(configured[0][1].model)
    rows = []
    for i, (label, cfg) in enumerate(configured):
        with open_dict(cfg):
            cfg.baseline = None if i == 0 else str(baseline_metrics)
        metrics = evaluate(cfg, bundle=bundle)["method"]
        if i == 0:
            metrics["summary"]["mIoU_drop"] = 0.0  # the reference row (Table 1's first line)
        rows.append({**metrics, "name": label})
    text = format_table(rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.txt").write_text(text + "\n")
    print(f"\nTable {table} ({root}):\n{text}", flush=True)
    return text


if __name__ == "__main__":
    run(sys.argv[1:])
