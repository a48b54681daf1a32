"""Split registry: split names as LISA users write them -> loaders.

``refcoco|unc|val``, ``refcoco+|unc|testA``, ``refcocog|umd|test``, ``ReasonSeg|val``, ``RIO|common`` ...
:data:`SPLIT_LOADERS` lists the paper's evaluation splits (Table 1 order). Any other split in the
refer format (``<ds>|<splitBy>|<split>``, e.g. ``refcoco|unc|train`` or ``toyref|unc|val``: data
set names are not restricted to the RefCOCO family) and any ``ReasonSeg|<split>`` (e.g.
``ReasonSeg|train``) are read by the same loaders. :func:`load_groups` is what evaluation and
training use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from datasets import toy
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


#: The splits of the published refer data sets, so that a typo (``refcoco|unc|test``) is an error
#: rather than an empty split; data sets not listed here accept any split name.
KNOWN_REFER_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB"), "google": ("train", "val", "test")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
    "refclef": {"unc": ("train", "val", "testA", "testB"), "berkeley": ("train", "val", "test")},
    # The synthetic toy world (datasets/toy.py).
    toy.DATASET: {toy.SPLIT_BY: toy.SPLITS},
}

#: Every evaluation split, in the column order of the paper's Table 1.
SPLIT_LOADERS: dict[str, SplitLoader] = _registry()


def valid_splits() -> list[str]:
    """Split names: Table 1's column order, then the toy world's."""
    return list(SPLIT_LOADERS)


def split_loader(name: str) -> SplitLoader:
    """The loader of ``name``: a Table 1 split, ``<ds>|<splitBy>|<split>`` (refer format) or
    ``ReasonSeg|<split>``; anything else raises :class:`UnknownSplitError`."""
    if name in SPLIT_LOADERS:
        return SPLIT_LOADERS[name]
    parts = name.split("|")
    if len(parts) == 3 and all(parts) and parts[0] not in ("ReasonSeg", "RIO"):
        dataset, split_by, split = parts
        known = KNOWN_REFER_SPLITS.get(dataset, {})
        if known and split not in known.get(split_by, ()):
            forms = [f"{dataset}|{by}|{sp}" for by, sps in known.items() for sp in sps]
            raise UnknownSplitError(f"unknown split {name!r}; {dataset} has {', '.join(forms)}. Evaluation "
                                    f"splits: {', '.join(SPLIT_LOADERS)}")
        return partial(load_refer, dataset=dataset, split_by=split_by, split=split, name=name)
    if len(parts) == 2 and parts[0] == "ReasonSeg" and parts[1]:
        return partial(load_reason_seg, split=parts[1], name=name)
    raise UnknownSplitError(
        f"unknown split {name!r}; expected '<dataset>|<splitBy>|<split>' (refer format, e.g. refcoco|unc|train), "
        f"'ReasonSeg|<split>', or one of the evaluation splits: {', '.join(SPLIT_LOADERS)}"
    )


def check_split(name: str) -> None:
    """Raise :class:`UnknownSplitError` with the accepted forms if no loader reads ``name``."""
    split_loader(name)


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
    return split_loader(name)(Path(dataset_dir))


def load_groups(name: str, dataset_dir: str | Path, max_samples: int | None = None) -> list[ImageGroup]:
    """Samples of ``name`` grouped by image; ``max_samples`` keeps the first samples in split order."""
    samples = load_split(name, dataset_dir)
    if max_samples is not None:
        samples = samples[: int(max_samples)]
    return group_by_image(samples)
