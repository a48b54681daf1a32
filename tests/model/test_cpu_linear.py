"""model.cpu_linear: oneDNN-prepacked linears give F.linear's outputs (fp32 rounding), leave state dicts
alone, fall back to F.linear for gradients, repack after an in-place weight change, and refuse
settings they cannot serve. The whole-model check runs plain LISA and a CSP schedule through the
pipeline with and without prepacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csp.schedule import StageSchedule
from model.cpu_linear import is_prepacked, prepack_cpu_linears
from model.pipeline import Query, SegmentationPipeline
from runs.models import build_from_config

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (1, 64, 48)])
def test_prepacked_linear_equals_f_linear(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(48, 80), nn.Linear(80, 48, bias=False))
    reference = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = F.linear(F.linear(x, block[0].weight, block[0].bias), block[1].weight)
        assert prepack_cpu_linears(block) == 2 and all(is_prepacked(m) for m in block)
        out = block(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert block.state_dict().keys() == reference.keys()  # the packed copy is not persistent
    assert all(torch.equal(block.state_dict()[k], v) for k, v in reference.items())


def test_gradients_fall_back_and_in_place_changes_repack() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    prepack_cpu_linears(nn.ModuleList([linear]))
    x = torch.randn(3, 16)
    linear(x).sum().backward()  # requires_grad weight: F.linear path, gradients as usual
    torch.testing.assert_close(linear.weight.grad, torch.ones(3, 8).t() @ x)
    with torch.no_grad():
        linear.weight.mul_(2.0)  # e.g. an optimizer step: the packed copy is stale
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="float32 model on the CPU.*bfloat16"):
        prepack_cpu_linears(nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16)))
    with pytest.raises(ValueError, match="no nn.Linear"):
        prepack_cpu_linears(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="model.cpu_prepack.*float32 model on the CPU"):
        build_from_config({"kind": "tiny", "num_layers": 2, "dtype": "bfloat16", "cpu_prepack": True})


@pytest.mark.parametrize("schedule", [None, StageSchedule(1, 64, 1, 16)])
def test_pipeline_outputs_match_with_prepacked_llm(schedule: StageSchedule | None) -> None:
    """Same [SEG] embeddings (fp32 rounding) and masks, plain and CSP, through the config option."""
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    queries = [Query("the red cup", False, "a"), Query("what can hold water here", True, "b")]
    results, keys = [], []
    for prepack in (False, True):
        bundle = build_from_config({"kind": "tiny", "num_layers": 4, "dtype": "float32", "cpu_prepack": prepack})
        assert is_prepacked(bundle.model.model.layers[0].self_attn.q_proj) == prepack
        assert not is_prepacked(bundle.model.lm_head)  # only the decoder layers
        results.append(SegmentationPipeline(bundle, schedule).segment(image, queries))
        keys.append(list(bundle.model.state_dict()))
    for eager, packed in zip(*results):
        torch.testing.assert_close(packed.seg_embeddings, eager.seg_embeddings, rtol=1e-4, atol=1e-4)
        assert packed.image_tokens == eager.image_tokens
    assert keys[0] == keys[1]  # checkpoints of a prepacked model are unchanged


def test_prepacked_is_the_default_for_fp32_cpu_inference_only() -> None:
    def packed(cfg: dict, **kw: bool) -> bool:
        bundle = build_from_config({"kind": "tiny", "num_layers": 2, **cfg}, **kw)
        return is_prepacked(bundle.model.model.layers[0].self_attn.q_proj)

    assert packed({"dtype": "float32"}) and packed({"dtype": "float32", "cpu_prepack": "auto"})
    assert packed({"dtype": "float32", "cpu_prepack": None})
    assert not packed({"dtype": "float32", "cpu_prepack": False})  # the option that turns it off
    assert not packed({"dtype": "float32"}, training=True)  # training builds eager linears
    assert not packed({"dtype": "bfloat16"})  # auto: off where it cannot run, no error
    with pytest.raises(ValueError, match="model.cpu_prepack='yes'; expected auto, true or false"):
        build_from_config({"kind": "tiny", "num_layers": 2, "cpu_prepack": "yes"})
    from scripts.benchmark import parse_args

    assert parse_args([]).cpu_prepack is True and parse_args(["--no-cpu-prepack"]).cpu_prepack is False
    assert parse_args(["--dtype", "bf16"]).cpu_prepack is False
