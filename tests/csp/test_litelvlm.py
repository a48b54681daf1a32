"""LiteLVLM (sejong-rcv/LiteLVLM): the registered method and strategy against a transcription of its
authors' ``CLIPVisionTower.forward`` (model/llava/model/multimodal_encoder/clip_encoder.py), on tiny
random float64 CLIPs (vision with projection, text with projection), and in the pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from csp.litelvlm import ClipTextSide
from csp.methods import VisionFeatures, build_method
from csp.strategies import ClusteringInputs, build_strategy
from tests.csp.tiny_clip_text import tiny_clip, tiny_text_side


# -- its CLIPVisionTower.forward, transcribed ------------------------------------------------------------
def litelvlm_authors(vision: CLIPVisionModelWithProjection, text_model, tokenizer, images: torch.Tensor,
                     questions: list[str], retain: int, select_layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """(retained indices in its order, gathered features) for one image (batch 1)."""
    outs = {}
    attn = vision.vision_model.encoder.layers[-1].self_attn  # L71
    hooks = [getattr(attn, name).register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, o))
             for name in ("q_proj", "k_proj", "v_proj")]  # L64-75
    try:
        forward = vision(images, output_hidden_states=True)
        features = forward.hidden_states[select_layer]  # L137: "cls_patch", CLS kept
        cls_q, img_k, img_v = outs["q_proj"][:, :1], outs["k_proj"][:, 1:], outs["v_proj"][:, 1:]  # L79-81
        dim = cls_q.shape[-1]  # L83
        logits = F.normalize(cls_q, dim=-1) @ F.normalize(img_k, dim=-1).transpose(-2, -1) / dim**0.5  # L85-89
        weights = F.softmax(logits, dim=-1)  # L90
        ctx = torch.sort((weights.transpose(1, 2) * img_v).norm(dim=-1).view(-1), descending=True)[1]  # L92-95
    finally:
        for h in hooks:
            h.remove()
    text = text_model(**tokenizer(text=questions, return_tensors="pt", truncation=True, padding=True)).text_embeds  # L147-151
    proj = vision.visual_projection(vision.vision_model.post_layernorm(features[:, 1:]))  # L99-102
    sim = torch.matmul(proj, text.unsqueeze(-1)).squeeze(-1)  # L105-107: Q x N
    low = torch.topk(sim, retain // text.shape[0], dim=-1, largest=False, sorted=True).indices  # L109-111
    low = torch.unique(low.view(-1)).unsqueeze(0)  # L112
    left = ctx.view(-1)[~torch.isin(ctx.view(-1), low.view(-1))].unsqueeze(0)  # L159-161
    keep = torch.cat([left[:, : retain - low.shape[1]], low], dim=1).to(torch.int64)  # L163-166
    assert keep.shape[1] == retain  # L168
    gathered = torch.gather(features[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, features.size(-1)))  # L170-172
    return keep[0], gathered[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("queries", [["the red car"], ["the red car", "a dog on the left", "sky"]])
def test_litelvlm_keeps_what_its_authors_code_keeps(seed: int, queries: list[str]) -> None:
    vision = tiny_clip(seed)
    side = tiny_text_side(16, seed=seed, vision=vision).double()
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        want_idx, want_feat = litelvlm_authors(vision, side.text_model, side.tokenizer, images, queries, 20)
        hidden = vision(images, output_hidden_states=True).hidden_states
    features = VisionFeatures(hidden_states=hidden, layers=vision.vision_model.encoder.layers, select_layer=-2,
                              grid=(8, 8))
    mode = "one" if len(queries) == 1 else "image"
    method = build_method({"name": "litelvlm", "keep": 20, "queries": mode, "text_side": side})
    reduced = method.reduce_queries(features, queries[:1], queries)
    assert reduced.source[0].tolist() == want_idx.tolist()  # the same tokens in its order
    torch.testing.assert_close(reduced.features[0], want_feat, atol=1e-12, rtol=0)
    raster = build_method({"name": "litelvlm", "keep": 20, "queries": mode, "order": "raster", "text_side": side})
    inputs = ClusteringInputs(features=hidden[-2][:, 1:], grid=(8, 8), crop_size=56, images=[None], sample_ids=["a"],
                              texts=queries[:1], image_texts=queries, vision=features)
    assert raster.select_input(inputs)[0].tolist() == sorted(want_idx.tolist())
    strategy = build_strategy("litelvlm", text_side=side, queries=mode)
    assert strategy.select(inputs, 20)[0].tolist() == sorted(want_idx.tolist())


def test_one_query_keeps_only_low_similarity_tokens() -> None:
    """With one query its rule gives all K slots to the K least similar tokens (K // 1 = K): no context
    token is left a slot (clip_encoder.py L109, L163)."""
    vision = tiny_clip(3)
    side = tiny_text_side(16, seed=3, vision=vision).double()
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        idx, _ = litelvlm_authors(vision, side.text_model, side.tokenizer, images, ["the cat"], 12)
        hidden = vision(images, output_hidden_states=True).hidden_states
        proj = vision.visual_projection(vision.vision_model.post_layernorm(hidden[-2][0, 1:]))
        text = side.text_embeds(["the cat"])[0]
    assert idx.tolist() == sorted((proj @ text).argsort()[:12].tolist())


def test_litelvlm_without_a_text_tower_says_so(tmp_path) -> None:
    from transformers import CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     num_hidden_layers=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no text tower"):
        ClipTextSide.from_dir(tmp_path)
    with pytest.raises(ValueError, match="clip"):
        build_method({"name": "litelvlm"}).check()


@pytest.mark.parametrize("order", ["authors", "raster"])
def test_litelvlm_runs_in_the_pipeline(order: str, make_image) -> None:
    from model.builder import build_tiny_lisa
    from model.pipeline import Query, SegmentationPipeline

    bundle = build_tiny_lisa(seed=1)
    width = bundle.model.vision_tower.config.hidden_size
    method = build_method({"name": "litelvlm", "keep": 30, "order": order, "text_side": tiny_text_side(width)})
    pipe = SegmentationPipeline(bundle, method)
    image = make_image(40, 52, seed=3)
    queries = [Query("the red car", False, "a"), Query("the small dog", False, "b")]
    results = pipe.segment(image, queries)
    n = pipe.num_layers
    for r in results:
        assert r.image_tokens == [30] * n
        assert r.kept_image_tokens[0].stage == "selection" and int((r.kept_image_tokens[0].indices >= 0).sum()) == 30
    enc = pipe.encode_image(image)
    want = method.retained(enc.vision, [q.text for q in queries])
    for r, row in zip(results, want, strict=True):
        assert r.kept_image_tokens[0].indices[0].tolist() == sorted(row.tolist())
    chat = pipe.chat(image, "the red car", max_new_tokens=2)
    assert chat.image_tokens[0] == 30
