"""The stage runner: drives LLaMA decoder layers through clustering, scattering and pruning.

With no schedule it is a plain decoder loop (own causal mask, own rotary for the actual
position ids) that equals ``LlamaModel.forward``.

The masks it hands to the decoder layers are SDPA's: a boolean ``B x 1 x T x T`` mask (True =
attend), or ``None`` for "causal, nothing padded". Only the SDPA attention function reads them so:
eager attention *adds* the mask to the scores (a boolean True becomes +1, and ``None`` means no
causal mask at all), flash_attention_2 expects a ``B x T`` padding mask and flex attention a
``BlockMask``. A model with any other implementation is therefore refused at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import Cache, LlamaModel

from csp.accounting import TokenRecord
from csp.schedule import StageSchedule
from csp.scoring import seg_attention_scores, top_image_tokens
from csp.tokens import TokenState, attention_mask


@dataclass
class DecoderInputs:
    """A right-padded batch of full sequences ``sys | img | usr | out``.

    Attributes:
        embeds: ``B x T x d`` layer-0 embeddings (image rows hold the projector output).
        valid: ``B x T`` False on padding.
        is_image: ``B x T`` True on the N image rows.
        query_rows: ``B x Q`` rows whose attention ranks image tokens for pruning (the token
            before each [SEG]; at prefill, the last prompt token).
        query_valid: ``B x Q`` False on padded query slots.
        cluster_keep: ``B x Nc`` indices (into the N image tokens) chosen by clustering, or None.
    """

    embeds: torch.Tensor
    valid: torch.Tensor
    is_image: torch.Tensor
    query_rows: torch.Tensor
    query_valid: torch.Tensor
    cluster_keep: torch.Tensor | None = None


@dataclass
class DecoderOutput:
    """Final-norm hidden states of the tokens active in the last layer, plus what ran where."""

    state: TokenState
    records: list[TokenRecord]
    layer_key_valid: list[torch.Tensor] = field(default_factory=list)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states at original rows ``B x Q`` -> ``B x Q x d``."""
        cols = self.state.rows_of(positions)
        return self.state.hidden.gather(1, cols.unsqueeze(-1).expand(-1, -1, self.state.hidden.shape[-1]))


class CachedKeyMasks:
    """Which cached keys of each layer are real (not padding), for decoding.

    Layers whose prefill had no padding need no mask at all (SDPA's fast path); for the others
    the new token's key is appended each step. Decided once after prefill, so decoding adds no
    host synchronisation per layer.
    """

    def __init__(self, layer_key_valid: list[torch.Tensor]):
        self.valid: list[torch.Tensor | None] = [None if bool(v.all()) else v for v in layer_key_valid]

    def step(self, layer: int) -> torch.Tensor | None:
        """Append the new token's key and return the ``B x 1 x 1 x T`` mask (or None)."""
        valid = self.valid[layer]
        if valid is None:
            return None
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        self.valid[layer] = valid
        return valid[:, None, None, :]


def image_keep_mask(is_image: torch.Tensor, cluster_keep: torch.Tensor) -> torch.Tensor:
    """``B x T`` True on text rows and on the image rows listed in ``cluster_keep`` (``B x Nc``)."""
    image_rank = is_image.long().cumsum(dim=1) - 1  # index among the image tokens
    chosen = torch.zeros(is_image.shape[0], int(is_image.sum(dim=1).max()), dtype=torch.bool, device=is_image.device)
    chosen.scatter_(1, cluster_keep, True)
    picked = chosen.gather(1, image_rank.clamp(min=0)) & is_image
    return ~is_image | picked


#: ``config._attn_implementation`` values whose attention reads the runner's masks correctly.
SUPPORTED_ATTENTION = ("sdpa",)
#: What the other implementations would do with them (for the error message).
_MISREAD = {
    "eager": "adds the mask to the scores (a boolean mask shifts them by 1, None applies no causal mask)",
    "flash_attention_2": "expects a B x T padding mask, not a B x 1 x T x T boolean one",
    "flash_attention_3": "expects a B x T padding mask, not a B x 1 x T x T boolean one",
    "flex_attention": "expects a BlockMask",
}


def check_attention_implementation(llm: LlamaModel) -> None:
    """Raise ``ValueError`` unless ``llm`` runs SDPA attention (see the module docstring)."""
    found = getattr(llm.config, "_attn_implementation", None)
    if found in SUPPORTED_ATTENTION:
        return
    why = _MISREAD.get(str(found), "does not read a boolean mask / None as SDPA does")
    raise ValueError(
        f"StageRunner needs attention implementation {' or '.join(map(repr, SUPPORTED_ATTENTION))}, "
        f"but the model's config._attn_implementation is {found!r}, which {why}. Load the model with "
        "attn_implementation='sdpa' (or set config._attn_implementation = 'sdpa' before building it)."
    )


