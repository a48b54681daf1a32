"""Building decoder batches from prompts and images, and the two inference paths.

``teacher_forced``: prompts that already contain the answer (evaluation) -> [SEG] embeddings.
``generate``: greedy chat with the KV cache -> generated ids and a [SEG] embedding per [SEG].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from csp.accounting import TokenRecord
from csp.runner import CachedKeyMasks, DecoderInputs, StageRunner
from csp.tokens import KeptImageTokens
from model.lisa import LISAForCausalLM
from model.prompt import IMAGE_PLACEHOLDER_ID, seg_query_rows


@dataclass
class ExpandedBatch:
    """Token ids with the image slot expanded to N rows, right padded.

    Attributes:
        ids: ``B x T`` token ids (image rows and padding hold the pad id).
        valid: ``B x T``; is_image: ``B x T``; lengths: ``B``.
    """

    ids: torch.Tensor
    valid: torch.Tensor
    is_image: torch.Tensor
    lengths: torch.Tensor


def expand_image_slots(token_ids: list[list[int]], num_image_tokens: int | Sequence[int], pad_id: int) -> ExpandedBatch:
    """Replace each sequence's single image placeholder by its image rows (N, or per sample after a
    before-LLM reducer) and right-pad."""
    counts = [num_image_tokens] * len(token_ids) if isinstance(num_image_tokens, int) else list(num_image_tokens)
    if len(counts) != len(token_ids):
        raise ValueError(f"{len(counts)} image-token counts for {len(token_ids)} prompts")
    rows = []
    for ids in token_ids:
        if ids.count(IMAGE_PLACEHOLDER_ID) != 1:
            raise ValueError(f"each prompt needs exactly one image slot, got {ids.count(IMAGE_PLACEHOLDER_ID)}")
        at = ids.index(IMAGE_PLACEHOLDER_ID)
        rows.append((ids[:at], ids[at + 1:]))
    lengths = [len(a) + n + len(b) for (a, b), n in zip(rows, counts)]
    length = max(lengths)
    ids_t = torch.full((len(rows), length), pad_id, dtype=torch.long)
    is_image = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (before, after) in enumerate(rows):
        n0 = len(before)
        ids_t[i, :n0] = torch.tensor(before, dtype=torch.long)
        is_image[i, n0:n0 + counts[i]] = True
        ids_t[i, n0 + counts[i]:lengths[i]] = torch.tensor(after, dtype=torch.long)
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(length) < lengths_t.unsqueeze(1)
    return ExpandedBatch(ids_t, valid, is_image, lengths_t)


def embed_batch(model: LISAForCausalLM, batch: ExpandedBatch, image_embeds: torch.Tensor,
                image_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Layer-0 embeddings: token embeddings with the image rows set to ``B x M x d`` projector output
    (``image_valid``: ``B x M``, False on the padding of per-sample counts)."""
    device = image_embeds.device
    embeds = model.model.embed_tokens(batch.ids.to(device))
    is_image = batch.is_image.to(device)
    images = image_embeds if image_valid is None else image_embeds[image_valid.to(device)]
    return embeds.masked_scatter(is_image.unsqueeze(-1), images.to(embeds.dtype))


def image_counts(image_embeds: torch.Tensor, image_valid: torch.Tensor | None) -> int | list[int]:
    """Image-slot rows per sample: M, or the per-sample counts of ``image_valid``."""
    return image_embeds.shape[1] if image_valid is None else image_valid.sum(dim=1).tolist()


