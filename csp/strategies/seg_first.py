"""Seg First clustering (paper 3.1, eqs. 4-5): sample image tokens per detected instance.

A light instance segmenter (YOLO11n-seg through ultralytics) gives No instance masks on the
original image. Each mask is mapped onto the CLIP input exactly as the image is preprocessed
(resize the shortest side to ``crop_size``, then center crop ``crop_size x crop_size``), then onto
the ``rows x cols`` token grid. Instance i gets

    S_o[i] = max(1, floor(Nc * area_i / sum_j area_j))                                  (eq. 4)

tokens drawn uniformly at random, without replacement, from its token set; S is the union (eq. 5).

Choices this module fixes (the paper is silent):

- Mask resampling: the binary mask is resized to the CLIP resize size with area resampling
  (``F.interpolate(mode="area")``, adaptive average pooling: each CLIP pixel averages the
  original pixels it overlaps), giving each CLIP pixel the fraction the instance covers, and is
  then center cropped like the image (the image itself is resized bicubic; a mask needs a
  coverage rule, not an intensity filter).
- ``area_i`` is the instance's pixel area at CLIP resolution inside the crop (the sum of that
  coverage map): eq. 4 sums the mask over the H x W CLIP input. Overlapping pixels count for every
  instance that covers them, as in eq. 4's double sum.
- Token membership: a token belongs to instance i when the instance covers at least half of the
  token's ``crop/rows x crop/cols`` patch. An instance that is visible in the crop but covers no
  token that much gets its single best-covered token (lowest index on ties). Instances with no
  pixel inside the crop are dropped. A token may belong to several instances.
- S_o[i] is capped at the size of the instance's token set. Tokens already taken by an earlier
  instance count once.
- Exactly Nc tokens: instances are visited in descending confidence (stable for ties), each
  adding its random sample, and the union stops at Nc (this is the trim). A short union is
  topped up with the uniform grid i * floor(N / Nc) (eq. 2) in that order, skipping chosen
  tokens, then with any unchosen token in index order (never reached: the grid alone has Nc
  distinct tokens). With no visible detection the result is therefore exactly eq. 2.
- Detections below ``conf`` are ignored even when the segmenter is injected; ``max_instances``
  keeps the most confident visible instances before eq. 4 is evaluated.
- Randomness: one generator per sample, seeded by (seed, sample id) as in ``RandomStrategy``.

Offline: ``weights`` must be an existing local ``.pt`` (checked before ultralytics is imported;
a missing file is a ``FileNotFoundError``) or a packaged architecture yaml; ultralytics is
imported lazily with ``YOLO_OFFLINE=1`` and ``YOLO_AUTOINSTALL=False``. The segmenter's cost
(ms per image, GFLOPs) is reported by ``extra_cost``, apart from the LLM's.
"""

from __future__ import annotations

import math
import os
import pickle
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from csp.geometry import clip_crop_geometry
from csp.strategies.base import (
    ClusteringInputs,
    ClusteringStrategy,
    register_strategy,
    sample_generator,
    uniform_indices,
)

#: Masks resampled per chunk, to bound the float copy of large images.
_MASK_CHUNK = 16
_YAML_SUFFIXES = (".yaml", ".yml")


class InstanceSegmenter(ABC):
    """Instance segmentation on one original image."""

    @abstractmethod
    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Segment ``image`` (RGB, H x W).

        Returns:
            masks: ``No x H x W`` bool, at the ORIGINAL image size.
            confidences: ``No`` float scores.
        """

    @property
    def gflops(self) -> float | None:
        """Cost of one forward pass in GFLOPs, when known."""
        return None


def resolve_weights(weights: str) -> str:
    """Validate a YOLO-seg ``weights`` spec without touching ultralytics or the network.

    A ``.yaml``/``.yml`` name is an ultralytics architecture file (random weights, for tests) and
    is returned as is; anything else must be an existing local ``.pt`` file, returned absolute so
    that ultralytics never looks for it elsewhere or tries to download it.
    """
    if not weights:
        raise ValueError(
            "seg_first needs a YOLO11-seg weights file: set schedule.clustering_kwargs.weights to "
            "the path of a YOLO11-seg .pt file (e.g. yolo11n-seg.pt); nothing is downloaded"
        )
    if "://" in weights:
        raise ValueError(f"seg_first weights must be a local file, not a URL: {weights!r}")
    if weights.lower().endswith(_YAML_SUFFIXES):
        return weights
    path = Path(weights).expanduser()
    if path.suffix.lower() != ".pt":
        raise ValueError(f"seg_first weights must be a YOLO .pt file (or an architecture .yaml): {weights!r}")
    if not path.is_file():
        raise FileNotFoundError(
            f"YOLO segmentation weights not found: {path} (seg_first never downloads weights; "
            "set schedule.clustering_kwargs.weights to an existing YOLO11-seg .pt file)"
        )
    return str(path.resolve())


def _import_ultralytics_offline() -> Any:
    """Import ultralytics with its network features off (no analytics, downloads or pip installs).

    ultralytics 8.4 reads ``YOLO_OFFLINE`` and ``YOLO_AUTOINSTALL`` once, when ``ultralytics.utils``
    is first imported (``ONLINE = is_online()``, ``AUTOINSTALL``), and its analytics and error
    reporting are gated on ``ONLINE``. The variables are therefore set before the import; a
    process that imported ultralytics earlier without them only gets a warning (and
    ``YoloSegmenter`` still strips the analytics callback from its own predictor).
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    import ultralytics.utils as ul_utils

    if ul_utils.ONLINE:
        warnings.warn(
            "ultralytics was imported before seg_first could set YOLO_OFFLINE=1; set YOLO_OFFLINE=1 "
            "in the environment to keep it offline",
            RuntimeWarning,
            stacklevel=3,
        )
    return ul_utils


