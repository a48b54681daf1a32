"""The run directory and the setting a run records in it (``run_manifest.json``): where a run
writes, and which keys differ between a recorded setting and the current one (resume, baselines)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

MANIFEST = "run_manifest.json"


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
