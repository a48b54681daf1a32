"""SparseVLM (Gumpest/SparseVLMs), its released v2.0 (SparseVLM+, ``USE_VERSION=2_0``): image tokens
ranked by text "raters" chosen on the embeddings, with the v2.0 RoPE correction and head selection."""

from __future__ import annotations

from dataclasses import dataclass, field

from csp.methods.base import Method, check_int, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import SparseVlmV2Attention


@register_method("sparsevlm")
@dataclass
class SparseVLM(Method):
    """SparseVLM v2.0 as its code runs it (modelling_sparse_llama.py of Gumpest/SparseVLMs, main):

    - each of ``layers`` (its pruning_loc [2, 6, 15]) runs at FULL width on the tokens it receives
      (L229-237); its OUTPUT keeps ``keep[i]`` image tokens (score.py sparse_token_list, v2.0 for
      RETAIN_TOKN 64 at N = 576: [66, 34, 20]; ``min(count, visual - 1)``, score.py L41): here a
      Prune at layer ``l + 1`` ranked by layer ``l``'s attention;
    - the rank: :class:`csp.scorers.SparseVlmV2Attention` on the text raters (the instruction tokens
      t with ``mean_v softmax_t(e_v . e_t) > mean``, L198-204) with the RoPE correction and the top
      ``heads`` (14) heads;
    - original position ids are kept (v2.0, L311-312); no recycling of pruned tokens (v2.0 sets
      ``s_flag = False``, L273-274).
    """

    layers: list[int] = field(default_factory=lambda: [2, 6, 15])
    keep: list[int] = field(default_factory=lambda: [66, 34, 20])
    heads: int = 14

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        layers, keep = list(self.layers), list(self.keep)
        if layers != sorted(set(layers)) or any(not 0 <= v < num_layers - 1 for v in layers):
            raise ValueError(f"sparsevlm.layers = {layers}: expected distinct ascending layers in 0..{num_layers - 2} "
                             f"(each runs at full width and prunes its output; the model has {num_layers} layers)")
        if len(keep) != len(layers):
            raise ValueError(f"sparsevlm.keep {keep} needs one count per layer of {layers}")
        for k in keep:
            check_int("sparsevlm", "keep[]", k, 1)
        check_int("sparsevlm", "heads", self.heads, 1)
        # its topk(min(count, visual - 1)): strictly decreasing counts below N keep exactly the count
        if any(b >= a for a, b in zip(keep, keep[1:])) or keep[0] >= num_image_tokens:
            raise ValueError(f"sparsevlm.keep {keep} must be strictly decreasing and < N = {num_image_tokens} "
                             "(its code keeps min(count, visual - 1))")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        scorer = SparseVlmV2Attention(heads=self.heads)
        events = tuple(Prune(layer=layer + 1, score_layer=layer, scorer=scorer, keep=TopK(k))
                       for layer, k in zip(self.layers, self.keep, strict=True))
        return TokenPlan(events=events)
