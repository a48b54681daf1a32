"""A Hydra ``model`` node -> the typed model builders (the entry layer's side of the model).

``model/`` takes typed arguments (``build_tiny_lisa(seed, num_layers=...)``, ``build_toy_lisa(seed,
ToySizes)``, ``load_lisa_checkpoint(dir, clip_dir, dtype=..., device=...)``, ``build_fresh_lisa``);
this module reads the config mapping (``configs/model/*.yaml``: ``kind`` tiny | toy | lisa | fresh,
paths, dtype, device) and calls them, for evaluation, training and the scripts alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig

from model.builder import ToySizes, build_tiny_lisa, build_toy_lisa
from model.bundle import LisaBundle, cast_model, resolve_dtype
from model.checkpoint import build_fresh_lisa, load_lisa_checkpoint, read_lisa_config
from model.cpu_linear import check_prepack_supported, prepack_cpu_linears
from model.vision import tiny_clip_config


def toy_sizes(cfg: Mapping[str, Any]) -> ToySizes:
    """The ``toy`` preset's sizes from a ``model`` config node (keys that are not ToySizes fields are ignored)."""
    return ToySizes(**{f: cfg[f] for f in ToySizes.__dataclass_fields__ if cfg.get(f) is not None})

def check_model_paths(cfg: Mapping[str, Any]) -> None:
    """Fail early, naming every configured path that does not exist."""
    kind = cfg.get("kind", "lisa")
    keys = {"lisa": ("checkpoint", "vision_tower"), "fresh": ("llava", "vision_tower", "sam_checkpoint")}.get(kind, ())
    missing = []
    for key in keys:
        value = cfg.get(key)
        if not value or not Path(str(value)).exists():
            missing.append(f"model.{key}={value!r}")
    if missing:
        raise FileNotFoundError(f"model paths not found: {', '.join(missing)} (kind={kind})")


def layers_and_image_tokens(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(decoder layers L, image tokens N) of the configured model, read from config files only,
    so that a schedule can be validated before any weights are loaded."""
    kind = cfg.get("kind", "lisa")
    if kind == "tiny":
        clip = tiny_clip_config()
        return int(cfg.get("num_layers", 6)), (clip.image_size // clip.patch_size) ** 2
    if kind == "toy":
        sizes = toy_sizes(cfg)
        return sizes.num_layers, sizes.num_image_tokens
    check_model_paths(cfg)
    llm_dir = cfg["checkpoint"] if kind == "lisa" else cfg["llava"]
    clip = CLIPVisionConfig.from_pretrained(cfg["vision_tower"])
    return read_lisa_config(Path(llm_dir)).num_hidden_layers, (clip.image_size // clip.patch_size) ** 2


def build_from_config(cfg: Mapping[str, Any], *, training: bool = False) -> LisaBundle:
    """Hydra ``model`` node -> bundle. ``kind``: ``tiny`` | ``toy`` | ``lisa`` (released) | ``fresh``.

    Paths are checked before anything is loaded. ``cpu_prepack`` runs the LLM's linear layers on
    oneDNN-prepacked weights (``model.cpu_linear``; same outputs up to fp32 rounding): ``auto`` (the default,
    also when the key is absent or null) turns it on for inference of a float32 model on a CPU with oneDNN
    and off otherwise (GPU, bf16 / fp16, ``training=True``); ``true`` insists (an error where it cannot run);
    ``false`` turns it off.
    """
    kind = cfg.get("kind", "lisa")
    dtype = resolve_dtype(cfg["dtype"]) if cfg.get("dtype") else None  # None: the checkpoint's own
    device = torch.device(cfg.get("device", "cpu"))
    prepack = prepack_setting(cfg.get("cpu_prepack"))
    if prepack is True and dtype is not None:  # before anything is loaded when the dtype is known
        _check_prepack(device, dtype)
    bundle = _build(cfg, kind, dtype, device)
    if prepack is True:  # fp32 CPU inference: the LLM's linears on oneDNN-prepacked weights (model.cpu_linear)
        if dtype is None:  # the checkpoint's own dtype: known only now
            _check_prepack(bundle.device, bundle.dtype)
        prepack_cpu_linears(bundle.model.model.layers)
    elif prepack == "auto" and not training and prepack_supported(bundle.device, bundle.dtype):
        prepack_cpu_linears(bundle.model.model.layers)
    return bundle


def prepack_setting(value: Any) -> bool | str:
    """``model.cpu_prepack`` as True, False or ``"auto"`` (absent / null / "auto"); anything else is an error."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    raise ValueError(f"model.cpu_prepack={value!r}; expected auto, true or false")


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        check_prepack_supported(device, dtype)
    except ValueError:
        return False
    return True


def _check_prepack(device: torch.device, dtype: torch.dtype) -> None:
    try:
        check_prepack_supported(device, dtype)
    except ValueError as err:
        raise ValueError(f"model.cpu_prepack=true: {err}") from None


def _build(cfg: Mapping[str, Any], kind: str, dtype: torch.dtype | None, device: torch.device) -> LisaBundle:
    if kind == "tiny":
        bundle = build_tiny_lisa(int(cfg.get("seed", 0)), num_layers=int(cfg.get("num_layers", 6)))
        cast_model(bundle.model, dtype=dtype or torch.float32, device=device)
        return bundle
    if kind == "toy":
        bundle = build_toy_lisa(int(cfg.get("seed", 0)), toy_sizes(cfg))
        cast_model(bundle.model, dtype=dtype or torch.float32, device=device)
        return bundle
    check_model_paths(cfg)
    if kind == "lisa":
        return load_lisa_checkpoint(cfg["checkpoint"], cfg["vision_tower"], dtype=dtype, device=device)
    if kind == "fresh":
        return build_fresh_lisa(cfg["llava"], cfg["vision_tower"], cfg["sam_checkpoint"], dtype=dtype, device=device)
    raise ValueError(f"model.kind must be one of tiny, toy, lisa, fresh; got {kind!r}")
