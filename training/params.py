"""Which parameters a training mode trains (``lisa``: LoRA + LISA's trainable heads, ``decoder``: SAM's
mask decoder, ``full``: everything but ``mode.freeze``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: What each mode trains (parameter-name prefixes); lisa adds the LoRA adapters.
LISA_TRAINABLE = ("lm_head", "model.embed_tokens", "model.visual_model.mask_decoder", "model.text_hidden_fcs")
DECODER_TRAINABLE = ("model.visual_model.mask_decoder",)
#: Run without gradients by the training loss (as in LISA), so they cannot be unfrozen.
ALWAYS_FROZEN = ("vision_tower.",)


@dataclass
class Trainable:
    names: list[str]
    lora: Any = None  # peft's LoraModel wrapper in mode lisa

    def params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]


def setup_trainable(model: torch.nn.Module, mode_cfg: Mapping[str, Any]) -> Trainable:
    """Freeze all but what ``mode`` trains; returns the trainable names (in parameter order)."""
    from model.training import set_trainable

    mode = mode_cfg["name"]
    if mode == "lisa":
        from training.lora import apply_lora

        wrapper = apply_lora(model, mode_cfg["lora"])
        set_trainable(model, list(mode_cfg.get("trainable") or LISA_TRAINABLE))
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return Trainable(names, wrapper)
    if mode == "decoder":
        return Trainable(set_trainable(model, list(DECODER_TRAINABLE)))
    freeze = tuple(str(f) for f in (mode_cfg.get("freeze") or ()))
    unfrozen = [p for p in ALWAYS_FROZEN if not any(p.startswith(f) or f.startswith(p) for f in freeze)]
    if unfrozen:
        raise ValueError(f"mode.freeze={list(freeze)} leaves {unfrozen} trainable, but the CLIP tower runs without "
                         f"gradients in training (as in LISA); keep it in mode.freeze")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(freeze))
        if param.requires_grad:
            names.append(name)
    missing = [f for f in freeze if not any(n.startswith(f) for n, _ in model.named_parameters())]
    if missing:
        raise ValueError(f"mode.freeze prefixes match no parameter: {missing}")
    return Trainable(names)
