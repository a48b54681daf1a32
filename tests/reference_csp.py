"""Slow, obviously-right LVLM_CSP: the full sequence through every layer, inactive image tokens
hidden as keys by a mask, written with explicit LLaMA math (no transformers layer code).

One sample at a time, float64, full attention matrices: an oracle, not an implementation.
"""

from __future__ import annotations

import torch
from transformers import LlamaModel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """``H x T x D`` rotated by angle position * theta^(-2i/D) on the (i, i + D/2) pairs."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def layer_attention(layer, h: torch.Tensor, visible: torch.Tensor, theta: float, eps: float):
    """Returns (attention output ``T x d``, probabilities ``H x T x T``) under ``visible`` (T x T)."""
    attn = layer.self_attn
    w = lambda lin: lin.weight.double()  # noqa: E731
    x = rms_norm(h, layer.input_layernorm.weight.double(), eps)
    length = x.shape[0]
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    head_dim = attn.head_dim
    q = (x @ w(attn.q_proj).T).view(length, heads, head_dim).transpose(0, 1)
    k = (x @ w(attn.k_proj).T).view(length, kv_heads, head_dim).transpose(0, 1)
    v = (x @ w(attn.v_proj).T).view(length, kv_heads, head_dim).transpose(0, 1)
    positions = torch.arange(length)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    v = v.repeat_interleave(heads // kv_heads, dim=0)
    logits = (q @ k.transpose(-1, -2)) / head_dim**0.5
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(0, 1).reshape(length, heads * head_dim) @ w(attn.o_proj).T
    return out, probs


def layer_mlp(layer, h: torch.Tensor, eps: float) -> torch.Tensor:
    mlp = layer.mlp
    x = rms_norm(h, layer.post_attention_layernorm.weight.double(), eps)
    gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.double().T)
    return (gate * (x @ mlp.up_proj.weight.double().T)) @ mlp.down_proj.weight.double().T


def reference_forward(
    llm: LlamaModel, embeds: torch.Tensor, image_rows: torch.Tensor, query_rows: torch.Tensor,
    schedule: tuple[int, int, int, int] | None, cluster_keep: torch.Tensor | None,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """One sample ``T x d`` (no padding) -> (final-norm states ``T x d``, image/total per layer).

    ``image_rows``: the N image rows; ``query_rows``: rows averaged for the pruning score;
    ``schedule``: (Lc, Nc, Ls, Np) or None; ``cluster_keep``: the Nc chosen image indices.
    Positions are the full-sequence rows; inactive tokens are hidden as keys.
    """
    config = llm.config
    theta, eps = config.rope_parameters["rope_theta"], config.rms_norm_eps
    length, num_layers, n_img = embeds.shape[0], len(llm.layers), len(image_rows)
    e0 = embeds.double()
    h = e0.clone()
    active = torch.ones(length, dtype=torch.bool)
    Lc, Nc, Ls, Np = schedule if schedule is not None else (0, n_img, num_layers, n_img)
    clusters = Lc > 0 and Nc < n_img
    prunes = Np < n_img and num_layers - Lc - Ls > 0
    if clusters:
        active[image_rows] = False
        active[image_rows[cluster_keep]] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    image_counts, total_counts = [], []
    for idx, layer in enumerate(llm.layers):
        if clusters and Ls > 0 and idx == Lc:
            dropped = image_rows[~active[image_rows]]
            h[dropped] = e0[dropped]  # eq. 7: unselected tokens return with layer-0 embeddings
            active[:] = True
        image_counts.append(int(active[image_rows].sum()))
        total_counts.append(int(active.sum()))
        visible = causal & active[None, :]
        visible |= torch.eye(length, dtype=torch.bool)  # inactive rows keep a finite (unused) output
        out, probs = layer_attention(layer, h, visible, theta, eps)
        h = h + out
        h = h + layer_mlp(layer, h, eps)
        if prunes and idx == Lc + Ls - 1:
            score = probs.mean(0)[query_rows].mean(0)  # heads, then query rows
            candidates = image_rows[active[image_rows]]
            k = min(Np, len(candidates))
            top = candidates[score[candidates].topk(k).indices]
            active[image_rows] = False
            active[top] = True
    return rms_norm(h, llm.norm.weight.double(), eps), image_counts, total_counts