def row_source(batch: ExpandedBatch, image_source: torch.Tensor | None, image_valid: torch.Tensor | None,
               device: torch.device) -> torch.Tensor | None:
    """``B x T`` grid index of each image row (-1 elsewhere) from a reducer's ``B x M`` sources."""
    if image_source is None:
        return None
    sources = image_source.to(device)
    sources = sources[image_valid.to(device)] if image_valid is not None else sources.reshape(-1)
    is_image = batch.is_image.to(device)
    return torch.full(is_image.shape, -1, dtype=torch.long, device=device).masked_scatter(is_image, sources)


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length 1-D row lists -> (``B x Q`` rows, ``B x Q`` validity)."""
    width = max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    return out, valid


def expression_rows(token_ids: list[list[int]], spans: Sequence[tuple[int, int]], counts: int | Sequence[int],
                    width: int) -> torch.Tensor:
    """``B x width`` True on each sample's expression rows: ``spans`` are ``[start, end)`` in the unexpanded ids
    (model.prompt.expression_span), shifted past the image slot where it precedes them."""
    counts = [counts] * len(token_ids) if isinstance(counts, int) else list(counts)
    mask = torch.zeros(len(token_ids), width, dtype=torch.bool)
    for i, (ids, (start, end), m) in enumerate(zip(token_ids, spans, counts, strict=True)):
        slot = ids.index(IMAGE_PLACEHOLDER_ID) if IMAGE_PLACEHOLDER_ID in ids else len(ids)
        shift = m - 1 if slot < start else 0
        mask[i, start + shift: end + shift] = True
    return mask


def decoder_inputs(model: LISAForCausalLM, batch: ExpandedBatch, image_embeds: torch.Tensor,
                   query_rows: list[torch.Tensor], cluster_keep: torch.Tensor | None, *,
                   last_rows: torch.Tensor | None = None, image_valid: torch.Tensor | None = None,
                   image_source: torch.Tensor | None = None, expression: torch.Tensor | None = None) -> DecoderInputs:
    """The runner's input for ``batch``: layer-0 embeddings, masks, the rows (one 1-D tensor per
    sample) whose attention ranks image tokens for CSP's pruning, the ``B x 1`` last prompt rows,
    and the grid index of each image row (after a reducer); all on the image embeddings' device."""
    device = image_embeds.device
    rows, rows_valid = pad_rows(query_rows)
    return DecoderInputs(
        embeds=embed_batch(model, batch, image_embeds, image_valid), valid=batch.valid.to(device),
        is_image=batch.is_image.to(device), query_rows=rows.to(device), query_valid=rows_valid.to(device),
        cluster_keep=cluster_keep, last_rows=None if last_rows is None else last_rows.to(device),
        source=row_source(batch, image_source, image_valid, device),
        expression=None if expression is None else expression.to(device),
        # host-side counts (the batch is built on the host): the runner sizes its stages from these
        lengths=batch.lengths.tolist(), image_counts=batch.is_image.sum(dim=1).tolist(),
    )


def last_prompt_rows(token_ids: list[list[int]], prompt_lengths: Sequence[int],
                     counts: int | Sequence[int]) -> torch.Tensor:
    """``B x 1`` expanded row of each sample's last prompt token (the token before the answer).

    ``prompt_lengths``: length of each prompt WITHOUT the answer in unexpanded token ids (image
    placeholder included); the ids of ``token_ids`` must start with that prompt.
    """
    counts = [counts] * len(token_ids) if isinstance(counts, int) else list(counts)
    rows = []
    for i, (ids, n, m) in enumerate(zip(token_ids, prompt_lengths, counts, strict=True)):
        if not 0 < n <= len(ids):
            raise ValueError(f"prompt {i}: prompt length {n} is outside 1..{len(ids)}")
        rows.append(n - 1 + m - 1)  # the placeholder became m rows
    return torch.tensor(rows, dtype=torch.long).unsqueeze(1)


@dataclass
class TeacherForcedOutput:
    """Per sample: ``K_i x out_dim`` prompt embeddings and its per-layer token record."""

    seg_embeddings: list[torch.Tensor]
    records: list[TokenRecord]
    seg_hidden: list[torch.Tensor]
    kept_image_tokens: list[KeptImageTokens] = field(default_factory=list)


