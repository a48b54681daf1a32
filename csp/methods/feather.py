"""FEATHER (markendo/FEATHER): FastV-style pruning ranked WITHOUT RoPE, plus a uniform grid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from csp.methods.base import Method, check_int, check_layers, register_method
from csp.plan import Prune, TokenPlan, TopFraction, TopKUnionGrid
from csp.scorers import QueryAttention


@register_method("feather")
@dataclass
class Feather(Method):
    """Stage 1 at ``layers[0]`` (8): the top ``int(N * keep_ratio)`` (0.3) UNION the uniform
    ``[::stride, ::stride]`` (3) grid of the patch grid; stage 2 at ``layers[1]`` (16): the top
    ``int(M * second_fraction)`` (0.09) of the M remaining (the grid is not forced to stay).

    Score: layer K-1's input_layernorm and q/k projections with NO rotary embedding, the last
    prompt row as the only query, softmax over the active image keys only, mean over heads.
    Original position ids kept. The stage-1 count depends on the overlap with the grid.
    """

    layers: list[int] = field(default_factory=lambda: [8, 16])
    keep_ratio: float = 0.3
    stride: int = 3
    second_fraction: float = 0.09

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_layers("feather", "layers", self.layers, num_layers)
        if len(self.layers) != 2:
            raise ValueError(f"feather.layers must name the two pruning layers, got {list(self.layers)}")
        check_int("feather", "stride", self.stride, 1)
        if not 0.0 < float(self.keep_ratio) <= 1.0 or not 0.0 < float(self.second_fraction) <= 1.0:
            raise ValueError(f"feather.keep_ratio ({self.keep_ratio}) and second_fraction "
                             f"({self.second_fraction}) must be in (0, 1]")
        if math.isqrt(num_image_tokens) ** 2 != num_image_tokens:
            raise ValueError(f"feather's uniform grid needs a square patch grid, N = {num_image_tokens}")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        scorer = QueryAttention(rows="last", rope=False, keys="image")
        first = TopKUnionGrid(k=max(1, int(num_image_tokens * float(self.keep_ratio))), stride=self.stride,
                              side=math.isqrt(num_image_tokens))
        return TokenPlan(events=(
            Prune(layer=self.layers[0], score_layer=self.layers[0] - 1, scorer=scorer, keep=first),
            Prune(layer=self.layers[1], score_layer=self.layers[1] - 1, scorer=scorer,
                  keep=TopFraction(float(self.second_fraction))),
        ))

    def data_dependent(self) -> str | None:
        return "stage 1 keeps top-k UNION a uniform grid: its count depends on their overlap per sample"

    def count_range(self, num_layers: int, num_image_tokens: int) -> tuple[list[int], list[int]] | None:
        """Per-layer image tokens with the least and the most overlap (bounds of the data-dependent count)."""
        side = math.isqrt(num_image_tokens)
        grid = math.ceil(side / self.stride) ** 2
        k = max(1, int(num_image_tokens * float(self.keep_ratio)))
        rows = []
        for first in (max(k, grid), min(num_image_tokens, k + grid)):
            second = max(1, int(first * float(self.second_fraction)))
            rows.append([num_image_tokens if i < self.layers[0] else first if i < self.layers[1] else second
                         for i in range(num_layers)])
        return rows[0], rows[1]
