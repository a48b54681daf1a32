"""PyramidDrop (Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py): several stages, each
ranked by the last instruction row, position ids renumbered contiguously after every drop."""

from __future__ import annotations

from dataclasses import dataclass, field

from csp.methods.base import Method, check_layer_counts, check_layers, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import QueryAttention


@register_method("pyramiddrop")
@dataclass
class PyramidDrop(Method):
    """At the i-th of ``layers`` (its layer_list; default [8, 16, 24]) keep ``int(N * ratio**(i+1))``
    image tokens: one ratio lambda over its layers, as its scripts' image_token_ratio_list
    [0.5, 0.25, 0.125] (= lambda^i, lambda 0.5; its loaders prepend 1.0; counts
    ``int(cur_image_token * ratio)``, modeling_llama_pdrop.py L1306-1307). ``keep`` (explicit counts
    per layer) replaces the lambda rule where given: an exploration knob, not its code.

    The rank is recomputed at the end of the layer before each listed layer with the listed layer's
    input_layernorm, q/k projections and RoPE at the current position ids (L1321-1342), one query
    row: the last instruction row (L1390-1392); softmax over the full causal row in fp32, mean over
    heads, image columns (L1395-1401); top count, sorted (L1405-1407). After every drop the position
    ids are renumbered 0, 1, 2, ... (L1431-1446; in decoding shifted by the dropped counts,
    L1259-1268): ``Prune(renumber=True)``.
    """

    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    ratio: float | None = 0.5
    keep: list[int] | None = None

    def counts(self, num_image_tokens: int) -> list[int]:
        """Kept image tokens after each listed layer."""
        if self.keep is not None:
            return list(self.keep)
        if self.ratio is None:
            raise ValueError("pyramiddrop needs a ratio (lambda) or explicit keep counts")
        return [int(num_image_tokens * float(self.ratio) ** (i + 1)) for i in range(len(self.layers))]

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        if self.keep is None:
            check_layers("pyramiddrop", "layers", self.layers, num_layers)
            if self.ratio is None or not 0.0 < float(self.ratio) < 1.0:
                raise ValueError(f"pyramiddrop.ratio (lambda) must be in (0, 1), got {self.ratio!r}")
            if min(self.counts(num_image_tokens)) < 1:
                raise ValueError(f"pyramiddrop.ratio = {self.ratio} keeps no image token at the last of "
                                 f"{list(self.layers)} (counts {self.counts(num_image_tokens)} of "
                                 f"N = {num_image_tokens})")
        check_layer_counts("pyramiddrop", self.layers, self.counts(num_image_tokens), num_layers, num_image_tokens)

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        events = tuple(Prune(layer=layer, score_layer=layer, scorer=QueryAttention(rows="last"), keep=TopK(k),
                             renumber=True)
                       for layer, k in zip(self.layers, self.counts(num_image_tokens), strict=True))
        return TokenPlan(events=events)
