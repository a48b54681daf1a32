"""Simignore (FanshuoZeng/Simignore, src/LLaVA/llava/model/llava_arch.py): image tokens least similar
to the text are ignored from layer 0, then FastV prunes at layer K."""

from __future__ import annotations

from dataclasses import dataclass

from csp.methods.base import Method, check_int, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import QueryAttention, TextSimilarity


@register_method("simignore")
@dataclass
class Simignore(Method):
    """Keep the first ``keep_similar`` image tokens (its k2; 7B script: 452 of 576) that its scan of
    the (image, text) pairs sorted by cosine similarity meets, starting at pair ``i_index`` (1) and
    visiting every ``step``-th (1) pair (llava_arch.py L284-311; inference_sqa_llava_7b.py
    L246-248), then FastV at ``layer`` (5) keeping ``keep`` (144 of 576).

    Text: the embed_tokens of the user's expression (``DecoderInputs.expression``; its code compares
    with the question's content tokens, ScienceQA's options, L202-241), not LISA's fixed wording;
    where the expression rows are not given, every instruction row. Image: the projected image
    tokens. The ignored tokens are removed physically (its code masks them as keys, L383-386);
    original position ids are kept.
    """

    keep_similar: int = 452
    layer: int = 5
    keep: int = 144
    i_index: int = 1
    step: int = 1

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("simignore", "keep_similar", self.keep_similar, 1)
        check_int("simignore", "layer", self.layer, 1)
        check_int("simignore", "keep", self.keep, 1)
        check_int("simignore", "i_index", self.i_index, 0)
        check_int("simignore", "step", self.step, 1)
        if self.layer >= num_layers:
            raise ValueError(f"simignore.layer = {self.layer}: the model has layers 0..{num_layers - 1}")
        if not self.keep <= self.keep_similar <= num_image_tokens:
            raise ValueError(f"simignore needs keep ({self.keep}) <= keep_similar ({self.keep_similar}) "
                             f"<= N ({num_image_tokens})")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        return TokenPlan(events=(
            Prune(layer=0, score_layer=0, scorer=TextSimilarity(self.i_index, self.step), keep=TopK(self.keep_similar),
                  stage="ignoring"),
            Prune(layer=self.layer, score_layer=self.layer - 1, scorer=QueryAttention(rows="last"),
                  keep=TopK(self.keep)),
        ))
