"""VisionZip (dvlab-research/VisionZip): dominant tokens by CLS attention plus merged contextual
tokens, between CLIP and the projector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csp.methods.base import Method, ReducedImages, VisionFeatures, check_int, register_method
from csp.plan import TokenPlan


def layer_attention_and_keys(vision: VisionFeatures, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``B x H x (1+N) x (1+N)`` attention probabilities, ``B x H x (1+N) x D`` keys) of one CLIP layer,
    recomputed from its input with its own layer_norm1 and q/k projections."""
    layer = vision.layers[layer_index]
    attn = layer.self_attn
    x = layer.layer_norm1(vision.layer_input(layer_index))
    batch, length, width = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x).view(batch, length, heads, -1).transpose(1, 2).float()
    k = attn.k_proj(x).view(batch, length, heads, -1).transpose(1, 2).float()
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
    return probs, k


@register_method("visionzip")
@dataclass
class VisionZip(Method):
    """``dominant`` tokens (the CLS token and the top ``dominant - 1`` patches by CLS->patch attention
    of CLIP layer ``layer`` (-2), summed over heads; hidden states of that layer's output) and
    ``contextual`` tokens: among the other patches, targets sampled uniformly
    (``step = max(1, M // contextual)``, the first ``contextual``), every other one assigned to its
    most similar target (that layer's keys averaged over heads, L2-normalised), each contextual
    token = target + mean(assigned). Order: dominant (CLS, then patches ascending), then contextual;
    position ids contiguous. CLS and contextual tokens are not on the grid (``num_extra``)."""

    dominant: int = 54
    contextual: int = 10
    layer: int = -2

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("visionzip", "dominant", self.dominant, 1)
        check_int("visionzip", "contextual", self.contextual, 0)
        if self.dominant - 1 + self.contextual > num_image_tokens:
            raise ValueError(f"visionzip: dominant - 1 + contextual = {self.dominant - 1 + self.contextual} "
                             f"exceeds the N = {num_image_tokens} patches")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        return TokenPlan(input_stage="merging", num_extra=1 + self.contextual)

    def input_tokens(self, num_image_tokens: int) -> int | None:
        return self.dominant + self.contextual

    def reduce_images(self, vision: VisionFeatures) -> ReducedImages:
        probs, keys = layer_attention_and_keys(vision, self.layer)
        hidden = vision.hidden_states[self.layer].float()  # output of that layer = LLaVA's features
        batch, length, width = hidden.shape
        n = length - 1
        self.validate(0, n)
        cls_to_patch = probs[:, :, 0, 1:].sum(dim=1)  # B x N
        top = cls_to_patch.topk(self.dominant - 1, dim=1).indices.sort(dim=1).values  # B x (dominant-1)
        dominant = torch.cat([hidden[:, :1], hidden[:, 1:].gather(1, top.unsqueeze(-1).expand(-1, -1, width))], dim=1)
        chosen = torch.zeros(batch, n, dtype=torch.bool, device=hidden.device).scatter(1, top, True)
        rest = torch.sort(chosen.to(torch.uint8), dim=1, stable=True).indices[:, : n - (self.dominant - 1)]  # B x M
        parts = [dominant]
        if self.contextual > 0:
            parts.append(self._contextual(hidden[:, 1:], keys.mean(dim=1)[:, 1:], rest))
        features = torch.cat(parts, dim=1).to(vision.features.dtype)
        source = torch.cat([torch.full_like(top[:, :1], -1), top,
                            torch.full((batch, self.contextual), -1, dtype=torch.long, device=top.device)], dim=1)
        return ReducedImages(features=features, source=source, valid=torch.ones_like(source, dtype=torch.bool))

    def _contextual(self, patches: torch.Tensor, metric: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """``B x contextual x C`` merged tokens from the remaining patches ``rest`` (``B x M``, ascending)."""
        width = patches.shape[-1]
        m = rest.shape[1]
        step = max(1, m // self.contextual)
        target_slots = torch.arange(0, m, step, device=rest.device)[: self.contextual]
        is_target = torch.zeros(m, dtype=torch.bool, device=rest.device)
        is_target[target_slots] = True
        x = patches.gather(1, rest.unsqueeze(-1).expand(-1, -1, width))  # B x M x C
        key = metric.gather(1, rest.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
        key = torch.nn.functional.normalize(key, dim=-1)
        targets, others = x[:, is_target], x[:, ~is_target]
        sim = key[:, ~is_target] @ key[:, is_target].transpose(1, 2)  # B x (M - c) x c
        assign = torch.nn.functional.one_hot(sim.argmax(dim=-1), targets.shape[1]).float()  # B x (M - c) x c
        total = assign.transpose(1, 2) @ others  # B x c x C
        count = assign.sum(dim=1).unsqueeze(-1)
        return targets + total / count.clamp(min=1)
