"""The toy world's grounding stage (training/toy_grounding.py): its targets by hand, its read-out row is the
row LISA's [SEG] embedding comes from, and a short run writes a checkpoint that the LISA stage loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.toy import ToySpec, generate_image, generate_scene
from model.builder import ToySizes, build_toy_lisa
from model.checkpoint import load_lisa_checkpoint
from model.inference import expand_image_slots
from model.pipeline import Query, SegmentationPipeline
from training import toy_grounding as tg

REPO = Path(__file__).resolve().parents[2]
TOWERS = REPO / "assets" / "toy_towers"


def test_cell_cover_by_hand() -> None:
    """A 128 x 128 mask on an 8 x 8 grid (16 px cells): a full cell, a half cell and a quarter cell."""
    mask = np.zeros((128, 128), dtype=bool)
    mask[0:16, 0:16] = True  # cell (0, 0): all of it
    mask[16:24, 16:32] = True  # cell (1, 1): half
    mask[112:120, 120:128] = True  # cell (7, 7): a quarter
    cover = tg.cell_cover(mask, 8).view(8, 8)
    expected = torch.zeros(8, 8)
    expected[0, 0], expected[1, 1], expected[7, 7] = 1.0, 0.5, 0.25
    assert torch.allclose(cover, expected / 1.75)
    with pytest.raises(ValueError, match="empty"):
        tg.cell_cover(np.zeros((128, 128), dtype=bool), 8)


def test_generate_scene_is_the_split_generator_on_another_stream() -> None:
    spec = ToySpec()
    a = generate_image(spec, "val", 3)
    b = generate_scene(spec, np.random.default_rng([spec.seed, 1, 3]))  # "val" is stream 1
    assert np.array_equal(a.pixels, b.pixels)
    assert [(i, e.text()) for i, e in a.refs] == [(i, e.text()) for i, e in b.refs]
    assert tg.TRAIN_STREAM not in (0, 1, 2, 100, 101) and tg.HELD_OUT_STREAM not in (0, 1, 2, 100, 101, tg.TRAIN_STREAM)


def test_spec_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        tg.GroundingSpec(steps=0).check()
    with pytest.raises(ValueError, match="lr"):
        tg.GroundingSpec(lr=-1.0).check()
    with pytest.raises(FileNotFoundError, match="towers="):
        tg.GroundingSpec(towers=str(tmp_path)).check()
    with pytest.raises(ValueError, match="residual_init.*'gpt'"):
        tg.GroundingSpec(residual_init="gpt").check()
    with pytest.raises(ValueError, match="words: .*-1"):
        tg.GroundingSpec(towers=str(TOWERS), words=-1.0).check()
    with pytest.raises(ValueError, match=r"words_layer: .*\[0, 7\].* 8"):
        tg.GroundingSpec(towers=str(TOWERS), words_layer=8).check()


def test_word_bags_by_hand() -> None:
    """The vocabulary is the expressions' words less ``the``, sorted; unknown words are not counted."""
    pipe = SegmentationPipeline(build_toy_lisa(0, ToySizes(towers=str(TOWERS))))
    stage = tg.GroundingStage(pipe, "the red circle on the left of the star".split(), words_layer=1)
    assert list(stage.vocabulary) == ["circle", "left", "of", "on", "red", "star"]
    bags = stage.word_bags(["the red star", "the blue circle on the left"])
    assert bags.tolist() == [[0, 0, 0, 0, 1, 1], [1, 1, 0, 1, 0, 0]]
    stage.close()


