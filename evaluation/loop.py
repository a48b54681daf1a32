"""Evaluate one setting (a pipeline) over image groups, one record per sample.

The image is opened once per group and the group's queries go to ``pipe.segment`` together; the
pipeline encodes the image once and runs the LLM in chunks of ``queries_per_batch`` (if set). A missing or
unreadable image, an unusable annotation, or a ground truth whose size differs from the image
makes that sample a ``failed`` record with the reason; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from csp.accounting import ModelDims, TokenRecord
from datasets.base import AnnotationError, ImageGroup, Sample
from evaluation.metrics import intersection_union, sample_iou
from evaluation.records import Record
from model.pipeline import Query
from runs.images import open_image


class Pipeline(Protocol):
    """What evaluation needs from ``model.pipeline.SegmentationPipeline``."""

    @property
    def dims(self) -> ModelDims: ...

    def segment(self, image: Image.Image, queries: list[Any], *, queries_per_batch: int | None = None) -> list[Any]:
        """One result per query (``sample_id``, ``mask``, ``image_tokens``, ``total_tokens``,
        ``llm_ms``, ``batch_size``); the image is encoded once whatever ``queries_per_batch``."""

    def extra_cost(self) -> dict[str, float]:
        """The method's cost outside the LLM so far (``csp.methods.Method.extra_cost``)."""


@dataclass
class SampleOutcome:
    """A record and, for ok samples, what an overlay needs (image, ``H x W`` prediction and GT)
    and, when the pipeline reports them, the kept image tokens per stage (token maps)."""

    record: Record
    image: Image.Image | None = None
    pred: np.ndarray | None = None
    gt: np.ndarray | None = None
    kept: list[Any] | None = None


class SampleFailedError(RuntimeError):
    """Raised with ``strict=true`` at the first failed sample."""


def failed_record(sample: Sample, reason: str) -> Record:
    return {"split": sample.split, "sample_id": sample.sample_id, "image": str(sample.image_path),
            "text": sample.text, "status": "failed", "reason": reason}


def ok_record(sample: Sample, gt: np.ndarray, result: Any, dims: ModelDims, batch_size: int = 1) -> Record:
    """Record of one finished query: I/U, the per-layer token accounting of the runner, and the LLM
    time (``llm_ms`` is the batch's time over ``batch_size``, the queries run together)."""
    pred = np.asarray(result.mask, dtype=bool)
    intersection, union = intersection_union(pred, gt)
    tokens = TokenRecord(list(result.image_tokens), list(result.total_tokens)).summarize(dims)
    return {"split": sample.split, "sample_id": sample.sample_id, "image": str(sample.image_path),
            "text": sample.text, "status": "ok", "reason": None, "intersection": intersection, "union": union,
            "iou": sample_iou(intersection, union), "navg": tokens["Navg"], "tflops": tokens["TFLOPs"],
            "image_tokens": list(result.image_tokens), "llm_ms": float(result.llm_ms), "batch_size": batch_size}


def evaluate_group(pipe: Pipeline, group: ImageGroup, *, skip: set[tuple[str, str]] = frozenset(),
                   queries_per_batch: int | None = None) -> Iterator[SampleOutcome]:
    """Outcomes for the samples of ``group`` not in ``skip``, as they finish."""
    todo = [s for s in group.samples if (s.split, s.sample_id) not in skip]
    for sample in todo:  # unusable before the image is even opened (e.g. no image file of a readable kind)
        if sample.load_error is not None:
            yield SampleOutcome(failed_record(sample, sample.load_error))
    todo = [s for s in todo if s.load_error is None]
    if not todo:
        return
    try:
        image = open_image(group.image_path)
    except Exception as exc:  # missing, unreadable or truncated image: every sample of it fails
        for sample in todo:
            yield SampleOutcome(failed_record(sample, f"cannot read image {group.image_path}: {exc!r}"))
        return
    ready: list[tuple[Sample, np.ndarray]] = []
    for sample in todo:
        try:
            gt = sample.gt_mask()
        except AnnotationError as exc:
            yield SampleOutcome(failed_record(sample, str(exc)))
            continue
        if gt.shape != (image.height, image.width):
            reason = f"ground truth is {gt.shape[0]}x{gt.shape[1]} but image {group.image_path} is " \
                     f"{image.height}x{image.width}"
            yield SampleOutcome(failed_record(sample, reason))
            continue
        ready.append((sample, gt))
    if not ready:
        return
    queries = [Query(text=s.text, is_sentence=s.is_sentence, sample_id=s.sample_id) for s, _ in ready]
    results = pipe.segment(image, queries, queries_per_batch=queries_per_batch)
    by_id = {r.sample_id: r for r in results}
    for sample, gt in ready:
        result = by_id[sample.sample_id]
        record = ok_record(sample, gt, result, pipe.dims, batch_size=int(getattr(result, "batch_size", 1)))
        yield SampleOutcome(record, image, np.asarray(result.mask, bool), gt,
                            getattr(result, "kept_image_tokens", None) or None)
