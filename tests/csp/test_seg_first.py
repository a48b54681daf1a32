"""Seg First clustering (csp/strategies/seg_first.py, paper eqs. 4-5).

The sampler is checked on hand-made instance masks through a fake segmenter, with the expected
token regions and eq. 4 counts worked out here from the geometry: a 448 x 448 image becomes the
224 x 224 CLIP input at scale 1/2, so a 28 x 28 original square is exactly one 14 x 14 token.
The YOLO path runs once end to end with a random-weight YOLO11n-seg, offline.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csp.strategies import ClusteringInputs, build_strategy
from csp.strategies.seg_first import InstanceSegmenter, SegFirstStrategy, YoloSegmenter

REPO_ROOT = Path(__file__).resolve().parents[2]
CROP, GRID, N = 224, (16, 16), 256
TOKEN_PX = 28  # original pixels per token side for a 448 x 448 image


class FakeSegmenter(InstanceSegmenter):
    """Returns fixed masks and confidences; counts its calls."""

    def __init__(self, masks: np.ndarray, confidences: list[float]) -> None:
        self.masks, self.confidences = masks, np.asarray(confidences, dtype=np.float32)
        self.calls = 0

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        return self.masks, self.confidences


class SpySegmenter(InstanceSegmenter):
    """Delegates to a real segmenter and records what it returned."""

    def __init__(self, inner: InstanceSegmenter) -> None:
        self.inner = inner
        self.outputs: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        out = self.inner(image)
        self.outputs.append(out)
        return out


def token_box(row0: int, row1: int, col0: int, col1: int, height: int = 448, width: int = 448) -> np.ndarray:
    """Mask of the tokens rows [row0, row1) x cols [col0, col1), drawn on a 448 x 448 image."""
    mask = np.zeros((height, width), dtype=bool)
    mask[row0 * TOKEN_PX : row1 * TOKEN_PX, col0 * TOKEN_PX : col1 * TOKEN_PX] = True
    return mask


def box_tokens(row0: int, row1: int, col0: int, col1: int) -> set[int]:
    """Token indices of the same box on the 16 x 16 grid."""
    return {r * GRID[1] + c for r in range(row0, row1) for c in range(col0, col1)}


def make_inputs(images: list[Image.Image], sample_ids: list[str]) -> ClusteringInputs:
    return ClusteringInputs(
        features=torch.zeros(len(images), N, 4), grid=GRID, crop_size=CROP, images=images, sample_ids=sample_ids
    )


def blank(height: int = 448, width: int = 448) -> Image.Image:
    return Image.new("RGB", (width, height))


def run(masks: list[np.ndarray], confs: list[float], num_keep: int, sample_id: str = "s0", **kw: object) -> set[int]:
    """Select with a fake segmenter on one blank image of the masks' size; check the invariants."""
    height, width = masks[0].shape if masks else (448, 448)
    stack = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    strategy = SegFirstStrategy(segmenter=FakeSegmenter(stack, confs), **kw)
    out = strategy.select(make_inputs([blank(height, width)], [sample_id]), num_keep)
    assert out.shape == (1, num_keep) and out.dtype == torch.int64
    row = out[0].tolist()
    assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < N
    return set(row)


def eq4(areas: list[float], num_keep: int) -> list[int]:
    total = sum(areas)
    return [max(1, math.floor(num_keep * a / total)) for a in areas]


def test_counts_follow_eq4_and_stay_in_their_instance() -> None:
    boxes = [(0, 4, 0, 8), (8, 16, 8, 16)]  # 32 and 64 tokens
    regions = [box_tokens(*b) for b in boxes]
    expected = eq4([len(r) * 14 * 14 for r in regions], 24)  # areas in CLIP pixels
    assert expected == [8, 16]  # the floors add up to Nc: no top-up, no trim
    chosen = run([token_box(*b) for b in boxes], [0.9, 0.8], 24)
    assert [len(chosen & r) for r in regions] == expected
    assert chosen <= regions[0] | regions[1]


def test_tiny_object_gets_one_token() -> None:
    big = token_box(0, 8, 0, 8)  # 64 tokens
    tiny = np.zeros((448, 448), dtype=bool)
    tiny[290:300, 290:300] = True  # 5 x 5 CLIP pixels inside token (10, 10): covers < half of it
    tiny_token = 10 * 16 + 10
    counts = eq4([64 * 196, 25], 16)
    assert counts == [15, 1]
    chosen = run([big, tiny], [0.9, 0.3], 16)
    assert tiny_token in chosen
    assert len(chosen & box_tokens(0, 8, 0, 8)) == 15


