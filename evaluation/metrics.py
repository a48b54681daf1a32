"""Segmentation metrics of LISA and the paper: per-sample I/U, gIoU, cIoU, mIoU_drop.

Per sample (one query): intersection and union of the predicted foreground with the ground-truth
foreground, pixels labelled 255 in the ground truth excluded from both. gIoU (the paper's mIoU) is
the mean over samples of I/U, where a sample with U = 0 (empty prediction, empty target) scores 1;
cIoU is sum(I) / sum(U) (1 when every union is empty). Failed samples are counted separately and
enter neither. Values are fractions in [0, 1]; tables print points (x 100).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import numpy as np

from datasets.base import IGNORE_LABEL


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """``pred``: ``H x W`` bool (or 0/1); ``gt``: ``H x W`` 0/1/255. Returns (I, U) in pixels."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction is {pred.shape} but ground truth is {gt.shape}")
    valid = gt != IGNORE_LABEL
    pred = pred.astype(bool) & valid
    target = (gt == 1) & valid
    return int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target))


def sample_iou(intersection: int, union: int) -> float:
    """I / U, and 1.0 for an empty union."""
    return 1.0 if union == 0 else intersection / union


@dataclass
class IoUAccumulator:
    """Sums over samples; two accumulators add, so ranks and resumed runs can be combined.

    ``iou_sum`` is a float, so gIoU depends on the order of addition in the last bits: evaluation
    sums in (split, sample_id) order, which makes runs with any number of processes identical.
    """

    count: int = 0
    failed: int = 0
    intersection: int = 0
    union: int = 0
    iou_sum: float = 0.0

    def add(self, intersection: int, union: int) -> None:
        self.count += 1
        self.intersection += int(intersection)
        self.union += int(union)
        self.iou_sum += sample_iou(intersection, union)

    def add_failure(self) -> None:
        self.failed += 1

    def __add__(self, other: IoUAccumulator) -> IoUAccumulator:
        return IoUAccumulator(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def giou(self) -> float | None:
        """Mean per-sample IoU (None without samples)."""
        return self.iou_sum / self.count if self.count else None

    @property
    def ciou(self) -> float | None:
        """Cumulative IoU, sum I / sum U (None without samples)."""
        if not self.count:
            return None
        return sample_iou(self.intersection, self.union)

    def as_dict(self) -> dict[str, float | int | None]:
        """``evaluated``: samples in gIoU/cIoU; ``failed``: samples that are not; ``samples``: both."""
        return {"gIoU": self.giou, "cIoU": self.ciou, "evaluated": self.count, "failed": self.failed,
                "samples": self.count + self.failed, "intersection": self.intersection, "union": self.union}


def accumulate(pairs: Iterable[tuple[int, int]]) -> IoUAccumulator:
    """An accumulator over (I, U) pairs, in the given order."""
    acc = IoUAccumulator()
    for intersection, union in pairs:
        acc.add(intersection, union)
    return acc


def miou_drop(baseline: Mapping[str, float], method: Mapping[str, float]) -> float:
    """Mean over ``method``'s splits of (baseline gIoU - method gIoU), in points (x 100).

    Both map split name -> gIoU as a fraction. Every split of ``method`` must be in ``baseline``.
    """
    if not method:
        raise ValueError("mIoU_drop needs at least one evaluated split")
    missing = [split for split in method if split not in baseline]
    if missing:
        raise KeyError(f"baseline has no gIoU for splits {missing}; it has {sorted(baseline)}")
    return 100.0 * sum(baseline[s] - method[s] for s in method) / len(method)
