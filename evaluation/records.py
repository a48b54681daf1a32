"""Per-sample result records: append-only per-rank JSONL files, resume, and the merged file.

Each rank appends one JSON line per finished sample to ``results.rank<r>.jsonl`` in the setting's
output directory (flushed per line, so a killed run keeps what it finished). A record holds
``split``, ``sample_id``, ``image``, ``text``, ``status`` (``ok`` | ``failed``), ``reason``,
``intersection``, ``union``, ``iou``, ``navg``, ``tflops``, ``image_tokens`` (per layer) and
``llm_ms``. With ``resume`` a rank skips samples that already have an ``ok`` record in any rank
file or in the merged file; failed samples are tried again. The merged ``results.jsonl`` holds one
record per sample of the configured splits, sorted by (split order, sample_id); metrics are computed
from it. A single-process run removes its rank file once merged (it would be a copy); several
processes keep theirs (which rank did what).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

Record = dict[str, Any]
Key = tuple[str, str]

RANK_GLOB = "results.rank*.jsonl"
MERGED = "results.jsonl"


def rank_file(out_dir: Path, rank: int) -> Path:
    return out_dir / f"results.rank{rank}.jsonl"


def key(record: Record) -> Key:
    return record["split"], record["sample_id"]


def clear_results(out_dir: Path) -> None:
    """Remove rank files, the merged file and metrics.json (a fresh, non-resumed run)."""
    for path in [*out_dir.glob(RANK_GLOB), out_dir / MERGED, out_dir / "metrics.json"]:
        path.unlink(missing_ok=True)


def read_records(path: Path) -> list[Record]:
    """Complete records of one JSONL file; a torn last line (a killed writer) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "split" in record and "sample_id" in record:
            records.append(record)
    return records


def repair_tail(path: Path) -> None:
    """Make appended records start on a line of their own after a killed writer: a last line that
    is a complete record gets its newline (read_records already counts it as finished), a torn
    one is cut."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        complete = isinstance(json.loads(data[start:]), dict)
    except ValueError:
        complete = False
    path.write_bytes(data + b"\n" if complete else data[:start])


def repair_all(out_dir: Path) -> None:
    """Repair every rank file of ``out_dir`` (one process, before any rank reads them)."""
    for path in sorted(out_dir.glob(RANK_GLOB)):
        repair_tail(path)


def finished_keys(out_dir: Path) -> set[Key]:
    """Samples with an ``ok`` record in any rank file or the merged file of ``out_dir``."""
    paths = [*sorted(out_dir.glob(RANK_GLOB)), out_dir / MERGED]
    return {key(r) for path in paths for r in read_records(path) if r["status"] == "ok"}


def has_results(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds records or metrics of a run."""
    return any(out_dir.glob(RANK_GLOB)) or (out_dir / MERGED).is_file() or (out_dir / "metrics.json").is_file()


def orphan_rank_files(out_dir: Path, world_size: int) -> list[Path]:
    """Rank files of ranks >= world_size (a resumed run with fewer processes)."""
    files = []
    for path in out_dir.glob(RANK_GLOB):
        suffix = path.name[len("results.rank"): -len(".jsonl")]
        if suffix.isdigit() and int(suffix) >= world_size:
            files.append(path)
    return sorted(files)


class RecordWriter:
    """Appends records to one rank file, one flushed line each."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.path = path
        self._handle: TextIO = open(path, "a", encoding="utf-8")

    def write(self, record: Record) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_records(records: Iterable[Record], targets: Sequence[Key], split_order: Sequence[str]) -> list[Record]:
    """One record per target sample (an ``ok`` record wins over ``failed``, then the later one),
    sorted by (position of the split in ``split_order``, sample_id). Missing targets are absent."""
    wanted = set(targets)
    best: dict[Key, Record] = {}
    for record in records:
        k = key(record)
        if k in wanted and (k not in best or record["status"] == "ok" or best[k]["status"] != "ok"):
            best[k] = record
    order = {split: i for i, split in enumerate(split_order)}
    return sorted(best.values(), key=lambda r: (order.get(r["split"], len(order)), r["sample_id"]))


def write_merged(path: Path, records: Sequence[Record]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
