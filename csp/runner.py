"""The stage runner: drives the LLaMA decoder layers through a method's per-layer token plan.

With no method it is a plain decoder loop (own causal mask, own rotary for the actual position
ids) that equals ``LlamaModel.forward``. With a method it executes the method's
:class:`~csp.plan.TokenPlan`: keep an input set before layer 0, put every token back
(:class:`~csp.plan.Scatter`), or score-and-keep (:class:`~csp.plan.Prune`); tokens that leave are
removed physically and every token keeps its original position id, unless a ``Prune(renumber=True)``
renumbers the remaining ones contiguously (a baseline whose code does so: PyramidDrop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import Cache, LlamaModel

from csp.accounting import TokenRecord
from csp.methods import Method, as_method
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
        lengths: per-sample sequence lengths (``valid`` row sums) known on the host, e.g. from the
            prompts; with ``image_counts`` they let the runner size every stage without reading
            counts back from the device. None: read once from the device.
        image_counts: per-sample image-slot rows (``is_image`` row sums) known on the host.
        expression: ``B x T`` True on the rows of the user's expression (the referring phrase or
            sentence, without the prompt's fixed wording), which Simignore compares the image with;
            None: not known (Simignore then falls back to every instruction row).
    """

    embeds: torch.Tensor
    valid: torch.Tensor
    is_image: torch.Tensor
    query_rows: torch.Tensor
    query_valid: torch.Tensor
    cluster_keep: torch.Tensor | None = None
    last_rows: torch.Tensor | None = None
    source: torch.Tensor | None = None
    lengths: list[int] | None = None
    image_counts: list[int] | None = None
    expression: torch.Tensor | None = None


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
    layer_key_padded: list[bool] | None = None

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

    def __init__(self, layer_key_valid: list[torch.Tensor], padded: list[bool] | None = None):
        if padded is None:  # not known on the host: one read per layer
            padded = [not bool(v.all()) for v in layer_key_valid]
        self.valid: list[torch.Tensor | None] = [v if p else None for v, p in zip(layer_key_valid, padded, strict=True)]
        # per layer: tokens of the full prompt no longer cached there (device tensors, no host read)
        full = layer_key_valid[0].sum(dim=1, keepdim=True) if layer_key_valid else None
        self._removed = [full - v.sum(dim=1, keepdim=True) for v in layer_key_valid]

    def removed_before(self, layer: int) -> torch.Tensor:
        """``B x 1`` prompt tokens that layer ``layer``'s cache lacks compared with layer 0's."""
        return self._removed[layer]

    def step(self, layer: int) -> torch.Tensor | None:
        """Append the new token's key and return the ``B x 1 x 1 x T`` mask (or None)."""
        valid = self.valid[layer]
        if valid is None:
            return None
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        self.valid[layer] = valid
        return valid[:, None, None, :]


def rope_positions(state: TokenState, contiguous: bool) -> torch.Tensor:
    """``B x T`` position ids for the rotary embedding: the original ones, or (``contiguous``) each
    active token's rank in sequence order (0 on padding)."""
    if not contiguous:
        return state.positions
    return (state.valid.long().cumsum(dim=1) - 1).clamp(min=0) * state.valid


