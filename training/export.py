"""The trained model in the released LISA layout, the form ``eval_ds.py`` loads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from training.params import Trainable


def save_released(bundle: Any, trainable: Trainable, root: Path, dtype: str | None = None) -> dict[str, str]:
    """The trained model as a released LISA checkpoint (``<root>/lisa``, LoRA merged into a copy)
    with its CLIP tower in ``<root>/lisa/vision_tower`` (LISA checkpoints carry no CLIP weights).

    ``dtype`` (``trainer.release_dtype``; None: the training dtype): the weights are written in it, e.g.
    ``bf16`` as LISA's released checkpoints are (RoPE and SAM's positional matrix stay float32)."""
    from model.bundle import LisaBundle, cast_model, resolve_dtype
    from model.checkpoint import save_lisa_checkpoint

    model = bundle.model
    if trainable.lora is not None:
        from training.lora import merge_lora

        model_copy, wrapper_copy = copy.deepcopy((model, trainable.lora))
        model = merge_lora(model_copy, wrapper_copy)
    if dtype is not None:
        model = cast_model(copy.deepcopy(model), dtype=resolve_dtype(dtype), device="cpu")
    out = save_lisa_checkpoint(LisaBundle(model, bundle.tokenizer, bundle.token_ids), root / "lisa")
    tower = model.vision_tower
    tower.clip.save_pretrained(out / "vision_tower")
    tower.processor.save_pretrained(out / "vision_tower")
    return {"checkpoint": str(out), "vision_tower": str(out / "vision_tower")}