def _strip_analytics(callbacks: dict[str, list[Any]]) -> None:
    """Remove ultralytics' anonymous-analytics callbacks from one predictor's callback lists."""
    for name, funcs in callbacks.items():
        callbacks[name] = [f for f in funcs if getattr(f, "__module__", "") != "ultralytics.utils.events"]


def load_yolo_weights_only(path: str) -> torch.nn.Module:
    """An ultralytics ``.pt`` checkpoint's model, read with ``torch.load(weights_only=True)``.

    Ultralytics' default loader unpickles the whole file (any code it carries runs) and, on a
    missing module, pip-installs it. Its safe mode (``torch_safe_load(..., safe_only=True)``) allows
    only the torch and ultralytics classes a model is made of, never installs and never falls back
    to a full unpickle; a file that needs more is refused here with what to do. ``path`` must be an
    existing local file (``resolve_weights``), so ultralytics' asset lookup never downloads.
    """
    _import_ultralytics_offline()
    from ultralytics.nn.tasks import _SafeLoad, guess_model_task, torch_safe_load
    from ultralytics.utils import DEFAULT_CFG_DICT

    if not _SafeLoad.SUPPORTED:  # torch_safe_load would silently fall back to a full unpickle
        raise RuntimeError(f"{path}: weights-only loading of YOLO checkpoints needs torch >= 2.6")
    try:
        ckpt, _ = torch_safe_load(path, safe_only=True)
    except (TypeError, pickle.UnpicklingError, ModuleNotFoundError) as exc:
        raise ValueError(
            f"{path}: refused to load this YOLO checkpoint: it needs more than the weights-only allow-list of "
            f"ultralytics' model classes ({exc}). Use an official ultralytics YOLO11-seg checkpoint (yolo11n-seg.pt), "
            "or re-save your model with ultralytics' YOLO(...).save() in an environment you trust."
        ) from exc
    module = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{path}: not an ultralytics checkpoint (no 'model' module inside)")
    # What ultralytics' load_checkpoint does after reading the file, for inference.
    module = module.float().eval()
    module.args = {**DEFAULT_CFG_DICT, **ckpt.get("train_args", {})}
    module.pt_path = str(path)
    if not hasattr(module, "task"):
        module.task = guess_model_task(module)
    if not hasattr(module, "stride"):
        module.stride = torch.tensor([32.0])
    for layer in module.modules():
        if hasattr(layer, "inplace"):
            layer.inplace = True
    return module


