"""Pretraining of the toy world's vision towers (the stand-ins for OpenAI CLIP and SA-1B SAM).

    python -m training.toy_towers clip --out assets/toy_towers      # CLIPVisionModel -> <out>/clip/
    python -m training.toy_towers sam  --out assets/toy_towers      # toy_conv SAM    -> <out>/sam.safetensors

Both stages read scenes drawn by the toy world's own generator (``datasets.toy``: the same shapes,
colours, sizes, occlusion and background texture) from a stream of its own, so no image of the
toyref train/val/testA splits is seen here; the images go through JPEG (quality 95) as the data set's
files do, and through the towers' own preprocessing (CLIP processor; SAM's resize to 1024).

CLIP stand-in (``clip``): each of the 8 x 8 patch tokens of the layer LLaVA reads (hidden layer -2)
is trained to say what covers its 16 x 16-pixel cell and where it is: the kind and the colour of the
shape with the most visible pixels there (background when none covers 15% of the cell), that shape's
size (log of its full area), and the cell's row and column. The class token of the last layer is
trained to say which (kind, colour) pairs the image holds, so that its attention over the patches
(what CLS-attention methods rank by) goes to the shapes, as a trained CLIP's goes to the objects.
Cross-entropy with foreground cells weighted 3x (a quarter of the cells are foreground).

SAM stand-in (``sam``): SAM's own promptable task on toy scenes ("everything mode"): a point inside
one shape -> that shape's visible mask, through the whole SAM (encoder, prompt encoder, mask decoder),
BCE + Dice on the mask at the image's size. The toy LISA then replaces the point by its [SEG] prompt,
as LISA does with SA-1B's SAM.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionModel

from datasets.toy import COLORS, KINDS, ToySpec, background_texture, paint, random_scene
from model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, build_toy_conv_sam, sam_postprocess_separable
from model.vision import clip_processor_for, tiny_clip_config

#: Stream ids of the pretraining scenes (the toyref splits use 0, 1, 2: SPLITS.index).
TRAIN_STREAM, HELD_OUT_STREAM = 100, 101
GRID = 8  # CLIP: 112 / 14
CELL_COVER = 0.15
FG_WEIGHT = 3.0
#: The size head predicts log(full area) minus this (about the mean log area of a shape), so it starts near 0.
LOG_AREA_OFFSET = 6.5
COLOR_NAMES = tuple(COLORS)


@dataclass
class Scenes:
    """``M`` toy scenes: JPEG-decoded pixels and their annotations."""

    pixels: np.ndarray  # M x 128 x 128 x 3 uint8 (after JPEG q95)
    masks: list[np.ndarray]  # per scene: S x 128 x 128 bool visible pixels
    kinds: list[np.ndarray]  # per scene: S kind index (0..3)
    colors: list[np.ndarray]  # per scene: S colour index (0..4)
    areas: list[np.ndarray]  # per scene: S full areas (pixels)


def draw_scenes(count: int, *, seed: int, stream: int, spec: ToySpec = ToySpec()) -> Scenes:
    """``count`` scenes from the toy generator's stream ``(seed, stream, index)``."""
    pixels, masks, kinds, colors, areas = [], [], [], [], []
    for index in range(count):
        rng = np.random.default_rng([seed, stream, index])
        shapes = random_scene(spec, rng)
        image, visible, full = paint(shapes, background_texture(spec.image_size, rng))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        pixels.append(np.asarray(Image.open(buffer).convert("RGB")))
        masks.append(visible)
        kinds.append(np.array([KINDS.index(s.kind) for s in shapes]))
        colors.append(np.array([COLOR_NAMES.index(s.color) for s in shapes]))
        areas.append(np.asarray(full, dtype=np.float64))
    return Scenes(np.stack(pixels), masks, kinds, colors, areas)


# -- CLIP stand-in ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipSpec:
    """The CLIP stand-in's sizes and its pretraining recipe."""

    image_size: int = 112
    patch_size: int = 14
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    train_scenes: int = 6000
    held_out_scenes: int = 300
    seed: int = 0


