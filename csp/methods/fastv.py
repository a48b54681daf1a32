"""FastV (pkunlp-icler/FastV): at layer K keep the image tokens that the last prompt row attends to
most in layer K-1 (RoPE, softmax over the full causal row, mean over heads)."""

from __future__ import annotations

from dataclasses import dataclass

from csp.methods.base import Method, check_int, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import QueryAttention


@register_method("fastv")
@dataclass
class FastV(Method):
    """``layer`` = K (FastV's default 2), ``keep`` = (1 - R) N image tokens for layers K..L-1.

    Original position ids are kept (gaps included); with a KV cache the choice is made at prefill.
    """

    layer: int = 2
    keep: int = 128

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("fastv", "layer", self.layer, 1)
        check_int("fastv", "keep", self.keep, 1)
        if self.layer >= num_layers:
            raise ValueError(f"fastv.layer = {self.layer}: the model has layers 0..{num_layers - 1}")
        if self.keep > num_image_tokens:
            raise ValueError(f"fastv.keep = {self.keep} exceeds the N = {num_image_tokens} image tokens")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        prune = Prune(layer=self.layer, score_layer=self.layer - 1, scorer=QueryAttention(rows="last"),
                      keep=TopK(self.keep))
        return TokenPlan(events=(prune,))
