"""The run directory and the setting a run records in it (``run_manifest.json``): where a run
writes, which keys differ between a recorded setting and the current one (resume, baselines), and
whether a directory may be resumed or written (:func:`check_run_dir`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

MANIFEST = "run_manifest.json"


class RunDirectoryError(RuntimeError):
    """The run directory holds another run (resume of a different setting, or records a fresh run
    would delete)."""


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` if set, else Hydra's run directory."""
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("output_dir is not set and there is no Hydra run directory; set output_dir=<dir>")
    return Path(HydraConfig.get().runtime.output_dir)


def setting_differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                        keys: Sequence[str] | None = None) -> list[str]:
    """``key: recorded vs current`` for every differing (dotted) key."""
    flat_a, flat_b = flatten(recorded), flatten(current)
    wanted = [k for k in sorted(set(flat_a) | set(flat_b))
              if keys is None or k.split(".")[0] in keys]
    return [f"{k}: {flat_a.get(k)!r} vs {flat_b.get(k)!r}" for k in wanted if flat_a.get(k) != flat_b.get(k)]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b": leaf}`` (lists are leaves)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value} if prefix else {"": value}


def check_run_dir(out_dir: Path, setting: Mapping[str, Any], *, resume: bool, overwrite: bool,
                  holds_results: Callable[[Path], bool], subdirs: Sequence[str] = ()) -> None:
    """Refuse to resume another setting's run, or to delete an earlier run's records unasked.

    ``holds_results(dir)``: whether a directory holds a run's records (evaluation: results*.jsonl);
    ``out_dir`` and its ``subdirs`` (evaluation: ``baseline``) are checked.
    """
    manifest = out_dir / MANIFEST
    dirs = [out_dir, *(out_dir / sub for sub in subdirs)]
    holds = [d for d in dirs if holds_results(d)]
    if resume:
        if not manifest.is_file():
            what = "records but no " + MANIFEST if holds else "no run (no " + MANIFEST + ")"
            raise RunDirectoryError(f"resume=true but {out_dir} holds {what}: pass the old run's directory "
                                    "(hydra.run.dir=<dir> or output_dir=<dir>), or drop resume=true")
        try:
            recorded = json.loads(manifest.read_text())
        except ValueError as exc:
            raise RunDirectoryError(f"resume=true but {manifest} is not readable JSON ({exc}); cannot check that "
                                    "the run was produced by the same setting") from exc
        if diffs := setting_differences(recorded, setting):
            raise RunDirectoryError(
                f"resume=true but {out_dir} was produced by a different setting (recorded vs now): "
                + "; ".join(diffs) + ". Resume with the same setting, use another run directory, or pass "
                "overwrite=true (without resume) to discard its records")
        return
    if holds and not overwrite:
        raise RunDirectoryError(
            f"{', '.join(map(str, holds))} already holds results of an earlier run; pass resume=true to continue "
            "it (finished samples are kept) or overwrite=true to delete them and start again")
