"""Fast stage runner (tokens physically removed) vs the masked full-sequence reference."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from csp.plan import TokenPlan
from csp.runner import DecoderInputs, StageRunner
from csp.schedule import StageSchedule
from tests.csp.reference_csp import reference_forward


def tiny_llm(num_layers: int, heads: int, kv_heads: int, seed: int) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=48, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        rms_norm_eps=1e-6,
    )
    config._attn_implementation = "sdpa"
    return LlamaModel(config).eval()


MODELS = {"mha6": tiny_llm(6, 4, 4, 0), "gqa5": tiny_llm(5, 4, 2, 1)}


def random_batch(rng: random.Random, batch: int, n_img: int, d: int):
    """Right-padded batch of ``prefix | N image rows | suffix`` with 1-3 query rows per sample."""
    lengths, rows, queries = [], [], []
    for _ in range(batch):
        prefix, suffix = rng.randint(2, 8), rng.randint(3, 12)
        start = prefix + n_img
        k = rng.randint(1, min(3, suffix - 1))
        queries.append(sorted(rng.sample(range(start, start + suffix - 1), k)))
        lengths.append(start + suffix)
        rows.append(torch.arange(prefix, start))
    length = max(lengths)
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    embeds = torch.randn(batch, length, d, generator=gen)
    valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    for i, r in enumerate(rows):
        is_image[i, r] = True
    width = max(len(q) for q in queries)
    qrows = torch.zeros(batch, width, dtype=torch.long)
    qvalid = torch.zeros(batch, width, dtype=torch.bool)
    for i, q in enumerate(queries):
        qrows[i, : len(q)] = torch.tensor(q)
        qvalid[i, : len(q)] = True
    return embeds, valid, is_image, qrows, qvalid, lengths, rows, queries


def random_schedule(rng: random.Random, num_layers: int, n_img: int) -> StageSchedule:
    while True:
        lc = rng.randint(0, num_layers)
        ls = rng.randint(0, num_layers - lc)
        sched = StageSchedule(Lc=lc, Nc=rng.randint(1, n_img), Ls=ls, Np=rng.randint(1, n_img))
        if not (sched.prunes(num_layers, n_img) and lc + ls == 0):
            return sched


CASES = list(range(60))


@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_masked_reference(case: int) -> None:
    rng = random.Random(1000 + case)
    name = "gqa5" if case % 3 == 2 else "mha6"
    llm = MODELS[name]
    n_img = 256 if case % 10 == 0 else rng.choice([12, 24, 40])
    batch = rng.randint(1, 3)
    schedule = random_schedule(rng, len(llm.layers), n_img)
    embeds, valid, is_image, qrows, qvalid, lengths, img_rows, queries = random_batch(
        rng, batch, n_img, llm.config.hidden_size
    )
    keep = torch.stack([torch.tensor(sorted(rng.sample(range(n_img), schedule.Nc))) for _ in range(batch)])
    runner = StageRunner(llm, schedule, n_img)
    with torch.no_grad():
        out = runner.forward(DecoderInputs(embeds, valid, is_image, qrows, qvalid, cluster_keep=keep))
    expected_counts = schedule.image_tokens_per_layer(len(llm.layers), n_img)
    for i in range(batch):
        ref, ref_img, ref_total, ref_kept = reference_forward(
            llm, embeds[i, : lengths[i]], img_rows[i], torch.tensor(queries[i]), runner.plan, keep[i],
        )
        state = out.state
        cols = state.valid[i].nonzero().flatten()
        positions = state.positions[i, cols]
        fast = state.hidden[i, cols].double()
        torch.testing.assert_close(fast, ref[positions], atol=2e-4, rtol=2e-4, msg=lambda m: f"{schedule}: {m}")
        assert out.records[i].image_tokens == ref_img == expected_counts
        assert out.records[i].total_tokens == ref_total
        text_rows = lengths[i] - n_img
        assert ref_total == [c + text_rows for c in expected_counts]
        assert len(out.kept_image_tokens) == len(ref_kept)
        for entry, want in zip(out.kept_image_tokens, ref_kept, strict=True):
            got = entry.indices[i]
            assert torch.equal(got[got >= 0], want), f"{schedule} {entry.stage}@{entry.first_layer}"
    stages = [(k.stage, k.first_layer) for k in out.kept_image_tokens]
    clusters, L = schedule.clusters(n_img), len(llm.layers)
    expected_stages = [("clustering" if clusters else "input", 0)]
    if clusters and schedule.Ls > 0:
        expected_stages.append(("scattering", schedule.Lc))
    if schedule.prunes(L, n_img):
        expected_stages.append(("pruning", schedule.Lc + schedule.Ls))
    assert stages == expected_stages


#: Schedules that keep every token in every stage, for a model of L layers and N image tokens:
#: clustering + scattering + pruning, clustering + pruning ranked in it (Ls = 0), scattering + pruning.
def _keep_all_schedules(L: int, n_img: int) -> list[StageSchedule]:
    return [StageSchedule(Lc=3, Nc=n_img, Ls=1, Np=n_img), StageSchedule(Lc=2, Nc=n_img, Ls=0, Np=n_img),
            StageSchedule(Lc=0, Nc=n_img, Ls=L - 2, Np=n_img)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_degenerate_schedules_equal_plain_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token kept, the select/scatter path forced: bit for bit LlamaModel.forward."""
    from csp.tokens import TokenState

    llm = MODELS[name]
    rng = random.Random(7)
    n_img = 24
    L = len(llm.layers)
    embeds, valid, is_image, qrows, qvalid, *_ = random_batch(rng, 3, n_img, llm.config.hidden_size)
    keep = torch.stack([torch.arange(n_img)] * 3)
    inputs = DecoderInputs(embeds, valid, is_image, qrows, qvalid, cluster_keep=keep)
    calls: list[str] = []
    select, scatter = TokenState.select, TokenState.scatter_into
    monkeypatch.setattr(TokenState, "select", lambda *a, **kw: calls.append("select") or select(*a, **kw))
    monkeypatch.setattr(TokenState, "scatter_into", lambda *a, **kw: calls.append("scatter") or scatter(*a, **kw))
    with torch.no_grad():
        theirs = llm(inputs_embeds=embeds, attention_mask=valid.long()).last_hidden_state
        expected_calls = [["select", "scatter", "select"], ["select", "select"], ["select"]]
        for sched, expected in zip(_keep_all_schedules(L, n_img), expected_calls, strict=True):
            calls.clear()
            got = StageRunner(llm, sched, n_img, always_move_tokens=True).forward(inputs).state
            assert calls == expected, (sched, calls)  # the path really ran
            assert torch.equal(got.valid, valid)
            assert torch.equal(got.hidden[valid], theirs[valid]), sched
            calls.clear()
            StageRunner(llm, sched, n_img).forward(inputs)
            assert calls == [], "by default a stage that keeps every token is skipped"


