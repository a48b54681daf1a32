"""The schedule inside the full LISA model: chat against the pruned KV cache, runtime records vs
the static calculator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from csp.accounting import ModelDims, TokenRecord, static_row, summarize_records
from csp.runner import DecoderInputs
from csp.schedule import StageSchedule
from model.builder import build_tiny_lisa
from model.inference import embed_batch, expand_image_slots, generate
from model.pipeline import Query, SegmentationPipeline
from model.prompt import build_prompt, tokenize_with_image


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(3).random((90, 130, 3)) * 255).astype(np.uint8))


def make_seg_likely(bundle, first_token: int) -> None:
    """Give [SEG] the lm_head row of the token greedy decoding picks first, slightly scaled up,
    so that the random model emits [SEG] where it would have emitted that token."""
    head = bundle.model.lm_head.weight.data
    head[bundle.token_ids.seg] = head[first_token] * 1.05


@pytest.mark.parametrize("schedule", [
    StageSchedule(Lc=2, Nc=48, Ls=2, Np=10),
    StageSchedule(Lc=3, Nc=32, Ls=0, Np=8),
    StageSchedule(Lc=0, Nc=1, Ls=2, Np=20),
])
def test_chat_with_schedule_equals_full_pass_ranked_by_last_prompt_row(schedule, image) -> None:
    """Decoding against per-layer pruned caches == one scheduled pass over prompt + answer whose
    pruning is ranked by the last prompt token (causally it sees exactly what prefill saw)."""
    bundle = build_tiny_lisa(seed=4)
    pipe = SegmentationPipeline(bundle, schedule)
    tok = bundle.token_ids
    texts = ["the red car", "a small dog near the table on the left"]
    ids = [tokenize_with_image(build_prompt(t, False, answer=None), bundle.tokenizer) for t in texts]
    enc = pipe.encode_image(image)
    keep = pipe.cluster(enc, ["a", "b"])
    embeds = enc.image_embeds.expand(2, -1, -1)
    first = generate(bundle.model, pipe.runner, ids, embeds, tok.seg, tok.eos, tok.pad, max_new_tokens=1,
                     cluster_keep=keep)
    make_seg_likely(bundle, first.generated[0][0])
    out = generate(bundle.model, pipe.runner, ids, embeds, tok.seg, tok.eos, tok.pad, max_new_tokens=6,
                   cluster_keep=keep)
    assert any(tok.seg in g for g in out.generated), "the test model must emit [SEG]"
    full = [p + g for p, g in zip(ids, out.generated)]
    batch = expand_image_slots(full, embeds.shape[1], tok.pad)
    prompt_lengths = [len(p) - 1 + embeds.shape[1] for p in ids]
    last = torch.tensor([[n - 1] for n in prompt_lengths])
    with torch.no_grad():
        ref = pipe.runner.forward(DecoderInputs(
            embed_batch(bundle.model, batch, embeds), batch.valid, batch.is_image, last,
            torch.ones_like(last, dtype=torch.bool), cluster_keep=keep,
        ))
    for i, gen in enumerate(out.generated):
        rows = [prompt_lengths[i] - 1 + j for j, t in enumerate(gen) if t == tok.seg]
        if not rows:
            continue
        positions = torch.zeros(2, len(rows), dtype=torch.long)  # row 0 exists in every sample
        positions[i] = torch.tensor(rows)
        expected = ref.rows(positions)[i]
        torch.testing.assert_close(out.seg_hidden[i], expected, atol=1e-5, rtol=1e-5)
    assert out.records[0].image_tokens == schedule.image_tokens_per_layer(6, 256)


def test_runtime_records_agree_with_static_calculator(image) -> None:
    bundle = build_tiny_lisa(seed=5)
    schedule = StageSchedule(Lc=2, Nc=64, Ls=1, Np=16)
    pipe = SegmentationPipeline(bundle, schedule)
    queries = [Query("the red car", False, "a"), Query("what can hold a cup of something", True, "b")]
    results = pipe.segment(image, queries)
    dims = ModelDims.from_config(bundle.model.config)
    for r, q in zip(results, queries):
        prompt = tokenize_with_image(build_prompt(q.text, q.is_sentence), bundle.tokenizer)
        text_tokens = len(prompt) - 1  # all but the image slot
        static = static_row(dims, schedule, 256, text_tokens)
        assert r.image_tokens == static["image_tokens"]
        assert r.total_tokens == static["total_tokens"]
        summary = summarize_records([TokenRecord(r.image_tokens, r.total_tokens)], dims)
        assert summary["Navg"] == pytest.approx(static["Navg"])
        assert summary["TFLOPs"] == pytest.approx(static["TFLOPs"])


def test_degenerate_schedules_give_plain_lisa_masks(image) -> None:
    """Schedules that keep every token, with the select/scatter path forced: plain LISA's masks."""
    from csp.runner import StageRunner

    bundle = build_tiny_lisa(seed=6)
    queries = [Query("the red car", False, "a"), Query("the dog", False, "b")]
    plain = SegmentationPipeline(bundle).segment(image, queries)
    for schedule in (StageSchedule(Lc=3, Nc=256, Ls=1, Np=256), StageSchedule(Lc=0, Nc=9, Ls=4, Np=256)):
        pipe = SegmentationPipeline(bundle, schedule)
        pipe.runner = StageRunner(bundle.model.model, schedule, 256, always_move_tokens=True)
        assert pipe.method.schedule.clustering == "uniform"  # Nc = N: eq. 2 keeps every index
        got = pipe.segment(image, queries)
        for a, b in zip(plain, got):
            assert np.array_equal(a.masks, b.masks)
            assert torch.equal(a.seg_embeddings, b.seg_embeddings)


