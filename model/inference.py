"""Building decoder batches from prompts and images, and the two inference paths.

``teacher_forced``: prompts that already contain the answer (evaluation) -> [SEG] embeddings.
``generate``: greedy chat with the KV cache -> generated ids and a [SEG] embedding per [SEG].
"""

from __future__ import annotations

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


def expand_image_slots(token_ids: list[list[int]], num_image_tokens: int, pad_id: int) -> ExpandedBatch:
    """Replace each sequence's single image placeholder by N image rows and right-pad."""
    rows = []
    for ids in token_ids:
        if ids.count(IMAGE_PLACEHOLDER_ID) != 1:
            raise ValueError(f"each prompt needs exactly one image slot, got {ids.count(IMAGE_PLACEHOLDER_ID)}")
        at = ids.index(IMAGE_PLACEHOLDER_ID)
        rows.append((ids[:at], ids[at + 1:]))
    lengths = [len(a) + num_image_tokens + len(b) for a, b in rows]
    length = max(lengths)
    ids_t = torch.full((len(rows), length), pad_id, dtype=torch.long)
    is_image = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (before, after) in enumerate(rows):
        n0 = len(before)
        ids_t[i, :n0] = torch.tensor(before, dtype=torch.long)
        is_image[i, n0:n0 + num_image_tokens] = True
        ids_t[i, n0 + num_image_tokens:lengths[i]] = torch.tensor(after, dtype=torch.long)
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(length) < lengths_t.unsqueeze(1)
    return ExpandedBatch(ids_t, valid, is_image, lengths_t)


def embed_batch(model: LISAForCausalLM, batch: ExpandedBatch, image_embeds: torch.Tensor) -> torch.Tensor:
    """Layer-0 embeddings: token embeddings with the image rows set to ``B x N x d`` projector output."""
    device = image_embeds.device
    embeds = model.model.embed_tokens(batch.ids.to(device))
    is_image = batch.is_image.to(device)
    return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length 1-D row lists -> (``B x Q`` rows, ``B x Q`` validity)."""
    width = max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    return out, valid


def decoder_inputs(model: LISAForCausalLM, batch: ExpandedBatch, image_embeds: torch.Tensor,
                   query_rows: list[torch.Tensor], cluster_keep: torch.Tensor | None) -> DecoderInputs:
    """The runner's input for ``batch``: layer-0 embeddings, masks, and the rows (one 1-D tensor per
    sample) whose attention ranks image tokens for pruning; all on the image embeddings' device."""
    device = image_embeds.device
    rows, rows_valid = pad_rows(query_rows)
    return DecoderInputs(
        embeds=embed_batch(model, batch, image_embeds), valid=batch.valid.to(device),
        is_image=batch.is_image.to(device), query_rows=rows.to(device), query_valid=rows_valid.to(device),
        cluster_keep=cluster_keep,
    )


@dataclass
class TeacherForcedOutput:
    """Per sample: ``K_i x out_dim`` prompt embeddings and its per-layer token record; for the
    batch: the runner's kept image tokens per stage (``B x K`` each, on the device)."""

    seg_embeddings: list[torch.Tensor]
    records: list[TokenRecord]
    seg_hidden: list[torch.Tensor]
    kept_image_tokens: list[KeptImageTokens] = field(default_factory=list)


def teacher_forced(
    model: LISAForCausalLM, runner: StageRunner, token_ids: list[list[int]], image_embeds: torch.Tensor,
    seg_id: int, pad_id: int, cluster_keep: torch.Tensor | None = None,
) -> TeacherForcedOutput:
    """Run prompts with answers; the [SEG] embedding is the final state BEFORE each [SEG].

    ``image_embeds``: ``B x N x d``; ``cluster_keep``: ``B x Nc`` or None.
    """
    batch = expand_image_slots(token_ids, image_embeds.shape[1], pad_id)
    query = [seg_query_rows(ids[: int(n)], seg_id) for ids, n in zip(batch.ids, batch.lengths)]
    for i, q in enumerate(query):
        if len(q) == 0:
            raise ValueError(f"prompt {i} has no [SEG] token: teacher-forced segmentation needs one per mask")
    inputs = decoder_inputs(model, batch, image_embeds, query, cluster_keep)
    out = runner.forward(inputs)
    hidden = out.rows(inputs.query_rows)
    seg_hidden = [hidden[i, : len(q)] for i, q in enumerate(query)]
    return TeacherForcedOutput([model.seg_head(h) for h in seg_hidden], out.records, seg_hidden,
                               out.kept_image_tokens)


@dataclass
class GenerationOutput:
    """Per sample: generated ids (without the prompt), [SEG] hidden states and embeddings; the
    prefill's kept image tokens per stage (``B x K`` each)."""

    generated: list[list[int]]
    seg_hidden: list[torch.Tensor]
    seg_embeddings: list[torch.Tensor]
    records: list[TokenRecord]
    kept_image_tokens: list[KeptImageTokens] = field(default_factory=list)


@torch.no_grad()
def generate(
    model: LISAForCausalLM, runner: StageRunner, token_ids: list[list[int]], image_embeds: torch.Tensor,
    seg_id: int, eos_id: int, pad_id: int, max_new_tokens: int = 32, cluster_keep: torch.Tensor | None = None,
) -> GenerationOutput:
    """Greedy decoding against the KV cache (prefill through the stage runner).

    The state that predicts a [SEG] is that [SEG]'s embedding; pruning at prefill is ranked by
    the last prompt token's attention row.
    """
    batch = expand_image_slots(token_ids, image_embeds.shape[1], pad_id)
    device = image_embeds.device
    last = (batch.lengths - 1).unsqueeze(1)  # B x 1: the last prompt token ranks at prefill
    inputs = decoder_inputs(model, batch, image_embeds, list(last), cluster_keep)
    cache = DynamicCache(config=model.config)
    out = runner.forward(inputs, cache=cache)
    hidden = out.rows(inputs.query_rows)  # B x 1 x d
    keys = CachedKeyMasks(out.layer_key_valid)
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
