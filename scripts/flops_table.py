"""Static Navg / TFLOPs table of every schedule preset in configs/schedule and of every method's
table preset in configs/exp/table*_<method>*.yaml (paper eqs. 9-11).

Usage:
    python -m scripts.flops_table [--json] [--text-tokens 62] [--schedule-dir DIR] [--exp-dir DIR]

Each schedule preset's model and image-token count N come from its name prefix
(``PRESET_FAMILIES``); a method preset's from its ``override /model``. The plain-model baseline of
each Table 6 family is added as ``<family>_baseline``. Methods whose counts depend on the data
(PruMerge+'s uniform samples, FEATHER's grid union, PruMerge with keep=iqr) get no Navg / TFLOPs
but ``data_dependent`` (why) and, where the rule bounds it, ``Navg_range``. TFLOPs count only the
LLM decoder layers, a multiply-add as 2 FLOPs (see csp/accounting.py).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from csp.accounting import DEFAULT_TEXT_TOKENS, MODEL_DIMS, counts_row, static_row
from csp.config import SCHEDULE_METHOD, method_from_config
from csp.methods import build_method
from csp.schedule import ScheduleError, StageSchedule

REPO_ROOT = Path(__file__).resolve().parents[1]

SCHEDULE_DIR = REPO_ROOT / "configs" / "schedule"
EXP_DIR = REPO_ROOT / "configs" / "exp"
METHOD_DIR = REPO_ROOT / "configs" / "method"

#: Preset name prefix -> (key of MODEL_DIMS, N image tokens). A preset named ``<prefix>`` or
#: ``<prefix>_...`` belongs to that family.
PRESET_FAMILIES: dict[str, tuple[str, int]] = {
    "llava7b_224": ("llama7b", 256),
    "llava7b_336": ("llama7b", 576),
    "llava13b_224": ("llama13b", 256),
    "table1": ("llama7b", 256),
    "t4": ("llama7b", 256),
    "t5": ("llama7b", 256),
    "toy": ("toy", 64),
}

#: Families whose plain-model row is added to the table (Table 6's 0% column).
BASELINE_FAMILIES: tuple[str, ...] = ("llava7b_224", "llava7b_336", "llava13b_224")

COLUMNS: tuple[str, ...] = ("name", "method", "Lc", "Nc", "Ls", "Np", "Navg", "TFLOPs")


def family_of(name: str) -> str:
    """The PRESET_FAMILIES key of a preset name (longest matching prefix)."""
    matches = [p for p in PRESET_FAMILIES if name == p or name.startswith(p + "_")]
    if not matches:
        raise ValueError(
            f"preset {name!r} matches no known family; add its prefix to PRESET_FAMILIES "
            f"(known: {sorted(PRESET_FAMILIES)})"
        )
    return max(matches, key=len)


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``np4`` before ``np16``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_presets(schedule_dir: Path = SCHEDULE_DIR) -> dict[str, StageSchedule]:
    """All ``*.yaml`` presets of ``schedule_dir``, by file stem, in natural name order."""
    presets: dict[str, StageSchedule] = {}
    for path in sorted(schedule_dir.glob("*.yaml"), key=lambda p: natural_key(p.stem)):
        with path.open(encoding="utf-8") as handle:
            schedule = StageSchedule.from_mapping(yaml.safe_load(handle))
        if schedule is None:
            raise ScheduleError(f"{path} is empty; a schedule preset needs Lc, Nc, Ls, Np")
        presets[path.stem] = schedule
    return presets


def make_row(
    name: str, family: str, schedule: StageSchedule | None, text_tokens: int
) -> dict[str, Any]:
    """One table row: schedule fields (None for a baseline), Navg (tokens), TFLOPs."""
    model, num_image_tokens = PRESET_FAMILIES[family]
    stats = static_row(MODEL_DIMS[model], schedule, num_image_tokens, text_tokens)
    fields = ("Lc", "Nc", "Ls", "Np", "clustering")
    return {
        "name": name,
        "method": None if schedule is None else SCHEDULE_METHOD,
        "model": model,
        "N": num_image_tokens,
        **{f: getattr(schedule, f) if schedule is not None else None for f in fields},
        "Navg": stats["Navg"],
        "Navg_floor": stats["Navg_floor"],
        "TFLOPs": stats["TFLOPs"],
        "data_dependent": None,
    }


def _defaults(exp: dict[str, Any], path: Path) -> dict[str, str]:
    """``override /<group>: <choice>`` entries of an experiment file's defaults list."""
    out = {}
    for entry in exp.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                out[key.replace("override", "").strip().lstrip("/")] = value
    if "model" not in out:
        raise ValueError(f"{path}: a method preset needs '- override /model: <model>' in its defaults")
    return out


