"""SparseVLM (Gumpest/SparseVLMs): image tokens ranked by text "raters" chosen on the embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

from csp.methods.base import Method, check_layer_counts, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import QueryAttention


@register_method("sparsevlm")
@dataclass
class SparseVLM(Method):
    """At each of ``layers`` (its code: [2, 6, 15]) keep ``keep[i]`` image tokens, ranked by that
    layer's attention (RoPE, causal, mean over heads) read on the rater rows and averaged.

    Raters: the instruction tokens t after the image whose ``mean_v softmax_t(e_v . e_t)`` over the
    layer-0 embeddings exceeds its mean (csp.scorers.sparsevlm_raters). The layer ranks from its own
    input (q/k recomputed, as PyramidDrop) and already runs on the kept set. Not done here: v1.x's
    recycling of pruned tokens into DPC-kNN cluster tokens (see the README); original position ids
    are kept (as v2.0).
    """

    layers: list[int] = field(default_factory=lambda: [2, 6, 15])
    keep: list[int] = field(default_factory=lambda: [66, 30, 17])

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_layer_counts("sparsevlm", self.layers, self.keep, num_layers, num_image_tokens)

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        events = tuple(Prune(layer=layer, score_layer=layer, scorer=QueryAttention(rows="raters"), keep=TopK(k))
                       for layer, k in zip(self.layers, self.keep, strict=True))
        return TokenPlan(events=events)
