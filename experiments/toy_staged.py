"""A staged toy recipe, the toy analogue of LLaVA then LISA: (A) the LLM learns to read its image
tokens from questions about the shapes on a shape-count curriculum, then (B) LISA's segmentation
training with those questions mixed in. Prints and writes JSON.

Stage A (no masks): ``where is <expr>?`` -> ``top left.`` and ``which object is <expr>?`` ->
``a red circle.`` on generated scenes of 1 shape (``--a1`` steps), 2 shapes (``--a2``), then the
toy training set's own questions (``--a3``; llava_dataset/toyvqa_train.json); ``--a-images``
images x 2 questions per step. Stage B (``--b`` steps): one training image with its 3 referring
expressions (the evaluation prompt) plus ``--b-vqa`` question images; the segmentation rows'
image tokens are multiplied by 0 for the first ``--silent`` steps (the questions keep theirs), so
the [SEG] row first learns to carry the expression; the lr decays linearly to 0.1x over stage B.

Model: the toy classes (model.builder.build_toy_lisa) with a narrower LLM (``--hidden``, default 64,
MLP 2x; ``--layers`` 8) and sin-cos position codes in CLIP and SAM's encoder; CLIP and SAM's encoder
frozen, everything else trains (the LLM at ``--llm-lr-scale`` x lr). Validation: gIoU / cIoU on the
first ``--val-samples`` samples of toyref|unc|val after the silent phase, half-way and at the end,
and at the end once more with every projected image token set to 0 (does the LLM use them?).
README "Toy world" gives the result of the default run. Records are appended to
``<out>/toy_staged.jsonl`` as they come; ``<out>/report.json`` at the end.

    python -m datasets.toy --out outputs/toy_data
    python -m experiments.toy_staged --dataset-dir outputs/toy_data --out outputs/toy_staged
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import datasets.toy as toy
from evaluation.evaluate import SettingOptions, evaluate_setting, load_all_groups
from model.builder import ToySizes, build_toy_lisa
from model.pipeline import SegmentationPipeline
from model.training import LossWeights, TrainingSample, training_loss
from runs.distributed import DistContext
from training.data import PromptStyle, conversations, item_rng, load_sources
from training.params import setup_trainable

TRAIN, VAL = "toyref|unc|train", "toyref|unc|val"
IMAGE_DIR = "refer_seg/images/mscoco/images/train2014"
LLM_PREFIXES = ("model.layers", "model.embed_tokens", "model.norm", "lm_head")
Pool = list[tuple[Image.Image, list[tuple[str, str]]]]


def scenes(count: int, shapes: int, seed: int) -> Pool:
    """``count`` generated images of exactly ``shapes`` shapes, with a where / which question pair per shape."""
    spec = toy.ToySpec(seed=seed, min_shapes=shapes, max_shapes=shapes)  # not check()ed: one shape is fine here
    pool = []
    for i in range(count):
        rng = np.random.default_rng([seed, shapes, i])
        drawn = toy.random_scene(spec, rng)
        pixels, _, areas = toy.paint(drawn, toy.background_texture(spec.image_size, rng))
        turns = []
        for j, shape in enumerate(drawn):
            exprs = [e for v in toy.expressions_for(j, drawn, areas).values() for e in v]
            if exprs:
                text = exprs[int(rng.integers(len(exprs)))].text()
                turns += [(f"where is {text}?", f"{toy.where(shape, spec.image_size)}."),
                          (f"which object is {text}?", f"a {shape.color} {shape.kind}.")]
        if turns:
            pool.append((Image.fromarray(pixels), turns))
    return pool


def questions(pool: Pool, images: int, rng: random.Random, per_image: int = 2) -> list[TrainingSample]:
    out = []
    for _ in range(images):
        image, turns = pool[rng.randrange(len(pool))]
        empty = np.zeros((0, image.height, image.width), np.float32)
        out += [TrainingSample(image=image, text=q, is_sentence=True, answer=a, gt_masks=empty, message=q)
                for q, a in rng.sample(turns, min(per_image, len(turns)))]
    return out


class Staged:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.manual_seed(args.seed)
        sizes = ToySizes(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden,
                         clip_position_embedding="sincos", sam_position_embedding="sincos")
        self.bundle = build_toy_lisa(args.seed, sizes)
        self.model = self.bundle.model
        self.pipe = SegmentationPipeline(self.bundle)
        trainable = setup_trainable(self.model, {"name": "full", "freeze": ["vision_tower.",
                                                                            "model.visual_model.image_encoder."]})
        self.params = trainable.params(self.model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        llm = [p for p in self.params if names[id(p)].startswith(LLM_PREFIXES)]
        rest = [p for p in self.params if not names[id(p)].startswith(LLM_PREFIXES)]
        groups = [{"params": llm, "lr": args.lr * args.llm_lr_scale}, {"params": rest, "lr": args.lr}]
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
        self.base_lr = [g["lr"] for g in self.opt.param_groups]
        self.weights = LossWeights(ce=1.0, bce=1.0, dice=2.0)
        self.encoded: dict[int, object] = {}
        self.start = time.perf_counter()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "toy_staged.jsonl"
        self.log_path.write_text("")

    def record(self, row: dict) -> None:
        row = {**row, "elapsed_s": round(time.perf_counter() - self.start, 1)}
        print(json.dumps(row), flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def encode(self, image: Image.Image, sam: bool) -> object:
        if id(image) not in self.encoded:
            with torch.no_grad():
                self.encoded[id(image)] = self.pipe.encode_image(image, sam=sam)
        return self.encoded[id(image)]

    def train_mode(self) -> None:
        self.model.train()
        self.model.vision_tower.eval()
        self.model.sam.image_encoder.eval()

    def step(self, parts: list[tuple[list[TrainingSample], float, bool]], lr_factor: float) -> dict[str, float]:
        for group, base in zip(self.opt.param_groups, self.base_lr):
            group["lr"] = base * lr_factor
        scalars: dict[str, float] = {}
        for samples, scale, sam in parts:
            encodings = {id(s.image): self.encode(s.image, sam) for s in samples}
            loss = training_loss(self.pipe, samples, self.weights, encodings, image_scale=scale)
            if not np.isfinite(float(loss.loss.detach())):
                raise FloatingPointError(f"loss is {float(loss.loss.detach())} (samples {[s.text for s in samples]})")
            loss.loss.backward()
            for k, v in loss.scalars().items():
                scalars[k] = scalars.get(k, 0.0) + v
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return scalars

    def question_ce(self, pool: Pool) -> float:
        samples = questions(pool, 40, random.Random(5))
        with torch.no_grad():
            loss = training_loss(self.pipe, samples, self.weights, {id(s.image): self.encode(s.image, False)
                                                                   for s in samples})
        return float(loss.ce_loss)

    def validate(self, groups: list, tag: str) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = evaluate_setting(self.pipe, groups, [VAL], Path(self.args.out) / "val" / tag, DistContext(),
                                       SettingOptions(name=tag, overwrite=True, progress=False))
        self.train_mode()
        split = metrics["splits"][VAL]
        return {"gIoU": split["gIoU"], "cIoU": split["cIoU"]}


def run(args: argparse.Namespace) -> dict:
    dataset_dir = Path(args.dataset_dir)
    seg = load_sources([{"split": TRAIN}], dataset_dir)[0]  # clear errors for a missing or empty data set first
    vqa = load_sources([{"vqa": "toyvqa_train", "image_dir": IMAGE_DIR}], dataset_dir)[0]
    val_groups = load_all_groups([VAL], dataset_dir, args.val_samples)
    if not val_groups:
        raise ValueError(f"{dataset_dir}: split {VAL} has no samples")
    s = Staged(args)
    full = [(Image.open(g.image_path).convert("RGB"), list(g.turns)) for g in vqa.groups]
    one, two = scenes(args.scenes, 1, args.seed + 11), scenes(args.scenes, 2, args.seed + 12)
    pools = {}  # (training images, held-out images: a tenth, at most 100)
    for name, pool in (("one", one), ("two", two), ("full", full)):
        held = max(1, min(100, len(pool) // 10))
        if len(pool) <= held:
            raise ValueError(f"curriculum pool {name!r} has {len(pool)} images; need at least 2 (--scenes, or a "
                             f"larger toy training split under {dataset_dir})")
        pools[name] = (pool[held:], pool[:held])
    s.train_mode()
    rng, done = random.Random(args.seed), 0
    total = args.a1 + args.a2 + args.a3 + args.b
    report: dict = {"config": vars(args), "stage_a": [], "stage_b": []}
    report["initial"] = {f"held_out_ce/{k}": round(s.question_ce(v[1]), 4) for k, v in pools.items()}
    s.record({"stage": "init", **report["initial"]})
    for name, steps in (("one", args.a1), ("two", args.a2), ("full", args.a3)):
        train_pool = pools[name][0]
        for i in range(steps):
            parts = s.step([(questions(train_pool, args.a_images, rng), 1.0, False)], min(1.0, (i + 1) / 10))
            done += 1
            if done % args.log_every == 0:
                rate = done / (time.perf_counter() - s.start)
                s.record({"stage": f"A:{name}", "step": done, "ce": round(parts["ce_loss"], 4),
                          "steps_per_s": round(rate, 2), "eta_s": round((total - done) / rate)})
        row = {"stage": f"A:{name}", "step": done, **{f"held_out_ce/{k}": round(s.question_ce(v[1]), 4)
                                                        for k, v in pools.items()}}
        report["stage_a"].append(row)
        s.record(row)
    order = list(range(len(seg.groups)))
    rng.shuffle(order)
    style, images = PromptStyle("eval"), {}
    checks = {args.silent, (args.b + args.silent) // 2, args.b}
    for i in range(args.b):
        group = seg.groups[order[i % len(order)]]
        if group.image_path not in images:
            images[group.image_path] = Image.open(group.image_path).convert("RGB")
        convs = conversations(group, samples_per_image=3, style=style, rng=item_rng(args.seed, i),
                              image=images[group.image_path])
        parts = [(convs, 0.0 if i < args.silent else 1.0, True)]
        if args.b_vqa:
            parts.append((questions(pools["full"][0], args.b_vqa, rng), 1.0, False))
        scalars = s.step(parts, min(1.0, (i + 1) / 10) * (1.0 - 0.9 * i / args.b))
        done += 1
        if (i + 1) % args.log_every == 0:
            rate = done / (time.perf_counter() - s.start)
            s.record({"stage": "B", "step": i + 1, **{k: round(v, 4) for k, v in scalars.items()},
                      "steps_per_s": round(rate, 2), "eta_s": round((total - done) / rate)})
        if i + 1 in checks:
            row = {"stage": "B", "step": i + 1, **s.validate(val_groups, f"B{i + 1}"),
                   "held_out_ce/full": round(s.question_ce(pools["full"][1]), 4)}
            report["stage_b"].append(row)
            s.record(row)
    projector_out = s.model.model.mm_projector[-1]
    saved = {k: v.clone() for k, v in projector_out.state_dict().items()}
    with torch.no_grad():  # every projected image token 0, at evaluation only
        for value in projector_out.parameters():
            value.zero_()
    report["final_zero_image_tokens"] = s.validate(val_groups, "zero_image_tokens")
    projector_out.load_state_dict(saved)
    report["final"] = report["stage_b"][-1] if report["stage_b"] else None
    report["elapsed_s"] = round(time.perf_counter() - s.start, 1)
    report["val_samples"] = sum(len(g.samples) for g in val_groups)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    s.record({"stage": "end", "final": report["final"], "zero_image_tokens": report["final_zero_image_tokens"]})
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-dir", default="outputs/toy_data", help="a toy data set (python -m datasets.toy)")
    p.add_argument("--out", default="outputs/toy_staged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--scenes", type=int, default=1500, help="generated images per curriculum stage")
    p.add_argument("--a1", type=int, default=200)
    p.add_argument("--a2", type=int, default=200)
    p.add_argument("--a3", type=int, default=300)
    p.add_argument("--a-images", type=int, default=8)
    p.add_argument("--b", type=int, default=2000)
    p.add_argument("--silent", type=int, default=600)
    p.add_argument("--b-vqa", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--llm-lr-scale", type=float, default=0.3)
    p.add_argument("--val-samples", type=int, default=150)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    for name in ("a1", "a2", "a3", "b", "silent", "b_vqa", "scenes", "a_images", "log_every", "val_samples"):
        if getattr(args, name) < (1 if name in ("scenes", "a_images", "log_every", "val_samples", "b") else 0):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.silent > args.b:
        p.error(f"--silent ({args.silent}) exceeds --b ({args.b})")
    return run(args)


if __name__ == "__main__":
    main()
