"""LoRA on LISA's LLM through peft (LISA's recipe: r 8, alpha 16, dropout 0.05, q_proj and v_proj).

LISA selects every ``nn.Linear`` whose name contains a target (``q_proj``, ``v_proj``) and none
of ``visual_model``, ``vision_tower``, ``mm_projector``, ``text_hidden_fcs``; the adapters are
injected into the LLaMA module (``model.model``) in place, so the stage runner runs them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from model.lisa import LISAForCausalLM

#: Module names LISA never adapts (its find_linear_layers exclusions).
LORA_EXCLUDED = ("visual_model", "vision_tower", "mm_projector", "text_hidden_fcs")


def lora_target_names(model: LISAForCausalLM, targets: Sequence[str]) -> list[str]:
    """Names (relative to ``model.model``) of the Linear layers LISA adapts; a target that matches
    no layer is an error listing the model's Linear module names."""
    linear = [n for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)
              and not any(x in n for x in LORA_EXCLUDED)]
    missing = [t for t in targets if not any(t in n for n in linear)]
    if missing or not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"LoRA target modules {list(missing) or list(targets)} match no Linear layer of the LLM; "
                         f"its Linear module names are {leaves} (e.g. {linear[:4]})")
    return sorted(n for n in linear if any(t in n for t in targets))


def apply_lora(model: LISAForCausalLM, cfg: Mapping[str, Any]) -> LoraModel:
    """Inject LoRA adapters (``cfg``: r, alpha, dropout, targets); returns peft's wrapper (for merging).

    peft matches a *list* of target names by suffix, so ``layers.0.self_attn.q_proj`` would also hit SAM's
    ``visual_model.mask_decoder.transformer.layers.0.self_attn.q_proj``; a string is matched as a full regex,
    so the exact names LISA selects are passed as one anchored alternation (nothing else is adapted)."""
    names = lora_target_names(model, list(cfg.get("targets", ("q_proj", "v_proj"))))
    pattern = "|".join(re.escape(n) for n in names)
    config = LoraConfig(r=int(cfg.get("r", 8)), lora_alpha=int(cfg.get("alpha", 16)),
                        lora_dropout=float(cfg.get("dropout", 0.05)), target_modules=f"(?:{pattern})", bias="none")
    return LoraModel(model.model, config, "default")


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """Names (relative to ``model``) of the modules that carry LoRA adapters."""
    return sorted(n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A"))


def merge_lora(model: LISAForCausalLM, wrapper: LoraModel) -> LISAForCausalLM:
    """Fold the adapters into the base weights (W + B A * alpha / r) and remove them, leaving the
    released LISA layout (``...q_proj.weight``) that ``save_lisa_checkpoint`` writes."""
    merged = wrapper.merge_and_unload()
    if merged is not model.model:
        raise RuntimeError("peft returned a new LLM module instead of unloading in place")
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())
