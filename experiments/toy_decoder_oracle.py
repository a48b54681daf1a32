"""The ceiling of the toy world's mask decoder: SAM's mask decoder trained with an oracle text code.

The LLM of toy LISA is replaced by a small GRU over the expression's words (the "oracle": it reads the
expression perfectly and never looks at the image); its output is the one sparse prompt SAM's mask
decoder gets, as a [SEG] embedding after ``text_hidden_fcs`` would be. The decoder and the GRU train on
``toyref|unc|train`` with BCE 1 + Dice 2 over SAM's image embeddings, which come from a frozen encoder:

- by default the toy model's own (``model.sam.build_toy_sam``: random, windowed, 64 x 64 grid), with
  ``--sam-position-embedding`` zeros (segment-anything's init, the committed toy model) or sincos;
- with ``--pretrain-steps N`` a global-attention SAM encoder (``--patch-size``, ``--width``, ``--depth``;
  ``ImageEncoderViT`` as in segment-anything) first trained for N steps of ``--pretrain-batch`` images on
  dense targets from the scene annotations: every pixel's kind and colour (cross-entropy, foreground
  pixels weighted 1, background 0.2) and its shape's centre and radius (L1 on the foreground), a
  stand-in for a pretrained SAM whose features know the objects. Then frozen.

Whatever the decoder reaches here, a toy LISA on the same encoder can reach only by reading its image
tokens (the oracle knows the expression, not the image): for an LLM that relays the expression it is the
ceiling. README "Toy world" gives the results. Validation gIoU / cIoU (and gIoU per expression type and
per way the target is named) on the first ``--val-samples`` val samples every ``--val-every`` steps;
records are appended to ``<out>/oracle.jsonl`` as they come (with s/step and ETA), ``<out>/report.json``
at the end.

    python -m datasets.toy --out outputs/toy_data
    python -m experiments.toy_decoder_oracle --dataset-dir outputs/toy_data --out outputs/toy_oracle
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import datasets.toy as toy
from datasets.base import ImageGroup, group_by_image
from datasets.refer import load_refer, refer_mask
from evaluation.metrics import IoUAccumulator, intersection_union
from model.sam import (
    build_sam,
    build_toy_sam,
    decode_masks,
    sam_postprocess_separable,
    sam_preprocess,
)

PROMPT_DIM = 64  # the toy SAM's prompt width (configs/model/toy.yaml's decoder)
KIND_INDEX = {kind: i + 1 for i, kind in enumerate(toy.KINDS)}  # 0: background
COLOR_INDEX = {color: i + 1 for i, color in enumerate(toy.COLORS)}


class TextCode(nn.Module):
    """Words of a toy expression -> one ``PROMPT_DIM`` prompt (word embedding, GRU, MLP)."""

    def __init__(self, vocabulary: Sequence[str], width: int = 128) -> None:
        super().__init__()
        self.index = {word: i + 1 for i, word in enumerate(sorted(set(vocabulary)))}
        self.embed = nn.Embedding(len(self.index) + 1, 64, padding_idx=0)
        self.gru = nn.GRU(64, width, batch_first=True)
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, PROMPT_DIM))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids = []
        for text in texts:
            unknown = [w for w in text.split() if w not in self.index]
            if unknown:
                raise ValueError(f"expression {text!r}: words {unknown} are not in the toy vocabulary")
            ids.append(torch.tensor([self.index[w] for w in text.split()]))
        padded = nn.utils.rnn.pad_sequence(ids, batch_first=True)
        states, _ = self.gru(self.embed(padded))
        last = states[torch.arange(len(ids)), torch.tensor([len(i) for i in ids]) - 1]
        return self.out(last)


def load_scenes(dataset_dir: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """scenes.json (shapes per image file) and instances.json's annotations per image file, id order."""
    ds = dataset_dir / "refer_seg" / toy.DATASET
    for path in (ds / "scenes.json", ds / "instances.json"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; write the toy world first (python -m datasets.toy --out "
                                    f"{dataset_dir})")
    scenes = json.loads((ds / "scenes.json").read_text())
    instances = json.loads((ds / "instances.json").read_text())
    names = {image["id"]: image["file_name"] for image in instances["images"]}
    anns: dict[str, list[dict]] = {}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        anns.setdefault(names[ann["image_id"]], []).append(ann)
    return scenes, anns


def dense_targets(shapes: list[dict], anns: list[dict], size: int) -> tuple[torch.Tensor, ...]:
    """Per pixel: kind index, colour index (0 background) and the shape's (cx, cy, radius), scaled to
    about [-1, 1] (zero on the background). Each annotation is the visible part of the shape at the same
    place in draw order (checked: same count, same kind)."""
    if len(shapes) != len(anns):
        raise ValueError(f"scene has {len(shapes)} shapes but instances.json {len(anns)} annotations")
    kind = np.zeros((size, size), np.int64)
    color = np.zeros((size, size), np.int64)
    geometry = np.zeros((3, size, size), np.float32)
    for shape, ann in zip(shapes, anns):
        if KIND_INDEX[shape["kind"]] != ann["category_id"]:
            raise ValueError(f"annotation {ann['id']}: category {ann['category_id']}, scene says {shape['kind']}")
        visible = refer_mask(ann, size, size).astype(bool)
        kind[visible] = KIND_INDEX[shape["kind"]]
        color[visible] = COLOR_INDEX[shape["color"]]
        half = size / 2
        geometry[:, visible] = np.array(
            [shape["cx"] / half - 1, shape["cy"] / half - 1, shape["radius"] / 20.0], np.float32)[:, None]
    return torch.from_numpy(kind), torch.from_numpy(color), torch.from_numpy(geometry)


def image_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def pretrain_encoder(encoder: nn.Module, groups: list[ImageGroup], dataset_dir: Path, args: argparse.Namespace,
                     log) -> dict[str, float]:
    """Train ``encoder`` on the dense scene targets (module docstring); returns the last step's losses."""
    scenes, anns = load_scenes(dataset_dir)
    head = nn.Conv2d(PROMPT_DIM, len(KIND_INDEX) + 1 + len(COLOR_INDEX) + 1 + 3, 1)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr)
    rng = random.Random(args.seed + 1)
    cache: dict[Path, tuple[torch.Tensor, ...]] = {}
    nk, nc = len(KIND_INDEX) + 1, len(COLOR_INDEX) + 1
    start, row = time.time(), {}
    for step in range(1, args.pretrain_steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.pretrain_lr * min(1.0, step / 20) * (1 - step / (args.pretrain_steps + 1))
        batch = [rng.choice(groups) for _ in range(args.pretrain_batch)]
        images = [image_array(g.image_path) for g in batch]
        for g, image in zip(batch, images):
            if g.image_path not in cache:
                name = g.image_path.name
                if name not in scenes or name not in anns:
                    raise KeyError(f"{g.image_path}: no entry in scenes.json / instances.json")
                cache[g.image_path] = dense_targets(scenes[name], anns[name], image.shape[0])
        kind, color, geometry = (torch.stack(t) for t in zip(*(cache[g.image_path] for g in batch)))
        size = tuple(kind.shape[-2:])
        out = F.interpolate(head(encoder(torch.stack([sam_preprocess(i)[0] for i in images]))), size,
                            mode="bilinear", align_corners=False)
        weight = (kind > 0).float() * 0.8 + 0.2
        fg = (kind > 0).unsqueeze(1).float()
        kind_loss = (F.cross_entropy(out[:, :nk], kind, reduction="none") * weight).sum() / weight.sum()
        color_loss = (F.cross_entropy(out[:, nk:nk + nc], color, reduction="none") * weight).sum() / weight.sum()
        geometry_loss = ((out[:, nk + nc:] - geometry).abs() * fg).sum() / fg.sum().clamp(min=1) / 3
        loss = kind_loss + color_loss + geometry_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining step {step}: loss {loss.item()}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.pretrain_steps:
            on_fg = kind > 0
            row = {"stage": "pretrain", "step": step, "kind_loss": kind_loss.item(), "color_loss": color_loss.item(),
                   "geometry_loss": geometry_loss.item(),
                   "kind_accuracy_fg": (out[:, :nk].argmax(1) == kind)[on_fg].float().mean().item(),
                   "color_accuracy_fg": (out[:, nk:nk + nc].argmax(1) == color)[on_fg].float().mean().item()}
            log(row, step, args.pretrain_steps, start)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return row


def validate(sam, code: TextCode, embed, groups: list[ImageGroup], max_samples: int) -> dict[str, Any]:
    """gIoU / cIoU over the first ``max_samples`` samples, gIoU per expression type and target naming."""
    accumulators: dict[str, IoUAccumulator] = {}
    seen = 0
    with torch.no_grad():
        for group in groups:
            samples = group.samples[: max_samples - seen]
            if not samples:
                break
            seen += len(samples)
            pred = (masks(sam, code, embed, group, [s.text for s in samples]) > 0).numpy()
            for p, sample in zip(pred, samples):
                pair = intersection_union(p, sample.gt_mask())
                kind = toy.expression_type(sample.text)
                for key in ("all", kind, f"{kind}/{toy.target_description(sample.text)}"):
                    accumulators.setdefault(key, IoUAccumulator()).add(*pair)
    total = accumulators["all"]
    return {"gIoU": total.giou, "cIoU": total.ciou, "samples": seen,
            "gIoU_by_type": {k: acc.giou for k, acc in sorted(accumulators.items()) if k != "all"}}


def masks(sam, code: TextCode, embed, group: ImageGroup, texts: list[str]) -> torch.Tensor:
    embedding, resized, original = embed(group)
    return sam_postprocess_separable(decode_masks(sam, embedding, code(texts)), resized, original)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, required=True, help="holds refer_seg/toyref (python -m datasets.toy)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000, help="decoder steps, one image with up to 3 expressions each")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sam-position-embedding", choices=("zeros", "sincos"), default="zeros")
    p.add_argument("--pretrain-steps", type=int, default=0, help="0: the toy model's random encoder")
    p.add_argument("--pretrain-batch", type=int, default=4)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--val-samples", type=int, default=300)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "val_samples", "log_every", "val_every", "pretrain_batch", "patch_size", "width", "depth"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.pretrain_steps < 0:
        raise SystemExit(f"--pretrain-steps: expected >= 0, got {args.pretrain_steps}")
    if 1024 % args.patch_size:
        raise SystemExit(f"--patch-size: SAM's 1024 input must be a multiple of it, got {args.patch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    kw = dict(dataset=toy.DATASET, split_by=toy.SPLIT_BY)
    train = group_by_image(load_refer(args.dataset_dir, split="train", name="toyref|unc|train", **kw))
    val = group_by_image(load_refer(args.dataset_dir, split="val", name="toyref|unc|val", **kw))
    if not train or not val:
        raise ValueError(f"{args.dataset_dir}: toyref train has {len(train)} images, val {len(val)}; need both")
    if args.pretrain_steps:
        load_scenes(args.dataset_dir)  # a missing file fails here, before anything runs
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "oracle.jsonl"
    log_path.write_text("")

    def log(row: dict[str, Any], step: int, total: int, start: float) -> None:
        rate = (time.time() - start) / step
        row = {**row, "elapsed_s": round(time.time() - start, 1), "s_per_step": round(rate, 4),
               "eta_s": round(rate * (total - step), 1)}
        print(json.dumps(row), flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    torch.manual_seed(args.seed)
    if args.pretrain_steps:
        sam = build_sam(encoder_embed_dim=args.width, encoder_depth=args.depth, encoder_num_heads=2,
                        encoder_global_attn_indexes=tuple(range(args.depth)), prompt_embed_dim=PROMPT_DIM,
                        vit_patch_size=args.patch_size, window_size=8, decoder_mlp_dim=2 * PROMPT_DIM, decoder_heads=4)
        pretrained = pretrain_encoder(sam.image_encoder, train, args.dataset_dir, args, log)
    else:
        sam = build_toy_sam(PROMPT_DIM, position_embedding=args.sam_position_embedding)
        pretrained = None
    sam.image_encoder.requires_grad_(False)
    encoder_before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    code = TextCode(toy.TOKENIZER_WORDS.split())
    cache: dict[Path, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = {}

    def embed(group: ImageGroup):
        if group.image_path not in cache:
            image = image_array(group.image_path)
            x, resized = sam_preprocess(image)
            with torch.no_grad():
                cache[group.image_path] = (sam.image_encoder(x[None]), resized, image.shape[:2])
        return cache[group.image_path]

    params = list(sam.mask_decoder.parameters()) + list(code.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "pretrain": pretrained, "val": []}
    start = time.time()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 10) * (1 - step / (args.steps + 1))
        group = rng.choice(train)
        samples = rng.sample(group.samples, min(3, len(group.samples)))
        logits = masks(sam, code, embed, group, [s.text for s in samples])
        gt = np.stack([s.gt_mask() for s in samples])
        target = torch.from_numpy(gt == 1).float()
        valid = torch.from_numpy(gt != 255).float()
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() / valid.sum()
        prob = (logits.sigmoid() * valid).flatten(1)
        flat = (target * valid).flatten(1)
        dice = (1 - (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)).mean()
        loss = bce + 2 * dice
        if not torch.isfinite(loss):
            raise FloatingPointError(f"decoder step {step}: loss {loss.item()} on {group.image_path}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step % args.val_every == 0 or step == args.steps:
            row: dict[str, Any] = {"stage": "decoder", "step": step, "loss": loss.item()}
            if step % args.val_every == 0 or step == args.steps:
                row["val"] = validate(sam, code, embed, val, args.val_samples)
                report["val"].append({"step": step, **row["val"]})
            log(row, step, args.steps, start)
    unchanged = all(torch.equal(v, sam.image_encoder.state_dict()[k]) for k, v in encoder_before.items())
    report.update(final=report["val"][-1], encoder_frozen=unchanged, seconds=round(time.time() - start, 1))
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
