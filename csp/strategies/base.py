"""Clustering strategies: pick Nc of the N image tokens before the projector (paper 3.1).

A strategy is a small dataclass with one method, ``select``; the registry maps config names to
classes so that configs, the runner and the tests all enumerate the same set.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image


@dataclass
class ClusteringInputs:
    """What a strategy may look at, for a batch of B samples.

    Attributes:
        features: ``B x N x C`` CLIP patch features (CLS dropped), before the projector.
        grid: (rows, cols) of the CLIP token grid, rows * cols = N.
        crop_size: side of the square CLIP input (224 or 336).
        images: the B original images (RGB), for strategies that look at pixels.
        sample_ids: B stable identifiers, used to seed per-sample randomness.
        cls_attention: ``B x N`` head-averaged CLS attention row of the configured CLIP layer,
            present only when the strategy asked for it (``cls_attention_layer``).
        texts: per sample, the query text (the referring expression or question); None where the
            caller has none (text-guided strategies such as ``litelvlm`` then refuse to run).
        image_texts: every query text of this image (all samples here are queries about ONE image).
        vision: the CLIP tower's hidden states and layers (``csp.methods.VisionFeatures``), for
            strategies that read more of CLIP than the patch features (``litelvlm``); None if not given.
    """

    features: torch.Tensor
    grid: tuple[int, int]
    crop_size: int
    images: Sequence[Image.Image]
    sample_ids: Sequence[str]
    cls_attention: torch.Tensor | None = None
    texts: Sequence[str] | None = None
    image_texts: Sequence[str] | None = None
    vision: Any = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]


class ClusteringStrategy(ABC):
    """Selects Nc image-token indices per sample."""

    name: ClassVar[str]

    #: CLIP layer whose CLS attention row the strategy needs (None: not needed).
    cls_attention_layer: int | None = None

    @abstractmethod
    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        """Return ``B x num_keep`` int64 indices into the N tokens, sorted ascending, distinct."""

    def extra_cost(self) -> dict[str, float]:
        """Cost spent outside the LLM (e.g. a detector), reported separately."""
        return {}


CLUSTERING_STRATEGIES: dict[str, type[ClusteringStrategy]] = {}


def register_strategy(name: str) -> Callable[[type[ClusteringStrategy]], type[ClusteringStrategy]]:
    def wrap(cls: type[ClusteringStrategy]) -> type[ClusteringStrategy]:
        if name in CLUSTERING_STRATEGIES:
            raise ValueError(f"clustering strategy {name!r} registered twice")
        cls.name = name
        CLUSTERING_STRATEGIES[name] = cls
        return cls

    return wrap


def build_strategy(name: str, **kwargs: object) -> ClusteringStrategy:
    """Instantiate a registered strategy; unknown names list the valid ones."""
    if name not in CLUSTERING_STRATEGIES:
        raise ValueError(
            f"unknown clustering strategy {name!r}; registered: {sorted(CLUSTERING_STRATEGIES)}"
        )
    try:
        return CLUSTERING_STRATEGIES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {kwargs} for clustering strategy {name!r}: {err}") from err


def check_strategy(schedule: Any) -> ClusteringStrategy:
    """Build ``schedule``'s clustering strategy once to validate its name and options (e.g. that
    seg_first's weights file exists) before anything runs; nothing heavy is loaded (ultralytics is
    imported on first use). Errors name the ``schedule.clustering`` / ``clustering_kwargs`` keys."""
    kwargs = dict(schedule.clustering_kwargs or {})
    try:
        return build_strategy(schedule.clustering, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"schedule.clustering={schedule.clustering!r} with clustering_kwargs={kwargs}: {err}") from err


def uniform_indices(num_tokens: int, num_keep: int) -> torch.Tensor:
    """Eq. 2: ``S[i] = i * floor(N / Nc)``, i = 0..Nc-1."""
    return torch.arange(num_keep, dtype=torch.long) * (num_tokens // num_keep)


def sample_generator(seed: int, sample_id: str) -> torch.Generator:
    """A generator seeded by (seed, sample id): per-sample randomness that reproduces across runs."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{sample_id}".encode()))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``B x N`` scores -> ``B x k`` indices of the k largest, in ascending index order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values
