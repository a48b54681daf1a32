"""Query-row attention over the tokens of one decoder layer (eq. 8 and the baselines' variants),
without n x n matrices."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb, repeat_kv


def query_attention_scores(
    layer: LlamaDecoderLayer,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor,
    query_cols: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    use_rope: bool = True,
) -> torch.Tensor:
    """Attention probabilities of the query rows, head-averaged and averaged over rows.

    Recomputes only what the layer's attention does for Q rows: input norm, q/k projections and
    RoPE; the keys are all T tokens, so the cost is O(T d^2 + Q T d), never O(T^2).

    Args:
        layer: the decoder layer whose attention ranks the tokens.
        hidden: ``B x T`` x d input hidden states of that layer.
        rotary: (cos, sin), each ``B x T x head_dim``, for the tokens' original positions.
        key_valid: ``B x T`` keys the softmax runs over (False on padding; FEATHER passes the image
            tokens only); causality is applied on top.
        query_cols: ``B x Q`` columns of the query rows (tokens before each [SEG]).
        query_valid: ``B x Q`` False on padded query slots.
        use_rope: False scores without rotary embeddings (FEATHER's no_rope variant).

    Returns:
        ``B x T`` scores: softmax over all visible keys per head, mean over heads and rows.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    xq = x.gather(1, query_cols.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xq).view(batch, query_cols.shape[1], -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = rotary
    cos_q = cos.gather(1, query_cols.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
    sin_q = sin.gather(1, query_cols.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
    if use_rope:
        q, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # B x H x Q x T
    cols = torch.arange(length, device=x.device)
    visible = key_valid[:, None, :] & (cols[None, None, :] <= query_cols[:, :, None])  # B x Q x T
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)  # B x Q x T
    weights = query_valid.float()
    return (probs * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
