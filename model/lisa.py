"""The LISA model: LLaMA decoder + CLIP tower + projector + SAM + text_hidden_fcs.

Module names follow LISA's checkpoints (``model.layers.N``, ``model.mm_projector``,
``model.visual_model``, ``model.text_hidden_fcs.0``, ``lm_head``) so that state dicts load
one to one. The vision tower is held by the model but is not part of the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import nn
from transformers import LlamaConfig, LlamaModel

from model.vision import CLIPVisionTower

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(kind: str, vision_dim: int, hidden_size: int) -> nn.Module:
    """LISA v1: one Linear; LLaVA-1.5 style: Linear-GELU-Linear (keys ``mm_projector.0/2``)."""
    if kind == "linear":
        return nn.Linear(vision_dim, hidden_size)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    raise ValueError(f"unknown mm_projector_type {kind!r}; expected one of {PROJECTOR_TYPES}")


@dataclass(frozen=True)
class LisaExtras:
    """LISA's fields on top of the LLaMA config (config.json as LISA writes it)."""

    mm_hidden_size: int = 1024
    mm_projector_type: str = "linear"
    mm_vision_select_layer: int = -2
    mm_use_im_start_end: bool = True
    out_dim: int = 256
    vision_tower: str = "openai/clip-vit-large-patch14"

    @classmethod
    def from_config(cls, config: LlamaConfig) -> LisaExtras:
        tower = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
        return cls(
            mm_hidden_size=getattr(config, "mm_hidden_size", 1024),
            mm_projector_type=getattr(config, "mm_projector_type", None) or "linear",
            mm_vision_select_layer=getattr(config, "mm_vision_select_layer", -2),
            mm_use_im_start_end=getattr(config, "mm_use_im_start_end", True),
            out_dim=getattr(config, "out_dim", 256),
            vision_tower=tower or cls.vision_tower,
        )


class LisaModel(LlamaModel):
    """LLaMA's embeddings, layers and norm plus LISA's multimodal heads.

    The decoder layers are run by ``csp.runner`` (own masks and rotary for the actual position
    ids); ``LlamaModel.forward`` stays available and is what the plain loop must equal.
    """

    def __init__(self, config: LlamaConfig, *, visual_model: Sam):
        super().__init__(config)
        extras = LisaExtras.from_config(config)
        self.mm_projector = build_projector(extras.mm_projector_type, extras.mm_hidden_size, config.hidden_size)
        self.visual_model = visual_model
        d = config.hidden_size
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, extras.out_dim), nn.Dropout(0.0))]
        )

    def mm_projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype


class LISAForCausalLM(nn.Module):
    """LISA as a plain module; ``vision_tower`` is attached but excluded from checkpoints."""

    def __init__(self, config: LlamaConfig, *, visual_model: Sam, vision_tower: CLIPVisionTower):
        super().__init__()
        self.config = config
        self.extras = LisaExtras.from_config(config)
        self.model = LisaModel(config, visual_model=visual_model)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision_tower = vision_tower
        prompt_dim = visual_model.prompt_encoder.embed_dim
        if prompt_dim != self.extras.out_dim:
            raise ValueError(
                f"config out_dim={self.extras.out_dim} (text_hidden_fcs output) does not match the SAM "
                f"prompt embedding size {prompt_dim}"
            )
        tower_dim = vision_tower.config.hidden_size
        if tower_dim != self.extras.mm_hidden_size:
            raise ValueError(
                f"vision tower hidden size {tower_dim} does not match the projector input "
                f"mm_hidden_size={self.extras.mm_hidden_size} of the checkpoint config"
            )

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def sam(self) -> Sam:
        return self.model.visual_model

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in LISA's checkpoint layout (no vision tower keys)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision_tower.")}

    def seg_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``K x d`` -> SAM prompt embeddings ``K x out_dim``."""
        return self.model.text_hidden_fcs[0](hidden)

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        """``B x N x C`` CLIP features -> ``B x N x d`` image embeddings (all N projected)."""
        return self.model.mm_projector(features.to(self.model.mm_projector_dtype()))