def test_schedule_is_validated_against_the_model() -> None:
    bundle = build_tiny_lisa(seed=0)
    from csp.schedule import ScheduleError

    with pytest.raises(ScheduleError, match="exceeds the model's 6 decoder layers"):
        SegmentationPipeline(bundle, StageSchedule(Lc=5, Nc=10, Ls=2, Np=4))
    with pytest.raises(ScheduleError, match="Nc = 300 exceeds"):
        SegmentationPipeline(bundle, StageSchedule(Lc=2, Nc=300, Ls=2, Np=4))
    with pytest.raises(ScheduleError, match="Lc \\+ Ls = 0"):
        SegmentationPipeline(bundle, StageSchedule(Lc=0, Nc=10, Ls=0, Np=4))


def test_training_prunes_like_evaluation(image) -> None:
    """The mIoU* setting fine-tunes on a pruned LLaVA: training must rank tokens by the [SEG]
    rows exactly as evaluation does, so the [SEG] prompts are the same."""
    from model.training import TrainingSample, training_loss

    bundle = build_tiny_lisa(seed=8)
    pipe = SegmentationPipeline(bundle, StageSchedule(Lc=2, Nc=64, Ls=2, Np=8))
    gt = np.zeros((1, image.height, image.width), dtype=bool)
    gt[:, 10:40, 20:70] = True
    sample = TrainingSample(image, "the red car", False, "[SEG].", gt, sample_id="a")
    with torch.no_grad():
        train = training_loss(pipe, [sample]).seg_embeddings[0]
        evaluated = pipe.segment(image, [Query("the red car", False, "a")])[0].seg_embeddings
    torch.testing.assert_close(train, evaluated, atol=1e-6, rtol=1e-6)


def test_image_encoded_once_whatever_queries_per_batch(image) -> None:
    """CLIP and SAM's image encoder run once per image for 1 or several queries per LLM batch;
    the results equal separate calls on each chunk (the behaviour before)."""
    bundle = build_tiny_lisa(seed=6)
    pipe = SegmentationPipeline(bundle, StageSchedule(Lc=2, Nc=64, Ls=1, Np=16, clustering="cls_attention"))
    queries = [Query("the red car", False, "a"), Query("the dog", False, "b"), Query("what is left?", True, "c")]
    calls = {"clip": 0, "sam": 0}
    def counter(name: str):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    hooks = [bundle.model.vision_tower.clip.register_forward_hook(counter("clip")),
             bundle.model.sam.image_encoder.register_forward_hook(counter("sam"))]
    try:
        for per_batch in (1,):  # the latency setting: one query per LLM call
            calls.update(clip=0, sam=0)
            got = pipe.segment(image, queries, queries_per_batch=per_batch)
            assert calls == {"clip": 1, "sam": 1}, (per_batch, calls)
            step = per_batch or len(queries)
            assert [r.batch_size for r in got] == [min(step, len(queries) - i // step * step) for i in range(3)]
            separate = [r for i in range(0, 3, step) for r in pipe.segment(image, queries[i: i + step])]
            for a, b in zip(got, separate, strict=True):
                assert a.sample_id == b.sample_id and np.array_equal(a.masks, b.masks)
                assert torch.equal(a.seg_embeddings, b.seg_embeddings) and a.image_tokens == b.image_tokens
    finally:
        for hook in hooks:
            hook.remove()


def test_a_per_query_method_that_returns_none_gets_the_image_level_slot(image) -> None:
    """``Method.reduce_queries`` may return None (its contract): the pipeline then uses the image-level slot,
    here the N grid tokens, exactly as with no method."""
    from csp.methods.base import Method
    from csp.plan import TokenPlan

    class NoneForQueries(Method):
        name = "none_for_queries"
        per_query_reduction = True

        def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
            return TokenPlan()

    bundle = build_tiny_lisa(seed=0)
    plain = SegmentationPipeline(bundle)
    pipe = SegmentationPipeline(bundle, method=NoneForQueries())
    enc = plain.encode_image(image)
    got = pipe.image_inputs(enc, 2, texts=["the cat", "the dog"])
    want = plain.image_inputs(enc, 2)
    assert set(got) == set(want) == {"image_embeds"}
    assert torch.equal(got["image_embeds"], want["image_embeds"])
