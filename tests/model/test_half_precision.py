"""bf16 / fp16 runs (the released checkpoints' dtype): buffers that must stay float32 stay so,
and every inference path runs and stays close to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

from csp.schedule import StageSchedule
from model.checkpoint import load_lisa_checkpoint
from model.pipeline import Query, SegmentationPipeline
from runs.models import build_from_config

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m "not slow" skips them


def rope_inv_freq_fp64(config) -> torch.Tensor:
    """Independent: theta^(-2i/d) for i < d/2."""
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(2).random((70, 90, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_fp32_buffers_and_runs(dtype: str, image: Image.Image) -> None:
    half = build_from_config({"kind": "tiny", "seed": 7, "dtype": dtype, "device": "cpu"})
    full = build_from_config({"kind": "tiny", "seed": 7, "dtype": "float32", "device": "cpu"})
    rotary = half.model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq.double(), rope_inv_freq_fp64(half.model.config), rtol=1e-6, atol=0)
    pe = [m for m in half.model.modules() if isinstance(m, PositionEmbeddingRandom)]
    assert pe and all(m.positional_encoding_gaussian_matrix.dtype == torch.float32 for m in pe)
    assert half.model.model.layers[0].self_attn.q_proj.weight.dtype == getattr(torch, dtype)

    queries = [Query("the red car", False, "a"), Query("the dog on the left", True, "b")]
    schedule = StageSchedule(Lc=2, Nc=48, Ls=2, Np=12)
    for sched in (None, schedule):
        got = SegmentationPipeline(half, sched).segment(image, queries)
        ref = SegmentationPipeline(full, sched).segment(image, queries)
        for g, r in zip(got, ref):
            assert g.mask.shape == (70, 90)
            cos = torch.nn.functional.cosine_similarity(g.seg_embeddings.float(), r.seg_embeddings, dim=-1)
            assert bool((cos > 0.98).all()), cos
    chat = SegmentationPipeline(half, schedule).chat(image, "the red car", max_new_tokens=3)
    assert chat.image_tokens == schedule.image_tokens_per_layer(6, 256)


def test_bf16_checkpoint_load_keeps_fp32_buffers(saved_tiny_checkpoint, image: Image.Image) -> None:
    ckpt, clip = saved_tiny_checkpoint.checkpoint, saved_tiny_checkpoint.clip_dir
    bundle = load_lisa_checkpoint(ckpt, clip, dtype=torch.bfloat16)
    assert bundle.model.model.rotary_emb.inv_freq.dtype == torch.float32
    results = SegmentationPipeline(bundle).segment(image, [Query("the red car", False, "a")])
    assert results[0].mask.shape == (70, 90)
