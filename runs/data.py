"""The data a run reads: LISA's dataset directory, or generated data written first (the miniature
data sets, the toy world), and the image groups of the configured splits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datasets.base import ImageGroup
from datasets.miniature import MiniatureSpec, write_miniature
from datasets.splits import load_groups
from datasets.toy import ToySpec, write_toyref
from runs.distributed import DistContext, barrier


def load_all_groups(splits: Sequence[str], dataset_dir: Path, max_samples: int | None) -> list[ImageGroup]:
    """Image groups of every split, split after split (layout errors are raised here)."""
    return [group for split in splits for group in load_groups(split, dataset_dir, max_samples)]


def prepare_dataset_dir(cfg: DictConfig, out_dir: Path, ctx: DistContext) -> Path:
    """``cfg.dataset_dir``, or the miniature data sets written first when ``cfg.miniature`` is set;
    with ``cfg.toy`` (datasets.toy.ToySpec fields) the toy world is written into that directory too."""
    mini = cfg.get("miniature")
    if mini is None:
        if not cfg.get("dataset_dir"):
            raise ValueError("dataset_dir is not set: point it at LISA's dataset directory (see configs/data)")
        root = Path(str(cfg.dataset_dir))
    else:
        root = Path(str(mini.get("dir") or out_dir / "miniature"))
        if ctx.is_main:
            spec = {k: v for k, v in OmegaConf.to_container(mini, resolve=True).items() if k != "dir"}
            write_miniature(root, MiniatureSpec(**spec))
    if cfg.get("toy") is not None and ctx.is_main:
        write_toyref(root, toy_spec(cfg.toy))
    barrier(ctx)
    return root


def toy_spec(node: Any) -> ToySpec:
    """``toy:`` config node -> :class:`ToySpec`; unknown keys are an error naming them."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    unknown = sorted(set(values) - set(ToySpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"toy: unknown keys {unknown}; expected ToySpec fields {sorted(ToySpec.__dataclass_fields__)}")
    return ToySpec(**values)
