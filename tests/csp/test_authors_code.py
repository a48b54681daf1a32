"""Each baseline against a transcription of its authors' selection code (written here from their
repositories, rule by rule, with their file and line numbers; float64, fixed tensors).

In-LLM methods (FastV, FEATHER, PyramidDrop, Simignore, SparseVLM) run the tiny LLaMA's own decoder
layers in the authors' loop: physical gathers of ``hidden_states`` / ``position_ids`` exactly where
their code does them, masks where their code masks; the registered method runs in
:class:`csp.runner.StageRunner`; kept image indices must be equal and the final hidden states close.
Before-LLM reducers (PruMerge, PruMerge+, VisionZip) run on a small random CLIP encoder.
See docs/baselines.md for the per-method table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from csp.methods import VisionFeatures, build_method
from csp.runner import DecoderInputs, StageRunner
from tests.csp.test_csp_oracle import tiny_llm

P, N, S = 4, 36, 7  # text before the image, a 6 x 6 image, the instruction (its last row: the last prompt row)
T = P + N + S


def double_llm(layers: int = 6, seed: int = 3):
    return tiny_llm(layers, 4, 2, seed=seed).double()


def prompt(llm, seed: int = 0, expression: list[int] | None = None) -> DecoderInputs:
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, T, llm.config.hidden_size, generator=gen, dtype=torch.float64)
    is_image = torch.zeros(1, T, dtype=torch.bool)
    is_image[0, P:P + N] = True
    last = torch.tensor([[T - 1]])
    expr = None
    if expression is not None:
        expr = torch.zeros(1, T, dtype=torch.bool)
        expr[0, expression] = True
    return DecoderInputs(embeds, torch.ones(1, T, dtype=torch.bool), is_image, last, torch.ones(1, 1, dtype=torch.bool),
                         last_rows=last, lengths=[T], image_counts=[N], expression=expr)


def run_registered(llm, cfg: dict, inputs: DecoderInputs):
    """(kept grid indices of every stage after the input one, final hidden state of the last row)."""
    method = build_method(cfg)
    with torch.no_grad():
        out = StageRunner(llm, method, N).forward(inputs)
    kept = [k.indices[0][k.indices[0] >= 0].tolist() for k in out.kept_image_tokens if k.stage != "input"]
    return kept, out.rows(torch.tensor([[T - 1]]))[0, 0]


def run_layer(llm, layer, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer as LLaMA runs it (causal when ``mask`` is None; else a boolean T x T mask)."""
    m = None if mask is None else mask[None, None]
    return layer(h, attention_mask=m, position_ids=pos, position_embeddings=llm.rotary_emb(h, pos))


