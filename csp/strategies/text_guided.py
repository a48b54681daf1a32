"""``litelvlm``: LiteLVLM's selection (csp/litelvlm.py, sejong-rcv/LiteLVLM) picks CSP's Nc tokens.

The Nc retained tokens are returned ascending (CSP's clustering keeps original position ids, as every
strategy); the ``litelvlm`` method (csp/methods/litelvlm.py) is where its own order is offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csp.strategies.base import ClusteringInputs, ClusteringStrategy, register_strategy

#: What ``queries`` may be: ``one`` (each sample's own expression) or ``image`` (every query of the
#: image, as its evaluation passes ``questions_list[0]``, infer_and_evaluate.py L127, L174).
QUERY_MODES = ("one", "image")


def check_queries(owner: str, queries: str) -> None:
    if queries not in QUERY_MODES:
        raise ValueError(f"{owner}.queries must be one of {QUERY_MODES}, got {queries!r}")


def texts_for(owner: str, inputs: ClusteringInputs, queries: str) -> list[list[str]]:
    """Per sample its list of query texts."""
    if inputs.texts is None:
        raise ValueError(f"{owner} needs the query texts (ClusteringInputs.texts); this caller gave none")
    if queries == "one":
        return [[t] for t in inputs.texts]
    every = list(inputs.image_texts or inputs.texts)
    return [every for _ in inputs.texts]


@register_strategy("litelvlm")
@dataclass
class LiteLvlmStrategy(ClusteringStrategy):
    """``clip``: a full CLIP directory (text tower included; for LISA its ``clip-vit-large-patch14``) or
    the toy text side; ``text_side``: an already built ``csp.litelvlm.ClipTextSide`` (tests)."""

    clip: str | None = None
    queries: str = "one"
    text_side: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_queries("litelvlm", self.queries)
        if self.text_side is None and self.clip is None:
            raise ValueError("litelvlm needs clustering_kwargs.clip: a full CLIP directory with its text tower "
                             "(LISA: the clip-vit-large-patch14 directory)")
        if self.text_side is None:
            from csp.litelvlm import check_text_side_dir

            check_text_side_dir(self.clip)

    def side(self):
        from csp.litelvlm import ClipTextSide

        if self.text_side is None:
            self.text_side = ClipTextSide.from_dir(self.clip)
        return self.text_side

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        from csp.litelvlm import litelvlm_select

        vision = inputs.vision
        if vision is None:
            raise ValueError("litelvlm needs CLIP's hidden states (ClusteringInputs.vision); this caller gave none")
        side = self.side().to(inputs.features.device)
        picked = litelvlm_select(side, vision.layers, vision.hidden_states, vision.select_layer,
                                 texts_for("litelvlm", inputs, self.queries), num_keep)
        return picked.sort(dim=1).values.to(inputs.features.device)