def test_word_head_reads_the_query_row_after_its_layer() -> None:
    """The words term reads the [SEG] query row's state after decoder layer k: the same state as the final
    state of a copy of the LLM cut after layer k with its final norm removed (no hook involved there)."""
    import copy

    bundle = build_toy_lisa(0, ToySizes(towers=str(TOWERS)))
    pipe = SegmentationPipeline(bundle)
    data = tg.draw_grounding_data(pipe, 2, seed=0, stream=tg.HELD_OUT_STREAM)
    texts, features = data.texts[:3], data.features[data.scene[:3]]
    k = 2
    stage = tg.GroundingStage(pipe, [w for t in data.texts for w in t.split()], words_layer=k)
    with torch.no_grad():
        final, at_k = stage._forward(features, texts)
        cells, point, words = stage.loss(features, texts, data.targets[:3], data.clicks[:3], 1.0)
    cut = copy.deepcopy(bundle)
    cut.model.model.layers = cut.model.model.layers[: k + 1]
    cut.model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        expected = tg.GroundingStage(SegmentationPipeline(cut)).seg_states(features, texts)
    torch.testing.assert_close(at_k, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(final, at_k)
    # the term is the binary cross-entropy of the word head over the bags, by hand
    logits = stage.word_head(at_k)
    bags = stage.word_bags(texts)
    by_hand = -(bags * torch.log(torch.sigmoid(logits)) + (1 - bags) * torch.log(1 - torch.sigmoid(logits))).mean()
    torch.testing.assert_close(words, by_hand, atol=1e-6, rtol=1e-5)
    assert cells > 0 and point > 0
    stage.close()
    assert not bundle.model.model.layers[k]._forward_hooks


def _layer_outputs(stage: tg.GroundingStage, features: torch.Tensor, texts: list[str],
                   delays: torch.Tensor | None) -> list[torch.Tensor]:
    """Every decoder layer's output rows (``B x T x d``) for one forward of the stage, read by forward hooks."""
    outs: list[torch.Tensor] = []
    layers = stage.pipe.model.model.layers
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for layer in layers]
    try:
        with torch.no_grad():
            stage._forward(features, texts, delays)
    finally:
        for hook in hooks:
            hook.remove()
    return outs


def test_read_delay_hides_the_image_from_text_rows_in_the_first_layers_only() -> None:
    """Two scenes behind the same expressions: with delay k a text row cannot depend on the image before layer
    k, so its outputs of layers 0..k-1 are the same for both scenes and differ from layer k on; the image rows
    differ from layer 0. Delay 0 (and every pass outside ``loss``) is the plain forward, bit for bit."""
    pipe = SegmentationPipeline(build_toy_lisa(0, ToySizes(towers=str(TOWERS))))
    data = tg.draw_grounding_data(pipe, 4, seed=0, stream=tg.HELD_OUT_STREAM)
    a = data.scene.tolist().index(0)
    texts = [data.texts[a], data.texts[a], data.texts[a]]
    stage = tg.GroundingStage(pipe, read_delay=3)
    plain = tg.GroundingStage(SegmentationPipeline(pipe.bundle))  # no delay hooks at all
    delays = torch.tensor([3, 1, 0])
    out_a = _layer_outputs(stage, data.features[[0, 0, 0]], texts, delays)
    out_b = _layer_outputs(stage, data.features[[1, 1, 1]], texts, delays)
    is_image = expand_image_slots([stage.prompt_ids(texts[0])], pipe.num_image_tokens, 0).is_image[0]
    text_after = ~is_image & (torch.arange(len(is_image)) > int(is_image.nonzero()[0]))
    for row, k in enumerate(delays.tolist()):
        for layer in range(len(out_a)):
            same_text = torch.equal(out_a[layer][row][text_after], out_b[layer][row][text_after])
            assert same_text == (layer < k), (row, layer)
            assert not torch.equal(out_a[layer][row][is_image], out_b[layer][row][is_image])
    reference = _layer_outputs(plain, data.features[[0, 0, 0]], texts, None)
    for got, expected in zip(out_a, reference, strict=True):
        assert torch.equal(got[2], expected[2])  # delay 0
    undelayed = _layer_outputs(stage, data.features[[0, 0, 0]], texts, None)
    for got, expected in zip(undelayed, reference, strict=True):
        assert torch.equal(got, expected)
    stage.close()
    assert not any(layer._forward_pre_hooks for layer in pipe.model.model.layers)
    with pytest.raises(ValueError, match=r"read_delay: .*\[0, 7\].* 8"):
        tg.GroundingSpec(towers=str(TOWERS), read_delay=8).check()