class YoloSegmenter(InstanceSegmenter):
    """YOLO(11n)-seg through ultralytics, strictly offline; built lazily on the first image.

    Args:
        weights: path to a YOLO-seg ``.pt`` file, or an ultralytics architecture yaml name such as
            ``"yolo11n-seg.yaml"`` (random weights, for tests).
        conf: confidence threshold of the detector.
        imgsz: inference size (letterboxed); masks still come back at the original size.
        device: torch device string for ultralytics (``"cpu"``, ``"cuda:0"``, ...).
        max_det: most detections per image.

    The ``.pt`` file is read weights-only (``load_yolo_weights_only``): no code in it runs.
    """

    def __init__(
        self, weights: str, conf: float = 0.25, imgsz: int = 640, device: str = "cpu", max_det: int = 300
    ) -> None:
        self.weights = resolve_weights(weights)
        self.conf = conf
        self.imgsz = imgsz
        self.device = device
        self.max_det = max_det
        self._predictor: Any = None
        self._gflops: float | None = None

    @property
    def gflops(self) -> float | None:
        """GFLOPs of one forward pass at ``imgsz x imgsz`` (thop; an upper bound for rect inference)."""
        return self._gflops

    def _build(self) -> Any:
        """Load the model and set up an ultralytics segmentation predictor for it."""
        _import_ultralytics_offline()
        from ultralytics import YOLO
        from ultralytics.models.yolo.segment import SegmentationPredictor
        from ultralytics.utils.torch_utils import get_flops

        if self.weights.lower().endswith(_YAML_SUFFIXES):  # a packaged architecture file: random weights
            module, overrides = YOLO(self.weights, task="segment").model, {}
        else:
            module, overrides = load_yolo_weights_only(self.weights), {"model": self.weights}
        if module.task != "segment":
            raise ValueError(f"{self.weights} is a {module.task!r} model; seg_first needs a segmentation model")
        overrides = {
            **overrides,
            "task": "segment",
            "conf": self.conf,
            "imgsz": self.imgsz,
            "device": self.device,
            "max_det": self.max_det,
            "retina_masks": True,  # masks upsampled letterbox-aware to the original image size
            "mode": "predict",
            "batch": 1,
            "rect": True,
            "save": False,
            "verbose": False,
        }
        predictor = SegmentationPredictor(overrides=overrides)
        _strip_analytics(predictor.callbacks)
        predictor.setup_model(model=module, verbose=False)
        self._gflops = get_flops(module, self.imgsz) or None
        return predictor

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """``image`` -> (``No x H x W`` bool masks at the original size, ``No`` confidences)."""
        if self._predictor is None:
            self._predictor = self._build()
        image = image.convert("RGB")
        result = self._predictor(source=image, stream=False)[0]
        height, width = image.height, image.width
        if result.masks is None or len(result.boxes) == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
        masks = result.masks.data.bool().cpu().numpy()
        if masks.shape[1:] != (height, width):
            raise RuntimeError(f"segmenter masks are {masks.shape[1:]}, expected the image size {(height, width)}")
        return masks, result.boxes.conf.float().cpu().numpy()


def masks_to_clip(masks: np.ndarray, crop_size: int) -> torch.Tensor:
    """``No x H x W`` bool masks -> ``No x crop x crop`` float coverage of each CLIP pixel in [0, 1]."""
    new_h, new_w, top, left = clip_crop_geometry(masks.shape[1], masks.shape[2], crop_size)
    chunks = []
    for start in range(0, masks.shape[0], _MASK_CHUNK):
        part = torch.from_numpy(np.ascontiguousarray(masks[start : start + _MASK_CHUNK])).float()
        resized = F.interpolate(part.unsqueeze(0), size=(new_h, new_w), mode="area")[0]
        chunks.append(resized[:, top : top + crop_size, left : left + crop_size])
    if not chunks:
        return torch.zeros((0, crop_size, crop_size))
    return torch.cat(chunks)


