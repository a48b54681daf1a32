"""The bundle type (a LISA model with its tokenizer and token ids) and the dtype helpers every
builder and loader shares (``model.builder``, ``model.checkpoint``, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from transformers import PreTrainedTokenizerBase
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model.lisa import LISAForCausalLM
from model.prompt import SpecialTokenIds

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LisaBundle:
    """A model with everything needed to feed it."""

    model: LISAForCausalLM
    tokenizer: PreTrainedTokenizerBase
    token_ids: SpecialTokenIds

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.model.layers.parameters()).dtype


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def keep_fp32_buffers(model: torch.nn.Module) -> None:
    """Undo what ``Module.to(dtype)`` does to buffers that must stay float32.

    RoPE inverse frequencies are recomputed in float32 (in bf16 the angles at positions of a few
    hundred are off by up to ~0.8 in cos), and SAM's random positional-encoding matrix is kept
    float32 because segment-anything builds its coordinate grid in float32.
    """
    for module in model.modules():
        if isinstance(module, LlamaRotaryEmbedding):
            device = module.inv_freq.device
            if module.rope_type == "default":
                inv_freq, _ = module.compute_default_rope_parameters(module.config)
            else:
                inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config, device)
            module.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            module.original_inv_freq = module.inv_freq.clone()
        elif isinstance(module, PositionEmbeddingRandom):
            matrix = module.positional_encoding_gaussian_matrix
            module.positional_encoding_gaussian_matrix = matrix.float()


def cast_model(model: torch.nn.Module, *, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    """``model.to(device, dtype)`` with the float32 buffers kept float32 (see keep_fp32_buffers)."""
    model.to(device=device, dtype=dtype)
    keep_fp32_buffers(model)
    return model
