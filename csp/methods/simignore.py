"""Simignore (FanshuoZeng/Simignore): image tokens least similar to the text are ignored from layer 0,
then FastV prunes at layer K."""

from __future__ import annotations

from dataclasses import dataclass

from csp.methods.base import Method, check_int, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import QueryAttention, TextSimilarity


@register_method("simignore")
@dataclass
class Simignore(Method):
    """Keep the ``keep_similar`` image tokens most similar (cosine, projected image embedding vs the
    embed_tokens of the user's instruction tokens) to any instruction token (its 7B script: 452 of
    576), then FastV at ``layer`` (5) keeping ``keep`` (144 of 576).

    Its code uses ScienceQA answer options as the text; here the instruction rows after the image
    up to the last prompt row. The ignored tokens are removed physically (its code masks them).
    """

    keep_similar: int = 452
    layer: int = 5
    keep: int = 144

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("simignore", "keep_similar", self.keep_similar, 1)
        check_int("simignore", "layer", self.layer, 1)
        check_int("simignore", "keep", self.keep, 1)
        if self.layer >= num_layers:
            raise ValueError(f"simignore.layer = {self.layer}: the model has layers 0..{num_layers - 1}")
        if not self.keep <= self.keep_similar <= num_image_tokens:
            raise ValueError(f"simignore needs keep ({self.keep}) <= keep_similar ({self.keep_similar}) "
                             f"<= N ({num_image_tokens})")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        return TokenPlan(events=(
            Prune(layer=0, score_layer=0, scorer=TextSimilarity(), keep=TopK(self.keep_similar), stage="ignoring"),
            Prune(layer=self.layer, score_layer=self.layer - 1, scorer=QueryAttention(rows="last"),
                  keep=TopK(self.keep)),
        ))
