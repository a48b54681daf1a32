"""The toy CLIP stand-in's text side, for LiteLVLM's toy rows (docs/peers.md, "Toy world").

    python -m training.toy_text_tower --out assets/toy_towers/text

LISA's CLIP (clip-vit-large-patch14) is a full CLIP with a text tower; the toy CLIP stand-in
(``assets/toy_towers/clip``, ``training.toy_towers clip``) is a ``CLIPVisionModel`` only. LiteLVLM reads
the query through CLIP's ``CLIPTextModelWithProjection`` and the image's layer -2 patches through CLIP's
``post_layernorm`` and ``visual_projection`` (csp/litelvlm.py), so the toy world needs those three:

- a tiny ``CLIPTextModelWithProjection`` (word-level tokenizer over the toy vocabulary, ``<s> words </s>``,
  pooled at ``</s>`` as CLIP pools at its end-of-text token) and a ``visual_projection`` (a bias-free
  linear map, as CLIP's), both trained here;
- ``post_layernorm``: the toy CLIP's own, copied and frozen (the vision tower is not touched);
- the objective: CLIP's symmetric InfoNCE (a learned temperature) between a referring expression and
  the region it refers to, the region's embedding being the coverage-weighted mean of the projected layer
  -2 patch features over the referent's visible mask (a patch's weight: the fraction of its 16 x 16-pixel
  cell the mask covers). Text -> region: the softmax runs over every shape of the batch's scenes (the
  other shapes of the same scene are the hard negatives); region -> text: over the batch's expressions.

Data: the toyref TRAIN split's scenes and expressions (``datasets.toy.generate_image(spec, "train", i)``,
i < ``train_scenes``: the toy LISA's own training images), JPEG q95 as the data set's files; never the val
or testA splits. The held-out scenes for the metric are the same train stream at indices from
``HELD_OUT_START`` on, which no toyref split writes. Metric: top-1 accuracy of expression -> referent among
the scene's shapes (cosine of the projected embeddings), against chance (1 / number of shapes).

Output (read by ``csp.litelvlm.ClipTextSide.from_dir``): the text tower (``config.json``,
``model.safetensors``, bf16), the tokenizer, ``image_side.safetensors`` (``post_layernorm.*``,
``visual_projection.weight``) and ``toy_text.json`` (recipe, metrics, and the sha256 of the CLIP weights it
pairs with).
"""

from __future__ import annotations

import argparse
import hashlib
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

#: The toy CLIP stand-in this text side is trained against (repository-relative).
CLIP_DIR = Path("assets/toy_towers/clip")
#: Train-stream indices of the held-out scenes (the toyref train split writes indices 0..train_images-1).
HELD_OUT_START = 100_000
GRID = 8  # 112 / 14
SPECIALS = ("<pad>", "<unk>", "<s>")
EOS = "</s>"


