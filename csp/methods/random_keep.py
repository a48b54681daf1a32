"""``random_keep``: a control, not a published method. Inside the LLM at ``layer``, keep a uniformly
random subset of ``keep`` image tokens, seeded per sample.

On a model that reads its image tokens it must lose clearly against every method that chooses its
tokens; it is the sanity row of the toy table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csp.methods.base import Method, check_int, register_method
from csp.plan import Prune, TokenPlan, TopK
from csp.scorers import ScoreContext, Scorer


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 that has its bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic; ``>>`` is arithmetic on int64,
    a fixed, deterministic variant of the logical shift)."""
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    return x ^ (x >> 31)


@dataclass(frozen=True)
class SeededRandomScores(Scorer):
    """Uniform random scores per image token, a pure function of ``(seed, the sample, the grid index)``.

    A sample is identified by its layer-0 embeddings (the float32 bits of every row of its prompt, image
    and text, up to the last prompt row; the answer rows are left out so that evaluation's teacher forcing
    and chat's prefill draw the same subset), hashed with integer arithmetic on the device (exact, so the same in any batch and with any
    padding; no host read). The score of grid index g is a SplitMix64 hash of (sample key, g), so the
    kept subset is uniform over the subsets of its size and depends on the sample only.
    """

    seed: int = 0

    def sample_keys(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``B x T x d`` layer-0 embeddings, ``B x T`` validity -> ``B`` int64 keys."""
        bits = embeds.detach().float().contiguous().view(torch.int32).long()  # B x T x d
        _, length, width = bits.shape
        index = torch.arange(length * width, device=bits.device).view(length, width)
        weights = mix64(index * _GOLDEN + self.seed)
        return (bits * weights * valid[:, :, None]).sum(dim=(1, 2))  # int64 sums wrap: order-independent

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        inputs = ctx.inputs
        rows = inputs.valid
        if inputs.last_rows is not None:  # the prompt only: teacher forcing and chat's prefill draw alike
            cols = torch.arange(rows.shape[1], device=rows.device)
            rows = rows & (cols <= inputs.last_rows[:, :1])
        keys = self.sample_keys(inputs.embeds, rows)  # B
        grid = ctx.state.source.clamp(min=0)  # B x T grid index of each active row (-1 off the grid)
        hashed = mix64(mix64(keys[:, None] + (grid + 1) * _GOLDEN))
        scores = (hashed & ((1 << 53) - 1)).double() / float(1 << 53)  # uniform in [0, 1)
        return scores.masked_fill(~ctx.state.is_image, float("-inf"))


@register_method("random_keep")
@dataclass
class RandomKeep(Method):
    """From ``layer`` on keep ``keep`` image tokens drawn uniformly at random (seed ``seed``, per sample);
    layers ``0..layer-1`` see all N. Original position ids are kept."""

    layer: int = 2
    keep: int = 64
    seed: int = 0

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        check_int("random_keep", "layer", self.layer, 0)
        check_int("random_keep", "keep", self.keep, 1)
        check_int("random_keep", "seed", self.seed, 0)
        if self.layer >= num_layers:
            raise ValueError(f"random_keep.layer = {self.layer}: the model has layers 0..{num_layers - 1}")
        if self.keep > num_image_tokens:
            raise ValueError(f"random_keep.keep = {self.keep} exceeds the N = {num_image_tokens} image tokens")

    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        self.validate(num_layers, num_image_tokens)
        prune = Prune(layer=self.layer, score_layer=max(self.layer - 1, 0), scorer=SeededRandomScores(self.seed),
                      keep=TopK(self.keep))
        return TokenPlan(events=(prune,))