def teacher_forced(
    model: LISAForCausalLM, runner: StageRunner, token_ids: list[list[int]], image_embeds: torch.Tensor,
    seg_id: int, pad_id: int, cluster_keep: torch.Tensor | None = None, *,
    prompt_lengths: Sequence[int] | None = None, image_valid: torch.Tensor | None = None,
    image_source: torch.Tensor | None = None, expression_spans: Sequence[tuple[int, int]] | None = None,
) -> TeacherForcedOutput:
    """Run prompts with answers; the [SEG] embedding is the final state BEFORE each [SEG].

    ``image_embeds``: ``B x M x d`` (M = N, or a reducer's tokens with ``image_valid``/``image_source``
    ``B x M``); ``cluster_keep``: ``B x Nc`` or None; ``prompt_lengths``: unexpanded length of each
    prompt without its answer, which gives the last prompt row that FastV-style methods rank by
    (the same row that ranks at chat prefill); ``expression_spans``: each prompt's ``[start, end)`` of the
    user's expression in unexpanded ids (model.prompt.expression_span), for methods that compare with it.
    """
    counts = image_counts(image_embeds, image_valid)
    batch = expand_image_slots(token_ids, counts, pad_id)
    query = [seg_query_rows(ids[: int(n)], seg_id) for ids, n in zip(batch.ids, batch.lengths)]
    for i, q in enumerate(query):
        if len(q) == 0:
            raise ValueError(f"prompt {i} has no [SEG] token: teacher-forced segmentation needs one per mask")
    last = None if prompt_lengths is None else last_prompt_rows(token_ids, prompt_lengths, counts)
    expression = None if expression_spans is None else expression_rows(token_ids, expression_spans, counts,
                                                                       batch.ids.shape[1])
    inputs = decoder_inputs(model, batch, image_embeds, query, cluster_keep, last_rows=last,
                            image_valid=image_valid, image_source=image_source, expression=expression)
    out = runner.forward(inputs)
    hidden = out.rows(inputs.query_rows)
    seg_hidden = [hidden[i, : len(q)] for i, q in enumerate(query)]
    return TeacherForcedOutput([model.seg_head(h) for h in seg_hidden], out.records, seg_hidden,
                               out.kept_image_tokens)


@dataclass
class GenerationOutput:
    """Per sample: generated ids (without the prompt), [SEG] hidden states and embeddings."""

    generated: list[list[int]]
    seg_hidden: list[torch.Tensor]
    seg_embeddings: list[torch.Tensor]
    records: list[TokenRecord]
    kept_image_tokens: list[KeptImageTokens] = field(default_factory=list)


@torch.no_grad()
def generate(
    model: LISAForCausalLM, runner: StageRunner, token_ids: list[list[int]], image_embeds: torch.Tensor,
    seg_id: int, eos_id: int, pad_id: int, max_new_tokens: int = 32, cluster_keep: torch.Tensor | None = None,
    *, image_valid: torch.Tensor | None = None, image_source: torch.Tensor | None = None,
    expression_spans: Sequence[tuple[int, int]] | None = None,
) -> GenerationOutput:
    """Greedy decoding against the KV cache (prefill through the stage runner).

    The state that predicts a [SEG] is that [SEG]'s embedding; pruning at prefill is ranked by
    the last prompt token's attention row.
    """
    batch = expand_image_slots(token_ids, image_counts(image_embeds, image_valid), pad_id)
    device = image_embeds.device
    last = (batch.lengths - 1).unsqueeze(1)  # B x 1: the last prompt token ranks at prefill
    expression = None if expression_spans is None else expression_rows(
        token_ids, expression_spans, image_counts(image_embeds, image_valid), batch.ids.shape[1])
    inputs = decoder_inputs(model, batch, image_embeds, list(last), cluster_keep, last_rows=last,
                            image_valid=image_valid, image_source=image_source, expression=expression)
    cache = DynamicCache(config=model.config)
    out = runner.forward(inputs, cache=cache)
    hidden = out.rows(inputs.query_rows)  # B x 1 x d
    keys = CachedKeyMasks(out.layer_key_valid, out.layer_key_padded)
    positions = last.to(device)
    size = len(token_ids)
    generated: list[list[int]] = [[] for _ in range(size)]
    seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(size)]
    done = [False] * size
    for _ in range(max_new_tokens):
        next_ids = model.lm_head(hidden[:, -1]).argmax(dim=-1)
        for i, token in enumerate(next_ids.tolist()):  # one host sync per step
            if done[i]:
                continue
            generated[i].append(token)
            done[i] = token == eos_id
            if token == seg_id:
                seg_hidden[i].append(hidden[i, -1])
        if all(done):
            break
        positions = positions + 1
        embeds = model.model.embed_tokens(next_ids.unsqueeze(1))
        hidden = runner.decode(embeds, positions, cache, keys)
    stacked = [torch.stack(h) if h else hidden.new_zeros(0, hidden.shape[-1]) for h in seg_hidden]
    return GenerationOutput(generated, stacked, [model.seg_head(h) for h in stacked], out.records,
                            out.kept_image_tokens)
