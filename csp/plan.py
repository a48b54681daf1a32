"""A method's per-layer plan of token events, executed by :class:`csp.runner.StageRunner`.

A plan says which image tokens each decoder layer processes:

- ``input_keep``: before layer 0 keep only the image tokens listed in ``DecoderInputs.cluster_keep``
  (CSP's clustering; the selection itself happens before the LLM);
- :class:`Scatter` at layer ``l``: every token of the input sequence is active again from layer
  ``l`` on, the ones that were inactive with their layer-0 embeddings (CSP's eq. 7);
- :class:`Prune` at layer ``l``: a scorer ranks the active image tokens from the input hidden
  states of ``score_layer`` (``l - 1`` or ``l``, with that layer's weights) and a keep rule picks
  the ones that stay for layers ``l..``; the others are removed physically.

Keep rules are small objects with one ``keep`` method (and their static count, for accounting).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from csp.scorers import Scorer


class PlanError(ValueError):
    """A plan that cannot run on the model it was built for."""


def rank_of(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``B x T`` rank (0 = best) of each candidate by descending score; non-candidates rank last."""
    order = scores.float().masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


class KeepRule(ABC):
    """Which of the scored candidate image tokens stay."""

    @abstractmethod
    def keep(self, scores: torch.Tensor, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``B x T`` scores, ``B x T`` candidate mask, ``B x T`` grid index -> ``B x T`` keep mask
        (a subset of the candidates; per sample)."""

    @abstractmethod
    def static_count(self, available: int) -> int | None:
        """Tokens kept out of ``available`` candidates, or None when it depends on the data."""


@dataclass(frozen=True)
class TopK(KeepRule):
    """The ``k`` highest-scoring candidates (all of them where a sample has fewer)."""

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise PlanError(f"TopK.k must be an integer >= 1, got {self.k!r}")

    def keep(self, scores: torch.Tensor, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return candidates & (rank_of(scores, candidates) < self.k)

    def static_count(self, available: int) -> int | None:
        return min(self.k, available)


@dataclass(frozen=True)
class TopFraction(KeepRule):
    """``int(M * fraction)`` of a sample's M candidates (at least one), per sample (FEATHER stage 2)."""

    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 < float(self.fraction) <= 1.0:
            raise PlanError(f"TopFraction.fraction must be in (0, 1], got {self.fraction!r}")

    def keep(self, scores: torch.Tensor, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        available = candidates.sum(dim=1, keepdim=True).double()
        count = (available * float(self.fraction)).floor().long().clamp(min=1)
        return candidates & (rank_of(scores, candidates) < count)

    def static_count(self, available: int) -> int | None:
        return max(1, int(available * float(self.fraction)))


@dataclass(frozen=True)
class TopKUnionGrid(KeepRule):
    """The ``k`` best candidates UNION the candidates on a uniform ``[::stride, ::stride]`` grid of the
    ``side x side`` patch grid (FEATHER stage 1); the count depends on the overlap."""

    k: int
    stride: int
    side: int

    def keep(self, scores: torch.Tensor, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        row, col = source.div(self.side, rounding_mode="floor"), source.remainder(self.side)
        on_grid = (source >= 0) & (row % self.stride == 0) & (col % self.stride == 0)
        return candidates & ((rank_of(scores, candidates) < self.k) | on_grid)

    def static_count(self, available: int) -> int | None:
        return None


@dataclass(frozen=True)
class Marked(KeepRule):
    """The candidates the scorer marked (score > 0): a scorer that makes the whole selection itself
    (IVC-Prune's union, ``csp.scorers.IvcUnion``); the count depends on the data."""

    def keep(self, scores: torch.Tensor, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return candidates & (scores > 0)

    def static_count(self, available: int) -> int | None:
        return None


@dataclass(frozen=True)
class Scatter:
    """From ``layer`` on every input token is active again (inactive ones with layer-0 embeddings)."""

    layer: int
    stage: str = "scattering"


@dataclass(frozen=True)
class Prune:
    """From ``layer`` on only the image tokens that ``keep`` picks by ``scorer`` stay.

    ``score_layer``: the layer whose INPUT hidden states and weights rank the tokens: ``layer - 1``
    (that layer's own attention, as CSP, FastV and FEATHER do) or ``layer`` (recomputed with the
    next layer's projections, as PyramidDrop and SparseVLM do; at layer 0: the embeddings).

    ``renumber``: from ``layer`` on, the rotary position ids of the remaining tokens are 0, 1, 2, ...
    in sequence order (the code of PyramidDrop renumbers so after each drop); False keeps every
    token's original id, gaps included (CSP, FastV, FEATHER). Once a plan renumbers, every later
    event must be a renumbering Prune.

    ``cut_cache_from``: with a KV cache (chat prefill), the caches of layers ``cut_cache_from..layer-1``
    (written before the prune) are cut to the kept tokens too, so that decoding attends to the kept
    set there as well (IVC-Prune's ``prune_past_key_values``); None leaves them whole (FastV, CSP).
    """

    layer: int
    scorer: Scorer
    keep: KeepRule
    score_layer: int
    stage: str = "pruning"
    renumber: bool = False
    cut_cache_from: int | None = None


Event = Scatter | Prune


@dataclass(frozen=True)
class TokenPlan:
    """What a method does inside the LLM, layer by layer (see the module docstring).

    Attributes:
        events: at most one event per layer, ascending layers.
        input_keep: keep ``DecoderInputs.cluster_keep`` before layer 0.
        input_stage: name of the set entering layer 0 (``input``, ``clustering``, ``merging``).
        num_extra: image-slot tokens per sample that are not on the grid (before-LLM merging).
    """

    events: tuple[Event, ...] = ()
    input_keep: bool = False
    input_stage: str = "input"
    num_extra: int = 0

    def at(self, layer: int) -> Event | None:
        return next((e for e in self.events if e.layer == layer), None)

    def scored_before(self, layer: int) -> Prune | None:
        """The prune event of ``layer + 1`` ranked by the input of ``layer``, if any."""
        event = self.at(layer + 1)
        return event if isinstance(event, Prune) and event.score_layer == layer else None

    def validate(self, num_layers: int) -> None:
        layers = [e.layer for e in self.events]
        if layers != sorted(set(layers)):
            raise PlanError(f"plan events must have distinct ascending layers, got {layers}")
        for event in self.events:
            if not 0 <= event.layer < num_layers:
                raise PlanError(f"{type(event).__name__} at layer {event.layer}: the model has layers "
                                f"0..{num_layers - 1}")
            if isinstance(event, Scatter) and not self.input_keep:
                raise PlanError("a Scatter event needs a reduced input set (input_keep) to scatter from")
            if isinstance(event, Prune) and event.score_layer not in (event.layer - 1, event.layer):
                raise PlanError(f"Prune at layer {event.layer} is ranked at layer {event.score_layer}; "
                                f"expected {event.layer - 1} or {event.layer}")
            if isinstance(event, Prune) and event.score_layer < 0:
                raise PlanError("Prune at layer 0 must be ranked at layer 0 (the embeddings)")
        renumbered = [i for i, e in enumerate(self.events) if isinstance(e, Prune) and e.renumber]
        if renumbered and not all(isinstance(e, Prune) and e.renumber for e in self.events[renumbered[0]:]):
            raise PlanError("after a renumbering Prune every later event must be a renumbering Prune "
                            "(contiguous position ids cannot be undone)")
        if renumbered and self.input_keep:
            raise PlanError("a renumbering plan cannot keep an input set (input_keep)")

    @property
    def renumbers_from(self) -> int | None:
        """The first layer whose position ids are renumbered contiguously (None: original ids)."""
        return next((e.layer for e in self.events if isinstance(e, Prune) and e.renumber), None)

    def image_tokens_per_layer(self, num_layers: int, num_input: int, num_kept_input: int | None = None,
                               num_full: int | None = None) -> list[int] | None:
        """Image tokens each layer processes (length L), or None where a count depends on the data.

        ``num_input``: image-slot tokens of the sequence; ``num_kept_input``: those kept before
        layer 0 (``input_keep``); ``num_full``: image tokens after a Scatter (default num_input).
        """
        self.validate(num_layers)
        count: int | None = num_kept_input if self.input_keep else num_input
        counts: list[int | None] = []
        for layer in range(num_layers):
            event = self.at(layer)
            if isinstance(event, Scatter):
                count = num_full if num_full is not None else num_input
            elif isinstance(event, Prune):
                count = None if count is None else event.keep.static_count(count)
            counts.append(count)
        return None if any(c is None for c in counts) else [int(c) for c in counts]  # type: ignore[arg-type]
