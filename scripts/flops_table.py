"""Static Navg / TFLOPs table of every schedule preset in configs/schedule (paper eqs. 9-11).

Usage:
    python scripts/flops_table.py [--json] [--text-tokens 62] [--schedule-dir DIR]

Each preset's model and image-token count N come from its name prefix (``PRESET_FAMILIES``);
the plain-model baseline of each Table 6 family is added as ``<family>_baseline``. TFLOPs count
only the LLM decoder layers, a multiply-add as 2 FLOPs (see csp/accounting.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# Make ``csp`` importable when run as ``python scripts/flops_table.py``.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csp.accounting import DEFAULT_TEXT_TOKENS, MODEL_DIMS, static_row
from csp.schedule import ScheduleError, StageSchedule

REPO_ROOT = Path(__file__).resolve().parents[1]

SCHEDULE_DIR = REPO_ROOT / "configs" / "schedule"

#: Preset name prefix -> (key of MODEL_DIMS, N image tokens). A preset named ``<prefix>`` or
#: ``<prefix>_...`` belongs to that family.
PRESET_FAMILIES: dict[str, tuple[str, int]] = {
    "llava7b_224": ("llama7b", 256),
    "llava7b_336": ("llama7b", 576),
    "llava13b_224": ("llama13b", 256),
    "table1": ("llama7b", 256),
    "t4": ("llama7b", 256),
    "t5": ("llama7b", 256),
}

#: Families whose plain-model row is added to the table (Table 6's 0% column).
BASELINE_FAMILIES: tuple[str, ...] = ("llava7b_224", "llava7b_336", "llava13b_224")

COLUMNS: tuple[str, ...] = ("name", "Lc", "Nc", "Ls", "Np", "Navg", "TFLOPs")


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
        "model": model,
        "N": num_image_tokens,
        **{f: getattr(schedule, f) if schedule is not None else None for f in fields},
        "Navg": stats["Navg"],
        "Navg_floor": stats["Navg_floor"],
        "TFLOPs": stats["TFLOPs"],
    }


def build_rows(
    text_tokens: int = DEFAULT_TEXT_TOKENS, schedule_dir: Path = SCHEDULE_DIR
) -> list[dict[str, Any]]:
    """Baseline rows first, then every preset in natural name order."""
    rows = [make_row(f"{f}_baseline", f, None, text_tokens) for f in BASELINE_FAMILIES]
    for name, schedule in load_presets(schedule_dir).items():
        rows.append(make_row(name, family_of(name), schedule, text_tokens))
    return rows


def format_cell(row: dict[str, Any], col: str) -> str:
    """One table cell: ``-`` for a missing value, Navg with 2 decimals, TFLOPs with 3."""
    value = row[col]
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
    parser.add_argument(
        "--schedule-dir",
        type=Path,
        default=SCHEDULE_DIR,
        help="directory of schedule presets, default configs/schedule",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = build_rows(args.text_tokens, args.schedule_dir)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
