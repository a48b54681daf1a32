"""PruMerge and PruMerge+ (42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py):
CLS-attention selection and merging between CLIP and the projector (see docs/baselines.md for the
lines each rule follows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csp.methods.base import Method, ReducedImages, VisionFeatures, check_int, register_method
from csp.plan import TokenPlan

#: Nearest neighbours (by key cosine similarity) merged into each kept token.
NEIGHBOURS = 32


def last_layer_cls_attention(vision: VisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(``B x N`` CLS attention, ``B x N x C`` keys) of CLIP's LAST layer as PruMerge computes them:
    ONE head over the full width, ``softmax(q_cls . k^T / sqrt(C))`` over all 1 + N keys, columns 1:."""
    layer = vision.layers[-1]
    x = layer.layer_norm1(vision.layer_input(-1))
    q = layer.self_attn.q_proj(x[:, :1]).float()
    k = layer.self_attn.k_proj(x).float()
    attn = (q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])).softmax(dim=-1)  # B x 1 x (1 + N)
    return attn[:, 0, 1:], k[:, 1:]


def iqr_keep_counts(attention: torch.Tensor) -> torch.Tensor:
    """PruMerge's count per sample: ``int(N * ratio)`` with ratio the share of CLS-attention values
    above ``Q3 + 1.5 (Q3 - Q1)`` (quartiles with linear interpolation, as numpy's percentile)."""
    values = attention.float()
    q1, q3 = torch.quantile(values, 0.25, dim=1), torch.quantile(values, 0.75, dim=1)
    upper = q3 + 1.5 * (q3 - q1)
    outliers = (values > upper[:, None]).sum(dim=1)
    n = values.shape[1]
    return (outliers.double() / n * n).floor().long()


def merge(features: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, kept: torch.Tensor) -> ReducedImages:
    """Merge into the kept tokens and append one extra token.

    ``features`` ``B x N x C`` (layer -2, no CLS), ``keys`` ``B x N x C'`` (last layer), ``attention``
    ``B x N`` (CLS), ``kept`` ``B x N`` bool. Each kept token i becomes ``x_i + sum_j a_j x_j`` over the
    32 tokens j != i (kept or not) nearest to it by key cosine similarity, itself excluded as in its
    code (clip_encoder.py L141-164: ``rest`` is every token but i; all N - 1 where N <= 32); the extra
    token is ``sum over pruned j of a_j x_j`` (L168). Kept tokens in spatial (ascending) order, then
    the extra one (its code: attention order; see docs/baselines.md).
    """
    batch, n, width = features.shape
    x = features.float()
    a = attention.float()
    normed = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = normed @ normed.transpose(1, 2)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf"))  # not itself
    near = sim.topk(min(NEIGHBOURS, n - 1), dim=-1).indices  # B x N x 32
    gathered = x.gather(1, near.reshape(batch, -1, 1).expand(-1, -1, width)).view(batch, n, -1, width)
    merged = x + (gathered * a.gather(1, near.reshape(batch, -1)).view(batch, n, -1, 1)).sum(dim=2)
    extra = ((~kept).float() * a).unsqueeze(-1).mul(x).sum(dim=1, keepdim=True)  # B x 1 x C
    counts = kept.sum(dim=1)
    size = int(counts.max()) + 1
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices[:, : size - 1]
    slot = torch.arange(size - 1, device=x.device)
    valid_kept = slot < counts[:, None]
    out = merged.gather(1, order.unsqueeze(-1).expand(-1, -1, width))
    # the extra token goes right after each sample's kept tokens
    feats = torch.cat([out, torch.zeros_like(out[:, :1])], dim=1)
    feats[torch.arange(batch, device=x.device), counts] = extra[:, 0]
    source = torch.cat([torch.where(valid_kept, order, -1), torch.full_like(order[:, :1], -1)], dim=1)
    valid = torch.arange(size, device=x.device) <= counts[:, None]
    feats = feats.masked_fill(~valid[..., None], 0.0)
    return ReducedImages(features=feats.to(features.dtype), source=source, valid=valid)


def top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``B x N`` True on each sample's ``counts[b]`` highest scores."""
    ranks = scores.float().argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return ranks < counts[:, None]


