"""metrics.json, the printed table row (the paper's Table 1 column order) and sweep tables.

Per split: gIoU and cIoU (fractions in [0, 1]), ``evaluated`` (samples in gIoU/cIoU), ``failed``
(samples that are not), ``samples`` (both), summed I and U, mean Navg and TFLOPs. Summary: the
same counts over all splits, mean Navg and TFLOPs over all evaluated samples (from the runtime
token records), T_LVLM = median milliseconds of the LLM forward per sample, mIoU_drop against a
baseline (points = gIoU x 100) with the failed samples of both sides beside it, splits without
any sample, the first failures with their reasons, and a clustering detector's own cost. The
``units`` block of metrics.json says the unit of every number; the table prints points.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.splits import valid_splits
from evaluation.metrics import IoUAccumulator, miou_drop
from evaluation.records import MERGED, Record, read_records

#: Failure reasons listed in metrics.json (all failures stay in results.jsonl).
MAX_LISTED_FAILURES = 20

#: The unit of every number of metrics.json (written into it).
UNITS = {
    "gIoU": "fraction in [0, 1] (mean of per-sample I/U; the table prints points = x 100)",
    "cIoU": "fraction in [0, 1] (sum I / sum U)",
    "gIoU_mean": "fraction in [0, 1] (mean over splits with samples)",
    "mIoU_drop": "points (baseline gIoU - gIoU, x 100, mean over splits)",
    "evaluated / failed / samples": "samples (samples = evaluated + failed; gIoU/cIoU use evaluated only)",
    "intersection / union": "pixels",
    "Navg": "image tokens per decoder layer (eq. 9), mean over evaluated samples",
    "TFLOPs": "1e12 FLOPs of the LLM per sample (eqs. 10-11, multiply-add = 2 FLOPs)",
    "T_LVLM_ms": "milliseconds (median LLM forward per sample)",
    "detector_ms": "milliseconds per image (clustering detector, e.g. seg_first's YOLO; not in T_LVLM)",
    "detector_GFLOPs": "1e9 FLOPs per image (clustering detector; not in TFLOPs)",
}


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
              baseline: BaselineInfo | None = None, baseline_giou: Mapping[str, float] | None = None,
              extra: Mapping[str, Any] | None = None, detector: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The metrics.json content for one evaluated setting.

    ``baseline`` (or only its per-split gIoU, ``baseline_giou``) gives mIoU_drop; ``detector`` is a
    clustering strategy's ``extra_cost()``.
    """
    per_split = split_metrics(records, splits)
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    evaluated = {s: m["gIoU"] for s, m in per_split.items() if m["gIoU"] is not None}
    if baseline is not None:
        baseline_giou = baseline.giou
    drop = miou_drop(baseline_giou, evaluated) if baseline_giou is not None and evaluated else None
    star = bool((extra or {}).get("mask_decoder"))
    listed = failed[:MAX_LISTED_FAILURES]
    failures = [f"{r['split']} {r['sample_id']}: {r['reason']}" for r in listed]
    if len(failed) > len(listed):
        failures.append(f"... and {len(failed) - len(listed)} more, see {MERGED}")
    summary: dict[str, Any] = {
        "evaluated": len(ok), "failed": len(failed), "samples": len(records),
        "empty_splits": [s for s, m in per_split.items() if m["samples"] == 0],
        "gIoU_mean": _mean(list(evaluated.values())),
        "mIoU_drop": drop,
        "mIoU_drop_failed": None,
        # gIoU after fine-tuning only SAM's mask decoder (model.mask_decoder): the paper's mIoU* and mIoU*_drop
        "mIoU*": star, "mIoU*_drop": drop if star else None,
        "Navg": _mean([r["navg"] for r in ok]), "TFLOPs": _mean([r["tflops"] for r in ok]),
        **t_lvlm(ok),
        "failures": failures,
    }
    if summary["mIoU_drop"] is not None:
        # gIoU of either side leaves its failed samples out: say how many, beside the drop.
        summary["mIoU_drop_failed"] = {"this_run": len(failed),
                                       "baseline": None if baseline is None else baseline.failed}
    if detector:
        summary["detector_ms"] = detector.get("segmenter_ms")
        summary["detector_GFLOPs"] = detector.get("segmenter_gflops")
        summary["detector_images"] = int(detector.get("segmenter_calls", 0))
    digests = {split: sample_ids_digest(r["sample_id"] for r in records if r["split"] == split) for split in splits}
    out = {"name": name, **(extra or {}), "splits": per_split, "summary": summary, "sample_ids": digests,
           "units": UNITS}
    if baseline is not None:
        out["baseline"] = {"path": baseline.path, "setting": baseline.setting}
    return out


