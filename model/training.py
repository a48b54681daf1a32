"""LISA's training objective: CE on the answer + BCE and Dice on the masks (1.0 / 2.0 / 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.inference import decoder_inputs, expand_image_slots, pad_rows
from model.pipeline import ImageEncoding, SegmentationPipeline
from model.prompt import seg_query_rows
from model.sam import decode_masks, sam_postprocess_separable, to_rgb_array


@dataclass
class TrainingSample:
    """One conversation: ``answer`` contains one [SEG] per ground-truth mask (``K x H x W``).

    ``question_template``: one of LISA's training templates (model.prompt), None for the
    evaluation question. Samples holding the same ``image`` object share one image encoding.
    """

    image: Image.Image
    text: str
    is_sentence: bool
    answer: str
    gt_masks: np.ndarray
    sample_id: str = "train"
    question_template: str | None = None
    #: A VQA turn's question (datasets/vqa.py): the prompt is model.prompt.vqa_prompt, ``answer`` is text
    #: without [SEG] and ``gt_masks`` is ``0 x H x W`` (the sample adds to the CE term only).
    message: str | None = None


@dataclass
class TrainingLoss:
    """The total loss, its parts, and the per-sample ``K x out_dim`` [SEG] prompt embeddings."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_bce_loss: torch.Tensor
    mask_dice_loss: torch.Tensor
    seg_embeddings: list[torch.Tensor]
    point_loss: torch.Tensor | None = None  # the (weighted) pointing term, where it is on

    def scalars(self) -> dict[str, float]:
        keys = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss") + (("point_loss",) if self.point_loss is not None
                                                                          else ())
        return {k: float(getattr(self, k).detach()) for k in keys}


@dataclass
class LossWeights:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    #: Not LISA's: the pointing term (:func:`pointing_targets`), 0 in LISA's recipe; the toy world uses it.
    point: float = 0.0


def pointing_targets(sam: torch.nn.Module, gt: torch.Tensor, resized_size: tuple[int, int],
                     original_size: tuple[int, int]) -> torch.Tensor:
    """``K x H x W`` target masks -> ``K x C``: the sparse token SAM's prompt encoder makes for a positive
    click on each target (at its visible pixel nearest to the mask's centroid, in SAM's 1024 frame).

    The pointing term is the mean squared distance of each [SEG] prompt to its target's click token: a
    dense signal that asks the [SEG] row to say where its referent is, in the terms SAM's decoder was
    pretrained on (as LLaVA-1.5's grounding data asks for coordinates as text). LISA has no such term.
    """
    clicks = []
    for mask in gt:
        ys, xs = torch.nonzero(mask > 0, as_tuple=True)
        if len(ys) == 0:
            raise ValueError("pointing_targets: an empty target mask has no pixel to click on")
        cy, cx = ys.float().mean(), xs.float().mean()
        k = int(((ys.float() - cy) ** 2 + (xs.float() - cx) ** 2).argmin())
        clicks.append((float(xs[k]) + 0.5, float(ys[k]) + 0.5))
    scale_y = resized_size[0] / original_size[0]
    scale_x = resized_size[1] / original_size[1]
    coords = torch.tensor([[[x * scale_x, y * scale_y]] for x, y in clicks], device=gt.device)
    labels = torch.ones(len(clicks), 1, dtype=torch.int, device=gt.device)
    with torch.no_grad():
        sparse, _ = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return sparse[:, 0].float()


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


@dataclass
class DecoderFeatures:
    """What SAM's mask decoder sees for one sample; everything upstream of it is frozen in the
    mIoU* setting, so these can be computed once and cached.

    ``sam_embedding``: ``1 x C x 64 x 64``; ``prompts``: ``K x out_dim`` [SEG] embeddings after
    ``text_hidden_fcs``; sizes are SAM's resized (h, w) and the original (H, W).
    """

    sam_embedding: torch.Tensor
    prompts: torch.Tensor
    resized_size: tuple[int, int]
    original_size: tuple[int, int]


def mask_logits(sam: torch.nn.Module, features: DecoderFeatures) -> torch.Tensor:
    """``K x H x W`` mask logits at the original size (LISA's decoding and post-processing; the
    post-processing in its separable form, equal up to float rounding and cheaper to differentiate)."""
    low_res = decode_masks(sam, features.sam_embedding, features.prompts)
    return sam_postprocess_separable(low_res, features.resized_size, features.original_size)


