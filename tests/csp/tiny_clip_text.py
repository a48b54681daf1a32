"""Tiny random CLIP pieces for LiteLVLM's tests (tests/csp/test_litelvlm.py, test_strategies.py,
test_runner_speed.py): a character tokenizer, a random text side (text tower with projection and the
image side's post_layernorm / visual_projection) and a tiny float64 vision tower with projection."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

from csp.litelvlm import ClipTextSide

VOCAB = 64


class CharTokenizer:
    """A stand-in for CLIP's tokenizer: BOS 1, one id per character, EOS = the largest id (CLIP's text
    model pools the row of the largest id), right padded with 0; truncated to 16."""

    def __call__(self, text, return_tensors="pt", truncation=True, padding=True):
        rows = [[1, *[3 + ord(c) % (VOCAB - 4) for c in t][:14], VOCAB - 1] for t in text]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(width) < lengths[:, None]).long()}


def tiny_text_side(width: int, projection: int = 8, seed: int = 0, vision: CLIPVisionModelWithProjection | None = None,
                   ) -> ClipTextSide:
    """A random text tower with projection; the image side from ``vision`` or random of ``width``."""
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection,
                         bos_token_id=1, eos_token_id=VOCAB - 1)  # pooled at the EOS row, as CLIP's
    text = CLIPTextModelWithProjection(cfg).eval()
    if vision is not None:
        return ClipTextSide(text, vision.vision_model.post_layernorm, vision.visual_projection, CharTokenizer()).eval()
    ln = torch.nn.LayerNorm(width)
    torch.nn.init.normal_(ln.weight, 1.0, 0.2)
    return ClipTextSide(text, ln, torch.nn.Linear(width, projection, bias=False), CharTokenizer()).eval()


def tiny_clip(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3,
                           image_size=56, patch_size=7, projection_dim=8)  # N = 64
    return CLIPVisionModelWithProjection(cfg).double().eval()
