"""metrics.json and the printed table row (the paper's Table 1 column order).

Per split: gIoU and cIoU (fractions), sample count, failed count, summed I and U, mean Navg and
TFLOPs. Summary: mean Navg and TFLOPs over all evaluated samples (from the runtime token
records), T_LVLM = median milliseconds of the LLM forward per sample, mIoU_drop against a
baseline (points), failures with their reasons.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets.splits import valid_splits
from evaluation.metrics import IoUAccumulator, miou_drop
from evaluation.records import Record

#: Failure reasons listed in metrics.json (all failures stay in results.jsonl).
MAX_LISTED_FAILURES = 20


def split_metrics(records: Sequence[Record], splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per split metrics from merged records (summed in record order)."""
    out = {}
    for split in splits:
        acc = IoUAccumulator()
        navg, tflops = [], []
        for record in records:
            if record["split"] != split:
                continue
            if record["status"] != "ok":
                acc.add_failure()
                continue
            acc.add(record["intersection"], record["union"])
            navg.append(record["navg"])
            tflops.append(record["tflops"])
        out[split] = {**acc.as_dict(), "Navg": _mean(navg), "TFLOPs": _mean(tflops)}
    return out


def summarize(records: Sequence[Record], splits: Sequence[str], *, name: str,
              baseline_giou: Mapping[str, float] | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json content for one evaluated setting."""
    per_split = split_metrics(records, splits)
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    evaluated = {s: m["gIoU"] for s, m in per_split.items() if m["gIoU"] is not None}
    drop = miou_drop(baseline_giou, evaluated) if baseline_giou is not None and evaluated else None
    star = bool((extra or {}).get("mask_decoder"))  # gIoU after a mask-decoder fine-tune: the paper's mIoU*
    summary = {
        "count": len(ok), "failed": len(failed),
        "gIoU_mean": _mean(list(evaluated.values())),
        "mIoU_drop": drop, "mIoU*": star, "mIoU*_drop": drop if star else None,
        "Navg": _mean([r["navg"] for r in ok]), "TFLOPs": _mean([r["tflops"] for r in ok]),
        **t_lvlm(ok),
        "failures": [f"{r['split']} {r['sample_id']}: {r['reason']}" for r in failed[:MAX_LISTED_FAILURES]],
    }
    return {"name": name, **(extra or {}), "splits": per_split, "summary": summary}


def t_lvlm(ok: Sequence[Record]) -> dict[str, Any]:
    """Median LLM milliseconds per sample. The paper's T_LVLM is one image with one query, so
    samples that ran alone are used when there are any (``queries_per_batch=1`` makes all of them
    so); otherwise the batch time shared among its queries, and the kind says which."""
    single = [r["llm_ms"] for r in ok if r.get("batch_size", 1) == 1]
    if single:
        return {"T_LVLM_ms": statistics.median(single), "T_LVLM_kind": "single query"}
    if not ok:
        return {"T_LVLM_ms": None, "T_LVLM_kind": None}
    return {"T_LVLM_ms": statistics.median(r["llm_ms"] for r in ok),
            "T_LVLM_kind": "amortised over query batches (use queries_per_batch=1 for latency)"}


def giou_by_split(metrics: Mapping[str, Any]) -> dict[str, float]:
    """split -> gIoU of a metrics.json mapping (splits without samples left out)."""
    return {s: m["gIoU"] for s, m in metrics["splits"].items() if m.get("gIoU") is not None}


def read_baseline(path: str | Path) -> dict[str, float]:
    """split -> gIoU from a previous run's metrics.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline={str(path)!r}: no such metrics.json (expected a previous run's "
                                "metrics.json, 'same_run', or null)")
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        raise ValueError(f"baseline {path}: expected a metrics.json with a 'splits' mapping")
    return giou_by_split(data)


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def column_label(split: str) -> str:
    """``refcoco+|unc|testA`` -> ``refcoco+ testA``; ``RIO|common`` -> ``RIO common``."""
    parts = split.split("|")
    return f"{parts[0]} {parts[-1]}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of metrics.json mappings as a text table: splits in Table 1 order, then
    mIoU_drop, Navg, TFLOPs, T_LVLM (ms). gIoU and mIoU_drop in points."""
    present = {s for row in rows for s in row["splits"]}
    splits = [s for s in valid_splits() if s in present] + sorted(present - set(valid_splits()))
    header = ["setting", *map(column_label, splits), "mIoU_drop", "Navg", "TFLOPs", "T_LVLM ms"]
    lines = [header]
    for row in rows:
        summary = row["summary"]
        cells = [row["name"]]
        cells += [_points(row["splits"].get(s, {}).get("gIoU")) for s in splits]
        star = "*" if summary.get("mIoU*") and summary.get("mIoU_drop") is not None else ""
        cells += [_fmt(summary.get("mIoU_drop"), ".1f") + star, _fmt(summary["Navg"], ".1f"),
                  _fmt(summary["TFLOPs"], ".3g"), _fmt(summary["T_LVLM_ms"], ".1f")]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True))) for line in lines)
    failed = [f"{row['name']}: {row['summary']['failed']} failed samples (reasons in metrics.json)"
              for row in rows if row["summary"]["failed"]]
    if any(row["summary"].get("mIoU*") for row in rows):
        failed.insert(0, "(mIoU*) rows: gIoU after fine-tuning only SAM's mask decoder (model.mask_decoder); "
                         "a drop marked * is mIoU*_drop against the plain baseline")
    return text + ("\n" + "\n".join(failed) if failed else "")


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
