"""Every registered clustering strategy, through the registry and through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from csp.schedule import StageSchedule
from csp.strategies import CLUSTERING_STRATEGIES, ClusteringInputs, build_strategy
from csp.strategies.seg_first import InstanceSegmenter
from model.builder import build_tiny_lisa
from model.pipeline import Query, SegmentationPipeline
from model.vision import cls_attention_row


class BoxSegmenter(InstanceSegmenter):
    """Test double: two rectangles, the second more confident."""

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        masks = np.zeros((2, image.height, image.width), dtype=bool)
        masks[0, : image.height // 2, : image.width // 3] = True
        masks[1, image.height // 2:, image.width // 2:] = True
        return masks, np.array([0.4, 0.9])


@pytest.fixture(scope="module")
def tiny_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(1).random((120, 160, 3)) * 255).astype(np.uint8))


def strategy_kwargs(name: str) -> dict:
    """Arguments a strategy needs to run offline; a new strategy without required ones needs none."""
    return {"seg_first": {"segmenter": BoxSegmenter()}}.get(name, {})


def inputs_for(batch: int, n: int = 256, with_cls: bool = True) -> ClusteringInputs:
    side = int(n**0.5)
    gen = torch.Generator().manual_seed(0)
    image = Image.fromarray((np.random.default_rng(0).random((150, 200, 3)) * 255).astype(np.uint8))
    return ClusteringInputs(
        features=torch.randn(batch, n, 8, generator=gen), grid=(side, side), crop_size=side * 14,
        images=[image] * batch, sample_ids=[f"s{i}" for i in range(batch)],
        cls_attention=torch.rand(batch, n, generator=gen).softmax(-1) if with_cls else None,
    )


@pytest.mark.parametrize("name", sorted(CLUSTERING_STRATEGIES))
@pytest.mark.parametrize("num_keep", [1, 17, 64, 256])
def test_every_strategy_returns_sorted_distinct_indices(name: str, num_keep: int) -> None:
    strategy = build_strategy(name, **strategy_kwargs(name))
    picked = strategy.select(inputs_for(3), num_keep)
    assert picked.shape == (3, num_keep) and picked.dtype == torch.long
    for row in picked:
        assert torch.equal(row, row.unique())  # sorted and distinct
        assert 0 <= int(row.min()) and int(row.max()) < 256


@pytest.mark.parametrize("name", sorted(CLUSTERING_STRATEGIES))
def test_every_strategy_runs_in_the_pipeline(name: str, tiny_image) -> None:
    bundle = build_tiny_lisa(seed=1)
    kwargs = strategy_kwargs(name)
    schedule = StageSchedule(Lc=2, Nc=40, Ls=1, Np=12, clustering=name, clustering_kwargs=kwargs)
    pipe = SegmentationPipeline(bundle, schedule)
    results = pipe.segment(tiny_image, [Query("the red car", False, "a"), Query("the small dog", False, "b")])
    for r in results:
        assert r.image_tokens == [40, 40, 256, 12, 12, 12]
        assert r.mask.shape == (tiny_image.height, tiny_image.width)


def test_uniform_is_eq2() -> None:
    picked = build_strategy("uniform").select(inputs_for(2), 80)
    assert picked[0].tolist() == [i * 3 for i in range(80)]  # floor(256 / 80) = 3


def test_random_is_reproducible_per_sample() -> None:
    a = build_strategy("random", seed=5).select(inputs_for(3), 32)
    b = build_strategy("random", seed=5).select(inputs_for(3), 32)
    c = build_strategy("random", seed=6).select(inputs_for(3), 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # sample ids differ


def test_unknown_strategy_lists_registered() -> None:
    with pytest.raises(ValueError, match="uniform"):
        build_strategy("kmeans")


def test_cls_attention_row_matches_eager_attention() -> None:
    """Our hook's row vs CLIP's own eager attention probabilities renormalised over image keys."""
    bundle = build_tiny_lisa(seed=2)
    clip = bundle.model.vision_tower.clip
    pixels = torch.randn(2, 3, 224, 224)
    clip.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = clip(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    finally:
        clip.config._attn_implementation = "sdpa"
    for layer_idx in (-1, 0):
        probs = out.attentions[layer_idx][:, :, 0, 1:]  # B x heads x N: CLS row over image keys
        expected = (probs / probs.sum(-1, keepdim=True)).mean(1)
        layer = bundle.model.vision_tower.encoder_layers[layer_idx]
        hidden_in = out.hidden_states[layer_idx if layer_idx >= 0 else len(out.hidden_states) - 2]
        got = cls_attention_row(layer, hidden_in)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _, row = bundle.model.vision_tower(pixels, cls_attention_layer=-1)
    probs = out.attentions[-1][:, :, 0, 1:]
    torch.testing.assert_close(row, (probs / probs.sum(-1, keepdim=True)).mean(1), atol=1e-5, rtol=1e-4)


def test_seg_first_segments_each_image_once() -> None:
    calls = []

    class CountingSegmenter(BoxSegmenter):
        def __call__(self, image):
            calls.append(image)
            return super().__call__(image)

    strategy = build_strategy("seg_first", segmenter=CountingSegmenter())
    inputs = inputs_for(4)  # four queries about one image
    picked = strategy.select(inputs, 32)
    assert len(calls) == 1 and strategy.extra_cost()["segmenter_calls"] == 1.0
    assert not torch.equal(picked[0], picked[1])  # still sampled per query
