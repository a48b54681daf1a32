"""IVC-Prune (FireRedTeam/IVC-Prune, ICLR 2026): one prune inside the LLM at layer k, ranked by value
similarity, plus the "implicit visual coordinate" tokens of RoPE.

Read at ``transformers/src/transformers/models/llama/modeling_llama.py`` (``compute_attention_weights``
L734-797, ``IVCP_forward_flashattention`` L799-1011, ``prune_past_key_values`` L1013-1053) and its
LLaVA setting in ``VLMEvalKit/vlmeval/config.py`` (L511-519: ``ivcp_k 16``).
"""

from __future__ import annotations

from dataclasses import dataclass

from csp.methods.base import Method, check_int, register_method
from csp.plan import Marked, Prune, TokenPlan
from csp.scorers import IvcUnion


def ivc_counts(num_image_tokens: int, seed: float = 0.01, foreground: float = 0.2,
               coordinates: float = 0.05) -> tuple[int, int, int]:
    """(seeds, foreground, coordinate tokens per cos/sin) as its code counts them from the image slot
    length N with Python's ``round`` (L907, L921, L934-935): ``max(1, round(0.01 N))``, ``round(0.2 N)``,
    ``round(0.05 N)``."""
    n = num_image_tokens
    return max(1, round(n * seed)), round(n * foreground), round(n * coordinates)


@register_method("ivc_prune")
@dataclass
class IvcPrune(Method):
    """Before layer ``layer - 1`` runs (``layer`` = its ``ivcp_k``, 16 for LLaVA-1.5-7B): S =
    softmax(V V^T / sqrt(D)) of that layer's normalised input (before RoPE), per key-value head, mean
    over heads (L752-766, L968-975); seeds: the top ``max(1, round(0.01 N))`` image columns of S averaged
    over the question rows (image end + 2 to the last prompt row, L899-908); foreground: the top
    ``round(0.2 N)`` image columns of S averaged over the seed rows and the question rows (L911-922);
    coordinate tokens: the top ``round(0.05 N)`` image positions by the mean over the head dimension of
    RoPE's cos, and as many by that of its sin (L924-936). Layers ``layer..`` keep the union plus every
    non-image token, sorted, with their ORIGINAL position ids (L938-953); at chat prefill the KV caches
    of layers ``1..layer-1`` are cut to the same set (L963-964, L1013-1030: layer 0's cache stays whole
    in its code, ``layer_idx > 0``).

    ``seed``, ``foreground``, ``coordinates``: the three shares (its literals 0.01, 0.2, 0.05). Under
    LISA's 1-D RoPE the coordinate tokens depend only on the image slot's position ids, not on the image.
    """

    layer: int = 16
    seed: float = 0.01
    foreground: float = 0.2
    coordinates: float = 0.05

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("ivc_prune", "layer", self.layer, 1)
        if self.layer >= num_layers:
            raise ValueError(f"ivc_prune.layer = {self.layer}: the model has layers 0..{num_layers - 1}")
        for name in ("seed", "foreground", "coordinates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ivc_prune.{name} must be a share in [0, 1], got {value!r}")
        if ivc_counts(num_image_tokens, self.seed, self.foreground, self.coordinates)[1] < 1:
            raise ValueError(f"ivc_prune.foreground = {self.foreground}: round(N * foreground) is 0 at "
                             f"N = {num_image_tokens}")

    def counts(self, num_image_tokens: int) -> tuple[int, int, int]:
        return ivc_counts(num_image_tokens, self.seed, self.foreground, self.coordinates)

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        seeds, fg, coords = self.counts(num_image_tokens)
        prune = Prune(layer=self.layer, score_layer=self.layer - 1, keep=Marked(), cut_cache_from=1,
                      scorer=IvcUnion(seeds=seeds, foreground=fg, coordinates=coords))
        return TokenPlan(events=(prune,))

    def data_dependent(self) -> str | None:
        return "keeps seeds UNION foreground UNION coordinate tokens: the count depends on their overlap"

    def count_range(self, num_layers: int, num_image_tokens: int) -> tuple[list[int], list[int]] | None:
        seeds, fg, coords = self.counts(num_image_tokens)
        low = max(fg, seeds, coords)
        high = min(num_image_tokens, seeds + fg + 2 * coords)
        return ([num_image_tokens] * self.layer + [low] * (num_layers - self.layer),
                [num_image_tokens] * self.layer + [high] * (num_layers - self.layer))
