"""LISA's training objective: CE on the answer + BCE and Dice on the masks (1.0 / 2.0 / 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.inference import decoder_inputs, expand_image_slots, pad_rows
from model.pipeline import SegmentationPipeline
from model.prompt import seg_query_rows
from model.sam import decode_masks, sam_postprocess


@dataclass
class TrainingSample:
    """One conversation: ``answer`` contains one [SEG] per ground-truth mask (``K x H x W``)."""

    image: Image.Image
    text: str
    is_sentence: bool
    answer: str
    gt_masks: np.ndarray
    sample_id: str = "train"


@dataclass
class TrainingLoss:
    """The total loss, its parts, and the per-sample ``K x out_dim`` [SEG] prompt embeddings."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_bce_loss: torch.Tensor
    mask_dice_loss: torch.Tensor
    seg_embeddings: list[torch.Tensor]

    def scalars(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss")}


@dataclass
class LossWeights:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


def set_trainable(model: torch.nn.Module, prefixes: list[str]) -> list[str]:
    """Freeze everything except parameters whose names start with one of ``prefixes``."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(tuple(prefixes)))
        if param.requires_grad:
            names.append(name)
    unused = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unused:
        raise ValueError(f"trainable prefixes match no parameter: {unused}")
    return names


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """``K x H x W``: per-mask mean BCE, summed, over ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.flatten(1).mean(1).sum() / (num_masks + 1e-8)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float, scale: float = 1000.0,
              eps: float = 1e-6) -> torch.Tensor:
    """LISA's scaled Dice loss over ``K x H x W`` masks."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    return (1 - (numerator + eps) / (denominator + eps)).sum() / (num_masks + 1e-8)


def training_loss(pipe: SegmentationPipeline, samples: list[TrainingSample],
                  weights: LossWeights = LossWeights()) -> TrainingLoss:
    """Total loss and its parts for a batch; gradients reach only parameters that require them.

    The CLIP tower and SAM image encoder run without gradients (frozen in LISA).
    """
    model, tok = pipe.model, pipe.bundle.token_ids
    with torch.no_grad():
        encodings = [pipe.encode_image(s.image) for s in samples]
    features = torch.cat([e.clip_features for e in encodings])
    image_embeds = model.project_images(features)
    full_ids, answer_starts = [], []
    for s in samples:
        prompt_ids = pipe.prompt_ids(s.text, s.is_sentence, answer=None)
        ids = pipe.prompt_ids(s.text, s.is_sentence, answer=s.answer)
        full_ids.append(ids)
        answer_starts.append(len(prompt_ids) - 1 + image_embeds.shape[1])  # expanded row of the first answer token
    batch = expand_image_slots(full_ids, image_embeds.shape[1], tok.pad)
    seg_rows = [seg_query_rows(ids[: int(n)], tok.seg) for ids, n in zip(batch.ids, batch.lengths)]
    pred_rows = [torch.arange(a - 1, int(n) - 1) for a, n in zip(answer_starts, batch.lengths)]
    device = image_embeds.device
    keep = torch.cat([pipe.cluster(e, [s.sample_id]) for e, s in zip(encodings, samples)]) if pipe.strategy else None
    # Pruning is ranked by the [SEG] rows only, as in evaluation; text rows always survive, so the
    # answer-prediction rows are read from the same final state afterwards.
    inputs = decoder_inputs(model, batch, image_embeds, seg_rows, keep)
    out = pipe.runner.forward(inputs)
    seg_states = out.rows(inputs.query_rows)
    pred, _ = pad_rows(pred_rows)
    pred_states = out.rows(pred.to(device))
    ce_terms, bce, dice, num_masks, prompts = [], 0.0, 0.0, 0, []
    for i, s in enumerate(samples):
        n_pred = len(pred_rows[i])
        logits = model.lm_head(pred_states[i, :n_pred])
        targets = batch.ids[i, pred_rows[i] + 1].to(device)
        ce_terms.append(F.cross_entropy(logits.float(), targets, reduction="sum"))
        seg_hidden = seg_states[i, : len(seg_rows[i])]
        gt = torch.as_tensor(s.gt_masks, dtype=torch.float32, device=device)
        if gt.shape[0] != seg_hidden.shape[0]:
            raise ValueError(f"sample {s.sample_id}: {seg_hidden.shape[0]} [SEG] tokens but {gt.shape[0]} masks")
        prompts.append(model.seg_head(seg_hidden))
        low_res = decode_masks(model.sam, encodings[i].sam_embedding, prompts[-1])
        pred = sam_postprocess(low_res, encodings[i].resized_size, encodings[i].original_size)
        k = gt.shape[0]
        bce = bce + sigmoid_ce_loss(pred, gt, k) * k
        dice = dice + dice_loss(pred, gt, k) * k
        num_masks += k
    ce = torch.stack(ce_terms).sum() / sum(len(p) for p in pred_rows)
    bce = weights.bce * bce / (num_masks + 1e-8)
    dice = weights.dice * dice / (num_masks + 1e-8)
    total = weights.ce * ce + bce + dice
    return TrainingLoss(loss=total, ce_loss=ce, mask_bce_loss=bce, mask_dice_loss=dice, seg_embeddings=prompts)
