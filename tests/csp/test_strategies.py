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
    if name == "litelvlm":
        from tests.csp.tiny_clip_text import tiny_text_side

        return {"text_side": tiny_text_side(WIDTH)}
    return {"seg_first": {"segmenter": BoxSegmenter()}}.get(name, {})


WIDTH = 32  # the tiny LISA's CLIP width, and the features of inputs_for


def tiny_vision(n: int, seed: int = 0):
    """Random CLIP hidden states (``1 x (1 + n) x WIDTH``) and one random CLIP layer, for litelvlm."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from csp.methods import VisionFeatures

    torch.manual_seed(seed)
    layers = torch.nn.ModuleList([CLIPEncoderLayer(CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=WIDTH,
                                                                    num_attention_heads=2))]).eval()
    gen = torch.Generator().manual_seed(seed)
    hidden = tuple(torch.randn(1, 1 + n, WIDTH, generator=gen) for _ in range(2))
    side = int(n**0.5)
    return VisionFeatures(hidden_states=hidden, layers=layers, select_layer=-2, grid=(side, side))


def inputs_for(batch: int, n: int = 256, with_cls: bool = True) -> ClusteringInputs:
    side = int(n**0.5)
    gen = torch.Generator().manual_seed(0)
    image = Image.fromarray((np.random.default_rng(0).random((150, 200, 3)) * 255).astype(np.uint8))
    return ClusteringInputs(
        features=torch.randn(batch, n, WIDTH, generator=gen), grid=(side, side), crop_size=side * 14,
        images=[image] * batch, sample_ids=[f"s{i}" for i in range(batch)],
        cls_attention=torch.rand(batch, n, generator=gen).softmax(-1) if with_cls else None,
        texts=[f"query {i}" for i in range(batch)], vision=tiny_vision(n),
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


def test_stratified_cells_partition_the_grid() -> None:
    from csp.strategies.spatial import stratified_cells

    for grid in [(16, 16), (8, 8), (24, 24), (3, 7)]:
        n = grid[0] * grid[1]
        for nc in sorted(v for v in {1, 2, 5, 17, 24, n // 3, n - 1, n} if v <= n):
            cells = stratified_cells(grid, nc)
            cover = torch.zeros(grid, dtype=torch.long)
            for r0, r1, c0, c1 in cells:
                assert r1 > r0 and c1 > c0
                cover[r0:r1, c0:c1] += 1
            assert len(cells) == nc and bool((cover == 1).all())  # Nc disjoint cells covering the grid
    picked = build_strategy("stratified").select(inputs_for(2, n=64), 16)  # 4 x 4 cells of 2 x 2 on 8 x 8
    assert picked[0].tolist() == [r * 8 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    rand = build_strategy("stratified", pick="random", seed=3).select(inputs_for(2, n=64), 16)
    for row in rand:  # one token in each 2 x 2 cell
        assert sorted(((int(i) // 8) // 2) * 4 + (int(i) % 8) // 2 for i in row) == list(range(16))


def test_kcenter_is_greedy_farthest_point() -> None:
    """A plain float64 loop over the documented distance (csp/strategies/spatial.py)."""
    inputs = inputs_for(2, n=64)
    for weight in (0.0, 1.0, 4.0):
        got = build_strategy("kcenter", weight=weight).select(inputs, 12)
        for b in range(2):
            f = inputs.features[b].double()
            fn = f / f.norm(dim=1, keepdim=True)
            pos = [(i // 8, i % 8) for i in range(64)]

            def d(i: int, j: int) -> float:
                grid = ((pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2) ** 0.5 / (7 * 2 ** 0.5)
                return float(1 - fn[i] @ fn[j]) + weight * grid

            mean = fn.mean(0)
            mean = mean / mean.norm()
            far = [float(1 - fn[i] @ mean) for i in range(64)]
            chosen = [max(range(64), key=lambda i: (far[i], -i))]
            while len(chosen) < 12:
                gap = [min(d(i, c) for c in chosen) if i not in chosen else -1.0 for i in range(64)]
                chosen.append(max(range(64), key=lambda i: (gap[i], -i)))
            assert got[b].tolist() == sorted(chosen)
    # a dominant grid term spreads the centres: every 4 x 4 quadrant of the 8 x 8 grid gets some
    spread = build_strategy("kcenter", weight=100.0).select(inputs, 4)[0].tolist()
    assert sorted((i // 8 // 4) * 2 + (i % 8) // 4 for i in spread) == [0, 1, 2, 3]