def token_coverage(coverage: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``No x crop x crop`` pixel coverage -> ``No x N`` fraction of each token's patch covered."""
    rows, cols = grid
    crop = coverage.shape[-1]
    if crop % rows or crop % cols:
        raise ValueError(f"crop size {crop} is not a multiple of the token grid {grid}")
    pooled = F.avg_pool2d(coverage.unsqueeze(1), kernel_size=(crop // rows, crop // cols))
    return pooled.flatten(1)


def instance_token_sets(token_frac: torch.Tensor, threshold: float = 0.5) -> list[torch.Tensor]:
    """``No x N`` token coverage -> per instance, its ascending token indices (never empty)."""
    sets = []
    for row in token_frac:
        members = torch.nonzero(row >= threshold).flatten()
        sets.append(members if members.numel() else row.argmax().reshape(1))
    return sets


def eq4_counts(areas: torch.Tensor, num_keep: int) -> list[int]:
    """Eq. 4: ``S_o[i] = max(1, floor(Nc * area_i / sum_j area_j))`` for ``No`` areas."""
    total = float(areas.sum())
    return [max(1, math.floor(num_keep * float(a) / total)) for a in areas]


def sample_union(token_sets: list[torch.Tensor], counts: list[int], num_keep: int, gen: torch.Generator) -> list[int]:
    """Eq. 5 in list order (the caller sorts by confidence): union of random samples, cut at Nc."""
    chosen: list[int] = []
    seen: set[int] = set()
    for tokens, count in zip(token_sets, counts, strict=True):
        perm = torch.randperm(tokens.numel(), generator=gen)[: min(count, tokens.numel())]
        for token in tokens[perm].tolist():
            if token not in seen:
                seen.add(token)
                chosen.append(token)
                if len(chosen) == num_keep:
                    return chosen
    return chosen


def top_up(chosen: list[int], num_tokens: int, num_keep: int) -> list[int]:
    """Fill ``chosen`` to Nc with uniform-grid tokens, then any token in index order."""
    seen = set(chosen)
    out = list(chosen)
    for token in [*uniform_indices(num_tokens, num_keep).tolist(), *range(num_tokens)]:
        if len(out) == num_keep:
            break
        if token not in seen:
            seen.add(token)
            out.append(token)
    return out


@register_strategy("seg_first")
@dataclass
class SegFirstStrategy(ClusteringStrategy):
    """Instance-aware sampling from a YOLO-seg model (eqs. 4-5); see the module docstring.

    ``weights`` is required (a YOLO11-seg ``.pt`` path, or an architecture yaml for tests) unless
    a ``segmenter`` is injected. ``imgsz`` and ``device`` configure the YOLO segmenter
    (``device=""``: the device of the CLIP features).
    """

    weights: str = ""
    conf: float = 0.25
    seed: int = 0
    max_instances: int | None = None
    imgsz: int = 640
    device: str = ""
    segmenter: InstanceSegmenter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.segmenter is None:
            self.weights = resolve_weights(self.weights)
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError(f"seg_first max_instances must be >= 1 or None, got {self.max_instances}")
        self._segmenter_ms: list[float] = []

    def _get_segmenter(self, device: torch.device) -> InstanceSegmenter:
        if self.segmenter is None:
            self.segmenter = YoloSegmenter(
                self.weights, conf=self.conf, imgsz=self.imgsz, device=self.device or str(device)
            )
        return self.segmenter

    def _segment(self, segmenter: InstanceSegmenter, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Run and time the segmenter; check its output against the image size."""
        start = time.perf_counter()
        masks, confidences = segmenter(image)
        self._segmenter_ms.append((time.perf_counter() - start) * 1e3)
        masks, confidences = np.asarray(masks, dtype=bool), np.asarray(confidences, dtype=np.float64)
        if masks.ndim != 3 or masks.shape[1:] != (image.height, image.width) or len(confidences) != len(masks):
            raise ValueError(
                f"segmenter returned masks {masks.shape} and {len(confidences)} confidences for an image of "
                f"size {(image.height, image.width)}; expected No x H x W masks at the original size"
            )
        return masks, confidences

    def select_one(
        self, masks: np.ndarray, confidences: np.ndarray, inputs: ClusteringInputs, num_keep: int, sample_id: str
    ) -> torch.Tensor:
        """One sample: ``No x H x W`` masks and ``No`` confidences -> ``num_keep`` sorted indices."""
        keep = confidences >= self.conf
        order = np.argsort(-confidences[keep], kind="stable")
        masks = masks[keep][order]
        coverage = masks_to_clip(masks, inputs.crop_size)
        areas = coverage.flatten(1).sum(dim=1)
        visible = torch.nonzero(areas > 0).flatten()[: self.max_instances]
        chosen: list[int] = []
        if visible.numel():
            token_sets = instance_token_sets(token_coverage(coverage[visible], inputs.grid))
            gen = sample_generator(self.seed, sample_id)
            chosen = sample_union(token_sets, eq4_counts(areas[visible], num_keep), num_keep, gen)
        return torch.tensor(sorted(top_up(chosen, inputs.num_tokens, num_keep)), dtype=torch.long)

    def select(self, inputs: ClusteringInputs, num_keep: int) -> torch.Tensor:
        """Return ``B x num_keep`` int64 indices, sorted ascending, on the features' device."""
        rows, cols = inputs.grid
        if rows * cols != inputs.num_tokens:
            raise ValueError(f"token grid {inputs.grid} does not hold the {inputs.num_tokens} image tokens")
        segmenter = self._get_segmenter(inputs.features.device)
        detections: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # queries of one image share it
        out = []
        for image, sample_id in zip(inputs.images, inputs.sample_ids, strict=True):
            if id(image) not in detections:
                detections[id(image)] = self._segment(segmenter, image)
            masks, confidences = detections[id(image)]
            out.append(self.select_one(masks, confidences, inputs, num_keep, sample_id))
        return torch.stack(out).to(inputs.features.device)

    def extra_cost(self) -> dict[str, float]:
        """Segmenter cost so far: mean wall-clock ms per image, calls, GFLOPs per image if known."""
        cost: dict[str, float] = {"segmenter_calls": float(len(self._segmenter_ms))}
        if self._segmenter_ms:
            cost["segmenter_ms"] = float(np.mean(self._segmenter_ms))
        gflops = self.segmenter.gflops if self.segmenter is not None else None
        if gflops:
            cost["segmenter_gflops"] = float(gflops)
        return cost