def mask_loss_sums(logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted BCE and Dice summed over the ``K`` masks of one sample (``K x H x W`` each)."""
    k = gt.shape[0]
    return sigmoid_ce_loss(logits, gt, k) * k, dice_loss(logits, gt, k) * k


def decoder_loss(sam: torch.nn.Module, features: list[DecoderFeatures], gt_masks: list[torch.Tensor],
                 weights: LossWeights = LossWeights()) -> TrainingLoss:
    """The mask terms of :func:`training_loss` from decoder inputs (the frozen-LLM mIoU* setting).

    ``gt_masks[i]``: ``K_i x H x W`` 0/1. The CE term is 0: no trainable parameter reaches it.
    """
    bce, dice, num_masks, prompts = 0.0, 0.0, 0, []
    for feats, gt in zip(features, gt_masks, strict=True):
        if gt.shape[0] != feats.prompts.shape[0]:
            raise ValueError(f"{feats.prompts.shape[0]} [SEG] embeddings but {gt.shape[0]} masks")
        b, d = mask_loss_sums(mask_logits(sam, feats), gt.to(feats.sam_embedding.device, torch.float32))
        bce, dice, num_masks = bce + b, dice + d, num_masks + gt.shape[0]
        prompts.append(feats.prompts)
    bce = weights.bce * bce / (num_masks + 1e-8)
    dice = weights.dice * dice / (num_masks + 1e-8)
    zero = torch.zeros((), device=bce.device)
    return TrainingLoss(loss=bce + dice, ce_loss=zero, mask_bce_loss=bce, mask_dice_loss=dice, seg_embeddings=prompts)


def sam_encoder_trains(model: torch.nn.Module) -> bool:
    """Whether SAM's image encoder has trainable parameters (``mode=full`` without it in ``mode.freeze``)."""
    return any(p.requires_grad for p in model.sam.image_encoder.parameters())


def training_loss(pipe: SegmentationPipeline, samples: list[TrainingSample],
                  weights: LossWeights = LossWeights(), encodings: dict[int, ImageEncoding] | None = None,
                  image_scale: float = 1.0) -> TrainingLoss:
    """Total loss and its parts for a batch; gradients reach only parameters that require them.

    The CLIP tower and SAM image encoder run without gradients (frozen in LISA), so their outputs
    may come precomputed: ``encodings`` maps ``id(sample.image)`` to the image's encoding (its
    ``image_embeds`` are not used: the projector runs here, it may be trainable). ``image_scale``
    multiplies the projected image tokens (training/train.py ``trainer.image_ramp``; 1: as evaluation).
    """
    model, tok = pipe.model, pipe.bundle.token_ids
    train_sam = sam_encoder_trains(model)  # full mode may train it: run here, with gradients, once per image
    with torch.no_grad():  # conversations about one image (LISA: up to 3) share its encoding
        encoded = dict(encodings or {})
        for s in samples:
            if id(s.image) not in encoded:
                encoded[id(s.image)] = pipe.encode_image(s.image, sam=not train_sam)
        encodings = [encoded[id(s.image)] for s in samples]
    sam_embeddings = {id(s.image): e.sam_embedding for s, e in zip(samples, encodings)}
    if train_sam:
        sam_embeddings = {key: pipe.sam_embedding(to_rgb_array(encoded[key].image))[0] for key in sam_embeddings}
    features = torch.cat([e.clip_features for e in encodings])
    image_embeds = model.project_images(features)
    if image_scale != 1.0:
        image_embeds = image_embeds * image_scale
    full_ids, answer_starts = [], []
    for s in samples:
        if s.message is not None:
            prompt_ids, ids = pipe.vqa_ids(s.message, None), pipe.vqa_ids(s.message, s.answer)
        else:
            prompt_ids = pipe.prompt_ids(s.text, s.is_sentence, answer=None, question_template=s.question_template)
            ids = pipe.prompt_ids(s.text, s.is_sentence, answer=s.answer, question_template=s.question_template)
        full_ids.append(ids)
        answer_starts.append(len(prompt_ids) - 1 + image_embeds.shape[1])  # expanded row of the first answer token
    batch = expand_image_slots(full_ids, image_embeds.shape[1], tok.pad)
    seg_rows = [seg_query_rows(ids[: int(n)], tok.seg) for ids, n in zip(batch.ids, batch.lengths)]
    pred_rows = [torch.arange(a - 1, int(n) - 1) for a, n in zip(answer_starts, batch.lengths)]
    device = image_embeds.device
    keep = None
    if pipe.selects_input:
        keep = torch.cat([pipe.cluster(e, [s.sample_id]) for e, s in zip(encodings, samples)])
    # Pruning is ranked by the [SEG] rows only, as in evaluation; text rows always survive, so the
    # answer-prediction rows are read from the same final state afterwards.
    if any(e.reduced is not None for e in encodings):
        raise ValueError(f"training with a before-LLM reducer ({pipe.method.name}) is not supported: the loss "
                         "is computed on the N grid tokens; train with plain LISA, CSP or an in-LLM method")
    last = torch.tensor([[a - 1] for a in answer_starts])  # the last prompt row, for last-row methods
    inputs = decoder_inputs(model, batch, image_embeds, seg_rows, keep, last_rows=last)
    out = pipe.runner.forward(inputs)
    seg_states = out.rows(inputs.query_rows)
    pred, _ = pad_rows(pred_rows)
    pred_states = out.rows(pred.to(device))
    ce_terms, num_masks, prompts = [], 0, []
    bce = dice = point = image_embeds.new_zeros((), dtype=torch.float32)  # stay 0 for a batch of VQA turns only
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
        if gt.shape[0] == 0:  # a VQA turn: text only
            continue
        enc = encodings[i]
        feats = DecoderFeatures(sam_embeddings[id(s.image)], prompts[-1], enc.resized_size, enc.original_size)
        b, d = mask_loss_sums(mask_logits(model.sam, feats), gt)
        bce, dice, num_masks = bce + b, dice + d, num_masks + gt.shape[0]
        if weights.point:
            target = pointing_targets(model.sam, gt, enc.resized_size, enc.original_size)
            point = point + ((prompts[-1].float() - target) ** 2).mean(dim=1).sum()
    ce = torch.stack(ce_terms).sum() / sum(len(p) for p in pred_rows)
    bce = weights.bce * bce / (num_masks + 1e-8)
    dice = weights.dice * dice / (num_masks + 1e-8)
    point = weights.point * point / (num_masks + 1e-8)
    total = weights.ce * ce + bce + dice + point
    return TrainingLoss(loss=total, ce_loss=ce, mask_bce_loss=bce, mask_dice_loss=dice, seg_embeddings=prompts,
                        point_loss=point if weights.point else None)
