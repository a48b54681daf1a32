"""One command per paper table: plain LISA and every method's preset on that table's splits,
evaluated by the same code as eval_ds.py, printed in the paper's layout (method rows, split
columns, mIoU_drop, Navg, TFLOPs).

    python -m scripts.run_table table=1 dataset_dir=/data/lisa_dataset
    python -m scripts.run_table table=2 output_dir=outputs/tables/table2     # run again: resumes
    python -m scripts.run_table table=1 model=tiny model.num_layers=32 miniature.seed=0 max_samples_per_split=2

``table=peers``: the newer methods (LiteLVLM, IVC-Prune) and CSP with the new clustering strategies and
pruning scorer, beside LISA and Table 1's CSP, at Table 1's setting (7B-224; docs/peers.md). A row whose
method cannot run here (LiteLVLM without a CLIP text tower) is listed as unavailable, with the reason.
``table=<1|2|3|peers|toy|toy19|toy10>``: ``toy19`` and ``toy10`` are Table 1's methods (and the ``random_keep``
control) on the trained toy LISA at Navg ~19 and ~10 of its N = 64 tokens (presets
``configs/exp/toy_table1_<method>.yaml`` and ``toy_n10_<method>.yaml``); ``toy`` runs both for every
checkpoint in ``models=[dir,...]`` (default: the committed assets/toy_lisa; e.g. three training seeds)
and prints one table, per method the mean gIoU over the models and its range, and the points lost against
plain LISA of the same model (mean and range), at both budgets.
``output_dir=<dir>`` (default ``outputs/tables/table<k>``):
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

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from evaluation.records import has_results

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "configs"

#: Method rows of each table in the paper's order: (label, configs/exp preset).
LABELS = {"prumerge": "PruMerge", "prumerge_plus": "PruMerge+", "visionzip": "VisionZip", "fastv": "FastV",
          "simignore": "Simignore", "sparsevlm": "SparseVLM", "pyramiddrop": "PyramidDrop", "feather": "FEATHER",
          "csp": "LVLM_CSP"}
TABLE1 = ["prumerge", "prumerge_plus", "visionzip", "fastv", "simignore", "sparsevlm", "pyramiddrop", "feather", "csp"]
TABLE2 = ["prumerge", "visionzip", "fastv", "pyramiddrop", "csp"]
TABLE3 = ["prumerge", "visionzip", "fastv", "csp"]
#: The toy table: Table 1's methods and the control that keeps random tokens (it must lose).
TOY = [*TABLE1, "random_keep", "litelvlm", "ivc_prune"]
LABELS["random_keep"] = "random_keep (control)"
LABELS["litelvlm"], LABELS["ivc_prune"] = "LiteLVLM", "IVC-Prune"
#: Further control rows after ``random_keep`` (which cuts where FastV does): (label, preset suffix). At layer 0
#: the random subset is cut before any layer reads the image, where the reducers before the LLM cut.
TOY_CONTROLS = [("random_keep at layer 0 (control)", "random_keep_l0")]


def toy_rows(prefix: str) -> list[tuple[str, str]]:
    """The toy table's method rows at one budget (``prefix``: ``toy_table1_`` or ``toy_n10_``)."""
    rows = []
    for m in TOY:
        rows.append((LABELS[m], f"{prefix}{m}"))
        if m == "random_keep":
            rows += [(label, f"{prefix}{suffix}") for label, suffix in TOY_CONTROLS]
    return rows


#: The peers (docs/peers.md): newer methods and CSP with the new clustering strategies / pruning scorer,
#: beside LISA and Table 1's CSP row: (label, preset suffix after ``table1_`` / ``toy_table1_``).
PEERS = [("LVLM_CSP", "csp"), ("LiteLVLM", "litelvlm"), ("LiteLVLM (raster order)", "litelvlm_raster"),
         ("IVC-Prune", "ivc_prune"), ("LVLM_CSP + kcenter", "csp_kcenter"), ("LVLM_CSP + stratified", "csp_stratified"),
         ("LVLM_CSP + litelvlm", "csp_litelvlm"), ("LVLM_CSP + ivc_value pruning", "csp_ivc_value")]