@dataclass(frozen=True)
class TextSpec:
    """The text side's sizes and recipe."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    projection_dim: int = 64
    max_length: int = 24
    steps: int = 600
    batch: int = 32  # scenes per step (each with up to 3 expressions)
    lr: float = 2e-3
    warmup: int = 30
    train_scenes: int = 1500
    held_out_scenes: int = 300
    seed: int = 0
    toy_seed: int = 0  # the toyref spec's seed (configs/exp/toy*.yaml: toy.seed)


def build_text_tokenizer(max_length: int):
    """Word-level tokenizer over the toy vocabulary: ``<pad>=0, <unk>=1, <s>=2``, words, ``</s>`` last."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from datasets.toy import VOCABULARY

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in VOCABULARY.split():
        vocab.setdefault(word, len(vocab))
    vocab[EOS] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(
        single=f"<s> $A {EOS}", special_tokens=[("<s>", vocab["<s>"]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=EOS, unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)


@dataclass
class Regions:
    """Scenes' referring expressions and the pooled (post_layernorm'd) layer -2 features of every shape."""

    texts: list[str]  # one per expression
    kinds: list[str]  # its expression type
    target: torch.Tensor  # per expression: the row of its referent in ``pooled``
    scene_of_text: torch.Tensor  # per expression: its scene
    pooled: torch.Tensor  # shapes x C: coverage-weighted mean of post_layernorm(layer -2 patch)
    scene_of_shape: torch.Tensor  # per shape: its scene


def coverage(visible: np.ndarray, grid: int = GRID) -> np.ndarray:
    """``S x grid^2``: the fraction of each patch's cell each shape's visible mask covers (raster order)."""
    s, h, w = visible.shape
    return visible.reshape(s, grid, h // grid, grid, w // grid).mean(axis=(2, 4)).reshape(s, -1)


def load_clip(clip_dir: Path):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(clip_dir), dtype=torch.float32).eval()


@torch.no_grad()
def draw_regions(indices: Sequence[int], clip, toy_seed: int = 0) -> Regions:
    """Toyref train-split scenes ``indices``: their expressions and every shape's pooled features."""
    from datasets.toy import ToySpec, expression_type, generate_image
    from model.vision import clip_processor_for

    spec = ToySpec(seed=toy_seed)
    processor = clip_processor_for(clip.config.image_size)
    texts, kinds, target, scene_of_text, weights, scene_of_shape, images = [], [], [], [], [], [], []
    for scene, index in enumerate(indices):
        toy = generate_image(spec, "train", index)
        buffer = io.BytesIO()
        Image.fromarray(toy.pixels).save(buffer, format="JPEG", quality=95)  # as write_toyref stores it
        images.append(Image.open(buffer).convert("RGB"))
        first = len(scene_of_shape)
        cover = coverage(toy.visible)
        weights.append(torch.as_tensor(cover / cover.sum(axis=1, keepdims=True).clip(min=1e-9), dtype=torch.float32))
        scene_of_shape += [scene] * len(cover)
        for shape, expr in toy.refs:
            text = expr.text()
            texts.append(text)
            kinds.append(expression_type(text))
            target.append(first + shape)
            scene_of_text.append(scene)
    pooled = []
    ln = getattr(clip, "vision_model", clip).post_layernorm
    for start in range(0, len(images), 256):
        pixels = processor(images=images[start:start + 256], return_tensors="pt")["pixel_values"]
        patches = ln(clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        for b, w in enumerate(weights[start:start + 256]):
            pooled.append(w @ patches[b])  # S x C
    return Regions(texts, kinds, torch.tensor(target), torch.tensor(scene_of_text), torch.cat(pooled),
                   torch.tensor(scene_of_shape))


def build_text_model(spec: TextSpec, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, max_position_embeddings=spec.max_length,
                            projection_dim=spec.projection_dim, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModelWithProjection(config)


def encode(text_model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(list(texts), return_tensors="pt", truncation=True, padding=True)
    return text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).text_embeds


@torch.no_grad()
def retrieval(text_embeds: torch.Tensor, region_embeds: torch.Tensor, regions: Regions) -> dict[str, float]:
    """Top-1 accuracy of expression -> referent among its scene's shapes (cosine), overall and per
    expression type, and chance (mean of 1 / shapes in the scene)."""
    t = F.normalize(text_embeds.float(), dim=-1)
    r = F.normalize(region_embeds.float(), dim=-1)
    hits, chance = [], []
    for i in range(len(regions.texts)):
        rows = (regions.scene_of_shape == regions.scene_of_text[i]).nonzero().squeeze(1)
        best = rows[(r[rows] @ t[i]).argmax()]
        hits.append(float(best == regions.target[i]))
        chance.append(1.0 / len(rows))
    out = {"top1": float(np.mean(hits)), "chance": float(np.mean(chance)), "expressions": len(hits)}
    for kind in sorted(set(regions.kinds)):
        sel = [h for h, k in zip(hits, regions.kinds) if k == kind]
        out[f"top1_{kind}"] = float(np.mean(sel))
    return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_text_side(spec: TextSpec, out_dir: Path, clip_dir: Path = CLIP_DIR, log_every: int = 100) -> dict:
    """Train the text side against the frozen toy CLIP at ``clip_dir``; write it to ``out_dir``."""
    from safetensors.torch import save_file

    t0 = time.time()
    torch.manual_seed(spec.seed)
    clip = load_clip(clip_dir)
    train = draw_regions(range(spec.train_scenes), clip, spec.toy_seed)
    held = draw_regions(range(HELD_OUT_START, HELD_OUT_START + spec.held_out_scenes), clip, spec.toy_seed)
    print(f"[text] {spec.train_scenes} + {spec.held_out_scenes} scenes ({len(train.texts)} + {len(held.texts)} "
          f"expressions) in {time.time() - t0:.0f} s", flush=True)
    tokenizer = build_text_tokenizer(spec.max_length)
    text_model = build_text_model(spec, tokenizer)
    width = clip.config.hidden_size
    projection = torch.nn.Linear(width, spec.projection_dim, bias=False)
    torch.nn.init.normal_(projection.weight, std=width**-0.5)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = [*text_model.parameters(), *projection.parameters(), logit_scale]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(spec.seed)
    history = []
    for step in range(spec.steps):
        for group in optim.param_groups:
            group["lr"] = spec.lr * lr_factor(step, spec.warmup, spec.steps)
        scenes = torch.randperm(spec.train_scenes, generator=gen)[: spec.batch]
        texts_idx = torch.isin(train.scene_of_text, scenes).nonzero().squeeze(1)
        shapes_idx = torch.isin(train.scene_of_shape, scenes).nonzero().squeeze(1)
        t = F.normalize(encode(text_model, tokenizer, [train.texts[i] for i in texts_idx]), dim=-1)
        r = F.normalize(projection(train.pooled[shapes_idx]), dim=-1)
        targets = (train.target[texts_idx].unsqueeze(1) == shapes_idx.unsqueeze(0)).float().argmax(1)
        scale = logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * t @ r.T  # expressions x every shape of the batch's scenes
        ref = r[targets]  # each expression's referent (distinct per expression: refs have distinct targets)
        loss = 0.5 * (F.cross_entropy(logits, targets)
                      + F.cross_entropy(scale * ref @ t.T, torch.arange(len(t))))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            with torch.no_grad():
                metrics = retrieval(encode(text_model.eval(), tokenizer, held.texts), projection(held.pooled), held)
            text_model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0, 1),
                            **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}})
            print(f"[text] step {step + 1}/{spec.steps} loss {loss.item():.3f} held-out top1 {metrics['top1']:.3f} "
                  f"(chance {metrics['chance']:.3f})", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_model.eval().to(torch.bfloat16).save_pretrained(out_dir)  # bf16, as the toy towers (assets stay small)
    tokenizer.save_pretrained(out_dir)
    ln = getattr(clip, "vision_model", clip).post_layernorm
    save_file({"post_layernorm.weight": ln.weight.detach().to(torch.bfloat16).contiguous(),
               "post_layernorm.bias": ln.bias.detach().to(torch.bfloat16).contiguous(),
               "visual_projection.weight": projection.weight.detach().to(torch.bfloat16).contiguous()},
              str(out_dir / "image_side.safetensors"))
    # the metric as users get it: the saved (bf16) weights through ClipTextSide.from_dir
    from csp.litelvlm import ClipTextSide

    report = {"spec": asdict(spec), "clip": {"dir": str(clip_dir), "width": width,
                                               "sha256": sha256(clip_dir / "model.safetensors")},
              "train_expressions": len(train.texts), "held_out": {"start": HELD_OUT_START},
              "history": history}
    (out_dir / "toy_text.json").write_text(json.dumps(report, indent=1))
    side = ClipTextSide.from_dir(out_dir)
    with torch.no_grad():
        report["held_out"].update(retrieval(side.text_embeds(held.texts), side.visual_projection(held.pooled), held))
    report["elapsed_s"] = round(time.time() - t0, 1)
    (out_dir / "toy_text.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.toy_text_tower", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the text side's folder (assets/toy_towers/text)")
    parser.add_argument("--clip", type=Path, default=CLIP_DIR, help="the frozen toy CLIP (assets/toy_towers/clip)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--scenes", type=int, default=None, help="override the number of training scenes")
    parser.add_argument("--held-out", type=int, default=None, help="override the number of held-out scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed}
    for key, value in (("steps", args.steps), ("train_scenes", args.scenes), ("held_out_scenes", args.held_out)):
        if value is not None:
            overrides[key] = value
    report = train_text_side(TextSpec(**overrides), args.out, args.clip)
    print(json.dumps({"elapsed_s": report["elapsed_s"], "held_out": report["held_out"]}))


if __name__ == "__main__":
    main()
