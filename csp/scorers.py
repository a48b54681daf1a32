"""Scorers: small strategy objects with one ``score`` method that rank the active tokens.

A scorer sees one decoder layer's INPUT (hidden states of the active tokens, their rotary
embeddings, the layer itself) and the batch, and returns ``B x T`` scores over the active
columns (higher = more important); the plan's keep rule then picks among the image tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from csp.scoring import query_attention_scores, rope
from csp.tokens import TokenState

if TYPE_CHECKING:
    from csp.runner import DecoderInputs


@dataclass
class ScoreContext:
    """What a scorer may look at.

    Attributes:
        layer: the decoder layer whose input and weights rank the tokens.
        hidden: ``B x T x d`` input hidden states of that layer (active tokens only).
        rotary: (cos, sin), each ``B x T x head_dim``, at the active tokens' original positions.
        state: the active tokens (positions, validity, image flags, grid indices).
        inputs: the whole batch (layer-0 embeddings of every row, query rows, last prompt rows).
        memo: per-forward store for what depends on ``inputs`` only (e.g. SparseVLM's raters), so
            that several events of one forward compute it (and read its size back) once.
    """

    layer: LlamaDecoderLayer
    hidden: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    state: TokenState
    inputs: DecoderInputs
    memo: dict[str, Any] = field(default_factory=dict)


class Scorer(ABC):
    """Ranks active tokens; see :class:`ScoreContext`."""

    @abstractmethod
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """``B x T`` scores over the active columns (only image columns are used)."""


def instruction_rows(inputs: DecoderInputs) -> torch.Tensor:
    """``B x T`` True on the text rows after the image up to the last prompt row (the user's
    instruction and ``ASSISTANT:``), the text that SparseVLM and Simignore compare with the image."""
    if inputs.last_rows is None:
        raise ValueError("this method needs DecoderInputs.last_rows (the last prompt row of each sample)")
    length = inputs.valid.shape[1]
    cols = torch.arange(length, device=inputs.valid.device)
    last_image = torch.where(inputs.is_image, cols, -1).amax(dim=1, keepdim=True)
    return inputs.valid & (cols > last_image) & (cols <= inputs.last_rows[:, :1])


def pad_true_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B x T`` mask -> (``B x Q`` row indices of the True entries, ascending; ``B x Q`` validity),
    Q = the largest count (one host read)."""
    counts = mask.sum(dim=1, keepdim=True)
    width = max(1, int(counts.max()))
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device) < counts
    return order * valid, valid