#: The peers on the toy (its Navg ~19 budget): every peer with a toy preset.
TOY_PEERS = [(label, suffix) for label, suffix in PEERS if suffix.startswith("csp_")]
TABLES: dict[int | str, dict[str, Any]] = {
    1: {"baseline": "llava7b_224_baseline", "data": "all5",
        "rows": [(LABELS[m], f"table1_{m}") for m in TABLE1]},
    2: {"baseline": "llava7b_336_baseline", "data": "table2",
        "rows": [(f"{LABELS[m]} {r}%", f"table2_{m}_p{r}") for r in (70, 80, 90) for m in TABLE2]},
    3: {"baseline": "llava13b_224_baseline", "data": "table3",
        "rows": [(LABELS[m], f"table3_{m}") for m in TABLE3]},
    # Table 1's methods on the trained toy LISA (assets/toy_lisa, L = 8, N = 64), counts scaled to Navg ~19 / ~10
    "toy19": {"baseline": "toy_baseline", "data": "toy",
              "rows": toy_rows("toy_table1_") + [(label, f"toy_table1_{suffix}") for label, suffix in TOY_PEERS]},
    "toy10": {"baseline": "toy_baseline", "data": "toy", "rows": toy_rows("toy_n10_")},
    "peers": {"baseline": "llava7b_224_baseline", "data": "all5",
              "rows": [(label, f"table1_{suffix}") for label, suffix in PEERS]},
}
#: ``table=toy``: both toy budgets, for one or more toy LISA checkpoints.
TOY_LEVELS = ("toy19", "toy10")


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
    if table not in {str(k) for k in TABLES} | {"toy"}:
        raise SystemExit(f"run_table.py needs table=<{'|'.join([*map(str, TABLES), 'toy'])}>, got table={table}")
    return (int(table) if table.isdigit() else table), out, overrides