def load_method_presets(exp_dir: Path = EXP_DIR, schedule_dir: Path = SCHEDULE_DIR,
                        method_dir: Path = METHOD_DIR,
                        model_dir: Path | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every ``table*_*.yaml`` experiment: name -> (model config name, method config incl. ``name``).

    The experiment's ``model``, ``schedule`` and ``method`` choices (and its own overrides of them) are
    composed under those keys as Hydra would, the method's and schedule's interpolations resolved
    against that composition (``${oc.select:model.vision_tower,null}`` is the experiment's model's vision
    tower path), and the result resolved by ``csp.config.method_from_config``, as evaluation resolves it.
    """
    from omegaconf import OmegaConf

    model_dir = exp_dir.parent / "model" if model_dir is None else model_dir
    presets = {}
    for path in sorted(exp_dir.glob("table*_*.yaml"), key=lambda p: natural_key(p.stem)):
        exp = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        groups = _defaults(exp, path)
        nodes: dict[str, Any] = {}
        for group, folder in (("model", model_dir), ("schedule", schedule_dir), ("method", method_dir)):
            node = yaml.safe_load((folder / f"{groups[group]}.yaml").read_text(encoding="utf-8")) \
                if groups.get(group) and (folder / f"{groups[group]}.yaml").is_file() else None
            if exp.get(group) is not None:
                node = OmegaConf.to_container(OmegaConf.merge(node or {}, exp[group]))
            nodes[group] = node
        composed = OmegaConf.create(nodes)
        resolved_nodes = {group: OmegaConf.to_container(composed[group], resolve=True)
                          if composed[group] is not None else None for group in ("schedule", "method")}
        resolved = method_from_config(resolved_nodes, build=False)
        if resolved.spec is None:
            raise ValueError(f"{path}: a method preset selects no method (schedule and method are null)")
        presets[path.stem] = (groups["model"], resolved.spec)
    return presets


def method_row(name: str, model_name: str, cfg: dict[str, Any], text_tokens: int) -> dict[str, Any]:
    """One row for a method preset: Navg / TFLOPs, or why they depend on the data."""
    if model_name not in PRESET_FAMILIES:
        raise ValueError(f"preset {name}: model {model_name!r} is not one of {sorted(PRESET_FAMILIES)}")
    model, n = PRESET_FAMILIES[model_name]
    dims = MODEL_DIMS[model]
    method = build_method(cfg)
    method.validate(dims.num_layers, n)
    fields = ("Lc", "Nc", "Ls", "Np", "clustering")  # the columns of the schedule presets' rows
    row = {"name": name, "method": method.name, "model": model, "N": n,
           **{f: cfg.get(f) for f in fields},
           "Navg": None, "Navg_floor": None, "TFLOPs": None, "data_dependent": method.data_dependent(),
           "params": {k: v for k, v in cfg.items() if k != "name"}}
    counts = method.image_tokens_per_layer(dims.num_layers, n)
    if counts is not None:
        stats = counts_row(dims, counts, text_tokens)
        row.update(Navg=stats["Navg"], Navg_floor=stats["Navg_floor"], TFLOPs=stats["TFLOPs"])
    elif (bounds := method.count_range(dims.num_layers, n)) is not None:
        low, high = bounds
        row["Navg_range"] = [counts_row(dims, low, text_tokens)["Navg"], counts_row(dims, high, text_tokens)["Navg"]]
    return row


def build_rows(
    text_tokens: int = DEFAULT_TEXT_TOKENS, schedule_dir: Path = SCHEDULE_DIR, exp_dir: Path = EXP_DIR
) -> list[dict[str, Any]]:
    """Baseline rows first, then every schedule preset, then every method preset (natural order)."""
    rows = [make_row(f"{f}_baseline", f, None, text_tokens) for f in BASELINE_FAMILIES]
    for name, schedule in load_presets(schedule_dir).items():
        rows.append(make_row(name, family_of(name), schedule, text_tokens))
    for name, (model_name, cfg) in load_method_presets(exp_dir, schedule_dir).items():
        rows.append(method_row(name, model_name, cfg, text_tokens))
    return rows


def format_cell(row: dict[str, Any], col: str) -> str:
    """One table cell: ``-`` for a missing value, Navg with 2 decimals, TFLOPs with 3."""
    value = row[col]
    if value is None and col == "Navg" and row.get("data_dependent"):
        return "data-dependent" if "Navg_range" not in row else "{:.2f}-{:.2f}".format(*row["Navg_range"])
    if value is None:
        return "-"
    if col == "Navg":
        return f"{value:.2f}"
    if col == "TFLOPs":
        return f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of COLUMNS: name left-aligned, numbers right-aligned."""
    cells = [list(COLUMNS)] + [[format_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for name, *values in cells:
        parts = [name.ljust(widths[0])]
        parts += [v.rjust(w) for v, w in zip(values, widths[1:], strict=True)]
        lines.append("  ".join(parts))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list of row dicts")
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=DEFAULT_TEXT_TOKENS,
        help="text tokens per sample (system + prompt + answer), default %(default)s",
    )
    parser.add_argument("--exp-dir", type=Path, default=EXP_DIR,
                        help="directory of experiment files (table*_<method>*.yaml), default configs/exp")
    parser.add_argument(
        "--schedule-dir",
        type=Path,
        default=SCHEDULE_DIR,
        help="directory of schedule presets, default configs/schedule",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = build_rows(args.text_tokens, args.schedule_dir, args.exp_dir)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