@pytest.mark.parametrize("impl", ["eager", "flash_attention_2", "flex_attention"])
def test_runner_refuses_attention_that_misreads_its_masks(impl: str) -> None:
    llm = tiny_llm(2, 4, 4, 0)
    llm.config._attn_implementation = impl  # as set_attn_implementation() or a loader would leave it
    with pytest.raises(ValueError, match=rf"_attn_implementation is '{impl}'.*attn_implementation='sdpa'"):
        StageRunner(llm, None, 16)
    llm.config._attn_implementation = "sdpa"
    StageRunner(llm, None, 16)  # accepted


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plain_loop_equals_llama_forward(name: str) -> None:
    """No schedule: the runner's own loop equals LlamaModel.forward (padded batch, same mask)."""
    llm = MODELS[name]
    rng = random.Random(3)
    embeds, valid, is_image, qrows, qvalid, *_ = random_batch(rng, 3, 16, llm.config.hidden_size)
    with torch.no_grad():
        ours = StageRunner(llm, None, 16).forward(DecoderInputs(embeds, valid, is_image, qrows, qvalid)).state
        theirs = llm(inputs_embeds=embeds, attention_mask=valid.long()).last_hidden_state
        single = llm(inputs_embeds=embeds[:1, : int(valid[0].sum())]).last_hidden_state
        ours_single = StageRunner(llm, None, 16).forward(
            DecoderInputs(embeds[:1, : int(valid[0].sum())], valid[:1, : int(valid[0].sum())],
                          is_image[:1, : int(valid[0].sum())], qrows[:1], qvalid[:1])
        ).state.hidden
    assert torch.equal(ours.hidden[valid], theirs[valid])
    assert torch.equal(ours_single, single)


def test_reference_itself_equals_llama_forward() -> None:
    """The oracle with no schedule is plain LLaMA (so it checks the fast path, not itself)."""
    llm = MODELS["gqa5"]
    embeds = torch.randn(30, llm.config.hidden_size)
    with torch.no_grad():
        theirs = llm(inputs_embeds=embeds[None]).last_hidden_state[0]
    ref, *_ = reference_forward(llm, embeds, torch.arange(4, 14), torch.tensor([20]), TokenPlan())
    torch.testing.assert_close(ref.float(), theirs, atol=1e-5, rtol=1e-5)


def test_runner_refuses_attention_without_boolean_masks() -> None:
    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2)
    config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attn_implementation.*'eager'"):
        StageRunner(LlamaModel(config), None, 4)