@register_method("prumerge")
@dataclass
class PruMerge(Method):
    """``keep``: ``iqr`` (its rule, a per-image count) or a fixed number of kept tokens (the tables'
    presets); one extra token is appended. Position ids are contiguous (the shorter sequence LLaVA
    builds from fewer image features)."""

    keep: int | str = "iqr"

    def _check(self, num_image_tokens: int) -> None:
        if self.keep == "iqr":
            return
        check_int(self.name, "keep", self.keep, 1)
        if self.keep > num_image_tokens:
            raise ValueError(f"{self.name}.keep = {self.keep} exceeds the N = {num_image_tokens} image tokens")

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        self._check(num_image_tokens)

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        return TokenPlan(input_stage="merging", num_extra=1)

    def counts(self, attention: torch.Tensor) -> torch.Tensor:
        """Kept tokens per sample (``B``)."""
        if self.keep == "iqr":
            return iqr_keep_counts(attention).clamp(min=1)
        return torch.full((attention.shape[0],), int(self.keep), dtype=torch.long, device=attention.device)

    def kept_mask(self, attention: torch.Tensor) -> torch.Tensor:
        return top_mask(attention, self.counts(attention))

    def reduce_images(self, vision: VisionFeatures) -> ReducedImages:
        attention, keys = last_layer_cls_attention(vision)
        self._check(attention.shape[1])
        return merge(vision.features[:, 1:], keys, attention, self.kept_mask(attention))

    def input_tokens(self, num_image_tokens: int) -> int | None:
        return None if self.keep == "iqr" else int(self.keep) + 1

    def data_dependent(self) -> str | None:
        return "keep=iqr: the IQR outlier count of each image's CLS attention" if self.keep == "iqr" else None


@register_method("prumerge_plus")
@dataclass
class PruMergePlus(PruMerge):
    """PruMerge's selection (IQR, or a fixed ``keep``) plus spatially uniform samples, as its
    ``token_prune_merge_advanced_plus`` (clip_encoder.py L203-214, the ``if_adaptive`` branch its
    ``forward`` runs, L300): with ``ratio = kept / N`` (a float, as its L46), ``step = int(1 / ratio)``,
    indices ``arange(0, N - 1, int(step / 3))`` (its literal 575 = N - 1 at N = 576) not already kept
    are added; then the same merge. A fixed ``keep`` sets the ratio (``keep / N``) and through it the
    spacing, so one knob reaches the budget as its rule does.

    ``stride`` (default None: its rule) overrides the spacing: an exploration knob, not its code.
    """

    stride: int | None = None

    def _check(self, num_image_tokens: int) -> None:
        super()._check(num_image_tokens)
        if self.stride is not None:
            check_int(self.name, "stride", self.stride, 1)
        elif self.keep != "iqr" and int(num_image_tokens / int(self.keep)) < 3:
            # int(step / 3) = 0: its torch.arange(0, 575, 0) raises
            raise ValueError(f"{self.name}.keep = {self.keep} of N = {num_image_tokens}: its rule's spacing "
                             f"int(int(N / keep) / 3) is 0 (keep must be <= N / 3)")

    def spacing(self, counts: torch.Tensor, n: int) -> torch.Tensor:
        """``B`` spacing of the uniform samples: ``int(int(1 / ratio) / 3)``, ``ratio = counts / n``
        in float64 (its Python floats), or ``stride``."""
        if self.stride is not None:
            return torch.full_like(counts, self.stride)
        ratio = counts.double() / n
        step = (1.0 / ratio).floor()
        return (step / 3).floor().long().clamp(min=1)

    def kept_mask(self, attention: torch.Tensor) -> torch.Tensor:
        counts = self.counts(attention)
        kept = top_mask(attention, counts)
        n = attention.shape[1]
        cols = torch.arange(n, device=attention.device)
        stride = self.spacing(counts, n)
        uniform = (cols[None, :] < n - 1) & (cols[None, :] % stride[:, None] == 0)
        return kept | uniform

    def input_tokens(self, num_image_tokens: int) -> int | None:
        return None

    def data_dependent(self) -> str | None:
        return "the uniform samples that are not already kept: the count depends on their overlap per image"

    def count_range(self, num_layers: int, num_image_tokens: int) -> tuple[list[int], list[int]] | None:
        """Per-layer image tokens with full and with no overlap (fixed ``keep`` only; +1 extra token)."""
        if self.keep == "iqr":
            return None
        n, k = num_image_tokens, int(self.keep)
        stride = int(self.spacing(torch.tensor([k]), n)[0])
        uniform = len(range(0, n - 1, stride))
        return [max(k, uniform) + 1] * num_layers, [min(n, k + uniform) + 1] * num_layers
