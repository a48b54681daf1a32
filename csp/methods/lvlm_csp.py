"""LVLM_CSP as a method: clustering before the LLM, then scattering and pruning (the paper's 3.1-3.3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from csp.methods.base import Method, register_method
from csp.plan import Prune, Scatter, TokenPlan, TopK
from csp.schedule import StageSchedule
from csp.scorers import IvcValue, QueryAttention
from csp.strategies import ClusteringInputs, ClusteringStrategy, build_strategy, check_strategy


@register_method("csp")
@dataclass
class LvlmCsp(Method):
    """(Lc, Nc, Ls, Np) from a :class:`~csp.schedule.StageSchedule`; its config is the schedule.

    Layers 0..Lc-1 see the Nc tokens the clustering strategy picked (original position ids),
    layer Lc brings back all N with their layer-0 embeddings, layers Lc+Ls.. keep the top Np by
    the [SEG] rows' attention in layer Lc+Ls-1 (the last prompt row at chat prefill), or with
    ``schedule.pruning: ivc_value`` by IVC-Prune's value-similarity score (``csp.scorers.IvcValue``) of
    that layer, with its seed count ``max(1, round(0.01 N))``.
    """

    schedule: StageSchedule
    _strategy: ClusteringStrategy | None = field(default=None, init=False, repr=False)
    _clustered: bool = field(default=False, init=False, repr=False)

    @property
    def strategy(self) -> ClusteringStrategy:
        """The clustering strategy, built on first use (seg_first checks its weights file then)."""
        if self._strategy is None:
            s = self.schedule
            self._strategy = build_strategy(s.clustering, **dict(s.clustering_kwargs))
        return self._strategy

    @property
    def cls_attention_layer(self) -> int | None:  # type: ignore[override]
        if self.schedule.Lc == 0:  # no clustering stage: nothing to select
            return None
        return self.strategy.cls_attention_layer

    @classmethod
    def from_config(cls, params: Mapping[str, Any]) -> LvlmCsp:
        schedule = StageSchedule.from_mapping(params)
        if schedule is None:
            raise ValueError("method csp needs a schedule (Lc, Nc, Ls, Np)")
        return cls(schedule)

    def check(self) -> None:
        """The clustering strategy's name and options (e.g. seg_first's weights file)."""
        if self._strategy is None:
            self._strategy = check_strategy(self.schedule)

    def check_model(self, model) -> None:
        """The litelvlm clustering strategy's text side against the model's vision tower."""
        clip = (self.schedule.clustering_kwargs or {}).get("clip")
        if self.schedule.clustering == "litelvlm" and clip is not None:
            from csp.litelvlm import check_text_side_pairs

            check_text_side_pairs(clip, model.get("vision_tower"))

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        self.schedule.validate(num_layers, num_image_tokens)

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        s, L, N = self.schedule, num_layers, num_image_tokens
        s.validate(L, N)
        clusters = s.clusters(N) or (always_move_tokens and s.Lc > 0)
        events: list[Scatter | Prune] = []
        if clusters and s.Ls > 0:
            events.append(Scatter(layer=s.Lc))
        prunes = s.prunes(L, N) or (always_move_tokens and s.Lp(L) > 0 and s.Lc + s.Ls > 0)
        if prunes:
            at = s.Lc + s.Ls
            scorer = QueryAttention(rows="seg") if s.pruning == "attention" else IvcValue(seeds=max(1, round(N * 0.01)))
            events.append(Prune(layer=at, score_layer=at - 1, scorer=scorer, keep=TopK(s.Np)))
        return TokenPlan(events=tuple(events), input_keep=clusters, input_stage="clustering" if clusters else "input")

    def select_input(self, inputs: ClusteringInputs) -> torch.Tensor | None:
        if not self.schedule.clusters(inputs.num_tokens):
            return None
        self._clustered = True
        return self.strategy.select(inputs, self.schedule.Nc)

    def image_tokens_per_layer(self, num_layers: int, num_image_tokens: int) -> list[int] | None:
        return self.schedule.image_tokens_per_layer(num_layers, num_image_tokens)

    def extra_cost(self) -> dict[str, float]:
        """The clustering strategy's cost (seg_first's detector) once it has clustered; {} before."""
        return self.strategy.extra_cost() if self._clustered else {}

    def describe(self) -> str:
        return self.schedule.describe()


def as_method(method: Method | StageSchedule | None) -> Method | None:
    """A :class:`~csp.schedule.StageSchedule` is the ``csp`` method's parameters: wrap it; a method
    or None (plain LISA) passes through."""
    return LvlmCsp(method) if isinstance(method, StageSchedule) else method