def image_keep_mask(is_image: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``B x T`` True on text rows and on the image rows whose grid index is in ``keep`` (``B x K``)."""
    chosen = torch.zeros(is_image.shape[0], is_image.shape[1] + 1, dtype=torch.bool, device=is_image.device)
    chosen.scatter_(1, keep, True)  # grid indices < N <= T
    picked = chosen.gather(1, source.clamp(min=0)) & is_image & (source >= 0)
    return ~is_image | picked


@dataclass(frozen=True)
class HostCounts:
    """Per-sample token counts of the active set, known on the host (no device read needed).

    Attributes:
        image: image tokens per sample.
        total: active tokens per sample.
        grid: on-grid image tokens per sample (their grid indices are listed in
            :class:`~csp.tokens.KeptImageTokens`), or None when unknown (a reducer's extra tokens).
    """

    image: tuple[int, ...]
    total: tuple[int, ...]
    grid: tuple[int, ...] | None

    @property
    def width(self) -> int:
        """Columns of the right-padded state: the largest per-sample count."""
        return max(self.total)

    def padded(self, width: int) -> bool:
        """Whether some sample is shorter than ``width`` (then the layers need a key mask)."""
        return min(self.total) < width

    def with_image(self, image: list[int]) -> HostCounts:
        """The same text, ``image`` image tokens per sample (all on the grid if they were before)."""
        total = tuple(t - i + n for t, i, n in zip(self.total, self.image, image, strict=True))
        grid = tuple(image) if self.grid is not None and self.grid == self.image else None
        return HostCounts(tuple(image), total, grid)


def read_counts(state: TokenState) -> HostCounts:
    """Counts of ``state`` read from the device in one host synchronisation (the fallback when a
    method's counts depend on the data)."""
    on_grid = state.is_image & (state.source >= 0)
    image, total, grid = torch.stack([state.is_image.sum(dim=1), state.valid.sum(dim=1), on_grid.sum(dim=1)]).tolist()
    return HostCounts(tuple(image), tuple(total), tuple(grid))


@dataclass(frozen=True)
class CompileOptions:
    """The compiled path for fixed stage shapes (off by default).

    Every decoder-layer call of a teacher-forced forward goes through one ``torch.compile``'d
    function with static shapes: layers share the graph of their stage's shape (parameters are
    graph inputs), and each stage's width is rounded up to a multiple of ``bucket`` so that the
    shapes of different prompts repeat. ``mode``: None picks ``reduce-overhead`` on CUDA (CUDA graphs
    per stage shape) and the default mode elsewhere. Prefill with a KV cache (chat) stays eager.

    Attributes:
        enabled: use the compiled path.
        backend: torch.compile backend (``inductor``; ``aot_eager`` traces without code generation).
        mode: torch.compile mode, or None (see above).
        bucket: stage widths are padded up to a multiple of this (1 = exact shapes, no padding).
    """

    enabled: bool = False
    backend: str = "inductor"
    mode: str | None = None
    bucket: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 1:
            raise ValueError(f"compile.bucket must be an integer >= 1, got {self.bucket!r}")

    @classmethod
    def from_mapping(cls, cfg: Any) -> CompileOptions:
        """From a config mapping (``compile: {enabled, backend, mode, bucket}``); None = off."""
        if cfg is None:
            return cls()
        unknown = set(cfg) - {"enabled", "backend", "mode", "bucket"}
        if unknown:
            raise ValueError(f"compile: unknown keys {sorted(unknown)}; expected enabled, backend, mode, bucket")
        return cls(**dict(cfg))

    def width(self, count: int) -> int:
        """``count`` rounded up to the bucket."""
        return -(-count // self.bucket) * self.bucket


def _layer_call(layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One decoder layer without a cache (the function the compiled path compiles once)."""
    return layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))


class StageRunner:
    """Runs the decoder layers of ``llm`` under ``method`` (a Method, or None = plain; a
    :class:`~csp.schedule.StageSchedule` stands for the ``csp`` method with those parameters).

    ``always_move_tokens``: execute every stage of the plan even where it keeps all tokens (so that
    tests can check the gather/scatter path against the plain loop). ``compile``: the compiled path
    (see :class:`CompileOptions`; off by default).

    Token counts and offsets are tracked on the host (from ``DecoderInputs.lengths`` and
    ``image_counts`` and the plan's static keep counts), so a forward of plain LISA, LVLM_CSP or any
    method with static counts never waits for the device; a data-dependent keep rule costs one read.
    """

    def __init__(self, llm: LlamaModel, method: Method | StageSchedule | None, num_image_tokens: int,
                 *, always_move_tokens: bool = False, compile: CompileOptions | None = None):
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
        # The plan looked up once per layer index, not searched in every layer of every forward.
        self._events = [self.plan.at(i) for i in range(self.num_layers)]
        self._ahead = [self.plan.scored_before(i) for i in range(self.num_layers)]
        self.compile = compile or CompileOptions()
        self._compiled: Any = None

    # -- running --------------------------------------------------------------------------
    def forward(self, inputs: DecoderInputs, cache: Cache | None = None) -> DecoderOutput:
        """Prefill / teacher-forced pass over the full sequences."""
        plan = self.plan
        compiled = self.compile.enabled and cache is None
        bucket = self.compile.width if compiled else (lambda n: n)
        full = TokenState.full(inputs.embeds, inputs.valid, inputs.is_image, inputs.source)
        full_counts = self._input_counts(inputs, full)
        full = full.pad_to(bucket(full.valid.shape[1]))
        state, counts = replace(full), full_counts  # layers overwrite state.hidden; full keeps layer-0 embeddings
        if plan.input_keep:
            if inputs.cluster_keep is None:
                raise ValueError("the method keeps an input set (clustering) but no cluster indices were given")
            keep = image_keep_mask(full.is_image, full.source, inputs.cluster_keep)
            state, counts = self._select(state, keep, self._clustered_counts(inputs, counts), bucket)
        layer_counts, key_valid, key_padded, kept = [], [], [], []
        contiguous = False  # position ids renumbered 0, 1, 2, ... (Prune(renumber=True))
        mask, rotary, rope_ids = self._prepare(state, counts, contiguous)
        pending: torch.Tensor | None = None  # scores ranked by the previous layer for this layer's event
        memo: dict[str, Any] = {}  # what scorers derive from the inputs alone, once per forward
        if compiled and self._mode() == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new forward: earlier graph outputs may be reused
        for idx, layer in enumerate(self.llm.layers):
            event = self._events[idx]
            if isinstance(event, Scatter):
                state, counts = state.scatter_into(full), full_counts
            elif isinstance(event, Prune):
                scores = pending if event.score_layer < idx else self._score(event, layer, state, rotary, inputs, memo)
                keep = ~state.is_image | event.keep.keep(scores, state.is_image, state.source)
                kept_cols = keep & state.valid
                state, counts = self._select(state, keep, self._pruned_counts(event, counts), bucket)
                contiguous = contiguous or event.renumber
            if event is not None:
                mask, rotary, rope_ids = self._prepare(state, counts, contiguous)
            if isinstance(event, Prune) and event.cut_cache_from is not None and cache is not None:
                cut_cache(cache, kept_cols, state.valid.shape[1], range(event.cut_cache_from, idx))
                for past in range(event.cut_cache_from, idx):
                    key_valid[past], key_padded[past] = state.valid, mask is not None
            if idx == 0 or event is not None:
                stage = event.stage if event is not None else plan.input_stage
                kept.append((stage, idx, *grid_indices(state), counts.grid))
            ahead = self._ahead[idx]
            pending = self._score(ahead, layer, state, rotary, inputs, memo) if ahead is not None else None
            layer_counts.append(counts)
            key_valid.append(state.valid)
            key_padded.append(mask is not None)
            if compiled:
                state.hidden = self._compiled_layer()(layer, state.hidden, mask, rope_ids, *rotary)
            else:
                state.hidden = layer(
                    state.hidden, attention_mask=mask, position_ids=rope_ids,
                    past_key_values=cache, use_cache=cache is not None, position_embeddings=rotary,
                )
        state.hidden = self.llm.norm(state.hidden)
        records = [TokenRecord(image_tokens=[c.image[b] for c in layer_counts],
                               total_tokens=[c.total[b] for c in layer_counts]) for b in range(len(full_counts.total))]
        widths = _kept_widths([(k[3], k[4]) for k in kept])
        kept_tokens = [KeptImageTokens(stage, first, indices[:, :w], plan.num_extra)
                       for (stage, first, indices, _, _), w in zip(kept, widths, strict=True)]
        return DecoderOutput(state=state, records=records, layer_key_valid=key_valid, kept_image_tokens=kept_tokens,
                             layer_key_padded=key_padded)

    def decode(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Cache, keys: CachedKeyMasks) -> torch.Tensor:
        """One generation step: ``B x 1 x d`` new-token embeddings at original ``B x 1`` positions.

        Every layer attends to its own (possibly reduced) KV cache. Where the plan renumbers position
        ids, a layer's new token sits right after that layer's cached tokens: its original position
        minus the tokens removed before the layer (as PyramidDrop's decoding shifts them).
        """
        rotary = self.llm.rotary_emb(hidden, position_ids=positions)
        renumber_from = self.plan.renumbers_from
        for idx, layer in enumerate(self.llm.layers):
            if renumber_from is not None and idx >= renumber_from and self._events[idx] is not None:
                positions_here = positions - keys.removed_before(idx)
                rotary = self.llm.rotary_emb(hidden, position_ids=positions_here)
            mask = keys.step(idx)
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, position_embeddings=rotary,
            )
        return self.llm.norm(hidden)

    # -- host-side counts -----------------------------------------------------------------
    def _input_counts(self, inputs: DecoderInputs, full: TokenState) -> HostCounts:
        """Counts of the full sequences: from the host lists when given, else one device read."""
        if inputs.lengths is None or inputs.image_counts is None:
            return read_counts(full)
        image, total = tuple(inputs.image_counts), tuple(inputs.lengths)
        if len(image) != full.valid.shape[0] or len(total) != full.valid.shape[0]:
            raise ValueError(f"DecoderInputs: {len(total)} lengths and {len(image)} image counts for a batch "
                             f"of {full.valid.shape[0]}")
        # a reducer's image slot holds plan.num_extra tokens off the grid per sample (PruMerge's merged
        # token, VisionZip's CLS and contextual tokens); checked on the device with the kept indices
        grid = image if inputs.source is None else tuple(i - self.plan.num_extra for i in image)
        return HostCounts(image, total, grid)

    def _clustered_counts(self, inputs: DecoderInputs, counts: HostCounts) -> HostCounts | None:
        """After keeping ``cluster_keep`` (K distinct grid indices per sample): K image tokens where
        every sample has the whole grid; None (read from the device) otherwise."""
        if inputs.source is not None or any(i != self.num_image_tokens for i in counts.image):
            return None
        return counts.with_image([int(inputs.cluster_keep.shape[1])] * len(counts.image))

    @staticmethod
    def _pruned_counts(event: Prune, counts: HostCounts) -> HostCounts | None:
        """The keep rule's static count of each sample's image tokens; None when data-dependent."""
        image = [event.keep.static_count(i) for i in counts.image]
        return None if any(i is None for i in image) else counts.with_image(image)

    @staticmethod
    def _select(state: TokenState, keep: torch.Tensor, counts: HostCounts | None,
                bucket: Callable[[int], int]) -> tuple[TokenState, HostCounts]:
        if counts is None:  # data-dependent: one device read for the new counts
            counts = read_counts(TokenState(state.hidden, state.positions, keep & state.valid,
                                            state.is_image & keep, state.source))
        return state.select(keep, bucket(counts.width)), counts

    # -- per stage and per layer ----------------------------------------------------------
    def _score(self, event: Prune, layer: torch.nn.Module, state: TokenState,
               rotary: tuple[torch.Tensor, torch.Tensor], inputs: DecoderInputs, memo: dict[str, Any]) -> torch.Tensor:
        return event.scorer.score(ScoreContext(layer=layer, hidden=state.hidden, rotary=rotary, state=state,
                                               inputs=inputs, memo=memo))

    def _prepare(self, state: TokenState, counts: HostCounts, contiguous: bool = False,
                 ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """What every layer of a stage shares: the key mask (None without padding), rotary (cos, sin)
        and the position ids they are computed at (original, or renumbered 0, 1, 2, ...)."""
        rope_ids = rope_positions(state, contiguous)
        rotary = self.llm.rotary_emb(state.hidden, position_ids=rope_ids)
        padded = counts.padded(state.valid.shape[1])
        if not padded:  # host counts that missed some padding would drop the key mask: check on the device
            torch._assert_async(state.valid.all(), "host token counts say no padding, but the batch is padded")
        return attention_mask(state.valid, padded=padded), rotary, rope_ids

    def _mode(self) -> str | None:
        if self.compile.mode is not None:
            return self.compile.mode
        return "reduce-overhead" if self.llm.norm.weight.device.type == "cuda" else None

    def _compiled_layer(self) -> Callable[..., torch.Tensor]:
        if self._compiled is None:
            self._compiled = torch.compile(_layer_call, backend=self.compile.backend, mode=self._mode(), dynamic=False)
        return self._compiled


def cut_cache(cache: Cache, keep: torch.Tensor, width: int, layers: range) -> None:
    """Cut the KV cache of ``layers`` to the columns ``keep`` (``B x T`` over the columns they cached),
    in order and right padded to ``width``, as :meth:`TokenState.select` gathers the active tokens."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    if width > order.shape[1]:
        order = torch.cat([order, order[:, :1].expand(-1, width - order.shape[1])], dim=1)
    order = order[:, :width]
    for layer in layers:
        entry = cache.layers[layer]
        index = order[:, None, :, None].expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1])
        entry.keys = entry.keys.gather(2, index)
        entry.values = entry.values.gather(2, index)


def _kept_widths(entries: list[tuple[torch.Tensor, tuple[int, ...] | None]]) -> list[int]:
    """Width of each kept-token entry (its largest per-sample on-grid count): from the host counts
    (checked against the device counts asynchronously), or, where unknown, from the device counts
    in one read for the whole forward."""
    for count, grid in entries:
        if grid is not None:
            # against a Python int: no host-to-device copy
            torch._assert_async(count.max() == max(grid), "host on-grid image-token counts differ from the device's")
    unknown = [count for count, grid in entries if grid is None]
    read = iter(torch.stack([c.max() for c in unknown]).tolist()) if unknown else iter(())
    return [max(grid) if grid is not None else next(read) for _, grid in entries]