def test_held_out_hit_under_a_control_that_keeps_every_token_is_the_plain_hit() -> None:
    """``read(method=...)`` runs the LLM under an in-LLM method: random_keep keeping all 64 tokens from layer 2
    gives the plain pass's hits and prompts; keeping 1 token changes the prompts; a method that selects its
    input tokens is refused by name."""
    from csp.methods import build_method

    pipe = SegmentationPipeline(build_toy_lisa(0, ToySizes(towers=str(TOWERS))))
    data = tg.draw_grounding_data(pipe, 3, seed=0, stream=tg.HELD_OUT_STREAM)
    stage = tg.GroundingStage(pipe)
    hits, prompts = stage.read(data)
    all_hits, all_prompts = stage.read(data, method=build_method({"name": "random_keep", "layer": 2, "keep": 64}))
    assert torch.equal(hits, all_hits)
    torch.testing.assert_close(prompts, all_prompts, atol=1e-5, rtol=1e-5)
    one = stage.read(data, method=build_method({"name": "random_keep", "layer": 2, "keep": 1}))[1]
    assert not torch.allclose(prompts, one, atol=1e-4)
    assert stage.runner is pipe.runner
    with pytest.raises(ValueError, match="visionzip selects its input tokens"):
        stage.read(data, method=build_method({"name": "visionzip", "dominant": 8, "contextual": 2}))
    assert stage.runner is pipe.runner
    assert set(tg.grounding_metrics(stage, data)["hit_under"]) == set(tg.CONTROLS)


def test_depth_residual_init_scales_only_the_residual_writes() -> None:
    """GPT-2's rule by hand: with L = 3 layers, o_proj and down_proj times 6 ** -0.5, every other weight kept."""
    llm = build_toy_lisa(0, ToySizes(num_layers=3, hidden_size=32, heads=2, intermediate_size=48)).model.model
    before = {name: p.detach().clone() for name, p in llm.named_parameters()}
    tg.scale_residual_writes(llm)
    scaled = 0
    for name, param in llm.named_parameters():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            torch.testing.assert_close(param, before[name] / 6 ** 0.5)
            scaled += 1
        else:
            assert torch.equal(param, before[name]), name
    assert scaled == 6


def test_grounding_row_is_the_seg_row() -> None:
    """The state the head reads is the state LISA's teacher-forced pass turns into the [SEG] embedding."""
    bundle = build_toy_lisa(0, ToySizes(towers=str(TOWERS)))
    pipe = SegmentationPipeline(bundle)
    stage = tg.GroundingStage(pipe)
    data = tg.draw_grounding_data(pipe, 2, seed=0, stream=tg.HELD_OUT_STREAM)
    states = stage.seg_states(data.features[data.scene[:2]], data.texts[:2])
    toy = generate_scene(ToySpec(), np.random.default_rng([0, tg.HELD_OUT_STREAM, 0]))
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(toy.pixels).save(buffer, format="JPEG", quality=95)
    enc = pipe.encode_image(Image.open(buffer).convert("RGB"))
    with torch.no_grad():
        out = pipe.teacher_forced(enc, [Query(data.texts[0], False, "g0")], None)
    assert torch.allclose(out.seg_hidden[0][0], states[0], atol=1e-5)
    assert torch.allclose(pipe.model.seg_head(states[:1]), out.seg_embeddings[0], atol=1e-5)


@pytest.mark.slow
def test_a_short_stage_writes_a_checkpoint_the_lisa_stage_loads(tmp_path: Path) -> None:
    spec = tg.GroundingSpec(towers=str(TOWERS), steps=6, batch=4, train_images=6, held_out_images=3, eval_every=3)
    report = tg.train_grounding(spec, tmp_path, log=False)
    assert [r["step"] for r in report["history"]] == [3, 6]
    lines = (tmp_path / "grounding_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 6]
    final = report["final"]
    assert final["word_loss"] > 0  # the word-carrying term is on by default
    assert 0.0 <= final["hit"] <= 1.0 and set(final["hit_by_type"]) <= {"attribute", "position", "relation",
                                                                          "superlative"}
    bundle = load_lisa_checkpoint(tmp_path / "lisa", tmp_path / "lisa" / "vision_tower")
    fresh = build_toy_lisa(0, ToySizes(towers=str(TOWERS)))
    trained = dict(bundle.model.named_parameters())
    before = dict(fresh.model.named_parameters())
    # the LLM and the [SEG] read-out (pointing term) moved; SAM is as the stage found it
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[q_proj], before[q_proj])
    assert not torch.equal(trained["model.text_hidden_fcs.0.2.weight"], before["model.text_hidden_fcs.0.2.weight"])
    sam_key = next(k for k in trained if "mask_decoder" in k)
    assert torch.equal(trained[sam_key], before[sam_key])