def attention_probs(llm, layer, h: torch.Tensor, pos: torch.Tensor, *, rope: bool = True,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``H x T x T`` softmax(q k^T / sqrt(D)) of ``layer`` on its input ``h`` (1 x T x d), causal, as
    LLaMA's eager attention returns it (output_attentions); ``key_mask``: keys allowed (T)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    length, dim = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, length, -1, dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, dim).transpose(1, 2)
    if rope:
        cos, sin = llm.rotary_emb(h, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = q @ k.transpose(2, 3) / math.sqrt(dim)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed &= key_mask[None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)[0]


def final_last_row(llm, h: torch.Tensor) -> torch.Tensor:
    return llm.norm(h)[0, -1]


# -- FastV (pkunlp-icler/FastV, src/transformers/src/transformers/models/llama/modeling_llama.py) ----------
def fastv_authors(llm, embeds: torch.Tensor, agg_layer: int, rank: int):
    h, pos, kept = embeds, torch.arange(T)[None], []
    last_attention = None  # the previous layer's attention (loop-carried)
    for idx, layer in enumerate(llm.layers):
        if idx == agg_layer:  # L736-756: layer K-1's attention, head mean, last row, image columns, top-R
            avg = last_attention.mean(0)[-1]
            top = avg[P:P + N].topk(rank).indices + P
            keep = torch.cat([torch.arange(P), top, torch.arange(P + N, T)]).sort().values
            h, pos = h[:, keep], keep[None]  # L754-756: original position ids
            kept.append(sorted((top - P).tolist()))
        last_attention = attention_probs(llm, layer, h, pos)  # this layer's output_attentions
        h = run_layer(llm, layer, h, pos)
    return kept, final_last_row(llm, h)


# -- FEATHER (markendo/FEATHER, prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py) -----------
def feather_authors(llm, embeds: torch.Tensor, ks: list[int], fastv_ratio: float, stride: int):
    ratio = 1 - fastv_ratio  # L23
    h, pos, kept = embeds, torch.arange(T)[None], []
    offset, image_indices, last_attention, original = P, None, None, None
    for idx, layer in enumerate(llm.layers):
        if idx in ks:
            if idx == ks[0]:  # L143-156: top int(n r) UNION the [::s, ::s] grid, unique and sorted
                top = last_attention.topk(int(len(image_indices) * ratio)).indices + offset
                side = int(math.sqrt(len(image_indices)))
                grid = torch.from_numpy(np.arange(len(image_indices)).reshape(side, side)[::stride, ::stride].flatten())
                top = torch.unique(torch.cat([top, grid + offset]), sorted=True)
                original = (top - offset).sort().values
            else:  # L159-164: top int(n r^2) of the n kept ones
                top = last_attention.topk(int(len(image_indices) * (ratio * ratio))).indices + offset
                original = original[(top - offset).sort().values]
            after = torch.arange(int(image_indices[-1]) + 1, h.shape[1])
            keep = torch.cat([torch.arange(offset), top, after]).sort().values
            h, pos = h[:, keep], pos[:, keep]  # L191-198: original position ids
            image_indices = torch.arange(len(top)) + offset  # L201
            kept.append(original.tolist())
        if idx + 1 in ks:
            if idx + 1 == ks[0]:
                image_indices = torch.arange(P, P + N)  # L206-209
            # L250-279: no RoPE, the last row as the only query, softmax over the image keys, head mean
            probs = attention_probs(llm, layer, h, pos, rope=False,
                                    key_mask=torch.isin(torch.arange(h.shape[1]), image_indices))
            last_attention = probs[:, -1, image_indices].mean(0)
        h = run_layer(llm, layer, h, pos)
    return kept, final_last_row(llm, h)


# -- PyramidDrop (Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py) -----------------------------
def pyramiddrop_authors(llm, embeds: torch.Tensor, layer_list: list[int], ratio_list: list[float]):
    ratios = [1.0, *ratio_list]  # llava/eval/model_vqa_loader.py L94-96 prepends 1.0
    h, pos, kept = embeds, torch.arange(T)[None], []
    image_index, grid = P, torch.arange(N)
    for layer_idx, layer in enumerate(llm.layers):
        h = run_layer(llm, layer, h, pos)
        rank_layer = layer_idx + 1  # L1222-1238: rank and drop after the layer before a listed one
        if rank_layer in layer_list:
            stage = layer_list.index(rank_layer)
            image_tokens, keep_length = int(N * ratios[stage]), int(N * ratios[stage + 1])  # L1306-1307
            # L1321-1342: the NEXT layer's norm and q/k, RoPE at the current position ids
            probs = attention_probs(llm, llm.layers[rank_layer], h, pos)
            row = h.shape[1] - 1  # L1390-1392: the last instruction row (prompt_total_len - 1)
            score = probs[:, row, image_index:image_index + image_tokens].mean(0)  # L1395-1401
            top = score.topk(keep_length).indices.sort().values + image_index  # L1405-1407
            start = image_index + image_tokens
            h = torch.cat([h[:, :image_index], h[:, top], h[:, start:]], dim=1)  # L1410
            pos = torch.arange(h.shape[1])[None]  # L1431-1446: renumbered 0, 1, 2, ...
            grid = grid[top - image_index]
            kept.append(grid.tolist())
    return kept, final_last_row(llm, h)


# -- Simignore (FanshuoZeng/Simignore, src/LLaVA/llava/model/llava_arch.py, with FastV) ----------------
def simignore_authors(llm, embeds: torch.Tensor, text_rows: list[int], k2: int, i_index: int, step: int,
                      agg_layer: int, rank: int):
    image = torch.nn.functional.normalize(embeds[0, P:P + N], p=2, dim=1)  # L263-268
    text = torch.nn.functional.normalize(embeds[0, text_rows], p=2, dim=1)
    similarity = image @ text.T  # L285
    values, order = torch.sort(similarity.view(-1), descending=True)  # L287-289
    cols = similarity.shape[1]
    pairs = [(int(i) // cols, int(i) % cols) for i in order]  # L293-298
    unique = []
    while len(unique) < k2 and i_index < len(pairs) and values[i_index] >= -1:  # L300-311
        if pairs[i_index][0] not in unique:
            unique.append(pairs[i_index][0])
        i_index += step
    # L383-386: the other image rows are masked as keys (original positions), then FastV at K
    allowed = torch.ones(T, dtype=torch.bool)
    allowed[P:P + N] = False
    allowed[[P + x for x in unique]] = True
    mask = torch.ones(T, T, dtype=torch.bool).tril() & allowed[None, :]
    mask |= torch.eye(T, dtype=torch.bool)
    kept = [sorted(unique)]
    h, pos = embeds, torch.arange(T)[None]
    last_attention = None  # the previous layer's attention (loop-carried)
    for idx, layer in enumerate(llm.layers):
        if idx == agg_layer:
            avg = last_attention.mean(0)[-1]
            top = avg[P:P + N].topk(rank).indices + P
            keep = torch.cat([torch.arange(P), top, torch.arange(P + N, T)]).sort().values
            h, pos, mask = h[:, keep], keep[None], None
            kept.append(sorted((top - P).tolist()))
        if idx == agg_layer - 1:
            last_attention = attention_probs(llm, layer, h, pos, key_mask=allowed)
        h = run_layer(llm, layer, h, pos, mask)
    return kept, final_last_row(llm, h)


# -- SparseVLM v2.0 (Gumpest/SparseVLMs, llava/model/language_model/modelling_sparse_llama.py, score.py) -----
def sparsevlm_v2_authors(llm, embeds: torch.Tensor, pruning_loc: list[int], counts: list[int], heads: int):
    h, pos, kept = embeds, torch.arange(T)[None], []
    v_start, v_num = P, N
    text_start = v_start + v_num
    m = (h[:, v_start:text_start] @ h[:, text_start:].transpose(1, 2)).softmax(2).mean(1)  # L198-204
    t_idx = torch.where(m > m.mean())[1]
    grid = torch.arange(N)
    for layer_idx, layer in enumerate(llm.layers):
        if layer_idx in pruning_loc:
            probs = attention_probs(llm, layer, h, pos)  # utils.py scaled_dot_product_attention: softmax
            out = run_layer(llm, layer, h, pos)  # L229-237: the listed layer runs at full width
            dim = layer.self_attn.head_dim
            ones = torch.ones(1, 1, h.shape[1], dim, dtype=h.dtype)
            cos, sin = llm.rotary_emb(h, pos)
            q1, k1 = apply_rotary_pos_emb(ones, ones, cos, sin)  # L242-251: RoPE weights of all-ones q, k
            probs = probs / (q1 @ k1.transpose(2, 3) / math.sqrt(dim))[0]
            rows = t_idx + text_start
            per_head = probs[:, rows, v_start:text_start].sum((1, 2))  # score.py L48-55
            probs = probs[per_head.topk(heads)[1]]
            score = probs.mean(0)[rows, v_start:v_start + v_num].mean(0)  # score.py L27-32
            top = torch.topk(score, min(counts[pruning_loc.index(layer_idx)], v_num - 1)).indices  # L41
            policy = torch.ones(h.shape[1], dtype=torch.bool)
            policy[v_start:text_start] = False
            policy[v_start + top] = True
            select = torch.where(policy)[0]
            h, pos = out[:, select], pos[:, select]  # L309-312: v2.0 keeps the position ids
            grid = grid[top.sort().values]
            v_num = len(top)
            text_start = v_start + v_num
            kept.append(grid.tolist())
        else:
            h = run_layer(llm, layer, h, pos)
    return kept, final_last_row(llm, h)


# -- IVC-Prune (FireRedTeam/IVC-Prune, transformers/src/transformers/models/llama/modeling_llama.py) -----
def ivc_prune_authors(llm, embeds: torch.Tensor, k: int, cache=None):
    """``IVCP_forward_flashattention`` (L799-1011) at prefill with image_token_start_index P and
    image_token_length N; ``cache``: a DynamicCache its ``prune_past_key_values`` cuts (L1013-1030)."""
    h, pos, kept = embeds, torch.arange(T)[None], []
    start, length = P, N
    value_weights, position_embedding = None, None  # set by layer k-1 below (loop-carried)
    for idx, layer in enumerate(llm.layers):
        if idx == k:
            sim = value_weights.mean(1)[0]  # L897: mean over heads, batch 0
            question = sim[start + length + 2:].mean(0)  # L899-902: rows from two past the image's end
            seeds = question[start:start + length].topk(max(1, round(length * 0.01))).indices + start  # L903-908
            anchor = torch.cat([seeds, torch.arange(start + length + 2, T)])  # L911-915
            related = sim[anchor].mean(0)[start:start + length]  # L916-919
            fg = related.topk(round(length * 0.2)).indices + start  # L920-922
            cos, sin = position_embedding  # L924-936: mean over the head dimension, top 5% each
            cos_mean = cos[0, start:start + length].mean(1)
            sin_mean = sin[0, start:start + length].mean(1)
            pe = torch.cat([cos_mean.topk(round(length * 0.05)).indices + start,
                            sin_mean.topk(round(length * 0.05)).indices + start])
            keep = torch.unique(torch.cat([torch.arange(start), fg, seeds, pe, torch.arange(start + length, T)]),
                                sorted=True)  # L938-945
            h, pos = h[:, keep], keep[None]  # L949-950: original position ids
            if cache is not None:  # L963-964, L1013-1030: layers 0 < l < k
                for past in range(1, k):
                    cache.layers[past].keys = cache.layers[past].keys[:, :, keep]
                    cache.layers[past].values = cache.layers[past].values[:, :, keep]
            kept.append(sorted((keep[(keep >= start) & (keep < start + length)] - start).tolist()))
        if idx == k - 1:  # L966-975, compute_attention_weights L750-766: V of the normalised input, no RoPE
            attn = layer.self_attn
            v = attn.v_proj(layer.input_layernorm(h)).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
            value_weights = (v @ v.transpose(2, 3) / math.sqrt(attn.head_dim)).softmax(-1)  # no causal mask
            position_embedding = llm.rotary_emb(h, pos)
        if cache is None:
            h = run_layer(llm, layer, h, pos)
        else:
            h = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=llm.rotary_emb(h, pos))
    return kept, final_last_row(llm, h)


IN_LLM = {
    "fastv": ({"name": "fastv", "layer": 2, "keep": 9}, lambda llm, e: fastv_authors(llm, e, 2, 9)),
    "feather": ({"name": "feather", "layers": [2, 4], "keep_ratio": 0.5, "stride": 3},
                lambda llm, e: feather_authors(llm, e, [2, 4], 0.5, 3)),
    "pyramiddrop": ({"name": "pyramiddrop", "layers": [1, 3, 4], "ratio": 0.6},
                    lambda llm, e: pyramiddrop_authors(llm, e, [1, 3, 4], [0.6, 0.6**2, 0.6**3])),
    "simignore": ({"name": "simignore", "keep_similar": 20, "layer": 3, "keep": 7, "i_index": 1, "step": 1},
                  lambda llm, e: simignore_authors(llm, e, [P + N + 1, P + N + 2, P + N + 3], 20, 1, 1, 3, 7)),
    "sparsevlm": ({"name": "sparsevlm", "layers": [0, 2, 3], "keep": [24, 12, 5], "heads": 2},
                  lambda llm, e: sparsevlm_v2_authors(llm, e, [0, 2, 3], [24, 12, 5], 2)),
    "ivc_prune": ({"name": "ivc_prune", "layer": 3}, lambda llm, e: ivc_prune_authors(llm, e, 3)),
}


def test_ivc_prune_decodes_against_its_cut_cache() -> None:
    """Chat: its prefill cuts the caches of layers 1..k-1 (layer 0's stays whole); the next token at
    position keep[-1] + 1 (L868-874) attends to that: the runner's decode step gives the same state."""
    from transformers import DynamicCache

    from csp.runner import CachedKeyMasks

    llm = double_llm(seed=21)
    inputs = prompt(llm, 3)
    new = torch.randn(1, 1, llm.config.hidden_size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    theirs = DynamicCache(config=llm.config)
    with torch.no_grad():
        ivc_prune_authors(llm, inputs.embeds, 3, cache=theirs)
        h, pos = new, torch.tensor([[T]])
        for layer in llm.layers:
            h = layer(h, attention_mask=None, position_ids=pos, past_key_values=theirs, use_cache=True,
                      position_embeddings=llm.rotary_emb(h, pos))
        want = llm.norm(h)[0, 0]
        runner = StageRunner(llm, build_method({"name": "ivc_prune", "layer": 3}), N)
        ours = DynamicCache(config=llm.config)
        out = runner.forward(inputs, cache=ours)
        got = runner.decode(new, torch.tensor([[T]]), ours, CachedKeyMasks(out.layer_key_valid, out.layer_key_padded))
    assert [ours.layers[i].keys.shape[2] for i in range(6)] == [theirs.layers[i].keys.shape[2] for i in range(6)]
    assert ours.layers[0].keys.shape[2] == T + 1 > ours.layers[1].keys.shape[2]
    torch.testing.assert_close(got[0, 0], want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(IN_LLM))
def test_in_llm_method_keeps_what_its_authors_code_keeps(name: str, seed: int) -> None:
    llm = double_llm(seed=seed + 10)
    cfg, authors = IN_LLM[name]
    inputs = prompt(llm, seed, expression=[P + N + 1, P + N + 2, P + N + 3])
    kept, last = run_registered(llm, cfg, inputs)
    with torch.no_grad():
        want_kept, want_last = authors(llm, inputs.embeds)
    assert kept == want_kept
    torch.testing.assert_close(last, want_last, atol=1e-9, rtol=1e-9)


def test_simignore_compares_with_the_expression_not_the_fixed_wording() -> None:
    llm = double_llm(seed=4)
    cfg, _ = IN_LLM["simignore"]
    with_expression = prompt(llm, 5, expression=[P + N + 1])
    without = prompt(llm, 5)
    assert run_registered(llm, cfg, with_expression)[0][0] != run_registered(llm, cfg, without)[0][0]
    with torch.no_grad():
        want = simignore_authors(llm, with_expression.embeds, [P + N + 1], 20, 1, 1, 3, 7)[0]
    assert run_registered(llm, cfg, with_expression)[0] == want


def test_pyramiddrop_contiguous_ids_change_the_kept_set() -> None:
    """With original ids the later stages keep other tokens (what the renumbering changes)."""
    from csp.methods.pyramiddrop import PyramidDrop
    from csp.plan import Prune, TokenPlan

    llm = double_llm(seed=21)
    inputs = prompt(llm, 3)
    cfg, _ = IN_LLM["pyramiddrop"]
    method = build_method(cfg)
    runner = StageRunner(llm, method, N)
    renumbered = runner.forward(inputs).kept_image_tokens
    plan = method.plan(6, N)
    runner.plan = TokenPlan(events=tuple(Prune(e.layer, e.scorer, e.keep, e.score_layer) for e in plan.events))
    runner._events = [runner.plan.at(i) for i in range(6)]
    original = runner.forward(inputs).kept_image_tokens
    assert isinstance(method, PyramidDrop)
    assert torch.equal(renumbered[1].indices, original[1].indices)  # the first stage ranks at original ids
    assert any(not torch.equal(a.indices, b.indices) for a, b in zip(renumbered[2:], original[2:], strict=True))


# -- before the LLM: PruMerge, PruMerge+ (42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py)
def small_clip(seed: int, n: int = 64, layers: int = 3):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=layers)
    cfg._attn_implementation = "eager"
    encoder = torch.nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(layers)]).double().eval()
    gen = torch.Generator().manual_seed(seed)
    hidden = tuple(torch.randn(1, 1 + n, 16, generator=gen, dtype=torch.float64) for _ in range(layers + 1))
    side = int(math.isqrt(n))
    return VisionFeatures(hidden_states=hidden, layers=encoder, select_layer=-2, grid=(side, side))


def outlier_ratio(attn: torch.Tensor) -> float:
    """clip_encoder.py L34-47: share of CLS-attention values above Q3 + 1.5 IQR (numpy percentiles)."""
    values = attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)