def cell_targets(scenes: Scenes, grid: int = GRID) -> dict[str, torch.Tensor]:
    """Per scene and cell (raster order, ``M x grid^2``): ``kind`` (0 background, 1..4), ``color``
    (0 background, 1..5), ``size`` (log full area of the covering shape, 0 on background); per scene
    ``presence`` (``M x 20``: kind-major (kind, colour) pairs present)."""
    kind_t, color_t, size_t, presence = [], [], [], []
    for masks, kinds, colors, areas in zip(scenes.masks, scenes.kinds, scenes.colors, scenes.areas):
        s, h, w = masks.shape
        cover = masks.reshape(s, grid, h // grid, grid, w // grid).mean(axis=(2, 4)).reshape(s, -1)
        best = cover.argmax(axis=0)
        fg = cover.max(axis=0) >= CELL_COVER
        kind_t.append(np.where(fg, kinds[best] + 1, 0))
        color_t.append(np.where(fg, colors[best] + 1, 0))
        size_t.append(np.where(fg, np.log(areas[best]), 0.0))
        pairs = np.zeros(len(KINDS) * len(COLORS))
        pairs[kinds * len(COLORS) + colors] = 1
        presence.append(pairs)
    return {"kind": torch.as_tensor(np.stack(kind_t)), "color": torch.as_tensor(np.stack(color_t)),
            "size": torch.as_tensor(np.stack(size_t), dtype=torch.float32),
            "presence": torch.as_tensor(np.stack(presence), dtype=torch.float32)}


class ClipHeads(torch.nn.Module):
    """Linear read-outs used only for pretraining (not saved with the tower)."""

    def __init__(self, width: int, grid: int = GRID):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.kind = torch.nn.Linear(width, len(KINDS) + 1)
        self.color = torch.nn.Linear(width, len(COLORS) + 1)
        self.size = torch.nn.Linear(width, 1)
        self.row = torch.nn.Linear(width, grid)
        self.col = torch.nn.Linear(width, grid)
        self.presence = torch.nn.Linear(width, len(KINDS) * len(COLORS))


def clip_losses(clip: CLIPVisionModel, heads: ClipHeads, pixel_values: torch.Tensor,
                targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    out = clip(pixel_values=pixel_values, output_hidden_states=True)
    tokens = heads.norm(out.hidden_states[-2][:, 1:])  # the layer LLaVA reads, class token dropped
    b, n, _ = tokens.shape
    grid = int(math.isqrt(n))
    fg = targets["kind"] > 0
    weight = torch.where(fg, FG_WEIGHT, 1.0).flatten()
    kind = (F.cross_entropy(heads.kind(tokens).flatten(0, 1), targets["kind"].flatten(), reduction="none")
            * weight).sum() / weight.sum()
    color = (F.cross_entropy(heads.color(tokens).flatten(0, 1), targets["color"].flatten(), reduction="none")
             * weight).sum() / weight.sum()
    size_err = (heads.size(tokens).squeeze(-1) - (targets["size"] - LOG_AREA_OFFSET)) ** 2
    size = (size_err * fg).sum() / fg.sum().clamp(min=1)
    cells = torch.arange(n)
    row = F.cross_entropy(heads.row(tokens).flatten(0, 1), (cells // grid).repeat(b))
    col = F.cross_entropy(heads.col(tokens).flatten(0, 1), (cells % grid).repeat(b))
    presence = F.binary_cross_entropy_with_logits(heads.presence(out.pooler_output), targets["presence"])
    loss = kind + color + size + 0.5 * (row + col) + presence
    parts = {"kind": kind.item(), "color": color.item(), "size": size.item(), "row": row.item(),
             "col": col.item(), "presence": presence.item()}
    return loss, parts


@torch.no_grad()
def clip_metrics(clip: CLIPVisionModel, heads: ClipHeads, pixel_values: torch.Tensor,
                 targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out accuracies: kind / colour over foreground cells, background cells right, row / column,
    size R^2 over foreground cells, presence accuracy over all (kind, colour) pairs."""
    clip.eval()
    out = clip(pixel_values=pixel_values, output_hidden_states=True)
    tokens = heads.norm(out.hidden_states[-2][:, 1:])
    n = tokens.shape[1]
    grid = int(math.isqrt(n))
    fg = targets["kind"] > 0
    kind = heads.kind(tokens).argmax(-1)
    color = heads.color(tokens).argmax(-1)
    size = heads.size(tokens).squeeze(-1) + LOG_AREA_OFFSET
    cells = torch.arange(n)
    truth = targets["size"][fg]
    r2 = 1 - ((size[fg] - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
    clip.train()
    return {
        "kind_acc_fg": (kind[fg] == targets["kind"][fg]).float().mean().item(),
        "color_acc_fg": (color[fg] == targets["color"][fg]).float().mean().item(),
        "background_right": (kind[~fg] == 0).float().mean().item(),
        "row_acc": (heads.row(tokens).argmax(-1) == cells // grid).float().mean().item(),
        "col_acc": (heads.col(tokens).argmax(-1) == cells % grid).float().mean().item(),
        "size_r2_fg": r2.item(),
        "presence_acc": ((heads.presence(out.pooler_output) > 0) == (targets["presence"] > 0)).float().mean().item(),
    }


def clip_pixels(scenes: Scenes, image_size: int) -> torch.Tensor:
    processor = clip_processor_for(image_size)
    chunks = []
    for start in range(0, len(scenes.pixels), 500):
        batch = [Image.fromarray(p) for p in scenes.pixels[start:start + 500]]
        chunks.append(processor(images=batch, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_clip(spec: ClipSpec, out_dir: Path, log_every: int = 100) -> dict:
    """Train the CLIP stand-in; save it as a CLIP directory (``CLIPVisionModel.from_pretrained``)."""
    t0 = time.time()
    torch.manual_seed(spec.seed)
    train = draw_scenes(spec.train_scenes, seed=spec.seed, stream=TRAIN_STREAM)
    held = draw_scenes(spec.held_out_scenes, seed=spec.seed, stream=HELD_OUT_STREAM)
    x_train, y_train = clip_pixels(train, spec.image_size), cell_targets(train)
    x_held, y_held = clip_pixels(held, spec.image_size), cell_targets(held)
    print(f"[clip] {spec.train_scenes} + {spec.held_out_scenes} scenes drawn in {time.time() - t0:.0f} s", flush=True)
    config = tiny_clip_config(spec.image_size, spec.patch_size, spec.hidden_size, spec.layers, heads=spec.heads)
    clip = CLIPVisionModel(config)
    heads = ClipHeads(spec.hidden_size)
    params = list(clip.parameters()) + list(heads.parameters())
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(spec.seed)
    history = []
    t1 = time.time()
    for step in range(spec.steps):
        for group in optim.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec.warmup, spec.steps)
        idx = torch.randint(len(x_train), (spec.batch,), generator=gen)
        x = x_train[idx]
        y = {k: v[idx] for k, v in y_train.items()}
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip: content targets flip with the pixels
            x = x.flip(-1)
            for key in ("kind", "color", "size"):
                y[key] = y[key].view(spec.batch, GRID, GRID).flip(-1).reshape(spec.batch, -1)
        loss, parts = clip_losses(clip, heads, x, y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            metrics = clip_metrics(clip, heads, x_held, y_held)
            rate = (step + 1) / (time.time() - t1)
            eta = (spec.steps - step - 1) / rate
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0, 1),
                            **{k: round(v, 4) for k, v in metrics.items()}})
            print(f"[clip] step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                  + f" | {rate:.2f} steps/s, ETA {eta / 60:.1f} min", flush=True)
    clip_dir = out_dir / "clip"
    clip.to(torch.bfloat16).save_pretrained(clip_dir)  # bf16, as the toy LISA's release (assets stay small)
    clip_processor_for(spec.image_size).save_pretrained(clip_dir)
    report = {"spec": asdict(spec), "elapsed_s": round(time.time() - t0, 1), "history": history}
    (clip_dir / "pretraining.json").write_text(json.dumps(report, indent=1))
    return report


# -- SAM stand-in -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamSpec:
    """The SAM stand-in's pretraining recipe (architecture: model.sam.build_toy_conv_sam)."""

    steps: int = 1000
    batch: int = 6  # images per step
    prompts_per_image: int = 2
    lr: float = 2e-3
    warmup: int = 50
    train_scenes: int = 3000
    held_out_scenes: int = 40
    seed: int = 0


def point_prompts(masks: np.ndarray, count: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """``count`` (shape index, point (x, y) in original pixels) pairs: a random visible pixel of a random shape."""
    shapes, points = [], []
    for _ in range(count):
        s = int(rng.integers(len(masks)))
        ys, xs = np.nonzero(masks[s])
        k = int(rng.integers(len(ys)))
        shapes.append(s)
        points.append((xs[k] + 0.5, ys[k] + 0.5))
    return shapes, np.array(points, dtype=np.float32)


def sam_point_masks(sam: torch.nn.Module, embedding: torch.Tensor, points: np.ndarray, scale: float) -> torch.Tensor:
    """``1 x C x 64 x 64`` embedding, ``K x 2`` points (original pixels) -> ``K x 1 x 256 x 256`` logits."""
    coords = torch.as_tensor(points * scale).unsqueeze(1)  # K x 1 x 2 in the 1024 frame
    labels = torch.ones(len(points), 1, dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low_res, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    return low_res


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + 2 Dice (``K x H x W`` logits and 0/1 targets), as the toy LISA's mask loss weights them."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + 2 * dice.mean()


def sam_inputs(pixels: np.ndarray) -> torch.Tensor:
    """``B x H x W x 3`` uint8 square images -> ``B x 3 x 1024 x 1024`` SAM inputs, batched.

    Upscaling by bilinear interpolation with half-pixel centres is what model.sam.sam_preprocess's PIL
    resize does for a square image (no padding is needed); this batched form is several times faster.
    """
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(1024, 1024), mode="bilinear", align_corners=False)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def sam_step_masks(sam: torch.nn.Module, scenes: Scenes, indices: Sequence[int], prompts: int,
                   rng: np.random.Generator, cached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits and targets for ``prompts`` random clicks on each scene of ``indices``; ``cached``: the image
    encoder's embeddings of every scene (``M x C x 64 x 64``), else the encoder runs on these scenes here."""
    size = scenes.pixels.shape[1]
    if cached is None:
        embeddings = sam.image_encoder(sam_inputs(scenes.pixels[list(indices)]))
    else:
        embeddings = cached[list(indices)]
    logits, targets = [], []
    for b, i in enumerate(indices):
        shapes, points = point_prompts(scenes.masks[i], prompts, rng)
        low = sam_point_masks(sam, embeddings[b:b + 1], points, 1024 / size)
        logits.append(sam_postprocess_separable(low, (1024, 1024), (size, size)))
        targets.append(torch.as_tensor(scenes.masks[i][shapes], dtype=torch.float32))
    return torch.cat(logits), torch.cat(targets)


@torch.no_grad()
def sam_metrics(sam: torch.nn.Module, scenes: Scenes) -> dict[str, float]:
    """Held-out mean IoU of the mask for one point per shape (a random visible pixel, seeded per scene)."""
    sam.eval()
    ious = []
    for i in range(len(scenes.pixels)):
        logits, targets = sam_step_masks(sam, scenes, [i], len(scenes.masks[i]), np.random.default_rng([0, i]))
        pred, truth = logits > 0, targets > 0
        inter = (pred & truth).sum((1, 2)).float()
        union = (pred | truth).sum((1, 2)).float()
        ious += (inter / union.clamp(min=1)).tolist()
    sam.train()
    return {"point_miou": float(np.mean(ious))}


#: Kept in float32 in the saved SAM: the click code's Gaussian matrix (bf16 would move every click's token).
FLOAT32_KEYS = ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",)


def save_sam(sam: torch.nn.Module, path: Path, **metadata: str) -> None:
    """SAM's state dict in bf16 (segment-anything key names), :data:`FLOAT32_KEYS` in float32."""
    state = {k: (v.float() if k in FLOAT32_KEYS else v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
             for k, v in sam.state_dict().items()}
    save_file(state, str(path), metadata={"sam_arch": "toy_conv", "dtype": "bfloat16", **metadata})


def log_sam_step(tag: str, sam: torch.nn.Module, held: Scenes, step: int, steps: int, loss: torch.Tensor,
                 t0: float, t1: float) -> dict:
    """Held-out point mIoU after ``step`` of ``steps`` (1-based), printed with the rate and ETA; the history row."""
    metrics = sam_metrics(sam, held)
    rate = step / (time.time() - t1)
    print(f"[{tag}] step {step}/{steps} loss {loss.item():.3f} point mIoU {metrics['point_miou']:.3f}"
          f" | {rate:.2f} steps/s, ETA {(steps - step) / rate / 60:.1f} min", flush=True)
    return {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0, 1),
            **{k: round(v, 4) for k, v in metrics.items()}}


def pretrain_sam(spec: SamSpec, out_dir: Path, log_every: int = 200) -> dict:
    """Train the SAM stand-in on point prompts; save all of SAM (segment-anything key names)."""
    t0 = time.time()
    torch.manual_seed(spec.seed)
    train = draw_scenes(spec.train_scenes, seed=spec.seed, stream=TRAIN_STREAM)
    held = draw_scenes(spec.held_out_scenes, seed=spec.seed, stream=HELD_OUT_STREAM)
    print(f"[sam] {spec.train_scenes} + {spec.held_out_scenes} scenes drawn in {time.time() - t0:.0f} s", flush=True)
    sam = build_toy_conv_sam()
    sam.train()
    optim = torch.optim.AdamW(sam.parameters(), lr=spec.lr, weight_decay=0.01)
    rng = np.random.default_rng(spec.seed)
    history = []
    t1 = time.time()
    for step in range(spec.steps):
        for group in optim.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec.warmup, spec.steps)
        indices = rng.integers(len(train.pixels), size=spec.batch).tolist()
        logits, targets = sam_step_masks(sam, train, indices, spec.prompts_per_image, rng)
        loss = mask_loss(logits, targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optim.step()
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            history.append(log_sam_step("sam", sam, held, step + 1, spec.steps, loss, t0, t1))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_sam(sam, out_dir / "sam.safetensors")
    report = {"spec": asdict(spec), "elapsed_s": round(time.time() - t0, 1), "history": history}
    (out_dir / "sam_pretraining.json").write_text(json.dumps(report, indent=1))
    return report


@dataclass(frozen=True)
class PromptScaleSpec:
    """Stage 1c: the SAM stand-in's click code made smooth at the CLIP cell's scale.

    SAM's prompt encoder writes a click as random Fourier features of its position (a 2 x C/2 Gaussian
    matrix, scale 1 in segment-anything). On the toy's 128-pixel images that code changes completely within
    one 16-pixel CLIP cell (clicks 16 px apart are as far apart as random pairs), so an LLM that knows at the
    cell level where its referent is cannot say it in SAM's terms. This stage multiplies the matrix by
    ``pe_scale`` (the same code for all positions, ``1 / pe_scale`` times smoother) and retrains SAM's prompt
    encoder and mask decoder on clicks over the frozen image encoder's embeddings (computed once)."""

    pe_scale: float = 0.25
    steps: int = 250
    batch: int = 8  # images per step
    prompts_per_image: int = 4
    lr: float = 1e-3
    warmup: int = 20
    train_scenes: int = 600
    held_out_scenes: int = 40
    seed: int = 0


def rescale_sam_prompts(spec: PromptScaleSpec, out_dir: Path, log_every: int = 100) -> dict:
    """Stage 1c on ``<out_dir>/sam.safetensors`` (written by the ``sam`` stage); rewrites it."""
    from safetensors.torch import load_file

    t0 = time.time()
    path = out_dir / "sam.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the sam stage first (python -m training.toy_towers sam --out {out_dir})")
    sam = build_toy_conv_sam()
    sam.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    with torch.no_grad():
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(spec.pe_scale)
    torch.manual_seed(spec.seed)
    train = draw_scenes(spec.train_scenes, seed=spec.seed, stream=TRAIN_STREAM)
    held = draw_scenes(spec.held_out_scenes, seed=spec.seed, stream=HELD_OUT_STREAM)
    sam.image_encoder.requires_grad_(False)
    with torch.no_grad():
        embeddings = torch.cat([sam.image_encoder(sam_inputs(train.pixels[i:i + 8]))
                                for i in range(0, len(train.pixels), 8)])
    before = sam_metrics(sam, held)
    print(f"[sam-pe] {spec.train_scenes} scenes encoded in {time.time() - t0:.0f} s; held-out point mIoU "
          f"{before['point_miou']:.3f} with the rescaled code before retraining", flush=True)
    params = [p for p in sam.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    rng = np.random.default_rng(spec.seed)
    history = [{"step": 0, **{k: round(v, 4) for k, v in before.items()}}]
    t1 = time.time()
    sam.train()
    for step in range(spec.steps):
        for group in optim.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec.warmup, spec.steps)
        indices = rng.integers(len(train.pixels), size=spec.batch).tolist()
        logits, targets = sam_step_masks(sam, train, indices, spec.prompts_per_image, rng, cached=embeddings)
        loss = mask_loss(logits, targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            history.append(log_sam_step("sam-pe", sam, held, step + 1, spec.steps, loss, t0, t1))
    save_sam(sam, path, pe_scale=str(spec.pe_scale))
    report = {"spec": asdict(spec), "elapsed_s": round(time.time() - t0, 1), "history": history}
    (out_dir / "sam_prompt_scale.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.toy_towers", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("clip", "sam", "sam-pe"),
                        help="clip (1a), sam (1b), sam-pe (1c: after sam, rewrites sam.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="folder for clip/ and sam.safetensors")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--scenes", type=int, default=None, help="override the number of training scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.scenes is not None:
        overrides["train_scenes"] = args.scenes
    if args.stage == "sam-pe":
        overrides.pop("train_scenes", None) if args.scenes is None else None
        report = rescale_sam_prompts(PromptScaleSpec(**overrides), args.out)
    elif args.stage == "clip":
        report = pretrain_clip(ClipSpec(**overrides), args.out)
    else:
        report = pretrain_sam(SamSpec(**overrides), args.out)
    print(json.dumps({"stage": args.stage, "elapsed_s": report["elapsed_s"], "final": report["history"][-1]}))


if __name__ == "__main__":
    main()
