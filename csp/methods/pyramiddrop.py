"""PyramidDrop (Cooperx521/PyramidDrop): several stages, each ranked by the last instruction row."""

from __future__ import annotations

from dataclasses import dataclass, field

from csp.methods.base import Method, check_layer_counts, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import QueryAttention


@register_method("pyramiddrop")
@dataclass
class PyramidDrop(Method):
    """At each of ``layers`` keep ``keep[i]`` image tokens (its code: int(N * ratio_i) with ratios
    lambda^i; LLaVA-1.5 at 576: layers [8, 16, 24], keep [288, 144, 72]).

    The rank is recomputed from that layer's input with that layer's input_layernorm, q/k
    projections and RoPE (one query row: the last prompt row; softmax over the full causal row in
    fp32; mean over heads); the layer itself already runs on the kept set. Original position ids
    are kept (its code re-indexes them contiguously; see the README).
    """

    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    keep: list[int] = field(default_factory=lambda: [288, 144, 72])

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_layer_counts("pyramiddrop", self.layers, self.keep, num_layers, num_image_tokens)

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        events = tuple(Prune(layer=layer, score_layer=layer, scorer=QueryAttention(rows="last"), keep=TopK(k))
                       for layer, k in zip(self.layers, self.keep, strict=True))
        return TokenPlan(events=events)