def _cls_attention(vision: VisionFeatures) -> torch.Tensor:
    from csp.methods.prumerge import last_layer_cls_attention

    return last_layer_cls_attention(vision)[0]


def prumerge_authors(vision: VisionFeatures, plus: bool, ratio: float | None):
    """``token_prune_merge_advanced`` (L85-171) / ``_plus`` (L174-281), the evaluation (adaptive)
    branch; ``ratio`` replaces the IQR ratio where given. Returns {grid index: merged row}, extra."""
    layer = vision.layers[-1]  # layers[23]: the last layer's q_proj / k_proj outputs (hooks, L93-107)
    x = layer.layer_norm1(vision.hidden_states[-2])
    q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    features = vision.hidden_states[-2][:, 1:]  # feature_select: layer -2, no CLS
    _, n, c = features.shape
    cls_attn = (q @ k.transpose(-2, -1) * c**-0.5).softmax(-1)[:, 0, 1:]  # L109-112
    ratio = outlier_ratio(cls_attn) if ratio is None else ratio  # L114-115
    idx = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True).indices  # L116
    if plus:  # L208-214; its literal 575 is N - 1 at N = 576
        step = int(1 / ratio)
        sequence = torch.arange(0, n - 1, int(step / 3))
        flat = idx.flatten()
        extra_idx = torch.tensor([int(v) for v in sequence if v not in flat], dtype=torch.long)
        idx = torch.cat([idx, extra_idx[None]], dim=1)
    keys = k[:, 1:]
    kept_x, kept_attn, kept_keys = features[0, idx[0]], cls_attn[0, idx[0]], keys[0, idx[0]]
    compl = torch.tensor([i for i in range(n) if i not in idx[0].tolist()], dtype=torch.long)  # complement_idx
    rest_x, rest_attn = features[0, compl], cls_attn[0, compl]
    kept_keys_n = torch.nn.functional.normalize(kept_keys, p=2, dim=-1)
    rest_keys_n = torch.nn.functional.normalize(keys[0, compl], p=2, dim=-1)
    merged = {}
    for i in range(len(idx[0])):  # L139-165: the 32 nearest among every token but i
        others = [j for j in range(len(idx[0])) if j != i]
        cand_x = torch.cat([kept_x[others], rest_x])
        cand_attn = torch.cat([kept_attn[others], rest_attn])
        cand_keys = torch.cat([kept_keys_n[others], rest_keys_n])
        near = (kept_keys_n[i] @ cand_keys.T).topk(32).indices
        merged[int(idx[0, i])] = (cand_x[near] * cand_attn[near, None]).sum(0) + kept_x[i]
    extra = (rest_x * rest_attn[:, None]).sum(0)  # L168
    return merged, extra


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize(("name", "keep"), [("prumerge", "iqr"), ("prumerge", 12), ("prumerge_plus", "iqr"),
                                            ("prumerge_plus", 5)])
