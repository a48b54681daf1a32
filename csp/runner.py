"""The stage runner: drives the LLaMA decoder layers through a method's per-layer token plan.

With no method it is a plain decoder loop (own causal mask, own rotary for the actual position
ids) that equals ``LlamaModel.forward``. With a method it executes the method's
:class:`~csp.plan.TokenPlan`: keep an input set before layer 0, put every token back
(:class:`~csp.plan.Scatter`), or score-and-keep (:class:`~csp.plan.Prune`); tokens that leave are
removed physically and every token keeps its original position id.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import Cache, LlamaModel

from csp.accounting import TokenRecord
from csp.methods import Method
from csp.methods.lvlm_csp import LvlmCsp
from csp.plan import Prune, Scatter, TokenPlan
from csp.schedule import StageSchedule
from csp.scorers import ScoreContext
from csp.tokens import KeptImageTokens, TokenState, attention_mask, grid_indices

#: Attention implementations the runner can drive: it passes boolean ``B x 1 x T x T`` masks
#: (True = attend) or ``None`` for "causal, nothing padded", which only SDPA reads so.
SUPPORTED_ATTENTION = ("sdpa",)
#: What the other implementations would do with them (for the error message).
_MISREAD = {
    "eager": "adds the mask to the scores (a boolean mask shifts them by 1, None applies no causal mask)",
    "flash_attention_2": "expects a B x T padding mask, not a B x 1 x T x T boolean one",
    "flash_attention_3": "expects a B x T padding mask, not a B x 1 x T x T boolean one",
    "flex_attention": "expects a BlockMask",
}


def check_attention_implementation(llm: LlamaModel) -> None:
    """Raise ``ValueError`` unless ``llm`` runs SDPA attention (see :data:`SUPPORTED_ATTENTION`)."""
    found = getattr(llm.config, "_attn_implementation", None)
    if found in SUPPORTED_ATTENTION:
        return
    why = _MISREAD.get(str(found), "does not read a boolean mask / None as SDPA does")
    raise ValueError(
        f"StageRunner needs attention implementation {' or '.join(map(repr, SUPPORTED_ATTENTION))}, "
        f"but the model's config._attn_implementation is {found!r}, which {why}. Load the model with "
        "attn_implementation='sdpa' (or set config._attn_implementation = 'sdpa' before building it)."
    )


@dataclass
class DecoderInputs:
    """A right-padded batch of full sequences ``sys | img | usr | out``.

    Attributes:
        embeds: ``B x T x d`` layer-0 embeddings (image rows hold the projector output).
        valid: ``B x T`` False on padding.
        is_image: ``B x T`` True on the image-slot rows (N grid tokens, or a reducer's M tokens).
        query_rows: ``B x Q`` rows whose attention ranks image tokens for CSP's pruning (the token
            before each [SEG]; at prefill, the last prompt token).
        query_valid: ``B x Q`` False on padded query slots.
        cluster_keep: ``B x K`` grid indices kept before layer 0 (CSP's clustering), or None.
        last_rows: ``B x 1`` the last prompt row (the token before the answer), which FastV,
            PyramidDrop and FEATHER rank by and which bounds the instruction text; None if unknown.
        source: ``B x T`` grid index of each image row, -1 for rows not on the grid; None: the
            image rows are the N grid tokens in order.
    """

    embeds: torch.Tensor
    valid: torch.Tensor
    is_image: torch.Tensor
    query_rows: torch.Tensor
    query_valid: torch.Tensor
    cluster_keep: torch.Tensor | None = None
    last_rows: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass
class DecoderOutput:
    """Final-norm hidden states of the tokens active in the last layer, plus what ran where.

    ``kept_image_tokens``: one entry for the image tokens entering layer 0, then one each time the
    active image set changes (see :class:`~csp.tokens.KeptImageTokens`).
    """

    state: TokenState
    records: list[TokenRecord]
    layer_key_valid: list[torch.Tensor] = field(default_factory=list)
    kept_image_tokens: list[KeptImageTokens] = field(default_factory=list)

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


def image_keep_mask(is_image: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``B x T`` True on text rows and on the image rows whose grid index is in ``keep`` (``B x K``)."""
    chosen = torch.zeros(is_image.shape[0], is_image.shape[1] + 1, dtype=torch.bool, device=is_image.device)
    chosen.scatter_(1, keep, True)  # grid indices < N <= T
    picked = chosen.gather(1, source.clamp(min=0)) & is_image & (source >= 0)
    return ~is_image | picked


def as_method(method: Method | StageSchedule | None) -> Method | None:
    """A schedule is LVLM_CSP's config: wrap it; None stays plain LISA."""
    return LvlmCsp(method) if isinstance(method, StageSchedule) else method


class StageRunner:
    """Runs the decoder layers of ``llm`` under ``method`` (a Method, a CSP schedule, or None = plain).

    ``always_move_tokens``: execute every stage of the plan even where it keeps all tokens (so that
    tests can check the gather/scatter path against the plain loop).
    """

    def __init__(self, llm: LlamaModel, method: Method | StageSchedule | None, num_image_tokens: int,
                 *, always_move_tokens: bool = False):
        check_attention_implementation(llm)
        self.llm = llm
        self.method = as_method(method)
        self.num_layers = len(llm.layers)
        self.num_image_tokens = num_image_tokens
        if self.method is None:
            self.plan = TokenPlan()
        else:
            self.method.validate(self.num_layers, num_image_tokens)
            self.plan = self.method.plan(self.num_layers, num_image_tokens, always_move_tokens=always_move_tokens)
        self.plan.validate(self.num_layers)

    @property
    def schedule(self) -> StageSchedule | None:
        """CSP's schedule when the method is LVLM_CSP (for callers that report it)."""
        return self.method.schedule if isinstance(self.method, LvlmCsp) else None

    # -- running --------------------------------------------------------------------------
    def forward(self, inputs: DecoderInputs, cache: Cache | None = None) -> DecoderOutput:
        """Prefill / teacher-forced pass over the full sequences."""
        plan = self.plan
        full = TokenState.full(inputs.embeds, inputs.valid, inputs.is_image, inputs.source)
        state = replace(full)  # layers overwrite state.hidden; full keeps layer-0 embeddings
        if plan.input_keep:
            if inputs.cluster_keep is None:
                raise ValueError("the method keeps an input set (clustering) but no cluster indices were given")
            state = full.select(image_keep_mask(full.is_image, full.source, inputs.cluster_keep))
        counts, key_valid, kept = [], [], []
        mask, rotary, stage_counts = self._prepare(state)
        pending: torch.Tensor | None = None  # scores ranked by the previous layer for this layer's event
        for idx, layer in enumerate(self.llm.layers):
            event = plan.at(idx)
            if isinstance(event, Scatter):
                state = state.scatter_into(full)
            elif isinstance(event, Prune):
                scores = pending if event.score_layer < idx else self._score(event, layer, state, rotary, inputs)
                state = state.select(~state.is_image | event.keep.keep(scores, state.is_image, state.source))
            if event is not None:
                mask, rotary, stage_counts = self._prepare(state)
            if idx == 0 or event is not None:
                stage = event.stage if event is not None else plan.input_stage
                kept.append((stage, idx, *grid_indices(state)))
            ahead = plan.scored_before(idx)
            pending = self._score(ahead, layer, state, rotary, inputs) if ahead is not None else None
            counts.append(stage_counts)
            key_valid.append(state.valid)
            state.hidden = layer(
                state.hidden, attention_mask=mask, position_ids=state.positions,
                past_key_values=cache, use_cache=cache is not None, position_embeddings=rotary,
            )
        state.hidden = self.llm.norm(state.hidden)
        records, widths = _records(counts, [k[3] for k in kept])
        kept_tokens = [KeptImageTokens(stage, first, indices[:, :w], plan.num_extra)
                       for (stage, first, indices, _), w in zip(kept, widths, strict=True)]
        return DecoderOutput(state=state, records=records, layer_key_valid=key_valid, kept_image_tokens=kept_tokens)

    def decode(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Cache, keys: CachedKeyMasks) -> torch.Tensor:
        """One generation step: ``B x 1 x d`` new-token embeddings at original ``B x 1`` positions.

        Every layer attends to its own (possibly reduced) KV cache.
        """
        rotary = self.llm.rotary_emb(hidden, position_ids=positions)
        for idx, layer in enumerate(self.llm.layers):
            mask = keys.step(idx)
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, position_embeddings=rotary,
            )
        return self.llm.norm(hidden)

    def _score(self, event: Prune, layer: torch.nn.Module, state: TokenState,
               rotary: tuple[torch.Tensor, torch.Tensor], inputs: DecoderInputs) -> torch.Tensor:
        return event.scorer.score(ScoreContext(layer=layer, hidden=state.hidden, rotary=rotary, state=state,
                                               inputs=inputs))

    def _prepare(
        self, state: TokenState
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """What every layer of a stage shares: mask, rotary (cos, sin) and the token counts."""
        rotary = self.llm.rotary_emb(state.hidden, position_ids=state.positions)
        return attention_mask(state.valid), rotary, state.counts()


def _records(counts: list[tuple[torch.Tensor, torch.Tensor]],
             kept_counts: list[torch.Tensor]) -> tuple[list[TokenRecord], list[int]]:
    """Per-layer (image, total) counts -> one TokenRecord per sample, and the width of each kept-token
    entry (its largest per-sample count), in one host read."""
    image = torch.stack([c[0] for c in counts], dim=1)
    total = torch.stack([c[1] for c in counts], dim=1)
    widths = torch.stack([c.max() for c in kept_counts])
    image_l, total_l, widths_l = image.tolist(), total.tolist(), widths.tolist()
    return [TokenRecord(image_tokens=i, total_tokens=t) for i, t in zip(image_l, total_l)], widths_l
