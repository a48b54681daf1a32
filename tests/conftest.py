"""Shared fixtures: one tiny LISA per session, random images, a tiny checkpoint on disk.

Session-scoped objects are shared by every test: tests that change weights must work on a
``copy.deepcopy`` of ``tiny_bundle`` (or build their own with ``build_tiny_lisa``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.builder import build_tiny_lisa
from model.bundle import LisaBundle
from model.checkpoint import save_clip_dir, save_lisa_checkpoint

#: Shard limit for the saved tiny checkpoint: small enough for several shards (~2 MB of weights).
TINY_SHARD_BYTES = 256 * 1024


def random_pil_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A seeded random ``width x height`` PIL image in ``mode`` (RGB, RGBA, L, P, I;16, ...)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}
    if mode in channels:
        data = rng.integers(0, 256, (height, width, channels[mode]), dtype=np.uint8)
        return Image.fromarray(data[..., 0] if mode == "L" else data, mode=mode)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


@dataclass(frozen=True)
class SavedCheckpoint:
    """A tiny LISA checkpoint directory (HF layout) and the separate CLIP directory."""

    checkpoint: Path
    clip_dir: Path


@pytest.fixture(scope="session")
def tiny_bundle() -> LisaBundle:
    """``build_tiny_lisa(seed=0)``; shared, never modify it in place."""
    return build_tiny_lisa(seed=0)


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Image.Image]:
    """The :func:`random_pil_image` factory."""
    return random_pil_image


@pytest.fixture(scope="session")
def saved_tiny_checkpoint(tiny_bundle: LisaBundle, tmp_path_factory: pytest.TempPathFactory) -> SavedCheckpoint:
    """``tiny_bundle`` saved as sharded safetensors in LISA's layout, plus its CLIP directory."""
    root = tmp_path_factory.mktemp("tiny_lisa")
    ckpt = save_lisa_checkpoint(tiny_bundle, root / "lisa", max_shard_bytes=TINY_SHARD_BYTES)
    return SavedCheckpoint(checkpoint=ckpt, clip_dir=save_clip_dir(tiny_bundle, root / "clip"))