def test_prumerge_merges_what_its_authors_code_merges(name: str, keep, seed: int) -> None:
    vision = small_clip(seed)
    out = build_method({"name": name, "keep": keep}).reduce_images(vision)
    ratio = None if keep == "iqr" else keep / 64
    with torch.no_grad():
        if keep == "iqr" and int(64 * outlier_ratio(_cls_attention(vision))) == 0:
            # no IQR outlier: its PruMerge keeps none and its PruMerge+ divides by 0; here one token stays
            # (the documented deviation): the best-attended one (PruMerge+ adds its uniform samples to it)
            kept = [int(s) for s in out.source[0] if s >= 0]
            best = int(_cls_attention(vision)[0].argmax())
            assert best in kept and (name == "prumerge_plus" or kept == [best])
            return
        merged, extra = prumerge_authors(vision, name == "prumerge_plus", ratio)
    source = out.source[0]
    got = {int(s): out.features[0, i].double() for i, s in enumerate(source) if s >= 0}
    assert sorted(got) == sorted(merged)
    for s, row in merged.items():
        torch.testing.assert_close(got[s], row, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.features[0, len(got)].double(), extra, atol=1e-5, rtol=1e-5)


# -- VisionZip (dvlab-research/VisionZip, visionzip/clip_encoder.py, utils.py, main.py) --------------------
def visionzip_authors(vision: VisionFeatures, dominant: int, contextual: int) -> torch.Tensor:
    layer = vision.layers[-2]
    h_in = layer.layer_norm1(vision.hidden_states[-3])
    attn = layer.self_attn
    b, t, c = h_in.shape
    heads, dim = attn.num_heads, c // attn.num_heads
    q = (attn.q_proj(h_in) * attn.scale).view(b, t, heads, dim).transpose(1, 2)
    k = attn.k_proj(h_in).view(b, t, heads, dim).transpose(1, 2)
    attn_weights = (q @ k.transpose(-1, -2)).softmax(-1)  # utils.py L22-33: attentions[-2]
    metric = k.mean(1)  # utils.py L24, L89: raw keys averaged over heads
    hidden_states = vision.hidden_states[-2]  # clip_encoder.py L44
    dominant_num = dominant - 1  # main.py L7
    topk = attn_weights[:, :, 0, 1:].sum(dim=1).topk(dominant_num, dim=1).indices + 1  # L50-53
    all_indices = torch.cat([torch.zeros((b, 1), dtype=topk.dtype), topk], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)  # L56
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(b, dominant_num + 1, c)
    metric_f = metric[mask].view(b, t - (dominant_num + 1), metric.shape[2])  # L60-64
    hidden_f = hidden_states.masked_select(mask.unsqueeze(-1)).view(b, t - (dominant_num + 1), c)
    metric_n = metric_f / metric_f.norm(dim=-1, keepdim=True)
    step = max(1, metric_n.shape[1] // contextual)  # L67-80
    targets = torch.arange(0, metric_n.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(metric_n.shape[1]), targets)
    sim = torch.bmm(metric_n[:, others], metric_n[:, targets].transpose(1, 2))
    assign = torch.zeros(b, int(others.sum()), contextual, dtype=hidden_f.dtype)
    assign.scatter_(2, sim.argmax(2)[..., None], 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    contextual_tokens = hidden_f[:, targets] + torch.bmm(assign.transpose(1, 2), hidden_f[:, others]) / counts
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)  # L83


@pytest.mark.parametrize("seed", [0, 1])
def test_visionzip_reduces_as_its_authors_code(seed: int) -> None:
    vision = small_clip(seed)
    out = build_method({"name": "visionzip", "dominant": 9, "contextual": 4}).reduce_images(vision)
    with torch.no_grad():
        want = visionzip_authors(vision, 9, 4)
    torch.testing.assert_close(out.features[0].double(), want[0], atol=1e-5, rtol=1e-5)


#: Before-LLM methods whose authors'-code tests are above.
BEFORE_LLM = {"prumerge", "prumerge_plus", "visionzip", "litelvlm"}  # litelvlm: tests/csp/test_litelvlm.py


def test_every_baseline_has_an_authors_code_test() -> None:
    """Every registered method but CSP itself and the random control (csp/methods/random_keep.py)."""
    from csp.methods import METHODS

    covered = set(IN_LLM) | BEFORE_LLM
    assert covered == set(METHODS) - {"csp", "random_keep"}


def test_pyramiddrop_decoding_positions_follow_its_code() -> None:
    """One generation step after the prefill: its decoding shifts the new token's position id by the
    tokens dropped before each layer (modeling_llama_pdrop.py L1259-1268), i.e. each layer sees it right
    after its own cached tokens."""
    from transformers import DynamicCache

    from csp.runner import CachedKeyMasks

    llm = double_llm(seed=30)
    inputs = prompt(llm, 7)
    layer_list, lam = [1, 3, 4], 0.6
    ratios = [1.0] + [lam ** (i + 1) for i in range(3)]
    new = torch.randn(1, 1, llm.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        # the authors' prefill (as pyramiddrop_authors) filling a cache, then one decoding step
        cache, h, pos = DynamicCache(), inputs.embeds, torch.arange(T)[None]
        for layer_idx, layer in enumerate(llm.layers):
            h = layer(h, position_ids=pos, position_embeddings=llm.rotary_emb(h, pos), past_key_values=cache,
                      use_cache=True)
            if layer_idx + 1 in layer_list:
                stage = layer_list.index(layer_idx + 1)
                image_tokens, keep_length = int(N * ratios[stage]), int(N * ratios[stage + 1])
                probs = attention_probs(llm, llm.layers[layer_idx + 1], h, pos)
                top = probs[:, -1, P:P + image_tokens].mean(0).topk(keep_length).indices.sort().values + P
                h = torch.cat([h[:, :P], h[:, top], h[:, P + image_tokens:]], dim=1)
                pos = torch.arange(h.shape[1])[None]
        step_pos, x = torch.tensor([[T]]), new
        for layer_idx, layer in enumerate(llm.layers):
            x = layer(x, position_ids=step_pos, position_embeddings=llm.rotary_emb(x, step_pos), past_key_values=cache,
                      use_cache=True)
            if layer_idx + 1 in layer_list:
                stage = layer_list.index(layer_idx + 1)
                step_pos = step_pos - (int(N * ratios[stage]) - int(N * ratios[stage + 1]))
        want = llm.norm(x)[0, 0]
        # the registered method: prefill with a cache, one decode step at the original position T
        runner = StageRunner(llm, build_method({"name": "pyramiddrop", "layers": layer_list, "ratio": lam}), N)
        cache2 = DynamicCache()
        out = runner.forward(inputs, cache=cache2)
        keys = CachedKeyMasks(out.layer_key_valid, out.layer_key_padded)
        got = runner.decode(new, torch.tensor([[T]]), cache2, keys)[0, 0]
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
