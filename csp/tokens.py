"""The set of tokens a decoder layer processes, per sample, and the moves between stages.

Tokens are physically gathered (right-padded per batch); every token carries its ORIGINAL
position id, which is also its row in the full ``sys | img | usr | out`` sequence, and its
``source``: its index on the image grid (0..N-1), or -1 for text and for image-slot tokens that are
not on the grid (merged "extra" tokens of PruMerge, VisionZip's CLS and contextual tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenState:
    """Active tokens of a batch.

    Attributes:
        hidden: ``B x T x d`` hidden states.
        positions: ``B x T`` original position ids (rows of the full sequence); 0 on padding.
        valid: ``B x T`` False on right padding.
        is_image: ``B x T`` True on image tokens.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    is_image: torch.Tensor
    source: torch.Tensor

    @classmethod
    def full(cls, embeds: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor,
             source: torch.Tensor | None = None) -> TokenState:
        """All rows of a batch; ``source`` (``B x T``) defaults to the rank among the image rows."""
        batch, length = valid.shape
        positions = torch.arange(length, device=embeds.device).expand(batch, length)
        is_image = is_image & valid
        if source is None:
            source = torch.where(is_image, is_image.long().cumsum(dim=1) - 1, -1)
        return cls(embeds, positions * valid, valid, is_image, source.masked_fill(~is_image, -1))

    def select(self, keep: torch.Tensor) -> TokenState:
        """Keep the tokens where ``keep`` (``B x T``) is True, in order, re-padded on the right."""
        keep = keep & self.valid
        counts = keep.sum(dim=1)
        length = int(counts.max())
        # A stable sort of ~keep lists the kept columns first, in their original order.
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :length]
        valid = torch.arange(length, device=keep.device) < counts.unsqueeze(1)
        hidden = self.hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1]))
        return TokenState(
            hidden=hidden,
            positions=self.positions.gather(1, order) * valid,
            valid=valid,
            is_image=self.is_image.gather(1, order) & valid,
            source=self.source.gather(1, order).masked_fill(~valid, -1),
        )

    def scatter_into(self, full: TokenState) -> TokenState:
        """``full`` with this state's hidden states written back at their original rows (eq. 7)."""
        hidden = full.hidden.clone()
        rows = self.valid.nonzero(as_tuple=True)
        hidden[rows[0], self.positions[rows]] = self.hidden[rows]
        return TokenState(hidden, full.positions, full.valid, full.is_image, full.source)

    def rows_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Column index of each original position ``B x Q`` in this state (must be present)."""
        match = (self.positions.unsqueeze(2) == positions.unsqueeze(1)) & self.valid.unsqueeze(2)
        if not bool(match.any(dim=1).all()):
            raise RuntimeError("a requested position is not among the active tokens")
        return match.to(torch.uint8).argmax(dim=1)

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens, total tokens) per sample, ``B`` each."""
        return self.is_image.sum(dim=1), self.valid.sum(dim=1)


@dataclass
class KeptImageTokens:
    """Which grid image tokens are active from layer ``first_layer`` on (until the next entry).

    Attributes:
        stage: what produced this set: ``input`` (no reduction), ``clustering``, ``scattering``,
            ``pruning``, or the method's own stage name (e.g. ``merging`` for PruMerge/VisionZip).
        first_layer: the first decoder layer that processes this set.
        indices: ``B x K`` long, indices into the N image tokens of the ORIGINAL image grid,
            ascending per sample, padded with -1 where a sample keeps fewer; on the model's device.
            For merged-token methods (PruMerge, PruMerge+, VisionZip) these are the kept
            (merged-into) grid tokens; tokens not on the grid are not listed.
        num_extra: image-slot tokens per sample that are not on the grid (PruMerge's one extra
            token, VisionZip's CLS and contextual tokens); 0 for selection-only methods.
    """

    stage: str
    first_layer: int
    indices: torch.Tensor
    num_extra: int = 0


def grid_indices(state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid indices of the active on-grid image tokens: (``B x T`` ascending, -1 padded; ``B`` counts).

    No host synchronisation: the caller trims the width to the largest count when it reads the
    counts anyway (the runner does it with the token records, once per forward).
    """
    on_grid = state.is_image & (state.source >= 0)
    big = torch.iinfo(torch.long).max
    ordered = torch.where(on_grid, state.source, big).sort(dim=1).values
    return ordered.masked_fill(ordered == big, -1), on_grid.sum(dim=1)


def attention_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """Causal mask in sequence order over valid keys, ``B x 1 x T x T`` bool (True = attend).

    ``None`` when nothing is padded, so SDPA may use its causal fast path. Padded query rows
    attend to themselves only (finite, ignored).
    """
    if bool(valid.all()):
        return None
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, None, :]
    return mask | torch.eye(length, dtype=torch.bool, device=valid.device)
