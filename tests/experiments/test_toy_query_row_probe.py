"""experiments/toy_query_row_probe.py: its statistics by hand, its attention rows against a by-hand layer 0, its
states against the grounding stage's [SEG] row, and a short run on the committed toy LISA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from experiments import toy_query_row_probe as qp
from model.checkpoint import load_lisa_checkpoint
from model.inference import decoder_inputs, expand_image_slots
from model.pipeline import SegmentationPipeline
from model.prompt import DEFAULT_ANSWER, seg_query_rows
from training.toy_grounding import HELD_OUT_STREAM, GroundingStage, draw_grounding_data

REPO = Path(__file__).resolve().parents[2]
TOY_LISA = REPO / "assets" / "toy_lisa"


def test_word_classes_by_hand() -> None:
    texts = ["the red circle above the blue star", "the star", "the shape on the left", "the largest green shape"]
    assert qp.word_classes(texts, qp.COLOUR_WORDS).tolist() == [0, 8, 8, 1]
    assert qp.word_classes(texts, qp.KIND_WORDS).tolist() == [0, 3, 4, 4]


def test_pointer_stats_by_hand() -> None:
    # 2 samples, 2 heads, 5 keys; image rows are keys 1-3 (cells 0-2); referents: cell 2 and cell 0
    attention = torch.tensor([[[0.1, 0.1, 0.2, 0.6, 0.0], [0.1, 0.5, 0.3, 0.1, 0.0]],
                              [[0.0, 0.7, 0.1, 0.1, 0.1], [0.4, 0.1, 0.1, 0.3, 0.1]]])
    image = torch.tensor([[False, True, True, True, False]] * 2)
    targets = torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.4, 0.0]])  # sample 1 covers cells 0 and 1
    stats = qp.pointer_stats(attention, image, targets)
    # head 0: sample 0 argmax cell 2 (hit), sample 1 cell 0 (hit); head 1: cell 0 (miss), cell 2 (miss)
    assert stats["pointer_hit"] == [1.0, 0.0]
    assert stats["image_mass"] == pytest.approx([(0.9 + 0.9) / 2, (0.9 + 0.5) / 2], abs=1e-4)
    assert stats["referent_mass"] == pytest.approx([(0.6 + 0.8) / 2, (0.1 + 0.2) / 2], abs=1e-4)


def test_linear_probe_reads_a_separable_code_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (600,), generator=g)
    x = torch.randn(600, 8, generator=g)
    x[:, 0] += 4 * y
    assert qp.linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:], 3) > 0.95
    noise = torch.randn(600, 8, generator=g)
    assert qp.linear_probe_accuracy(noise[:400], y[:400], noise[400:], y[400:], 3) < 0.5


def test_views_are_the_llms_attention_and_the_seg_row() -> None:
    """Layer 0's attention row by hand (RMSNorm, q/k projections, RoPE, causal softmax), and the last layer's
    state through the final norm equals the grounding stage's [SEG] row state."""
    bundle = load_lisa_checkpoint(TOY_LISA, TOY_LISA / "vision_tower")
    pipe = SegmentationPipeline(bundle)
    data = draw_grounding_data(pipe, 2, seed=0, stream=HELD_OUT_STREAM)
    features, texts = data.features[data.scene], data.texts
    attention, states, image = qp.query_row_views(pipe, features, texts, batch=4)
    assert len(attention) == len(states) == bundle.model.config.num_hidden_layers
    assert image.sum(1).tolist() == [pipe.num_image_tokens] * len(texts)
    final = GroundingStage(pipe).seg_states(features, texts)
    torch.testing.assert_close(bundle.model.model.norm(states[-1]), final, atol=1e-5, rtol=1e-5)

    # layer 0 by hand for the first expression
    llm, tok = bundle.model.model, bundle.token_ids
    ids = pipe.prompt_ids(texts[0], False, answer=DEFAULT_ANSWER)
    packed = expand_image_slots([ids], pipe.num_image_tokens, tok.pad)
    with torch.no_grad():
        inputs = decoder_inputs(bundle.model, packed, bundle.model.project_images(features[:1]),
                                [seg_query_rows(packed.ids[0][: int(packed.lengths[0])], tok.seg)], None)
        x = inputs.embeds
        layer = llm.layers[0]
        h = layer.input_layernorm(x)
        attn = layer.self_attn
        n_heads, hd = bundle.model.config.num_attention_heads, attn.head_dim
        q = attn.q_proj(h).view(1, -1, n_heads, hd).transpose(1, 2)
        k = attn.k_proj(h).view(1, -1, n_heads, hd).transpose(1, 2)
        cos, sin = llm.rotary_emb(x, torch.arange(x.shape[1])[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        row = int(inputs.query_rows[0, 0])
        scores = (q[0, :, row].unsqueeze(1) @ k[0].transpose(-1, -2)).squeeze(1) / hd ** 0.5  # H x T
        scores[:, row + 1:] = float("-inf")
        expected = scores.softmax(-1)
    width = expected.shape[-1]
    torch.testing.assert_close(attention[0][0, :, :width], expected, atol=1e-5, rtol=1e-4)


def test_short_run_writes_a_report_and_names_a_bad_checkpoint(tmp_path: Path) -> None:
    report = qp.run_probe(TOY_LISA, tmp_path / "probe", seed=0, train_images=6, held_out_images=3, log=False)
    saved = json.loads((tmp_path / "probe" / "report.json").read_text())
    assert saved == report and len(report["layers"]) == 8
    for row in report["layers"]:
        assert len(row["pointer_hit"]) == 4 and all(0.0 <= v <= 1.0 for v in row["pointer_hit"])
        assert 0.0 <= row["colour_word_accuracy"] <= 1.0
    with pytest.raises(SystemExit) as exc:
        qp.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="held_out_images"):
        qp.check_inputs(TOY_LISA, 5, 0)