def sample_ids_digest(ids: Iterable[str]) -> dict[str, Any]:
    """``{"samples": n, "sha256": ...}`` of a split's sample ids (order-free), to compare two runs."""
    ordered = sorted(ids)
    digest = hashlib.sha256("\n".join(ordered).encode("utf-8")).hexdigest()
    return {"samples": len(ordered), "sha256": digest}


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


@dataclass(frozen=True)
class BaselineInfo:
    """A previous run's metrics.json used as the mIoU_drop reference.

    Attributes:
        path: the metrics.json (``same_run`` for the plain model evaluated in this run).
        giou: split -> gIoU (fraction) of its splits with samples.
        setting: the run's ``setting`` block (model, dataset_dir, ...), None in old files.
        sample_ids: split -> ``{"samples", "sha256"}`` digests, None in old files.
        failed: its failed samples.
    """

    path: str
    giou: dict[str, float]
    setting: dict[str, Any] | None
    sample_ids: dict[str, Any] | None
    failed: int | None


def read_baseline(path: str | Path) -> BaselineInfo:
    """A previous run's metrics.json; errors name the file and what was expected."""
    path = Path(path)
    expected = "expected a previous run's metrics.json, 'same_run', or null"
    if not path.is_file():
        raise FileNotFoundError(f"baseline={str(path)!r}: no such metrics.json ({expected})")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"baseline={str(path)!r} is not JSON ({exc}); {expected}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        raise ValueError(f"baseline {path}: expected a metrics.json with a 'splits' mapping")
    return BaselineInfo(path=str(path), giou=giou_by_split(data), setting=data.get("setting"),
                        sample_ids=data.get("sample_ids"), failed=(data.get("summary") or {}).get("failed"))


