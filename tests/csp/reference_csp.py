"""Slow, obviously-right token plans: the full sequence through every layer, inactive image tokens
hidden as keys by a mask, written with explicit LLaMA math (no transformers layer code).

It takes the same :class:`csp.plan.TokenPlan` as the runner (so every registered in-LLM method is
checked against it) but computes every score and every keep rule itself, from the definitions.
One sample at a time, float64, full attention matrices: an oracle, not an implementation.
"""

from __future__ import annotations

import torch
from transformers import LlamaModel

from csp.methods.random_keep import SeededRandomScores
from csp.plan import Marked, Prune, Scatter, TokenPlan, TopFraction, TopK, TopKUnionGrid
from csp.scorers import IvcUnion, IvcValue, QueryAttention, SparseVlmV2Attention, TextSimilarity


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


def qkv(layer, h: torch.Tensor, theta: float, eps: float, with_rope: bool = True,
        positions: torch.Tensor | None = None):
    """Per-head q, k, v (``H x T x D``, k and v repeated for grouped heads) of a layer's input, rotated
    at ``positions`` (``T``; default the rows 0..T-1)."""
    attn = layer.self_attn
    w = lambda lin: lin.weight.double()  # noqa: E731
    x = rms_norm(h, layer.input_layernorm.weight.double(), eps)
    length = x.shape[0]
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    head_dim = attn.head_dim
    q = (x @ w(attn.q_proj).T).view(length, heads, head_dim).transpose(0, 1)
    k = (x @ w(attn.k_proj).T).view(length, kv_heads, head_dim).transpose(0, 1)
    v = (x @ w(attn.v_proj).T).view(length, kv_heads, head_dim).transpose(0, 1)
    if with_rope:
        positions = torch.arange(length) if positions is None else positions
        q, k = rope(q, positions, theta), rope(k, positions, theta)
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    v = v.repeat_interleave(heads // kv_heads, dim=0)
    return q, k, v


def layer_attention(layer, h: torch.Tensor, visible: torch.Tensor, theta: float, eps: float,
                    positions: torch.Tensor | None = None):
    """Returns (attention output ``T x d``, probabilities ``H x T x T``) under ``visible`` (T x T)."""
    attn = layer.self_attn
    length = h.shape[0]
    q, k, v = qkv(layer, h, theta, eps, positions=positions)
    heads, head_dim = q.shape[0], q.shape[-1]
    logits = (q @ k.transpose(-1, -2)) / head_dim**0.5
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(0, 1).reshape(length, heads * head_dim) @ attn.o_proj.weight.double().T
    return out, probs


def layer_mlp(layer, h: torch.Tensor, eps: float) -> torch.Tensor:
    mlp = layer.mlp
    x = rms_norm(h, layer.post_attention_layernorm.weight.double(), eps)
    gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.double().T)
    return (gate * (x @ mlp.up_proj.weight.double().T)) @ mlp.down_proj.weight.double().T


def instruction_rows(length: int, image_rows: torch.Tensor, last_row: int) -> torch.Tensor:
    """Text rows after the image up to the last prompt row."""
    return torch.arange(int(image_rows.max()) + 1, last_row + 1)


def raters(e0: torch.Tensor, image_rows: torch.Tensor, last_row: int) -> torch.Tensor:
    """SparseVLM: m_t = mean over image rows v of softmax over text t of (e_v . e_t); m_t > mean(m)."""
    text = instruction_rows(e0.shape[0], image_rows, last_row)
    m = (e0[image_rows] @ e0[text].T).softmax(dim=-1).mean(dim=0)
    return text[m > m.mean()]


MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """Python int -> the signed value of its low 64 bits (two's complement)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def _mix64(x: int) -> int:
    """SplitMix64's finaliser with signed 64-bit wrap and arithmetic shifts (Python ints)."""
    x = _int64((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9)
    x = _int64((x ^ (x >> 27)) * 0x94D049BB133111EB)
    return x ^ (x >> 31)


def random_keep_scores(seed: int, e0: torch.Tensor, grid_index: torch.Tensor) -> torch.Tensor:
    """random_keep's scores from their definition, in Python integers: the sample's key is the sum over
    every entry i (row-major over the valid rows) of its float32 bit pattern times mix64(i * golden + seed),
    wrapped to 64 bits; grid index g scores mix64(mix64(key + (g + 1) * golden)) mod 2^53 / 2^53."""
    golden = 0x9E3779B97F4A7C15
    bits = e0.float().contiguous().view(torch.int32).flatten().tolist()
    key = 0
    for i, b in enumerate(bits):
        key = _int64(key + b * _mix64(_int64(i * golden + seed)))
    out = torch.full((len(grid_index),), float("-inf"), dtype=torch.float64)
    for row, g in enumerate(grid_index.tolist()):
        if g >= 0:
            out[row] = (_mix64(_mix64(_int64(key + (g + 1) * golden))) & ((1 << 53) - 1)) / float(1 << 53)
    return out


def oracle_scores(event: Prune, layer, h: torch.Tensor, active: torch.Tensor, e0: torch.Tensor,
                  image_rows: torch.Tensor, query_rows: torch.Tensor, last_row: int | None,
                  theta: float, eps: float, positions: torch.Tensor | None = None,
                  grid_index: torch.Tensor | None = None) -> torch.Tensor:
    """``T`` scores of the event's scorer, written out from its definition."""
    scorer = event.scorer
    length = h.shape[0]
    if isinstance(scorer, SeededRandomScores):  # keyed by the prompt's rows (up to the last prompt row)
        return random_keep_scores(scorer.seed, e0 if last_row is None else e0[: last_row + 1], grid_index)
    if isinstance(scorer, TextSimilarity):
        # Simignore's scan: pairs (image row, text row) by cosine, descending; from pair i_index every
        # step-th pair; an image row's score is minus the rank where the scan first meets it
        text = instruction_rows(length, image_rows, last_row)
        x = h / h.norm(dim=-1, keepdim=True)
        rows = image_rows[active[image_rows]]
        sim = x[rows] @ x[text].T
        pairs = sorted(((float(sim[i, j]), i, j) for i in range(len(rows)) for j in range(len(text))),
                       key=lambda p: -p[0])
        scores = torch.full((length,), float("-inf"), dtype=torch.float64)
        for r in range(scorer.i_index, len(pairs), scorer.step):
            row = int(rows[pairs[r][1]])
            if scores[row] == float("-inf"):
                scores[row] = -r
        return scores
    if isinstance(scorer, SparseVlmV2Attention):
        # SparseVLM v2.0: causal probabilities per head on the rater rows, divided by the all-ones
        # RoPE weights, the `heads` heads with the largest rater x image sum, mean over them and raters
        rows = raters(e0, image_rows, last_row)
        pos = torch.arange(length) if positions is None else positions
        q, k, _ = qkv(layer, h, theta, eps, positions=pos)
        dim = q.shape[-1]
        visible = torch.ones(length, length, dtype=torch.bool).tril() & active[None, :]
        probs = ((q @ k.transpose(-1, -2)) / dim**0.5).masked_fill(~visible, float("-inf")).softmax(-1)
        ones = rope(torch.ones(1, length, dim, dtype=torch.float64), pos, theta)[0]
        probs = probs / ((ones @ ones.T) / dim**0.5)
        img = image_rows[active[image_rows]]
        per_head = probs[:, rows][:, :, img].sum(dim=(1, 2))
        top = per_head.topk(min(scorer.heads, len(per_head))).indices
        return probs[top][:, rows].mean(0).mean(0)
    if isinstance(scorer, (IvcValue, IvcUnion)):
        return ivc_scores(scorer, layer, h, active, image_rows, last_row, theta, eps,
                          torch.arange(length) if positions is None else positions)
    assert isinstance(scorer, QueryAttention), f"the oracle has no definition for {scorer!r}"
    rows = {"seg": lambda: query_rows, "last": lambda: torch.tensor([last_row]),
            "raters": lambda: raters(e0, image_rows, last_row)}[scorer.rows]()
    q, k, _ = qkv(layer, h, theta, eps, with_rope=scorer.rope, positions=positions)
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # H x T x T
    keys = active.clone()
    if scorer.keys == "image":
        keys &= torch.zeros(length, dtype=torch.bool).index_fill(0, image_rows, True)
    visible = torch.ones(length, length, dtype=torch.bool).tril() & keys[None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs.mean(0)[rows].mean(0)


def ivc_scores(scorer, layer, h: torch.Tensor, active: torch.Tensor, image_rows: torch.Tensor, last_row: int,
               theta: float, eps: float, positions: torch.Tensor) -> torch.Tensor:
    """IVC-Prune: S = softmax over the active prompt columns of V V^T / sqrt(D) (the layer's normalised
    input, no RoPE), mean over heads; seeds = top image columns of S averaged over the question rows
    (image slot end + 2 .. last prompt row); foreground score = S averaged over seed and question rows;
    IvcUnion marks seeds | top foreground | top mean(cos) | top mean(sin) of the active image rows."""
    length = h.shape[0]
    _, _, v = qkv(layer, h, theta, eps, with_rope=False)
    prompt = active & (torch.arange(length) <= last_row)
    sim = ((v @ v.transpose(-1, -2)) / v.shape[-1] ** 0.5).masked_fill(~prompt, float("-inf")).softmax(-1).mean(0)
    question = active.clone()
    question[: int(image_rows.max()) + 3] = False
    question[last_row + 1:] = False
    img = image_rows[active[image_rows]]

    def top(score: torch.Tensor, k: int) -> torch.Tensor:
        return img[score[img].topk(min(k, len(img))).indices]

    seeds = top(sim[question].mean(0), scorer.seeds)
    rows = question.clone()
    rows[seeds] = True
    fg = sim[rows].mean(0)
    if isinstance(scorer, IvcValue):
        return fg
    dim = v.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # LLaMA's cos/sin repeat the frequencies over the two halves
    marked = torch.cat([seeds, top(fg, scorer.foreground), top(angles.cos().mean(-1), scorer.coordinates),
                        top(angles.sin().mean(-1), scorer.coordinates)])
    out = torch.zeros(length, dtype=torch.float64)
    out[marked] = 1.0
    return out


def oracle_keep(event: Prune, scores: torch.Tensor, candidates: torch.Tensor, grid_index: torch.Tensor) -> torch.Tensor:
    """The candidate rows (``C``) the event's keep rule keeps, from its definition."""
    ranked = candidates[scores[candidates].argsort(descending=True)]
    rule = event.keep
    if isinstance(rule, TopK):
        return ranked[: rule.k]
    if isinstance(rule, TopFraction):
        return ranked[: max(1, int(len(ranked) * rule.fraction))]
    if isinstance(rule, TopKUnionGrid):
        g = grid_index[candidates]
        grid = candidates[((g // rule.side) % rule.stride == 0) & ((g % rule.side) % rule.stride == 0)]
        return torch.unique(torch.cat([ranked[: rule.k], grid]))
    if isinstance(rule, Marked):
        return candidates[scores[candidates] > 0]
    raise AssertionError(f"the oracle has no definition for {rule!r}")


def reference_forward(
    llm: LlamaModel, embeds: torch.Tensor, image_rows: torch.Tensor, query_rows: torch.Tensor,
    plan: TokenPlan, cluster_keep: torch.Tensor | None = None, last_row: int | None = None,
    grid_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int], list[int], list[torch.Tensor]]:
    """One sample ``T x d`` (no padding) -> (final-norm states ``T x d``, image/total per layer, and
    the grid indices active at layer 0 and after every change of the image set).

    ``image_rows``: the image-slot rows; ``query_rows``: the [SEG] rows; ``plan``: the method's plan;
    ``cluster_keep``: grid indices kept before layer 0 (``plan.input_keep``); ``last_row``: the
    last prompt row; ``grid_index``: ``T`` grid index of every row (-1 off the grid; default: the
    image rows in order). Positions are the full-sequence rows, or, from a ``Prune(renumber=True)``
    on, each active row's rank among the active rows (0, 1, 2, ...); inactive tokens are hidden as keys.
    """
    config = llm.config
    theta, eps = config.rope_parameters["rope_theta"], config.rms_norm_eps
    length = embeds.shape[0]
    if grid_index is None:
        grid_index = torch.full((length,), -1, dtype=torch.long)
        grid_index[image_rows] = torch.arange(len(image_rows))
    e0 = embeds.double()
    h = e0.clone()
    active = torch.ones(length, dtype=torch.bool)
    if plan.input_keep:
        active[image_rows] = False
        active[image_rows[torch.isin(grid_index[image_rows], cluster_keep)]] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    image_counts, total_counts, kept = [], [], []
    pending = None
    renumbered = False

    def positions_now() -> torch.Tensor:
        if not renumbered:
            return torch.arange(length)
        return (active.long().cumsum(0) - 1).clamp(min=0)  # rank among the active rows

    def grid_now() -> torch.Tensor:
        rows = image_rows[active[image_rows]]
        g = grid_index[rows]
        return g[g >= 0].sort().values

    for idx, layer in enumerate(llm.layers):
        event = plan.at(idx)
        if isinstance(event, Scatter):
            dropped = ~active
            h[dropped] = e0[dropped]  # eq. 7: unselected tokens return with layer-0 embeddings
            active[:] = True
        elif isinstance(event, Prune):
            scores = pending if event.score_layer < idx else oracle_scores(
                event, layer, h, active, e0, image_rows, query_rows, last_row, theta, eps, positions_now(),
                grid_index)
            candidates = image_rows[active[image_rows]]
            keep = oracle_keep(event, scores, candidates, grid_index)
            active[image_rows] = False
            active[keep] = True
            renumbered = renumbered or event.renumber
        if idx == 0 or event is not None:
            kept.append(grid_now())
        image_counts.append(int(active[image_rows].sum()))
        total_counts.append(int(active.sum()))
        ahead = plan.scored_before(idx)
        pending = None if ahead is None else oracle_scores(
            ahead, layer, h, active, e0, image_rows, query_rows, last_row, theta, eps, positions_now(),
            grid_index)
        visible = causal & active[None, :]
        visible |= torch.eye(length, dtype=torch.bool)  # inactive rows keep a finite (unused) output
        out, _ = layer_attention(layer, h, visible, theta, eps, positions_now())
        h = h + out
        h = h + layer_mlp(layer, h, eps)
    return rms_norm(h, llm.norm.weight.double(), eps), image_counts, total_counts, kept
