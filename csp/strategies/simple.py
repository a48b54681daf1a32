"""Strategies that need nothing beyond the token grid: uniform (eq. 2) and random."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csp.strategies.base import (
    ClusteringInputs,
    ClusteringStrategy,
    register_strategy,
    sample_generator,
    topk_sorted,
    uniform_indices,
)


@register_strategy("uniform")
@dataclass
class UniformStrategy(ClusteringStrategy):
    """S[i] = i * floor(N / Nc), i = 0..Nc-1 (eq. 2)."""

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        row = uniform_indices(inputs.num_tokens, num_keep)
        return row.unsqueeze(0).expand(inputs.batch_size, -1).to(inputs.features.device)


@register_strategy("random")
@dataclass
class RandomStrategy(ClusteringStrategy):
    """Nc distinct indices drawn from a generator seeded by (seed, sample id)."""

    seed: int = 0

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        rows = []
        for sample_id in inputs.sample_ids:
            gen = sample_generator(self.seed, sample_id)
            rows.append(torch.randperm(inputs.num_tokens, generator=gen)[:num_keep].sort().values)
        return torch.stack(rows).to(inputs.features.device)


@register_strategy("cls_attention")
@dataclass
class ClsAttentionStrategy(ClusteringStrategy):
    """TopK of the head-averaged softmax(q_cls . K_img / sqrt(d)) of one CLIP layer (eq. 3).

    ``layer`` indexes CLIP's encoder layers like Python lists (-1 = last, the paper's choice).
    """

    layer: int = -1

    def __post_init__(self) -> None:
        self.cls_attention_layer = self.layer

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        if inputs.cls_attention is None:
            raise RuntimeError("cls_attention strategy needs the CLS attention row of the vision tower")
        return topk_sorted(inputs.cls_attention.float(), num_keep)
