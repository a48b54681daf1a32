"""Metrics against hand-computed numbers (docs/design.md section 2 'Metrics')."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import IoUAccumulator, accumulate, intersection_union, miou_drop, sample_iou

GT = np.array([[1, 1, 0, 0],
               [1, 1, 0, 0],
               [0, 0, 255, 255],
               [0, 0, 0, 0]], dtype=np.uint8)
PRED = np.array([[1, 0, 0, 0],
                 [1, 0, 0, 0],
                 [0, 0, 1, 1],
                 [0, 0, 0, 1]], dtype=bool)


def test_intersection_union_ignores_255() -> None:
    # foreground of GT: (0,0) (0,1) (1,0) (1,1); prediction on valid pixels: (0,0) (1,0) (3,3)
    # I = {(0,0), (1,0)} = 2; U = 4 + {(3,3)} = 5; the predicted (2,2), (2,3) are ignored
    assert intersection_union(PRED, GT) == (2, 5)
    assert intersection_union(np.zeros((2, 2), bool), np.zeros((2, 2), np.uint8)) == (0, 0)
    assert intersection_union(np.ones((2, 2), bool), np.full((2, 2), 255, np.uint8)) == (0, 0)
    with pytest.raises(ValueError, match="shape|is"):
        intersection_union(np.zeros((2, 3), bool), np.zeros((3, 2), np.uint8))


def test_giou_ciou_hand_computed() -> None:
    pairs = [(2, 5), (0, 0), (0, 4), (3, 3)]
    acc = accumulate(pairs)
    assert sample_iou(0, 0) == 1.0
    assert acc.giou == pytest.approx((0.4 + 1.0 + 0.0 + 1.0) / 4)
    assert acc.ciou == pytest.approx(5 / 12)
    assert (acc.count, acc.intersection, acc.union, acc.failed) == (4, 5, 12, 0)


def test_accumulators_add_like_one_pass() -> None:
    left, right = accumulate([(2, 5), (0, 0)]), accumulate([(0, 4), (3, 3)])
    right.add_failure()
    total = left + right
    assert (total.count, total.failed, total.intersection, total.union) == (4, 1, 5, 12)
    assert total.giou == pytest.approx(0.6) and total.ciou == pytest.approx(5 / 12)


def test_empty_accumulator_and_only_empty_unions() -> None:
    assert IoUAccumulator().giou is None and IoUAccumulator().ciou is None
    only_empty = accumulate([(0, 0), (0, 0)])
    assert only_empty.giou == 1.0 and only_empty.ciou == 1.0


def test_miou_drop_in_points() -> None:
    baseline = {"a": 0.70, "b": 0.50, "c": 0.9}
    assert miou_drop(baseline, {"a": 0.60, "b": 0.45}) == pytest.approx((10.0 + 5.0) / 2)
    assert miou_drop(baseline, {"a": 0.72}) == pytest.approx(-2.0)
    with pytest.raises(KeyError, match="'d'"):
        miou_drop(baseline, {"d": 0.1})
    with pytest.raises(ValueError):
        miou_drop(baseline, {})
