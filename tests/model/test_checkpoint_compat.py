"""Details of released checkpoints: rotary buffers saved by old transformers, the dtype recorded in
config.json, and the CLIP resolution the checkpoint was trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.builder import build_tiny_lisa
from model.checkpoint import load_lisa_checkpoint, save_lisa_checkpoint
from tests.conftest import save_clip_dir


def copy_checkpoint(saved, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved.checkpoint, ckpt)
    return ckpt


def test_old_rotary_buffers_in_checkpoint_are_ignored(saved_tiny_checkpoint, tmp_path: Path) -> None:
    """transformers < 4.31 saved model.layers.N.self_attn.rotary_emb.inv_freq; it is recomputed."""
    ckpt = copy_checkpoint(saved_tiny_checkpoint, tmp_path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(ckpt / shard))
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tensors[key] = torch.zeros(8)  # a wrong value: it must not be used
    save_file(tensors, str(ckpt / shard))
    index["weight_map"][key] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    bundle = load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert bool((bundle.model.model.rotary_emb.inv_freq > 0).all())


def test_dtype_defaults_to_the_checkpoints_own(tmp_path: Path) -> None:
    bundle = build_tiny_lisa(seed=1)
    bundle.model.to(torch.bfloat16)
    ckpt = save_lisa_checkpoint(bundle, tmp_path / "bf16")
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    clip = save_clip_dir(build_tiny_lisa(seed=1), tmp_path / "clip")
    loaded = load_lisa_checkpoint(ckpt, clip)
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert load_lisa_checkpoint(ckpt, clip, dtype=torch.float32).model.lm_head.weight.dtype == torch.float32


def test_clip_resolution_must_match_the_checkpoints_tower(saved_tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # a LISA++ style tower name
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="336 px.*224 px CLIP"):
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