class StageRunner:
    """Runs the decoder layers of ``llm`` under ``schedule`` (None = plain LISA).

    ``force_stages``: run the gather at clustering, the scatter and the pruning selection even
    when the schedule keeps every token there (Nc = N, Np = N), so that tests can check that the
    select/scatter path is exact. By default a stage that keeps every token is skipped (the same
    result, without the copies). Clustering still needs ``cluster_keep`` (e.g. all N indices).
    """

    def __init__(self, llm: LlamaModel, schedule: StageSchedule | None, num_image_tokens: int,
                 *, force_stages: bool = False):
        check_attention_implementation(llm)
        self.llm = llm
        self.schedule = schedule
        self.num_layers = len(llm.layers)
        if schedule is not None:
            schedule.validate(self.num_layers, num_image_tokens)
        self.num_image_tokens = num_image_tokens
        self.force_stages = force_stages

    # -- which layer does what ------------------------------------------------------------
    def _clusters(self) -> bool:
        s = self.schedule
        if s is None:
            return False
        return s.Lc > 0 if self.force_stages else s.clusters(self.num_image_tokens)

    def _scatter_layer(self) -> int | None:
        s = self.schedule
        return s.Lc if self._clusters() and s.Ls > 0 else None

    def _score_layer(self) -> int | None:
        s = self.schedule
        if s is None:
            return None
        if self.force_stages:
            return s.Lc + s.Ls - 1 if s.Lp(self.num_layers) > 0 and s.Lc + s.Ls > 0 else None
        if not s.prunes(self.num_layers, self.num_image_tokens):
            return None
        return s.Lc + s.Ls - 1

    # -- running --------------------------------------------------------------------------
    def forward(self, inputs: DecoderInputs, cache: Cache | None = None) -> DecoderOutput:
        """Prefill / teacher-forced pass over the full sequences."""
        full = TokenState.full(inputs.embeds, inputs.valid, inputs.is_image)
        state = replace(full)  # layers overwrite state.hidden; full keeps layer-0 embeddings
        if self._clusters():
            if inputs.cluster_keep is None:
                raise ValueError("the schedule clusters but no cluster indices were given")
            state = full.select(image_keep_mask(full.is_image, inputs.cluster_keep))
        scatter_at, score_at = self._scatter_layer(), self._score_layer()
        counts, key_valid = [], []
        mask, rotary, stage_counts = self._prepare(state)
        for idx, layer in enumerate(self.llm.layers):
            if idx == scatter_at:
                state = state.scatter_into(full)
                mask, rotary, stage_counts = self._prepare(state)
            scores = None
            if idx == score_at:
                cols = state.rows_of(inputs.query_rows * inputs.query_valid)
                scores = seg_attention_scores(layer, state.hidden, rotary, state.valid, cols, inputs.query_valid)
            counts.append(stage_counts)
            key_valid.append(state.valid)
            state.hidden = layer(
                state.hidden, attention_mask=mask, position_ids=state.positions,
                past_key_values=cache, use_cache=cache is not None, position_embeddings=rotary,
            )
            if scores is not None:
                state = state.select(~state.is_image | top_image_tokens(scores, state.is_image, self.schedule.Np))
                mask, rotary, stage_counts = self._prepare(state)
        state.hidden = self.llm.norm(state.hidden)
        return DecoderOutput(state=state, records=_records(counts), layer_key_valid=key_valid)

    def decode(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Cache, keys: CachedKeyMasks) -> torch.Tensor:
        """One generation step: ``B x 1 x d`` new-token embeddings at original ``B x 1`` positions.

        Every layer attends to its own (possibly clustered or pruned) KV cache.
        """
        rotary = self.llm.rotary_emb(hidden, position_ids=positions)
        for idx, layer in enumerate(self.llm.layers):
            mask = keys.step(idx)
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, position_embeddings=rotary,
            )
        return self.llm.norm(hidden)

    def _prepare(
        self, state: TokenState
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """What every layer of a stage shares: mask, rotary (cos, sin) and the token counts."""
        rotary = self.llm.rotary_emb(state.hidden, position_ids=state.positions)
        return attention_mask(state.valid), rotary, state.counts()


def _records(counts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[TokenRecord]:
    """Per-layer (image, total) counts -> one TokenRecord per sample (one host sync)."""
    image = torch.stack([c[0] for c in counts], dim=1).tolist()
    total = torch.stack([c[1] for c in counts], dim=1).tolist()
    return [TokenRecord(image_tokens=i, total_tokens=t) for i, t in zip(image, total)]
