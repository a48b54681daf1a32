"""The committed toy LISA (assets/toy_lisa: ``python -m training.toy_grounding --out outputs/toy_grounded/s0
--seed 0`` then ``python train_ds.py +exp=toy_grounded seed=0``) loads in the released layout, reproduces the
val gIoU recorded in its metrics.json, and reads its image tokens.

The recorded ``check`` numbers were computed by ``python -m scripts.toy_metrics`` (evaluation over the
first ``max_samples_per_split`` samples of ``toyref|unc|val``); recomputing them here runs the same
evaluation on a freshly generated toy val split. Tolerance: 1e-6 absolute on gIoU, so a change in
any mask pixel of the checked samples, in the data generator or in the model is caught (one pixel of
one 128 x 128 mask moves gIoU by more than 1e-5), while the float order of the mean is free.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.checkpoint import read_lisa_config
from runs.models import build_from_config
from scripts.toy_metrics import REPO, SPLIT, evaluate_checkpoint
from tests.training.test_export_lisa import lisa_431_token_ids

ASSET = REPO / "assets" / "toy_lisa"


def test_committed_checkpoint_is_small_and_complete() -> None:
    files = {p.relative_to(ASSET).as_posix(): p.stat().st_size for p in ASSET.rglob("*") if p.is_file()}
    assert "config.json" in files and "metrics.json" in files and "vision_tower/config.json" in files
    assert any(name.endswith(".safetensors") and "/" not in name for name in files)
    assert sum(files.values()) < 6 * 1024**2, files  # the toy issue: all committed assets <= 10 MB
    config = read_lisa_config(ASSET)
    assert config.num_hidden_layers == 8 and config.sam_arch == "toy_conv"
    bundle = build_from_config({"kind": "lisa", "checkpoint": str(ASSET), "vision_tower": str(ASSET / "vision_tower"),
                                "dtype": "float32", "device": "cpu"})
    assert bundle.model.vision_tower.num_patches == 64
    # the released layout's files: LISA's own tokenizer path (4.31) finds its tokens at the checkpoint's rows
    ids = lisa_431_token_ids(ASSET)
    token_ids = bundle.token_ids
    assert (ids["seg"], ids["chat_seg"], ids["im_start"], ids["im_end"], ids["rows"]) == (
        token_ids.seg, token_ids.seg, token_ids.im_start, token_ids.im_end, config.vocab_size)


@pytest.mark.slow
def test_committed_checkpoint_reproduces_its_val_giou(tmp_path: Path) -> None:
    recorded = json.loads((ASSET / "metrics.json").read_text())
    check = recorded["check"]
    metrics = evaluate_checkpoint(ASSET, tmp_path, int(check["max_samples_per_split"]))
    split = metrics["splits"][SPLIT]
    assert split["evaluated"] == check["samples"] and metrics["summary"]["failed"] == 0
    assert split["gIoU"] == pytest.approx(check["gIoU"], abs=1e-6)
    assert split["cIoU"] == pytest.approx(check["cIoU"], abs=1e-6)


@pytest.mark.slow
def test_committed_checkpoint_reads_its_image_tokens(tmp_path: Path) -> None:
    """The same check samples with every projected image token zeroed: the recorded figure, and a loss of more
    than 20 points (all 300 val samples: metrics.json ``zeroed_image_tokens``)."""
    check = json.loads((ASSET / "metrics.json").read_text())["check"]
    metrics = evaluate_checkpoint(ASSET, tmp_path, int(check["max_samples_per_split"]), zero_image_tokens=True)
    zeroed = metrics["splits"][SPLIT]["gIoU"]
    assert zeroed == pytest.approx(check["zeroed_image_tokens_gIoU"], abs=1e-6)
    assert check["gIoU"] - zeroed > 0.20, (check["gIoU"], zeroed)
