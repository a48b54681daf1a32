"""Split registry: split names as LISA users write them -> loaders.

``refcoco|unc|val``, ``refcoco+|unc|testA``, ``refcocog|umd|test``, ``ReasonSeg|val``, ``RIO|common`` ...
:data:`SPLIT_LOADERS` is the single list of valid splits; :func:`load_groups` is what evaluation uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from datasets.base import ImageGroup, Sample, UnknownSplitError, group_by_image
from datasets.reason_seg import load_reason_seg
from datasets.refer import load_refer
from datasets.rio import load_rio

SplitLoader = Callable[[Path], list[Sample]]


def _registry() -> dict[str, SplitLoader]:
    loaders: dict[str, SplitLoader] = {}
    refer = {("refcoco", "unc"): ("val", "testA", "testB"), ("refcoco+", "unc"): ("val", "testA", "testB"),
             ("refcocog", "umd"): ("val", "test")}
    for (dataset, split_by), splits in refer.items():
        for split in splits:
            name = f"{dataset}|{split_by}|{split}"
            loaders[name] = partial(load_refer, dataset=dataset, split_by=split_by, split=split, name=name)
    for split in ("val", "test"):
        loaders[f"ReasonSeg|{split}"] = partial(load_reason_seg, split=split, name=f"ReasonSeg|{split}")
    for subset in ("common", "uncommon"):
        loaders[f"RIO|{subset}"] = partial(load_rio, subset=subset, name=f"RIO|{subset}")
    return loaders


def _toy_registry() -> dict[str, SplitLoader]:
    """The synthetic toy world (datasets/toy.py), in the refer format: ``toyref|unc|{train,val,testA}``."""
    from datasets import toy

    names = {f"{toy.DATASET}|{toy.SPLIT_BY}|{split}": split for split in toy.SPLITS}
    return {name: partial(load_refer, dataset=toy.DATASET, split_by=toy.SPLIT_BY, split=split, name=name)
            for name, split in names.items()}


#: The paper's evaluation splits, in the column order of Table 1.
TABLE1_SPLITS: tuple[str, ...] = tuple(_registry())
#: Every split a loader knows: Table 1's, then the toy world's.
SPLIT_LOADERS: dict[str, SplitLoader] = {**_registry(), **_toy_registry()}


def valid_splits() -> list[str]:
    """Split names: Table 1's column order, then the toy world's."""
    return list(SPLIT_LOADERS)


def check_split(name: str) -> None:
    """Raise :class:`UnknownSplitError` listing the valid names if ``name`` is not one."""
    if name not in SPLIT_LOADERS:
        raise UnknownSplitError(f"unknown split {name!r}; valid splits: {', '.join(SPLIT_LOADERS)}")


def parse_splits(value: Any, key: str = "splits") -> list[str]:
    """A split list from config: a list of names, one name (``refcoco|unc|val``) or a comma-separated
    string (``'refcoco|unc|val,ReasonSeg|val'``, quoted on a Hydra command line). Anything else is an
    error that shows the accepted forms."""
    forms = (f"{key}=[refcoco|unc|val,ReasonSeg|val] (a list), {key}=refcoco|unc|val (one split) or "
             f"{key}=\'refcoco|unc|val,ReasonSeg|val\' (quoted, comma-separated)")
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence) or (hasattr(value, "__iter__") and not isinstance(value, Mapping)):
        names = list(value)
    else:
        raise UnknownSplitError(f"{key} must be split names, got {value!r} ({type(value).__name__}); use {forms}")
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise UnknownSplitError(f"{key} must be a non-empty list of split names, got {value!r}; use {forms}")
    return [n.strip() for n in names]


def load_split(name: str, dataset_dir: str | Path) -> list[Sample]:
    """All samples of split ``name`` under ``dataset_dir`` (LISA's layout), in a deterministic order."""
    check_split(name)
    return SPLIT_LOADERS[name](Path(dataset_dir))


def load_groups(name: str, dataset_dir: str | Path, max_samples: int | None = None) -> list[ImageGroup]:
    """Samples of ``name`` grouped by image; ``max_samples`` keeps the first samples in split order."""
    samples = load_split(name, dataset_dir)
    if max_samples is not None:
        samples = samples[: int(max_samples)]
    return group_by_image(samples)