def compose_setting(preset: str, data: str, overrides: list[str], out_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"+exp={preset}", f"data={data}", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
        cfg.resume = has_results(out_dir)  # a finished or interrupted earlier run of this setting: resume it
        cfg.name = preset
    return cfg


def settings(table: int | str, root: Path, overrides: list[str],
             unavailable: list[tuple[str, str]] | None = None) -> list[tuple[str, DictConfig]]:
    """(label, config) of the baseline and every method row; composed and checked before any run.

    ``unavailable``: where given, rows whose method cannot run here (``Method.check`` or ``check_model`` fails:
    e.g. LiteLVLM without a CLIP text tower, or with a text side of another width than the model's CLIP) are
    left out and listed in it as (label, reason) instead of failing the whole table."""
    from csp.config import method_from_config
    from runs.models import layers_and_image_tokens

    spec = TABLES[table]
    out = [("LISA", compose_setting(spec["baseline"], spec["data"], overrides, root / "baseline"))]
    out += [(label, compose_setting(preset, spec["data"], overrides, root / preset)) for label, preset in spec["rows"]]
    models = {OmegaConf.to_yaml(cfg.model) for _, cfg in out}
    if len(models) != 1:
        raise ValueError(f"table {table}: the settings compose to different models; override model.* for all")
    kept = out[:1]
    for label, cfg in out[1:]:
        method = method_from_config(cfg).method
        if method is None:
            raise ValueError(f"{cfg.name}: the preset configures no method")
        method.validate(*layers_and_image_tokens(cfg.model))
        if unavailable is not None:
            try:
                method.check()
                method.check_model(cfg.model)
            except (ValueError, FileNotFoundError) as err:
                unavailable.append((label, f"{cfg.name}: {err}"))
                continue
        kept.append((label, cfg))
    return kept


def run(argv: Sequence[str]) -> str:
    """Evaluate the table and return its printed text."""
    table, out, overrides = parse(argv)
    root = out or Path("outputs") / "tables" / f"table{table}"
    if table == "toy":
        return run_toy(root, overrides)
    return run_grid(table, root, overrides)[0]


def run_grid(table: int | str, root: Path, overrides: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """One table's grid for one model: (printed text, metrics rows)."""
    from evaluation.evaluate import evaluate
    from evaluation.report import table as format_table
    from runs.models import build_from_config

    missing: list[tuple[str, str]] = []
    configured = settings(table, root, overrides, missing)
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
    if missing:
        text += "\n" + "\n".join(f"unavailable: {label}: {why}" for label, why in missing)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.txt").write_text(text + "\n")
    print(f"\nTable {table} ({root}):\n{text}", flush=True)
    return text, rows


def split_models(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``models=[a,b]`` (toy checkpoints) out of the overrides; default the committed toy LISA."""
    models, rest = ["assets/toy_lisa"], []
    for arg in overrides:
        if arg.startswith("models="):
            models = [m.strip() for m in arg.split("=", 1)[1].strip("[]").split(",") if m.strip()]
        else:
            rest.append(arg)
    missing = [m for m in models if not (Path(m) / "config.json").is_file()]
    if missing:
        raise SystemExit(f"models=: no toy LISA checkpoint (config.json) in {missing}")
    return models, rest


def run_toy(root: Path, overrides: list[str]) -> str:
    """Both toy budgets for every model of ``models=[...]``; one table of means and ranges over the models."""
    import json

    models, rest = split_models(overrides)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {level: {} for level in TOY_LEVELS}
    unavailable: list[str] = []
    for model in models:
        model_args = [f"model.checkpoint={model}", f"model.vision_tower={Path(model) / 'vision_tower'}", *rest]
        for level in TOY_LEVELS:
            level_text, rows = toy_grid(level, root / model_slug(model) / level, model_args)
            for row in rows:
                results[level].setdefault(row["name"], []).append({**row, "model": model})
            unavailable += [line for line in level_text.splitlines()
                            if line.startswith("unavailable:") and line not in unavailable]
    text = "\n".join([format_toy(results, models), *unavailable])
    summary = {level: {name: [{"gIoU": r["splits"]["toyref|unc|val"]["gIoU"], "Navg": r["summary"]["Navg"]}
                              for r in rows] for name, rows in per.items()} for level, per in results.items()}
    (root / "table.txt").write_text(text + "\n")
    (root / "table.json").write_text(json.dumps({"models": models, "rows": summary}, indent=1))
    print(f"\nToy table ({root}):\n{text}", flush=True)
    return text


def model_slug(model: str) -> str:
    """The folder of one checkpoint's grids under the toy table's root (its path, made a file name)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).as_posix().strip("/"))


def toy_grid(level: str, root: Path, model_args: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """One budget's grid for one checkpoint: (its printed text, its rows), read back from ``rows.json`` where an
    earlier run with the same arguments finished the same settings (so per-checkpoint runs can go in parallel
    and the combined table reuses them). Run with other arguments, the folder is an error rather than a silent
    mix of two settings; where the grid has gained or lost rows since (a new method preset), it runs again,
    and the settings already finished resume from their own results."""
    import json

    saved = root / "rows.json"
    record = json.loads(saved.read_text()) if saved.is_file() else None
    if record is not None and record.get("args") != model_args:
        raise SystemExit(f"{saved}: written for {record.get('args')}, not {model_args}; use another out= or "
                         "remove the folder")
    labels = [label for label, _ in settings(level, root, model_args, [])]
    if record is not None:
        if record.get("labels") == labels:
            print(f"{level}: reusing the finished grid in {root}", flush=True)
            return record.get("text", ""), record["rows"]
        print(f"{level}: the grid in {root} was finished for other rows; running it again (finished settings "
              "resume from their results)", flush=True)
    text, rows = run_grid(level, root, model_args)
    saved.write_text(json.dumps({"args": model_args, "labels": labels, "text": text, "rows": rows}, default=str))
    return text, rows


def format_toy(results: dict[str, dict[str, list[dict[str, Any]]]], models: list[str]) -> str:
    """Rows: LISA and the methods; per budget: gIoU mean over the models (points), [min, max], the points lost
    against plain LISA of the same model (mean, [min, max]: paired per model, so a seed that is weaker
    everywhere does not widen a method's range), Navg."""
    split = "toyref|unc|val"
    header = ["setting"]
    for level in TOY_LEVELS:
        budget = level[3:]
        header += [f"gIoU@{budget}", "range", f"lost@{budget}", "range", "Navg"]
    lines = [header]
    names = list(results[TOY_LEVELS[0]])
    plain_name = names[0]

    def giou(row: dict[str, Any]) -> float:
        return 100 * row["splits"][split]["gIoU"]

    def spread(xs: list[float]) -> list[str]:
        return [f"{sum(xs) / len(xs):.1f}", f"[{min(xs):.1f}, {max(xs):.1f}]"]

    plain = {level: {r["model"]: giou(r) for r in results[level].get(plain_name, [])} for level in TOY_LEVELS}
    for name in names:
        cells = [name]
        for level in TOY_LEVELS:
            rows = results[level].get(name, [])
            values = [giou(r) for r in rows]
            lost = [plain[level][r["model"]] - giou(r) for r in rows if r["model"] in plain[level]]
            navgs = [r["summary"]["Navg"] for r in rows]
            cells += [*spread(values), *spread(lost), f"{sum(navgs) / len(navgs):.1f}"] if values and lost \
                else ["-"] * 5
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    body = "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)
    return body + f"\n(gIoU in points on toyref|unc|val, mean and [min, max] over {len(models)} model(s); lost: " \
                  f"points below {plain_name} of the same model: " + ", ".join(models) + ")"


if __name__ == "__main__":
    from runs.cli import user_errors_in_one_line

    user_errors_in_one_line(run)(sys.argv[1:])
