"""LiteLVLM (sejong-rcv/LiteLVLM, ICML 2026): text-guided selection before the LLM (csp/litelvlm.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from csp.methods.base import Method, ReducedImages, VisionFeatures, check_int, register_method
from csp.plan import TokenPlan
from csp.strategies import ClusteringInputs
from csp.strategies.text_guided import check_queries

ORDERS = ("authors", "raster")


@register_method("litelvlm")
@dataclass
class LiteLvlm(Method):
    """``keep`` (its ``num_retain_tokens``) image tokens chosen by LiteLVLM's rule (csp/litelvlm.py) from
    the query (``queries: one``: the sample's expression; ``image``: every query of the image, as its
    evaluation passes them) and the image.

    ``order: authors`` (default, its code): the kept features fill the image slot contiguously in its
    order [context, low-similarity] (clip_encoder.py L164-172), position ids contiguous (the LLM sees a
    shorter sequence). ``order: raster``: the kept grid tokens in raster order with their ORIGINAL
    position ids (as CSP's clustering keeps them). ``clip``: a full CLIP directory with its text tower
    (LISA: ``clip-vit-large-patch14``) or the toy text side.
    """

    keep: int = 64
    order: str = "authors"
    queries: str = "one"
    clip: str | None = None
    text_side: object = field(default=None, repr=False)

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("litelvlm", "keep", self.keep, 1)
        if self.keep > num_image_tokens:
            raise ValueError(f"litelvlm.keep = {self.keep} exceeds the N = {num_image_tokens} image tokens")
        if self.order not in ORDERS:
            raise ValueError(f"litelvlm.order must be one of {ORDERS}, got {self.order!r}")
        check_queries("litelvlm", self.queries)

    def check(self) -> None:
        self.validate(1, self.keep)
        if self.text_side is None and self.clip is None:
            raise ValueError("litelvlm needs method.clip: a full CLIP directory with its text tower (LISA: the "
                             "clip-vit-large-patch14 directory)")
        if self.clip is not None and self.text_side is None:
            from csp.litelvlm import check_text_side_dir

            check_text_side_dir(self.clip)

    def check_model(self, model) -> None:
        if self.clip is not None and self.text_side is None:
            from csp.litelvlm import check_text_side_pairs

            check_text_side_pairs(self.clip, model.get("vision_tower"))

    @property
    def per_query_reduction(self) -> bool:  # type: ignore[override]
        return self.order == "authors"

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        if self.order == "raster":
            return TokenPlan(input_keep=True, input_stage="selection")
        return TokenPlan(input_stage="selection")

    def input_tokens(self, num_image_tokens: int) -> int | None:
        return self.keep if self.order == "authors" else num_image_tokens

    def image_tokens_per_layer(self, num_layers: int, num_image_tokens: int) -> list[int] | None:
        return [self.keep] * num_layers

    def side(self):
        from csp.litelvlm import ClipTextSide

        if self.text_side is None:
            self.text_side = ClipTextSide.from_dir(self.clip)
        return self.text_side

    def _texts(self, texts: Sequence[str], image_texts: Sequence[str] | None) -> list[list[str]]:
        if self.queries == "one":
            return [[t] for t in texts]
        every = list(image_texts or texts)
        return [every for _ in texts]

    def retained(self, vision: VisionFeatures, texts: Sequence[str],
                 image_texts: Sequence[str] | None = None) -> torch.Tensor:
        """``B x keep`` grid indices in its order, one row per query text."""
        from csp.litelvlm import litelvlm_select

        device = vision.features.device
        side = self.side().to(device)
        return litelvlm_select(side, vision.layers, vision.hidden_states, vision.select_layer,
                               self._texts(texts, image_texts), self.keep).to(device)

    def select_input(self, inputs: ClusteringInputs) -> torch.Tensor | None:
        if self.order != "raster":
            return None
        if inputs.texts is None or inputs.vision is None:
            raise ValueError("litelvlm needs the query texts and CLIP's hidden states (ClusteringInputs.texts, .vision)")
        return self.retained(inputs.vision, inputs.texts, inputs.image_texts).sort(dim=1).values

    def reduce_queries(self, vision: VisionFeatures, texts: Sequence[str],
                       image_texts: Sequence[str] | None = None) -> ReducedImages | None:
        """Per query, the kept patch features (layer ``select_layer``) in its order (``order: authors``)."""
        if self.order != "authors":
            return None
        order = self.retained(vision, texts, image_texts)  # B x keep
        patches = vision.features[:, 1:]
        patches = patches.expand(order.shape[0], -1, -1) if patches.shape[0] == 1 else patches
        features = patches.gather(1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return ReducedImages(features=features, source=order, valid=torch.ones_like(order, dtype=torch.bool))
