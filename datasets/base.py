"""Samples, image groups and the errors shared by every data set loader.

One :class:`Sample` is one query (a sentence or a referring phrase) with its ground truth; the
ground truth is read lazily by :meth:`Sample.gt_mask`, so a malformed annotation surfaces when
that sample is evaluated (and is recorded as a failed sample), never while indexing a split.
Samples of one image are collected into an :class:`ImageGroup`, the unit of evaluation: the
vision tower and the SAM image encoder run once per group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Ground-truth value of pixels that are excluded from the metrics (ReasonSeg "ignore" shapes).
IGNORE_LABEL = 255


class DatasetLayoutError(FileNotFoundError):
    """A data set directory or annotation file is missing; the message shows the expected layout."""


class UnknownSplitError(ValueError):
    """A split name that no loader knows; the message lists the valid ones."""


class AnnotationError(ValueError):
    """The annotation of one sample cannot be turned into a ground-truth mask."""


@dataclass(frozen=True)
class Sample:
    """One query of one image.

    Attributes:
        split: split name as LISA users write it, e.g. ``refcoco|unc|val``.
        sample_id: stable identifier, unique within the split (derived from the annotation).
        image_path: the image file.
        text: the raw query (a referring phrase or a sentence); prompt templates are the model's job.
        is_sentence: False for short phrases (LISA asks ``What is {text} in this image?``).
        mask_source: returns the ``H x W`` ground truth (0/1/255); called lazily by :meth:`gt_mask`.
        load_error: set when the annotation was already unusable while indexing; the sample is
            then reported as failed with this reason.
    """

    split: str
    sample_id: str
    image_path: Path
    text: str
    is_sentence: bool
    mask_source: Callable[[], np.ndarray] | None = field(default=None, compare=False, repr=False)
    load_error: str | None = None

    def gt_mask(self) -> np.ndarray:
        """Ground truth as ``H x W`` uint8: 0 background, 1 target, 255 ignored.

        Raises :class:`AnnotationError` naming the sample when the annotation is unusable.
        """
        if self.load_error is not None:
            raise AnnotationError(self.load_error)
        if self.mask_source is None:
            raise AnnotationError(f"{self.split} {self.sample_id}: no ground truth")
        try:
            mask = np.asarray(self.mask_source())
        except AnnotationError:
            raise
        except Exception as exc:  # a malformed annotation can fail in many ways (keys, types, shapes)
            raise AnnotationError(f"{self.split} {self.sample_id}: malformed annotation: {exc!r}") from exc
        return check_gt_mask(mask, f"{self.split} {self.sample_id}")


@dataclass(frozen=True)
class ImageGroup:
    """All samples of one split that share an image, in split order."""

    split: str
    image_path: Path
    samples: tuple[Sample, ...]


def check_gt_mask(mask: np.ndarray, what: str) -> np.ndarray:
    """Validate an ``H x W`` ground truth with values in {0, 1, 255}; returns it as uint8."""
    if mask.ndim != 2 or mask.size == 0:
        raise AnnotationError(f"{what}: ground truth must be a non-empty H x W array, got shape {mask.shape}")
    values = np.unique(mask)
    if not np.isin(values, (0, 1, IGNORE_LABEL)).all():
        raise AnnotationError(f"{what}: ground truth values must be 0, 1 or {IGNORE_LABEL}, got {values.tolist()}")
    return mask.astype(np.uint8, copy=False)


def group_by_image(samples: Iterable[Sample]) -> list[ImageGroup]:
    """Group samples by (split, image), groups in order of first appearance, samples in input order."""
    groups: dict[tuple[str, Path], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.split, sample.image_path), []).append(sample)
    return [ImageGroup(split, path, tuple(items)) for (split, path), items in groups.items()]


def check_unique_ids(samples: Sequence[Sample], split: str) -> None:
    """Sample ids must be unique within a split (resume and sharding key on them)."""
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise AnnotationError(f"{split}: duplicate sample_id {sample.sample_id!r}")
        seen.add(sample.sample_id)


def require_paths(split: str, layout: str, *paths: Path) -> None:
    """Raise :class:`DatasetLayoutError` for the first missing path, showing the expected layout."""
    for path in paths:
        if not path.exists():
            raise DatasetLayoutError(
                f"split {split!r}: {path} not found. Expected layout under dataset_dir:\n{layout}"
            )