def test_short_union_is_topped_up_with_the_uniform_grid() -> None:
    # One 2 x 2 instance: S_o = 16 capped at its 4 tokens, then the grid 0, 16, 32, ... fills in.
    instance = box_tokens(0, 2, 4, 6)
    chosen = run([token_box(0, 2, 4, 6)], [0.9], 16)
    grid = [i * (N // 16) for i in range(16)]
    assert chosen == instance | set(grid[:12])


def test_long_union_is_trimmed_in_confidence_order() -> None:
    # Six one-token instances, Nc = 4: each gets max(1, 0) = 1, the union of 6 is cut to the 4 most confident.
    cells = [(0, 1, 0, 1), (3, 4, 3, 4), (6, 7, 6, 7), (9, 10, 9, 10), (12, 13, 12, 13), (15, 16, 15, 16)]
    confs = [0.3, 0.9, 0.5, 0.8, 0.4, 0.7]
    chosen = run([token_box(*c) for c in cells], confs, 4)
    top4 = sorted(range(6), key=lambda i: -confs[i])[:4]
    assert chosen == set().union(*(box_tokens(*cells[i]) for i in top4))


def test_confidence_beats_area_when_trimming() -> None:
    # A (4 tokens, least confident): 1 token by eq. 4; B, C, D (1 token each): 1 each. Nc = 3 keeps B, C, D.
    boxes = [(0, 2, 0, 2), (5, 6, 5, 6), (8, 9, 8, 9), (11, 12, 11, 12)]
    assert eq4([4, 1, 1, 1], 3) == [1, 1, 1, 1]
    chosen = run([token_box(*b) for b in boxes], [0.4, 0.9, 0.8, 0.7], 3)
    assert chosen == box_tokens(*boxes[1]) | box_tokens(*boxes[2]) | box_tokens(*boxes[3])


def test_max_instances_keeps_the_most_confident() -> None:
    boxes = [(0, 2, 0, 2), (8, 10, 8, 10)]
    chosen = run([token_box(*b) for b in boxes], [0.4, 0.9], 4, max_instances=1)
    assert chosen == box_tokens(*boxes[1])


def test_overlapping_instances_count_shared_tokens_once() -> None:
    # A 2 x 2 instance inside an 8 x 8 one: eq. 4 sums both areas; a token both sample counts once.
    outer, inner = box_tokens(0, 8, 0, 8), box_tokens(2, 4, 2, 4)
    counts = eq4([len(outer), len(inner)], 40)
    assert counts == [37, 2]
    chosen = run([token_box(0, 8, 0, 8), token_box(2, 4, 2, 4)], [0.9, 0.8], 40)
    assert len(chosen & outer) >= counts[0]
    assert chosen - outer <= {i * (N // 40) for i in range(40)}  # the rest is top-up from the grid


def uniform_row(num_keep: int) -> set[int]:
    strategy = build_strategy("uniform")
    return set(strategy.select(make_inputs([blank()], ["s0"]), num_keep)[0].tolist())


def test_no_detections_fall_back_to_uniform() -> None:
    assert run([], [], 32) == uniform_row(32)
    # Detections below the confidence threshold count as none.
    assert run([token_box(0, 4, 0, 4)], [0.1], 32, conf=0.25) == uniform_row(32)


def test_reproducible_per_sample_and_different_across_samples() -> None:
    masks = np.stack([token_box(0, 8, 0, 8)])
    images = [blank(), blank()]

    def select(ids: list[str], seed: int = 0) -> list[list[int]]:
        strategy = SegFirstStrategy(segmenter=FakeSegmenter(masks, [0.9]), seed=seed)
        return strategy.select(make_inputs(images[: len(ids)], ids), 16).tolist()

    both = select(["a", "b"])
    assert both == select(["a", "b"])
    assert both[0] == select(["a"])[0] and both[1] == select(["b"])[0]
    assert both[0] != both[1]
    assert select(["a"], seed=1)[0] != both[0]
    assert set(both[0]) <= box_tokens(0, 8, 0, 8) and set(both[1]) <= box_tokens(0, 8, 0, 8)


def test_center_crop_drops_instances_outside_it() -> None:
    # 448 x 896 (H x W) -> resized 224 x 448 -> crop columns 112..336, i.e. original x 224..672.
    height, width = 448, 896
    outside = np.zeros((height, width), dtype=bool)
    outside[:, :112] = True
    inside = np.zeros((height, width), dtype=bool)
    inside[0:56, 280:336] = True  # CLIP x 28..56, y 0..28: tokens rows 0-1, cols 2-3
    assert run([outside], [0.9], 4) == uniform_row(4)
    # Were the outside instance counted, eq. 4 would give the inside one fewer than its 4 tokens.
    assert run([outside, inside], [0.9, 0.5], 4) == {2, 3, 18, 19}


def test_segmenter_output_must_match_the_image() -> None:
    strategy = SegFirstStrategy(segmenter=FakeSegmenter(np.zeros((1, 10, 10), dtype=bool), [0.9]))
    with pytest.raises(ValueError, match="original size"):
        strategy.select(make_inputs([blank()], ["s0"]), 8)


def test_extra_cost_counts_segmenter_calls() -> None:
    strategy = SegFirstStrategy(segmenter=FakeSegmenter(np.stack([token_box(0, 2, 0, 2)]), [0.9]))
    assert strategy.extra_cost()["segmenter_calls"] == 0
    strategy.select(make_inputs([blank(), blank()], ["a", "b"]), 8)
    cost = strategy.extra_cost()
    assert cost["segmenter_calls"] == 2 and cost["segmenter_ms"] >= 0


def test_weights_are_required_and_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=re.escape("schedule.clustering_kwargs.weights")):
        build_strategy("seg_first")
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "yolo11n-seg.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        YoloSegmenter(str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape("yolo11n-seg.pt")):
        build_strategy("seg_first", weights="yolo11n-seg.pt")
    with pytest.raises(ValueError, match="URL"):
        SegFirstStrategy(weights="https://example.com/yolo11n-seg.pt")
    assert list(tmp_path.iterdir()) == []


def test_import_is_light_and_missing_weights_fail_before_ultralytics(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import csp.strategies as s\n"
        "assert 'seg_first' in s.CLUSTERING_STRATEGIES\n"
        "assert 'ultralytics' not in sys.modules\n"
        "try:\n"
        "    s.build_strategy('seg_first', weights='yolo11n-seg.pt')\n"
        "except FileNotFoundError:\n"
        "    pass\n"
        "assert 'ultralytics' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly on any DNS lookup or socket connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_yolo_end_to_end_random_weights(tmp_path: Path, no_network: None) -> None:
    from csp.strategies.seg_first import _import_ultralytics_offline

    _import_ultralytics_offline()
    from ultralytics import YOLO

    weights = tmp_path / "yolo11n-seg-random.pt"
    YOLO("yolo11n-seg.yaml", task="segment").save(str(weights))  # built from the packaged yaml
    images = [noise_image(120, 200, 0), noise_image(150, 100, 1)]
    inputs = make_inputs(images, ["a", "b"])
    num_keep = 48

    # The users' path: weights= a .pt file, segmenter built lazily. conf=0: random weights still detect.
    strategy = SegFirstStrategy(weights=str(weights), conf=0.0, imgsz=160, device="cpu")
    out = strategy.select(inputs, num_keep)
    assert out.shape == (2, num_keep) and out.dtype == torch.int64
    for row in out.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < N
    assert isinstance(strategy.segmenter, YoloSegmenter)
    cost = strategy.extra_cost()
    assert cost["segmenter_calls"] == 2 and cost["segmenter_ms"] > 0 and cost["segmenter_gflops"] > 0

    # Same weights behind a spy: the masks were parsed (original size, bool) and give the same selection.
    spy = SpySegmenter(YoloSegmenter(str(weights), conf=0.0, imgsz=160, device="cpu"))
    spied = SegFirstStrategy(segmenter=spy, conf=0.0).select(inputs, num_keep)
    assert torch.equal(spied, out)
    for image, (masks, confs) in zip(images, spy.outputs, strict=True):
        assert masks.dtype == bool and masks.shape[1:] == (image.height, image.width)
        assert len(masks) == len(confs) > 0 and masks.any(axis=(1, 2)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [weights.name]
