"""FEATHER (markendo/FEATHER): FastV-style pruning ranked WITHOUT RoPE, plus a uniform grid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from csp.methods.base import Method, check_int, check_layers, register_method
from csp.plan import Prune, TokenPlan, TopFraction, TopKUnionGrid
from csp.scorers import QueryAttention


def feather_keep_ratio(keep_ratio: float) -> float:
    """The keep ratio as its code holds it: ``fastV_ratio = 1 - fastv_ratio`` (llama2_models.py L23)
    with ``fastv_ratio`` the pruned share its script writes (``1 - keep_ratio`` to 12 digits, e.g.
    0.8 for 0.2), so that ``int(N * r)`` and ``int(M * r * r)`` round exactly as its floats do."""
    return 1.0 - round(1.0 - float(keep_ratio), 12)


@register_method("feather")
@dataclass
class Feather(Method):
    """One knob, the keep ratio r (its ``fastV_ratio``; ``eval_feather.sh``: fastv_ratio 0.7 pruned,
    r = 0.3), over two layers (its fastv_k [8, 16]):

    - stage 1 at ``layers[0]``: the top ``int(N * r)`` UNION the uniform ``[::stride, ::stride]``
      grid (``no_rope_s=3``) of the patch grid (llama2_models.py L143-156);
    - stage 2 at ``layers[1]``: the top ``int(M * (r * r))`` of the M remaining (L159-164: its
      ``image_indices`` were reset to the M kept ones at L201); the grid is not forced to stay.

    Score: layer K-1's input_layernorm and q/k projections with NO rotary embedding, the last
    prompt row as the only query, softmax over the active image keys only, mean over heads
    (L250-279). Original position ids kept (L195-196). The stage-1 count depends on the overlap with
    the grid. Where ``int(M * r * r)`` is 0 its code keeps no image token; here one stays.
    """

    layers: list[int] = field(default_factory=lambda: [8, 16])
    keep_ratio: float = 0.3
    stride: int = 3

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_layers("feather", "layers", self.layers, num_layers)
        if len(self.layers) != 2:
            raise ValueError(f"feather.layers must name the two pruning layers, got {list(self.layers)}")
        check_int("feather", "stride", self.stride, 1)
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"feather.keep_ratio ({self.keep_ratio}) must be in (0, 1]")
        if math.isqrt(num_image_tokens) ** 2 != num_image_tokens:
            raise ValueError(f"feather's uniform grid needs a square patch grid, N = {num_image_tokens}")

    @property
    def ratio(self) -> float:
        return feather_keep_ratio(self.keep_ratio)

    def first_count(self, num_image_tokens: int) -> int:
        return max(1, int(num_image_tokens * self.ratio))

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        scorer = QueryAttention(rows="last", rope=False, keys="image")
        first = TopKUnionGrid(k=self.first_count(num_image_tokens), stride=self.stride,
                              side=math.isqrt(num_image_tokens))
        return TokenPlan(events=(
            Prune(layer=self.layers[0], score_layer=self.layers[0] - 1, scorer=scorer, keep=first),
            Prune(layer=self.layers[1], score_layer=self.layers[1] - 1, scorer=scorer,
                  keep=TopFraction(self.ratio * self.ratio)),
        ))

    def data_dependent(self) -> str | None:
        return "stage 1 keeps top-k UNION a uniform grid: its count depends on their overlap per sample"

    def count_range(self, num_layers: int, num_image_tokens: int) -> tuple[list[int], list[int]] | None:
        """Per-layer image tokens with the least and the most overlap (bounds of the data-dependent count)."""
        side = math.isqrt(num_image_tokens)
        grid = math.ceil(side / self.stride) ** 2
        k = self.first_count(num_image_tokens)
        second = TopFraction(self.ratio * self.ratio)
        rows = []
        for first in (max(k, grid), min(num_image_tokens, k + grid)):
            rows.append([num_image_tokens if i < self.layers[0] else first if i < self.layers[1]
                         else second.static_count(first) for i in range(num_layers)])
        return rows[0], rows[1]
