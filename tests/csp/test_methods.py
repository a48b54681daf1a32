"""Every registered method: runner vs the masking oracle, evaluation and chat on the tiny LISA with
batches, and each method's selection rule against a direct computation on hand-made tensors."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
from transformers import LlamaModel

from csp.methods import METHODS, Method, ReducedImages, build_method
from csp.methods.prumerge import iqr_keep_counts, merge
from csp.methods.visionzip import VisionZip
from csp.plan import Prune, TopFraction, TopKUnionGrid
from csp.runner import DecoderInputs, StageRunner
from csp.scorers import QueryAttention, ScoreContext, TextSimilarity, sparsevlm_raters
from csp.tokens import TokenState
from model.bundle import LisaBundle
from model.inference import generate, teacher_forced
from model.pipeline import ImageEncoding, Query, SegmentationPipeline
from model.prompt import build_prompt, tokenize_with_image
from tests.csp.reference_csp import reference_forward, rms_norm, rope
from tests.csp.test_csp_oracle import random_batch, tiny_llm

N_ORACLE = 36  # a 6 x 6 grid (FEATHER's uniform grid needs a square)

#: A configuration of every registered method for the 6-layer oracle model with N = 36.
ORACLE_CONFIGS = {
    "csp": {"Lc": 2, "Nc": 12, "Ls": 1, "Np": 6},
    "fastv": {"layer": 2, "keep": 10},
    "pyramiddrop": {"layers": [1, 3, 4], "ratio": 0.6},  # int(36 * 0.6^i) = 21, 12, 7
    "sparsevlm": {"layers": [0, 2, 3], "keep": [24, 12, 5], "heads": 3},
    "feather": {"layers": [2, 4], "keep_ratio": 0.5, "stride": 3},  # 18 | grid, then int(M / 4)
    "simignore": {"keep_similar": 24, "layer": 3, "keep": 8},
    "prumerge": {"keep": "iqr"},
    "prumerge_plus": {"keep": "iqr"},
    "visionzip": {"dominant": 10, "contextual": 4},
    "random_keep": {"layer": 3, "keep": 7},
    "ivc_prune": {"layer": 3},  # seeds 1, foreground round(7.2) = 7, coordinates round(1.8) = 2 each
    "litelvlm": {"keep": 12, "order": "raster", "text_side": "tiny"},  # the input set, original ids
}

#: The same for the tiny LISA (6 layers, N = 256).
PIPELINE_CONFIGS = {
    "csp": {"Lc": 2, "Nc": 64, "Ls": 1, "Np": 16},
    "fastv": {"layer": 2, "keep": 64},
    "pyramiddrop": {"layers": [2, 3, 4], "ratio": 0.5},
    "sparsevlm": {"layers": [0, 2, 3], "keep": [128, 64, 16], "heads": 2},
    "feather": {"layers": [2, 4], "keep_ratio": 0.3, "stride": 3},
    "simignore": {"keep_similar": 200, "layer": 3, "keep": 50},
    "prumerge": {"keep": "iqr"},
    "prumerge_plus": {"keep": 20},  # spacing int(int(256 / 20) / 3) = 4
    "visionzip": {"dominant": 54, "contextual": 10},
    "random_keep": {"layer": 2, "keep": 40},
    "ivc_prune": {"layer": 3},
    "litelvlm": {"keep": 40, "text_side": "tiny"},  # its own order, contiguous ids (tests/csp/test_litelvlm.py)
}


def method_config(name: str, table: dict) -> dict:
    """``{name, **table[name]}`` with ``text_side: tiny`` replaced by a random text side for the tiny LISA."""
    cfg = {"name": name, **table[name]}
    if cfg.get("text_side") == "tiny":
        from tests.csp.test_litelvlm import tiny_text_side

        cfg["text_side"] = tiny_text_side(32)
    return cfg


def test_every_registered_method_has_test_configs() -> None:
    assert sorted(ORACLE_CONFIGS) == sorted(METHODS) == sorted(PIPELINE_CONFIGS)


# -- in-LLM plans against the masking oracle ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_matches_masking_oracle(name: str) -> None:
    llm = tiny_llm(6, 4, 2, seed=5)
    rng = random.Random(zlib.crc32(name.encode()))
    method = build_method(method_config(name, ORACLE_CONFIGS))
    runner = StageRunner(llm, method, N_ORACLE)
    if not runner.plan.events and not runner.plan.input_keep:
        # a before-LLM reducer: nothing in the LLM
        assert type(method).reduce_images is not Method.reduce_images or method.per_query_reduction
        return
    embeds, valid, is_image, qrows, qvalid, lengths, img_rows, queries = random_batch(rng, 3, N_ORACLE, 48)
    keep = torch.stack([torch.tensor(sorted(rng.sample(range(N_ORACLE), 12))) for _ in range(3)])
    last = torch.tensor([[n - 1] for n in lengths])
    inputs = DecoderInputs(embeds, valid, is_image, qrows, qvalid, cluster_keep=keep, last_rows=last)
    with torch.no_grad():
        out = runner.forward(inputs)
    for i in range(3):
        ref, ref_img, ref_total, ref_kept = reference_forward(
            llm, embeds[i, : lengths[i]], img_rows[i], torch.tensor(queries[i]), runner.plan, keep[i],
            last_row=lengths[i] - 1,
        )
        state = out.state
        cols = state.valid[i].nonzero().flatten()
        torch.testing.assert_close(state.hidden[i, cols].double(), ref[state.positions[i, cols]], atol=2e-4, rtol=2e-4)
        assert out.records[i].image_tokens == ref_img
        assert out.records[i].total_tokens == ref_total
        assert [torch.equal(k.indices[i][k.indices[i] >= 0], want) for k, want in
                zip(out.kept_image_tokens, ref_kept, strict=True)] == [True] * len(ref_kept)
    static = method.image_tokens_per_layer(6, N_ORACLE)
    if static is not None:
        assert all(r.image_tokens == static for r in out.records)


@pytest.mark.parametrize("Ls", [0, 1])
def test_csp_pruned_by_ivc_value_matches_masking_oracle(Ls: int) -> None:
    """schedule.pruning = ivc_value: CSP's pruning stage ranked by IVC-Prune's value-similarity score."""
    llm = tiny_llm(6, 4, 2, seed=6)
    rng = random.Random(31 + Ls)
    method = build_method({"name": "csp", "Lc": 2, "Nc": 12, "Ls": Ls, "Np": 6, "pruning": "ivc_value"})
    runner = StageRunner(llm, method, N_ORACLE)
    assert type(runner.plan.events[-1].scorer).__name__ == "IvcValue"
    embeds, valid, is_image, qrows, qvalid, lengths, img_rows, queries = random_batch(rng, 3, N_ORACLE, 48)
    keep = torch.stack([torch.tensor(sorted(rng.sample(range(N_ORACLE), 12))) for _ in range(3)])
    last = torch.tensor([[n - 1] for n in lengths])
    with torch.no_grad():
        out = runner.forward(DecoderInputs(embeds, valid, is_image, qrows, qvalid, cluster_keep=keep, last_rows=last))
    for i in range(3):
        ref, ref_img, _, ref_kept = reference_forward(llm, embeds[i, : lengths[i]], img_rows[i],
                                                      torch.tensor(queries[i]), runner.plan, keep[i],
                                                      last_row=lengths[i] - 1)
        cols = out.state.valid[i].nonzero().flatten()
        torch.testing.assert_close(out.state.hidden[i, cols].double(), ref[out.state.positions[i, cols]],
                                   atol=2e-4, rtol=2e-4)
        assert out.records[i].image_tokens == ref_img
        assert [k.indices[i][k.indices[i] >= 0].tolist() for k in out.kept_image_tokens] == [r.tolist() for r in ref_kept]


# -- every method in evaluation and chat on the tiny LISA -----------------------------------------
def counts_from_kept(kept: list, num_layers: int, sample: int) -> list[int]:
    """Image tokens per layer implied by the kept-token entries (grid tokens + tokens off the grid)."""
    counts = []
    for layer in range(num_layers):
        entry = [k for k in kept if k.first_layer <= layer][-1]
        counts.append(int((entry.indices[sample] >= 0).sum()) + entry.num_extra)
    return counts


QUERIES = [Query("the red car", False, "a"),
           Query("the small dog that sits under the wooden table next to the window", True, "b"),
           Query("what can hold hot soup", True, "c")]


def check_kept_and_counts(out, num_layers: int, static: list[int] | None) -> None:
    """Kept indices ascending, -1 only as padding; recorded counts = the kept sets (= the static level)."""
    kept = out.kept_image_tokens
    assert kept[0].first_layer == 0 and [k.first_layer for k in kept] == sorted({k.first_layer for k in kept})
    for i, record in enumerate(out.records):
        for entry in kept:
            row = entry.indices[i]
            real = row[row >= 0]
            assert torch.equal(real, real.sort().values) and len(real.unique()) == len(real)
            assert bool((row[len(real):] == -1).all())  # padding only at the end
        assert record.image_tokens == counts_from_kept(kept, num_layers, i)
        if static is not None:  # the configured level, exactly
            assert record.image_tokens == static
        assert record.total_tokens[0] > record.image_tokens[0]


@pytest.fixture(scope="module")
def plain_encoding(tiny_bundle: LisaBundle, make_image) -> ImageEncoding:
    """The image encoded once for every method that needs nothing of CLIP beyond its features."""
    return SegmentationPipeline(tiny_bundle).encode_image(make_image(40, 52, seed=3))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.slow
def test_every_method_runs_in_evaluation_and_chat(name: str, tiny_bundle: LisaBundle, make_image,
                                                  plain_encoding: ImageEncoding) -> None:
    """Teacher forcing (evaluation) and KV-cache generation (chat), three prompts of different lengths
    in one batch (pipeline.segment is run for every method by the table test)."""
    method = build_method(method_config(name, PIPELINE_CONFIGS))
    pipe = SegmentationPipeline(tiny_bundle, method=method)
    own_encoding = (type(method).reduce_images is not Method.reduce_images or method.cls_attention_layer is not None
                    or method.per_query_reduction)
    enc = pipe.encode_image(make_image(40, 52, seed=3)) if own_encoding else plain_encoding
    tok, tokenizer = tiny_bundle.token_ids, tiny_bundle.tokenizer
    full = [tokenize_with_image(build_prompt(q.text, q.is_sentence), tokenizer) for q in QUERIES]
    prompts = [tokenize_with_image(build_prompt(q.text, q.is_sentence, answer=None), tokenizer) for q in QUERIES]
    assert len({len(p) for p in prompts}) == 3
    texts = [q.text for q in QUERIES]
    keep = pipe.cluster(enc, [q.sample_id for q in QUERIES], texts)
    images = pipe.image_inputs(enc, len(QUERIES), texts)
    evaluation = teacher_forced(pipe.model, pipe.runner, full, seg_id=tok.seg, pad_id=tok.pad, cluster_keep=keep,
                                prompt_lengths=[len(p) for p in prompts], **images)
    chat = generate(pipe.model, pipe.runner, prompts, seg_id=tok.seg, eos_id=tok.eos, pad_id=tok.pad,
                    max_new_tokens=2, cluster_keep=keep, **images)
    static = method.image_tokens_per_layer(pipe.num_layers, pipe.num_image_tokens)
    for out in (evaluation, chat):
        check_kept_and_counts(out, pipe.num_layers, static)
    assert all(len(g) == 2 for g in chat.generated)
    assert [e.shape[0] for e in evaluation.seg_embeddings] == [1, 1, 1]
    if name != "csp":  # ranked by the last prompt row: chat's prefill and teacher forcing agree
        for got, want in zip(chat.kept_image_tokens, evaluation.kept_image_tokens, strict=True):
            assert (got.stage, got.first_layer, got.num_extra) == (want.stage, want.first_layer, want.num_extra)
            assert torch.equal(got.indices, want.indices)


@pytest.mark.slow
def test_prumerge_iqr_counts_differ_per_sample_in_one_batch(tiny_bundle: LisaBundle, make_image) -> None:
    pipe = SegmentationPipeline(tiny_bundle, method=build_method({"name": "prumerge"}))
    encs = [pipe.encode_image(make_image(40, 52, seed=s)) for s in (0, 7)]
    counts = [int(e.reduced.valid.sum()) for e in encs]
    assert counts[0] != counts[1], "the test images must give different IQR counts"
    width = max(counts)

    def padded(t: torch.Tensor, value: float) -> torch.Tensor:
        pad = width - t.shape[1]
        return torch.cat([t, t.new_full((1, pad, *t.shape[2:]), value)], dim=1)

    images = {"image_embeds": torch.cat([padded(e.reduced_embeds, 0.0) for e in encs]),
              "image_valid": torch.cat([padded(e.reduced.valid, False) for e in encs]),
              "image_source": torch.cat([padded(e.reduced.source, -1) for e in encs])}
    tok, tokenizer = tiny_bundle.token_ids, tiny_bundle.tokenizer
    ids = [tokenize_with_image(build_prompt(q.text, q.is_sentence), tokenizer) for q in QUERIES[:2]]
    out = teacher_forced(pipe.model, pipe.runner, ids, seg_id=tok.seg, pad_id=tok.pad, **images)
    assert [r.image_tokens for r in out.records] == [[c] * pipe.num_layers for c in counts]
    kept = out.kept_image_tokens[0]
    assert kept.stage == "merging" and kept.num_extra == 1
    for i, enc in enumerate(encs):
        source = enc.reduced.source[0]
        assert torch.equal(kept.indices[i][kept.indices[i] >= 0], source[source >= 0])
    alone = teacher_forced(pipe.model, pipe.runner, ids[1:], seg_id=tok.seg, pad_id=tok.pad,
                           **pipe.image_inputs(encs[1], 1))
    torch.testing.assert_close(out.seg_hidden[1], alone.seg_hidden[0], atol=1e-5, rtol=1e-5)


# -- each selection rule against a direct computation ---------------------------------------------
def plain_hidden_states(llm: LlamaModel, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states


def explicit_last_row_attention(llm: LlamaModel, layer: int, h: torch.Tensor, row: int, with_rope: bool,
                                keys: torch.Tensor) -> torch.Tensor:
    """softmax over ``keys`` (columns) of q_row . k / sqrt(D), mean over heads, written out."""
    attn = llm.layers[layer].self_attn
    cfg = llm.config
    x = rms_norm(h.double(), llm.layers[layer].input_layernorm.weight.double(), cfg.rms_norm_eps)
    heads, kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.double().T).view(-1, heads, dim).transpose(0, 1)
    k = (x @ attn.k_proj.weight.double().T).view(-1, kv, dim).transpose(0, 1).repeat_interleave(heads // kv, 0)
    if with_rope:
        positions = torch.arange(h.shape[0])
        theta = cfg.rope_parameters["rope_theta"]
        q, k = rope(q, positions, theta), rope(k, positions, theta)
    logits = (q[:, row, None] @ k[:, keys].transpose(1, 2))[:, 0] / math.sqrt(dim)  # H x K
    return logits.softmax(-1).mean(0)


def one_sample(llm: LlamaModel, n_img: int, prefix: int = 3, suffix: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    length = prefix + n_img + suffix
    embeds = torch.randn(1, length, llm.config.hidden_size, generator=gen)
    is_image = torch.zeros(1, length, dtype=torch.bool)
    is_image[0, prefix:prefix + n_img] = True
    last = torch.tensor([[length - 2]])
    inputs = DecoderInputs(embeds, torch.ones(1, length, dtype=torch.bool), is_image, last,
                           torch.ones(1, 1, dtype=torch.bool), last_rows=last)
    return inputs, torch.arange(prefix, prefix + n_img)


def test_fastv_keeps_topk_of_the_explicit_softmax_row() -> None:
    llm = tiny_llm(4, 4, 4, seed=11)
    inputs, image_rows = one_sample(llm, 30)
    with torch.no_grad():
        out = StageRunner(llm, build_method({"name": "fastv", "layer": 2, "keep": 7}), 30).forward(inputs)
    h1 = plain_hidden_states(llm, inputs.embeds)[1][0]  # input of layer K - 1 = 1
    row = int(inputs.last_rows[0, 0])
    full_row = explicit_last_row_attention(llm, 1, h1, row, True, torch.arange(row + 1))  # the whole causal row
    expected = full_row[image_rows].topk(7).indices.sort().values
    assert [(k.stage, k.first_layer) for k in out.kept_image_tokens] == [("input", 0), ("pruning", 2)]
    assert torch.equal(out.kept_image_tokens[1].indices[0], expected)


def test_feather_score_has_no_rope_and_softmax_over_image_keys() -> None:
    llm = tiny_llm(3, 4, 2, seed=12)
    inputs, image_rows = one_sample(llm, 36)
    state = TokenState.full(inputs.embeds, inputs.valid, inputs.is_image)
    h = inputs.embeds
    scorer = QueryAttention(rows="last", rope=False, keys="image")
    row = int(inputs.last_rows[0, 0])
    expected = explicit_last_row_attention(llm, 0, h[0], row, False, image_rows)
    for shift in (0, 50):  # without RoPE the positions cannot matter
        rotary = llm.rotary_emb(h, position_ids=state.positions + shift)
        got = scorer.score(ScoreContext(llm.layers[0], h, rotary, state, inputs))[0, image_rows]
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    with_rope = explicit_last_row_attention(llm, 0, h[0], row, True, image_rows)
    assert not torch.allclose(with_rope, expected, atol=1e-4)  # so the check above can tell them apart
    # stage 1: top int(36 * 0.2) = 7 UNION the [::3, ::3] grid of the 6 x 6 patches (indices 0, 3, 18, 21)
    rule = TopKUnionGrid(k=7, stride=3, side=6)
    scores = expected.float()[None]
    kept = rule.keep(scores, torch.ones(1, 36, dtype=torch.bool), torch.arange(36)[None])
    want = set(expected.topk(7).indices.tolist()) | {0, 3, 18, 21}
    assert set(kept[0].nonzero().flatten().tolist()) == want


def test_top_fraction_counts_per_sample() -> None:
    scores = torch.tensor([[5.0, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0], [1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    candidates = torch.ones(2, 12, dtype=torch.bool)
    candidates[0, 5:] = False  # sample 0 has 5 candidates, sample 1 has 12
    kept = TopFraction(0.5).keep(scores, candidates, torch.zeros(2, 12, dtype=torch.long))
    assert kept[0].nonzero().flatten().tolist() == [0, 1]  # int(5 * 0.5) = 2
    assert kept[1].nonzero().flatten().tolist() == [6, 7, 8, 9, 10, 11]  # int(12 * 0.5) = 6


def test_prumerge_count_is_the_iqr_rule_per_sample() -> None:
    # 16 values 1..13, 40, 50, 60: Q1 = 4.75, Q3 = 12.25 (linear), upper = 12.25 + 1.5 * 7.5 = 23.5 -> 3
    # outliers; 1..16: Q1 = 4.75, Q3 = 12.25, upper 23.5 -> none (PruMerge keeps at least one).
    a = torch.tensor([list(range(1, 14)) + [40, 50, 60], list(range(1, 17))], dtype=torch.float32)
    a = a[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert iqr_keep_counts(a).tolist() == [3, 0]
    method = build_method({"name": "prumerge"})
    kept = method.kept_mask(a)
    assert sorted(a[0][kept[0]].tolist()) == [40.0, 50.0, 60.0]
    assert a[1][kept[1]].tolist() == [16.0]


def test_prumerge_merge_and_extra_token_by_hand() -> None:
    # N = 4 <= 32 neighbours: every OTHER token is a neighbour of each kept one (itself excluded, as
    # PruMerge's clip_encoder.py L141-156 builds the candidates from every token but i).
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]])
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    kept = torch.tensor([[False, True, False, True]])
    out = merge(x, torch.randn(1, 4, 3), a, kept)
    # token 1: [0, 1] + 0.1 x_0 + 0.3 x_2 + 0.4 x_3 = [1.2, 1.3]; token 3: [2, 0] + 0.1 x_0 + 0.2 x_1 + 0.3 x_2
    # = [2.4, 0.5]; extra = 0.1 x_0 + 0.3 x_2 = [0.4, 0.3]
    torch.testing.assert_close(out.features[0], torch.tensor([[1.2, 1.3], [2.4, 0.5], [0.4, 0.3]]))
    assert out.source.tolist() == [[1, 3, -1]] and out.valid.tolist() == [[True, True, True]]


def test_prumerge_plus_adds_the_uniform_samples() -> None:
    # keep 2 of N = 16: ratio 1/8, step int(8) = 8, stride int(8 / 3) = 2 -> arange(0, 15, 2)
    a = torch.zeros(2, 16)
    a[0, 5], a[0, 9] = 2.0, 1.0
    a[1, 1], a[1, 2] = 2.0, 1.0
    kept = build_method({"name": "prumerge_plus", "keep": 2}).kept_mask(a)
    assert kept[0].nonzero().flatten().tolist() == [0, 2, 4, 5, 6, 8, 9, 10, 12, 14]
    assert kept[1].nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 8, 10, 12, 14]


def test_visionzip_contextual_tokens_by_hand() -> None:
    vz = VisionZip(dominant=2, contextual=2)
    # remaining patches (M = 6, in grid order): targets at slots 0 and 3 (step 6 // 2 = 3)
    patches = torch.arange(8, dtype=torch.float32).view(1, 8, 1) * 10  # patch p has feature 10 p
    metric = torch.zeros(1, 8, 2)
    rest = torch.tensor([[0, 2, 3, 5, 6, 7]])
    metric[0, 0], metric[0, 5] = torch.tensor([1.0, 0]), torch.tensor([0, 1.0])  # the two targets
    metric[0, 2], metric[0, 3] = torch.tensor([0.1, 1.0]), torch.tensor([1.0, 0.2])  # -> target 5, target 0
    metric[0, 6], metric[0, 7] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # -> target 0, target 5
    out = vz._contextual(patches, metric, rest)
    # target 0 (feature 0) + mean(30, 60) = 45; target 5 (feature 50) + mean(20, 70) = 95
    torch.testing.assert_close(out[0, :, 0], torch.tensor([45.0, 95.0]))


def test_visionzip_dominant_tokens_by_explicit_cls_attention(tiny_bundle: LisaBundle, make_image) -> None:
    tower = tiny_bundle.model.vision_tower
    pixels = tower.processor(images=make_image(30, 30, seed=1), return_tensors="pt")["pixel_values"]
    _, _, hidden = tower.encode(pixels)
    from csp.methods import VisionFeatures

    vision = VisionFeatures(hidden, tower.encoder_layers, tower.select_layer, tower.grid)
    out = VisionZip(dominant=6, contextual=3).reduce_images(vision)
    layer = tower.encoder_layers[-2]
    x = layer.layer_norm1(hidden[-3])[0]  # input of layer -2
    heads, width = layer.self_attn.num_heads, x.shape[-1]
    q = layer.self_attn.q_proj(x).view(-1, heads, width // heads).transpose(0, 1)
    k = layer.self_attn.k_proj(x).view(-1, heads, width // heads).transpose(0, 1)
    cls = ((q[:, :1] @ k.transpose(1, 2)) / math.sqrt(width // heads)).softmax(-1)[:, 0, 1:].sum(0)
    assert out.source[0, 1:6].tolist() == cls.topk(5).indices.sort().values.tolist()
    assert out.source[0, 0] == -1 and out.source[0, 6:].tolist() == [-1, -1, -1]
    torch.testing.assert_close(out.features[0, 0], hidden[-2][0, 0])  # the CLS token of layer -2's output
    assert isinstance(out, ReducedImages) and out.features.shape == (1, 9, width)


def test_sparsevlm_raters_by_hand() -> None:
    # rows: sys | 2 image rows | 3 instruction rows; e_v . e_t = ln 4 for t1 and 0 for t2, t3, so the
    # softmax over the text is [4, 1, 1] / 6 for both image rows; mean 1/3 -> only t1 (row 3) rates.
    e = torch.zeros(1, 6, 2)
    e[0, 1], e[0, 2] = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])
    e[0, 3], e[0, 4], e[0, 5] = torch.tensor([math.log(4), 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])
    is_image = torch.tensor([[False, True, True, False, False, False]])
    inputs = DecoderInputs(e, torch.ones(1, 6, dtype=torch.bool), is_image, torch.tensor([[5]]),
                           torch.ones(1, 1, dtype=torch.bool), last_rows=torch.tensor([[5]]))
    rows, valid = sparsevlm_raters(inputs)
    assert rows[valid].tolist() == [3]


def test_simignore_keeps_the_image_tokens_its_scan_meets_first() -> None:
    # image rows 1..4; the one instruction row is [1, 0]; cosines: 0.6, -1, 1, 0. Sorted pairs: rows 3, 1,
    # 4, 2; its 7B scan starts at pair 1 (i_index = 1): rows 1, 4, 2 (row 3 is never met) -> keep 2: 1, 4
    e = torch.tensor([[[0.0, 5.0], [3.0, 4.0], [-2.0, 0.0], [7.0, 0.0], [0.0, -1.0], [1.0, 0.0]]])
    is_image = torch.tensor([[False, True, True, True, True, False]])
    inputs = DecoderInputs(e, torch.ones(1, 6, dtype=torch.bool), is_image, torch.tensor([[5]]),
                           torch.ones(1, 1, dtype=torch.bool), last_rows=torch.tensor([[5]]))
    state = TokenState.full(e, inputs.valid, is_image)
    scores = TextSimilarity().score(ScoreContext(None, e, (e, e), state, inputs))
    assert scores[0, 1:5].tolist() == [-1.0, -3.0, float("-inf"), -2.0]
    from_top = TextSimilarity(i_index=0).score(ScoreContext(None, e, (e, e), state, inputs))
    assert from_top[0, 1:5].tolist() == [-1.0, -3.0, 0.0, -2.0]
    plan = build_method({"name": "simignore", "keep_similar": 2, "layer": 1, "keep": 1}).plan(2, 4)
    first = plan.events[0]
    assert isinstance(first, Prune) and first.layer == 0
    kept = first.keep.keep(scores, state.is_image, state.source)
    assert kept[0].nonzero().flatten().tolist() == [1, 4]


# -- presets: the paper's Navg -----------------------------------------------------------------------
#: The paper's (Navg, TFLOPs) of every method row of Tables 1-3, copied from the paper.
PAPER_ROWS = {
    "table1_prumerge": (75, 1.79), "table1_prumerge_plus": (95, 2.04), "table1_visionzip": (80, 1.85),
    "table1_fastv": (76, 1.80), "table1_simignore": (76, 1.80), "table1_sparsevlm": (76, 1.80),
    "table1_pyramiddrop": (81, 1.87), "table1_feather": (85, 1.92), "table1_csp": (73, 1.76),
    "table2_prumerge_p70": (172, 3.04), "table2_prumerge_p80": (115, 2.30), "table2_prumerge_p90": (58, 1.57),
    "table2_visionzip_p70": (176, 3.01), "table2_visionzip_p80": (115, 2.30), "table2_visionzip_p90": (60, 1.59),
    "table2_fastv_p70": (176, 3.10), "table2_fastv_p80": (111, 2.25), "table2_fastv_p90": (64, 1.64),
    "table2_pyramiddrop_p70": (180, 3.14), "table2_pyramiddrop_p80": (114, 2.29),
    "table2_pyramiddrop_p90": (68, 1.70), "table2_csp_p70": (170, 3.01), "table2_csp_p80": (115, 2.30),
    "table2_csp_p90": (66, 1.67), "table3_prumerge": (75, 3.49), "table3_visionzip": (80, 3.62),
    "table3_fastv": (73, 3.45), "table3_csp": (74.8, 3.37),
}


#: Presets of the peers table (scripts/run_table.py table=peers) that are not rows of the paper.
PEER_PRESETS = ("table1_ivc_prune", "table1_litelvlm", "table1_litelvlm_raster", "table1_csp_kcenter",
                "table1_csp_stratified", "table1_csp_litelvlm", "table1_csp_ivc_value")


def test_every_table_preset_has_the_papers_navg() -> None:
    from scripts.flops_table import build_rows

    peers = set(PEER_PRESETS)  # the newer methods of the peers table: not in the paper
    rows = {r["name"]: r for r in build_rows() if r["name"].startswith("table") and "_" in r["name"]
            and r["name"] not in peers}
    assert sorted(rows) == sorted(PAPER_ROWS)
    for name, (navg, tflops) in PAPER_ROWS.items():
        row = rows[name]
        if row["data_dependent"] is None:
            assert round(row["Navg"], 1 if name == "table3_csp" else 0) == navg, name
            assert abs(row["TFLOPs"] / tflops - 1) < 0.05, name  # the paper's text length is not given
        else:  # PruMerge+ and FEATHER: the paper's value lies within the rule's bounds
            low, high = row["Navg_range"]
            assert low <= navg <= high, name


def test_evaluation_marks_the_users_expression_for_simignore(tiny_bundle: LisaBundle, make_image,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline.segment passes the rows of the user's words (DecoderInputs.expression), which Simignore
    compares with: they spell the expression, and only it (not LISA's fixed wording)."""
    from model.prompt import IMAGE_PLACEHOLDER_ID

    pipe = SegmentationPipeline(tiny_bundle, method=build_method({"name": "simignore", **PIPELINE_CONFIGS["simignore"]}))
    seen = {}
    forward = pipe.runner.forward

    def spy(inputs, *args, **kwargs):
        seen["inputs"] = inputs
        return forward(inputs, *args, **kwargs)

    monkeypatch.setattr(pipe.runner, "forward", spy)  # this runner instance only
    queries = [Query("the red car", False, "a"), Query("what can hold hot soup", True, "b")]
    pipe.segment(make_image(40, 52, seed=3), queries)
    expression = seen["inputs"].expression
    for i, q in enumerate(queries):
        ids = pipe.prompt_ids(q.text, q.is_sentence)
        slot = ids.index(IMAGE_PLACEHOLDER_ID)
        expanded = ids[:slot] + [-1] * pipe.num_image_tokens + ids[slot + 1:]
        rows = expression[i].nonzero().flatten().tolist()
        alone = tiny_bundle.tokenizer(q.text, add_special_tokens=False).input_ids  # word-level: no context effects
        assert [expanded[r] for r in rows] == alone and len(alone) == len(q.text.split())