def sparsevlm_raters(inputs: DecoderInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's text raters, from the layer-0 embeddings: ``m = mean_v softmax_t(V_v . T_t)``
    over the instruction rows t and image rows v; raters are the t with ``m_t > mean(m)``.

    Returns (``B x R`` rater rows; ``B x R`` validity).
    """
    text = instruction_rows(inputs)
    embeds = inputs.embeds.float()
    logits = embeds @ embeds.transpose(1, 2)  # B x T x T, rows: image, cols: text
    logits = logits.masked_fill(~text[:, None, :], float("-inf"))
    probs = logits.softmax(dim=-1).nan_to_num(0.0)  # image rows: softmax over the text columns
    image = inputs.is_image & inputs.valid
    m = (probs * image[:, :, None]).sum(dim=1) / image.sum(dim=1, keepdim=True).clamp(min=1)  # B x T
    mean = (m * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
    return pad_true_rows(text & (m > mean))


@dataclass(frozen=True)
class QueryAttention(Scorer):
    """Attention of query rows in the layer, softmax per head, mean over heads then rows.

    Attributes:
        rows: ``seg`` (the rows before each [SEG]; at chat prefill the last prompt row: CSP),
            ``last`` (the last prompt row: FastV, PyramidDrop, FEATHER) or ``raters``
            (SparseVLM's text raters).
        rope: apply RoPE to q and k (False: FEATHER).
        keys: ``visible`` (softmax over every key the row sees, causal) or ``image`` (over the
            active image keys only: FEATHER).
    """

    rows: str = "seg"
    rope: bool = True
    keys: str = "visible"

    def __post_init__(self) -> None:
        if self.rows not in ("seg", "last", "raters"):
            raise ValueError(f"QueryAttention.rows must be seg, last or raters, got {self.rows!r}")
        if self.keys not in ("visible", "image"):
            raise ValueError(f"QueryAttention.keys must be visible or image, got {self.keys!r}")

    def query(self, inputs: DecoderInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(``B x Q`` original rows, ``B x Q`` validity) of the query rows."""
        if self.rows == "seg":
            return inputs.query_rows, inputs.query_valid
        if self.rows == "last":
            if inputs.last_rows is None:
                raise ValueError("rows='last' needs DecoderInputs.last_rows (the last prompt row)")
            return inputs.last_rows, torch.ones_like(inputs.last_rows, dtype=torch.bool)
        return sparsevlm_raters(inputs)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if self.rows == "raters":  # from the layer-0 embeddings: the same for every event of a forward
            if "raters" not in ctx.memo:
                ctx.memo["raters"] = self.query(ctx.inputs)
            rows, valid = ctx.memo["raters"]
        else:
            rows, valid = self.query(ctx.inputs)
        cols = ctx.state.rows_of(rows * valid)
        keys = ctx.state.valid if self.keys == "visible" else ctx.state.is_image
        return query_attention_scores(ctx.layer, ctx.hidden, ctx.rotary, keys, cols, valid, use_rope=self.rope)


def expression_rows(inputs: DecoderInputs) -> torch.Tensor:
    """``B x T`` rows of the user's expression (``DecoderInputs.expression``), or every instruction
    row where the caller did not mark the expression."""
    if inputs.expression is not None:
        return inputs.expression & inputs.valid
    return instruction_rows(inputs)


@dataclass(frozen=True)
class SparseVlmV2Attention(Scorer):
    """SparseVLM v2.0 (SparseVLM+, ``USE_VERSION=2_0``; Gumpest/SparseVLMs modelling_sparse_llama.py
    L239-259, score.py L23-55): the layer's own attention probabilities (RoPE at the tokens' position
    ids, causal softmax per head) on the rater rows, divided by the "RoPE weights" of all-ones q and
    k rotated at the same ids (``(R_m 1) . (R_n 1) / sqrt(D)``, L242-251); the ``heads`` heads with the
    largest sum over rater rows x image columns are kept (L256-257, ``topk(14)``; every head where a
    model has fewer); mean over those heads, then over the raters (score.py L27-32).
    """

    heads: int = 14

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if "raters" not in ctx.memo:
            ctx.memo["raters"] = sparsevlm_raters(ctx.inputs)
        rows, valid = ctx.memo["raters"]
        cols = ctx.state.rows_of(rows * valid)
        layer, attn = ctx.layer, ctx.layer.self_attn
        x = layer.input_layernorm(ctx.hidden)
        batch, length, _ = x.shape
        head_dim = attn.head_dim
        xq = x.gather(1, cols.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        q = attn.q_proj(xq).view(batch, cols.shape[1], -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = ctx.rotary
        cos_q = cos.gather(1, cols.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
        sin_q = sin.gather(1, cols.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
        q, k = rope(q, cos_q, sin_q), rope(k, cos, sin)
        from transformers.models.llama.modeling_llama import repeat_kv

        k = repeat_kv(k, attn.num_key_value_groups)
        logits = (q.float() @ k.float().transpose(-1, -2)) / head_dim**0.5  # B x H x R x T
        positions = torch.arange(length, device=x.device)
        visible = ctx.state.valid[:, None, :] & (positions[None, None, :] <= cols[:, :, None])  # B x R x T
        probs = logits.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(dim=-1)
        ones_q = rope(torch.ones_like(q[:, :1]), cos_q, sin_q).float()  # B x 1 x R x D
        ones_k = rope(torch.ones_like(k[:, :1]), cos, sin).float()  # B x 1 x T x D
        probs = probs / ((ones_q @ ones_k.transpose(-1, -2)) / head_dim**0.5)  # the RoPE correction
        rated = (valid[:, None, :, None] & ctx.state.is_image[:, None, None, :]).float()
        per_head = (probs.nan_to_num(0.0) * rated).sum(dim=(2, 3))  # B x H
        top = per_head.topk(min(self.heads, per_head.shape[1]), dim=1).indices
        chosen = probs.gather(1, top[:, :, None, None].expand(-1, -1, *probs.shape[2:])).mean(dim=1)  # B x R x T
        weights = valid.float()
        return (chosen * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


@dataclass(frozen=True)
class TextSimilarity(Scorer):
    """Simignore's scan (Simignore llava_arch.py L284-311): cosine similarities of every (image,
    text) pair of embeddings (image tokens x the user's expression tokens), sorted descending; the
    scan starts at pair ``i_index`` (its 7B script: 1, so the single most similar pair is skipped)
    and visits every ``step``-th pair, collecting image tokens in the order it first meets them.

    Score of an image token: minus the rank of the first visited pair that holds it (-inf where the
    scan never meets it), so that a top-k keeps the first k tokens the scan collects. Used at layer 0.
    """

    i_index: int = 1
    step: int = 1

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        rows, valid = pad_true_rows(expression_rows(ctx.inputs))
        cols = ctx.state.rows_of(rows * valid)
        x = torch.nn.functional.normalize(ctx.hidden.float(), dim=-1)
        text = x.gather(1, cols.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # B x Q x d
        pair = valid[:, None, :] & ctx.state.is_image[:, :, None]  # B x T x Q: image rows x text columns
        sim = (x @ text.transpose(1, 2)).masked_fill(~pair, float("-inf"))
        batch, length, width = sim.shape
        order = sim.reshape(batch, -1).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        rank = rank.view(batch, length, width)
        visited = pair & (rank >= self.i_index) & ((rank - self.i_index) % self.step == 0)
        first = torch.where(visited, rank, order.shape[1]).amin(dim=-1)  # B x T
        return torch.where(first < order.shape[1], -first.double(), float("-inf")).float()


def ivc_question_rows(state: TokenState, inputs: DecoderInputs) -> torch.Tensor:
    """``B x T`` active rows IVC-Prune averages over (IVC-Prune modeling_llama.py L899-901): from two
    rows past the image slot's end (``image_start + image_length + 2``) to the last prompt row."""
    if inputs.last_rows is None:
        raise ValueError("IVC-Prune's scores need DecoderInputs.last_rows (the last prompt row of each sample)")
    rows = torch.arange(inputs.is_image.shape[1], device=inputs.is_image.device)
    last_image = torch.where(inputs.is_image & inputs.valid, rows, -1).amax(dim=1, keepdim=True)  # the slot's end
    pos = state.positions
    return state.valid & (pos >= last_image + 3) & (pos <= inputs.last_rows[:, :1])


def ivc_value_similarity(ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(``B x T x T`` head-averaged ``softmax(V V^T / sqrt(D))`` of the layer's normalised input, before
    RoPE, per key-value head (IVC-Prune L752-766, L968-969); ``B x T`` the prompt rows it runs over).

    Its code runs the softmax over every column of the prefill sequence (no causal mask, L765); here the
    columns are the active prompt tokens (up to the last prompt row), so that teacher-forced evaluation,
    whose sequence also holds the answer, ranks as chat prefill does. Memoised per forward and layer."""
    key = f"ivc_value:{id(ctx.layer)}:{ctx.hidden.data_ptr()}"
    if key in ctx.memo:
        return ctx.memo[key]
    layer, attn = ctx.layer, ctx.layer.self_attn
    x = layer.input_layernorm(ctx.hidden)
    batch, length, _ = x.shape
    v = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2).float()  # B x Hkv x T x D
    prompt = ctx.state.valid & (ctx.state.positions <= ctx.inputs.last_rows[:, :1]) if ctx.inputs.last_rows is not None \
        else ctx.state.valid
    logits = (v @ v.transpose(-1, -2)) / attn.head_dim**0.5
    sim = logits.masked_fill(~prompt[:, None, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)  # B x T x T
    ctx.memo[key] = (sim, prompt)
    return sim, prompt


def _row_mean(sim: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``B x T``: mean over the ``rows`` (``B x T`` mask) of ``sim``."""
    w = rows.float()
    return (w.unsqueeze(-1) * sim).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1.0)


def _top_mask(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``B x T`` True on the ``k`` best candidates (torch.topk over the candidate columns)."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    top = masked.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.zeros_like(candidates).scatter(1, top, True) & candidates


@dataclass(frozen=True)
class IvcValue(Scorer):
    """IVC-Prune's foreground score (FireRedTeam/IVC-Prune modeling_llama.py L896-920): with S the
    value similarity (:func:`ivc_value_similarity`), the ``seeds`` image tokens with the largest mean S
    over the question rows (L899-908; its count ``max(1, round(0.01 N))``), then the score of every
    token is the mean S over the seed rows and the question rows (L911-918). A TopK of it is its
    foreground set (``round(0.2 N)``, L920-922); CSP's pruning can rank by it too."""

    seeds: int = 1

    def foreground(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(``B x T`` foreground scores, ``B x T`` seed mask)."""
        sim, _ = ivc_value_similarity(ctx)
        question = ivc_question_rows(ctx.state, ctx.inputs)
        seeds = _top_mask(_row_mean(sim, question), ctx.state.is_image, self.seeds)
        return _row_mean(sim, question | seeds), seeds

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.foreground(ctx)[0]


@dataclass(frozen=True)
class IvcUnion(Scorer):
    """IVC-Prune's whole selection as a mark (1 kept, 0 not; keep rule ``csp.plan.Marked``): the
    ``seeds`` UNION the ``foreground`` best by :class:`IvcValue` UNION its "implicit visual coordinate"
    tokens, the ``coordinates`` image tokens with the largest mean over the head dimension of RoPE's
    cos, and as many by the mean of its sin, at their position ids (L924-936); text is kept by the
    plan (L938-946)."""

    seeds: int = 1
    foreground: int = 1
    coordinates: int = 1

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        fg_scores, seeds = IvcValue(self.seeds).foreground(ctx)
        image = ctx.state.is_image
        cos, sin = ctx.rotary
        keep = seeds | _top_mask(fg_scores, image, self.foreground)
        keep |= _top_mask(cos.float().mean(dim=-1), image, self.coordinates)
        keep |= _top_mask(sin.float().mean(dim=-1), image, self.coordinates)
        return keep.float()