def baseline_sample_differences(baseline: BaselineInfo, targets: Mapping[str, Sequence[str]]) -> list[str]:
    """Per split, how the baseline's samples differ from ``targets`` (split -> sample ids of this run).

    Digests decide; where they differ, the baseline's results.jsonl (beside its metrics.json) names
    the missing and extra ids. Returns one message per differing split (empty: same samples).
    """
    if baseline.sample_ids is None:
        return [f"{baseline.path} records no sample ids (written by an older version): re-run the baseline"]
    beside = Path(baseline.path).parent / MERGED
    theirs_by_split: dict[str, set[str]] | None = None
    problems = []
    for split, ids in targets.items():
        ours = sample_ids_digest(ids)
        recorded = baseline.sample_ids.get(split)
        if recorded == ours:
            continue
        if theirs_by_split is None:
            theirs_by_split = {}
            for record in read_records(beside):
                theirs_by_split.setdefault(record["split"], set()).add(record["sample_id"])
        theirs = theirs_by_split.get(split)
        if recorded is None:
            problems.append(f"{split}: the baseline has no samples of this split")
        elif theirs is None or len(theirs) != recorded.get("samples"):
            problems.append(f"{split}: the baseline has {recorded.get('samples')} samples, this run "
                            f"{ours['samples']} (different sample ids; {beside} not available to name them)")
        else:
            missing, extra = sorted(set(ids) - theirs), sorted(theirs - set(ids))
            problems.append(f"{split}: {len(missing)} samples of this run are missing from the baseline "
                            f"(e.g. {missing[:3]}), {len(extra)} baseline samples are not in this run "
                            f"(e.g. {extra[:3]})")
    return problems


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def column_label(split: str) -> str:
    """``refcoco+|unc|testA`` -> ``refcoco+ testA``; ``RIO|common`` -> ``RIO common``."""
    parts = split.split("|")
    return f"{parts[0]} {parts[-1]}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of metrics.json mappings as a text table: splits in Table 1 order, then mIoU_drop,
    Navg, TFLOPs, T_LVLM (ms) and, when a row has one, the clustering detector's cost. gIoU and
    mIoU_drop in points; each column uses one number format for every row. Notes follow the
    table: failed samples, empty splits, truncated failure lists."""
    present = {s for row in rows for s in row["splits"]}
    splits = [s for s in valid_splits() if s in present] + sorted(present - set(valid_splits()))
    detector = any(row["summary"].get("detector_ms") is not None for row in rows)
    header = ["setting", *map(column_label, splits), "mIoU_drop", "Navg", "TFLOPs", "T_LVLM ms"]
    header += ["detector ms", "detector GFLOPs"] if detector else []
    tflops_spec = _column_spec([row["summary"].get("TFLOPs") for row in rows])
    lines = [header]
    for row in rows:
        summary = row["summary"]
        cells = [row["name"]]
        cells += [_points(row["splits"].get(s, {}).get("gIoU")) for s in splits]
        drop = _fmt(summary.get("mIoU_drop"), ".1f")
        if summary.get("mIoU_drop") is not None and any((summary.get("mIoU_drop_failed") or {}).values()):
            drop += "*"
        cells += [drop, _fmt(summary["Navg"], ".1f"), _fmt(summary.get("TFLOPs"), tflops_spec),
                  _fmt(summary["T_LVLM_ms"], ".1f")]
        if detector:
            cells += [_fmt(summary.get("detector_ms"), ".1f"), _fmt(summary.get("detector_GFLOPs"), ".1f")]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True))) for line in lines)
    return text + "".join(f"\n{note}" for note in table_notes(rows))


def table_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines printed under the table."""
    notes = []
    for row in rows:
        summary = row["summary"]
        for split in summary.get("empty_splits") or []:
            notes.append(f"WARNING {row['name']}: split {split} has NO samples (shown as '-'); check dataset_dir "
                         "and the split's files (strict=true makes this an error)")
        if summary["failed"]:
            more = summary["failed"] - MAX_LISTED_FAILURES
            notes.append(f"{row['name']}: {summary['failed']} of {summary['samples']} samples failed and are not in "
                         f"gIoU/cIoU (reasons in metrics.json" + (f", the {more} not listed there in {MERGED})"
                                                                   if more > 0 else ")"))
        if summary.get("mIoU*") and summary.get("mIoU_drop") is not None:
            notes.append(f"{row['name']}: gIoU after fine-tuning only SAM's mask decoder (model.mask_decoder); "
                         "its mIoU_drop is the paper's mIoU*_drop against the plain baseline")
        failed = summary.get("mIoU_drop_failed") or {}
        if summary.get("mIoU_drop") is not None and any(failed.values()):
            notes.append(f"* {row['name']}: mIoU_drop compares gIoU without failed samples "
                         f"({failed.get('this_run')} in this run, {failed.get('baseline')} in the baseline)")
    return notes


def collect_runs(root: Path, skipped: list[tuple[Path, str]] | None = None) -> list[dict[str, Any]]:
    """Every metrics.json under ``root`` (e.g. a Hydra multirun directory), in path order; a plain
    baseline evaluated by several jobs (``<job>/baseline/``) is kept once. Files that are not a
    readable metrics mapping (a job still writing it, a damaged file) are left out and, when
    ``skipped`` is given, appended to it as ``(path, why)``."""
    rows, seen_baselines = [], set()
    skipped = [] if skipped is None else skipped
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, OSError) as err:
            skipped.append((path, f"not readable JSON ({type(err).__name__}: {err})"))
            continue
        if not isinstance(data, dict) or "splits" not in data or "summary" not in data:
            skipped.append((path, "not a metrics mapping (no 'splits' and 'summary')"))
            continue
        if path.parent.name == "baseline":
            if data.get("name") in seen_baselines:
                continue
            seen_baselines.add(data.get("name"))
        rows.append(data)
    return rows


def _column_spec(values: Sequence[float | None]) -> str:
    """One format for a column: two decimals as the paper prints TFLOPs when every value shows
    at least two significant digits that way, else scientific for all (tiny models)."""
    present = [abs(v) for v in values if v is not None]
    return ".2f" if all(v >= 0.1 for v in present) else ".2e"


def _points(value: float | None) -> str:
    return _fmt(None if value is None else 100.0 * value, ".1f")


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = format(value, spec)
    # -0.0 (a drop that rounds to zero) prints as 0.0.
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
