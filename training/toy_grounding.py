"""Stage 2a of the toy world: a grounding stage for the toy LLM, as LLaVA is trained before LISA.

    python -m training.toy_grounding --towers assets/toy_towers --out outputs/toy_grounded/s0 --seed 0

LISA starts from LLaVA, whose LLM has learnt from grounding data (LLaVA-1.5's RefCOCO turns ask for a
referent's box as text) to find a described object among its image tokens. A toy LLM trained only through
LISA's loss never learns that: the [SEG] row's only signal is SAM's mask loss, or a pointing term, through a
single vector, and the row collapses to a constant that ignores the image (docs/toy_world.md). This stage
gives the toy LLM what LLaVA's grounding data gives the real one, with a target per image token:

- inputs: LISA's own segmentation prompt (the evaluation wording, answer ``[SEG].``) for a toy referring
  expression, with the frozen CLIP stand-in's tokens of the scene in the image slot;
- target: where the referent is, as a distribution over the ``N`` image-token cells (the fraction of each
  14 x 14 CLIP cell its visible mask covers, normalised to sum 1);
- loss: cross-entropy between that distribution and a linear *grounding head* over the state of the row
  LISA reads the [SEG] embedding from. The head is a training device only: it is not part of the
  checkpoint, and LISA's stage then learns its own read-out (``text_hidden_fcs``) of the same row;
- words: a linear *word head* (also a training device) predicts the expression's bag of words from the same
  row's state after decoder layer ``words_layer``. LLaVA's LLM comes pretrained on text and gathers a question
  into its last rows; the toy LLM has no such pretraining, and without this term its query row never holds
  what the expression asks for, so it cannot learn where to look (docs/toy_world.md, run M);
- trained: the LLM (decoder layers, embeddings, final norm) and the projector; CLIP and SAM stay as
  pretrained. Scenes come from the generator's own streams (never the toyref splits' images), through JPEG
  q95 as the data set's files.

The output is a released-layout LISA checkpoint (``<out>/lisa``, float32; ``text_hidden_fcs`` still random)
that ``python train_ds.py +exp=toy_grounded`` trains on, and ``<out>/grounding.json`` with the held-out
measurements: how often the head's most likely cell lies on the referent, overall, per expression type and
with every image token zeroed (the LLM must read its image tokens to beat the zeroed figure).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from csp.methods import Method, build_method
from csp.runner import StageRunner
from csp.tokens import attention_mask
from datasets.toy import EXPRESSION_TYPES, ToySpec, generate_scene
from model.builder import ToySizes, build_toy_lisa
from model.inference import decoder_inputs, expand_image_slots, last_prompt_rows
from model.pipeline import SegmentationPipeline
from model.prompt import DEFAULT_ANSWER, seg_query_rows
from model.sam import sam_resized_size
from model.training import pointing_targets
from training.toy_towers import lr_factor

#: Scene streams of this stage (the toyref splits use 0, 1, 2; the tower pretraining 100, 101).
TRAIN_STREAM, HELD_OUT_STREAM = 102, 103
#: What the stage trains: the LLM and the projector (LISA's full mode trains the same, plus its heads).
TRAINED_PREFIXES = ("model.layers", "model.embed_tokens", "model.norm", "model.mm_projector")
#: With the pointing term on, the [SEG] read-out too (LISA's ``text_hidden_fcs``).
POINT_PREFIXES = ("model.text_hidden_fcs",)
RESIDUAL_INITS = ("uniform", "depth")


def scale_residual_writes(llm: torch.nn.Module) -> None:
    """GPT-2's residual initialisation: every decoder layer's ``o_proj`` and ``down_proj`` weights times
    ``(2 L) ** -0.5`` (``L`` decoder layers, two residual writes each)."""
    layers = llm.layers
    factor = (2 * len(layers)) ** -0.5
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)


@dataclass(frozen=True)
class GroundingSpec:
    """The stage's recipe (``python -m training.toy_grounding --help`` overrides the main ones)."""

    towers: str = "assets/toy_towers"
    seed: int = 0
    steps: int = 1200
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 50
    grad_clip: float = 1.0
    #: Weight of the pointing term (the [SEG] prompt regressed onto the click token of the referent, as
    #: ``mode.loss_weights.point`` in the LISA stage); 0: the LLM and projector only.
    point: float = 1.0
    train_images: int = 3000
    held_out_images: int = 100
    eval_every: int = 200
    #: ``uniform``: every LLM weight drawn with the same std (``ToySizes.init_std``); ``depth``: the two
    #: projections that write into the residual stream (attention's ``o_proj``, the MLP's ``down_proj``) further
    #: scaled by ``(2 L) ** -0.5`` as GPT-2 initialises them, so that the stream's variance at init does not
    #: grow with depth (docs/toy_world.md, run K: the held-out hit after 600 steps 0.56 against 0.46).
    residual_init: str = "depth"
    #: Weight of the word-carrying term: the expression's words (a bag, ``the`` left out) predicted by a linear
    #: *word head* (a training device, not saved) from the [SEG] query row's state after decoder layer
    #: ``words_layer`` (0-based). The toy LLM comes with no language pretraining, and without this term its query
    #: row does not hold what the expression asks for (docs/toy_world.md, run M: the colour word decodable 0.39
    #: against a majority 0.26; held-out hit after 600 steps 0.71 with the term at layer 3, 0.56 without). 0: off.
    words: float = 1.0
    words_layer: int = 3
    #: Reading delay (a training device, as the heads are; 0: off). Each training expression draws a delay
    #: ``k`` uniformly from ``0..read_delay``, and in decoder layers ``0..k-1`` its text rows may not attend to
    #: its image rows (the image rows themselves, and every row at evaluation, attend as usual). A model that can
    #: find the referent only in its first layers (docs/toy_world.md, run M: layers 1-2) must then learn to find
    #: it in later ones too, as an LLM that keeps reading its image through its depth does.
    read_delay: int = 0

    def check(self) -> None:
        for key in ("steps", "batch", "train_images", "held_out_images", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        if not self.words >= 0:
            raise ValueError(f"words: expected a weight >= 0, got {self.words}")
        if not 0 <= self.words_layer < ToySizes.num_layers:
            raise ValueError(f"words_layer: expected a decoder layer in [0, {ToySizes.num_layers - 1}], "
                             f"got {self.words_layer}")
        if not 0 <= self.read_delay < ToySizes.num_layers:
            raise ValueError(f"read_delay: expected a number of layers in [0, {ToySizes.num_layers - 1}], "
                             f"got {self.read_delay}")
        if self.residual_init not in RESIDUAL_INITS:
            raise ValueError(f"residual_init: expected one of {RESIDUAL_INITS}, got {self.residual_init!r}")
        towers = Path(self.towers)
        if not (towers / "clip" / "config.json").is_file() or not (towers / "sam.safetensors").is_file():
            raise FileNotFoundError(f"towers={towers}: expected clip/config.json and sam.safetensors there "
                                    "(python -m training.toy_towers clip|sam --out <folder>)")


@dataclass
class GroundingData:
    """``M`` referring expressions over ``I`` scenes: the frozen CLIP features of each scene, and per
    expression its scene, text, type and target distribution over the ``N`` cells."""

    features: torch.Tensor  # I x N x C
    scene: torch.Tensor  # M (index into features)
    texts: list[str]
    types: list[str]
    targets: torch.Tensor  # M x N, rows sum to 1
    clicks: torch.Tensor  # M x C: SAM's prompt token for a click on the referent (model.training.pointing_targets)

    def __len__(self) -> int:
        return len(self.texts)


def cell_cover(mask: np.ndarray, grid: int) -> torch.Tensor:
    """``H x W`` bool mask -> ``grid^2`` (raster order): the fraction of each cell the mask covers, normalised
    to sum 1. The image is cut into ``grid`` equal bands each way (CLIP's patches cover the resized image
    the same way: the toy images are square)."""
    h, w = mask.shape
    rows = np.minimum((np.arange(h) * grid) // h, grid - 1)
    cols = np.minimum((np.arange(w) * grid) // w, grid - 1)
    cover = np.zeros((grid, grid), dtype=np.float64)
    np.add.at(cover, (rows[:, None].repeat(w, 1), cols[None, :].repeat(h, 0)), mask.astype(np.float64))
    counts = np.zeros((grid, grid), dtype=np.float64)
    np.add.at(counts, (rows[:, None].repeat(w, 1), cols[None, :].repeat(h, 0)), 1.0)
    cover = cover / counts
    total = cover.sum()
    if total <= 0:
        raise ValueError("cell_cover: the mask is empty")
    return torch.from_numpy((cover / total).reshape(-1)).float()


def draw_grounding_data(pipe: SegmentationPipeline, count: int, *, seed: int, stream: int,
                        spec: ToySpec = ToySpec()) -> GroundingData:
    """``count`` scenes of the stream ``(seed, stream, index)`` with their referring expressions (the toyref
    generator's grammar and choice rule), encoded by the pipeline's frozen CLIP tower."""
    grid = int(round(pipe.num_image_tokens ** 0.5))
    features, scene, texts, types, targets, clicks = [], [], [], [], [], []
    for index in range(count):
        toy = generate_scene(spec, np.random.default_rng([seed, stream, index]))
        buffer = io.BytesIO()
        Image.fromarray(toy.pixels).save(buffer, format="JPEG", quality=95)
        image = Image.open(buffer).convert("RGB")
        features.append(pipe.encode_image(image, sam=False).clip_features[0])
        for shape_index, expr in toy.refs:
            scene.append(index)
            texts.append(expr.text())
            types.append(expr.kind)
            targets.append(cell_cover(toy.visible[shape_index], grid))
            mask = torch.from_numpy(toy.visible[shape_index][None].astype(np.float32))
            clicks.append(pointing_targets(pipe.model.sam, mask, sam_resized_size(mask.shape[1:]), mask.shape[1:])[0])
    return GroundingData(torch.stack(features), torch.tensor(scene), texts, types, torch.stack(targets),
                         torch.stack(clicks))


def cell_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy between ``M x N`` cell logits and the ``M x N`` target distributions."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def referent_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``M`` bool: whether the most likely cell lies on the referent (its target covers any of it)."""
    return targets.gather(1, logits.argmax(-1, keepdim=True))[:, 0] > 0


def hit_rates(hits: torch.Tensor, types: Sequence[str]) -> dict:
    """The fraction of hits overall (``hit``) and per expression type (``hit_by_type``), rounded to 1e-4."""
    hits = hits.float()
    by_type = {}
    for kind in EXPRESSION_TYPES:
        idx = [i for i, t in enumerate(types) if t == kind]
        if idx:
            by_type[kind] = round(float(hits[idx].mean()), 4)
    return {"hit": round(float(hits.mean()), 4), "hit_by_type": by_type}


class GroundingStage:
    """The [SEG] row's state for a batch of expressions, the grounding head over it and, with ``words`` (the
    expressions' vocabulary) and ``words_layer``, the word head over the same row's state after that layer."""

    def __init__(self, pipe: SegmentationPipeline, words: Sequence[str] = (), words_layer: int | None = None,
                 read_delay: int = 0):
        self.pipe = pipe
        model = pipe.model
        self.runner = pipe.runner
        self._delay: tuple[torch.Tensor, torch.Tensor] | None = None  # (B per-sample delays, B x T image rows)
        self._delay_hooks = [layer.register_forward_pre_hook(self._delayed_mask(i), with_kwargs=True)
                             for i, layer in enumerate(model.model.layers[:read_delay])]
        self.head = torch.nn.Linear(model.config.hidden_size, pipe.num_image_tokens)
        self._ids: dict[str, list[int]] = {}
        self._prompt_lengths: dict[str, int] = {}  # the same prompt without its answer (ends at the last prompt row)
        self.vocabulary = {w: i for i, w in enumerate(sorted(set(words) - {"the"}))}
        self.word_head = None
        self._hook = None
        self._layer_out: torch.Tensor | None = None
        if words_layer is not None:
            if not self.vocabulary:
                raise ValueError("words_layer is set but the word vocabulary is empty")
            self.word_head = torch.nn.Linear(model.config.hidden_size, len(self.vocabulary))
            self._hook = model.model.layers[words_layer].register_forward_hook(self._keep_layer_output)

    def _keep_layer_output(self, module: torch.nn.Module, args: tuple, output) -> None:
        self._layer_out = output[0] if isinstance(output, tuple) else output

    def _delayed_mask(self, layer: int):
        """A pre-hook for decoder layer ``layer``: AND the runner's key mask with "text rows of a sample whose
        delay exceeds ``layer`` do not see its image rows" (only while :meth:`loss` sets delays)."""
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._delay is None:
                return args, kwargs
            delays, is_image = self._delay
            mask = kwargs.get("attention_mask")
            if mask is None:  # no padding: the runner leaves SDPA its causal path; spell the causal mask out
                mask = attention_mask(torch.ones_like(is_image), padded=True)
            blind = (delays > layer)[:, None, None] & ~is_image[:, :, None] & is_image[:, None, :]  # B x T x T
            kwargs["attention_mask"] = mask & ~blind[:, None]
            return args, kwargs
        return hook

    def close(self) -> None:
        """Remove the hooks on the LLM's layers (the model outlives the stage)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for hook in self._delay_hooks:
            hook.remove()
        self._delay_hooks = []

    def heads(self) -> list[torch.nn.Parameter]:
        """The training devices' parameters (not saved with the checkpoint)."""
        extra = list(self.word_head.parameters()) if self.word_head is not None else []
        return list(self.head.parameters()) + extra

    def prompt_ids(self, text: str) -> list[int]:
        """The evaluation prompt with its answer ``[SEG].`` (cached per expression)."""
        if text not in self._ids:
            self._ids[text] = self.pipe.prompt_ids(text, False, answer=DEFAULT_ANSWER)
            self._prompt_lengths[text] = len(self.pipe.prompt_ids(text, False, answer=None))
        return self._ids[text]

    def word_bags(self, texts: Sequence[str]) -> torch.Tensor:
        """``B x V`` 0/1: which vocabulary words each expression holds (words outside it are not counted)."""
        bags = torch.zeros(len(texts), len(self.vocabulary))
        for row, text in enumerate(texts):
            for word in text.split():
                if word in self.vocabulary:
                    bags[row, self.vocabulary[word]] = 1.0
        return bags

    def _forward(self, features: torch.Tensor, texts: Sequence[str],
                 delays: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        pipe, tok = self.pipe, self.pipe.bundle.token_ids
        embeds = pipe.model.project_images(features)
        ids = [self.prompt_ids(t) for t in texts]
        batch = expand_image_slots(ids, embeds.shape[1], tok.pad)
        rows = [seg_query_rows(seq[: int(n)], tok.seg) for seq, n in zip(batch.ids, batch.lengths)]
        if any(len(r) != 1 for r in rows):
            raise ValueError("a grounding prompt must hold exactly one [SEG]")
        # the last prompt rows, which FastV-like controls rank by
        last = last_prompt_rows(ids, [self._prompt_lengths[t] for t in texts], embeds.shape[1])
        inputs = decoder_inputs(pipe.model, batch, embeds, rows, None, last_rows=last)
        self._layer_out = None
        self._delay = None if delays is None else (delays.to(embeds.device), inputs.is_image)
        try:
            states = self.runner.forward(inputs).rows(inputs.query_rows)[:, 0]
        finally:
            self._delay = None
        layer_states = None
        if self._layer_out is not None and self.runner is self.pipe.runner:  # a control's rows moved: no words
            at = inputs.query_rows[:, 0].to(self._layer_out.device)
            layer_states = self._layer_out[torch.arange(len(texts), device=at.device), at]
            self._layer_out = None
        return states, layer_states

    def seg_states(self, features: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``B x N x C`` CLIP features and ``B`` expressions -> ``B x d``: the final state of the row whose state
        LISA turns into the [SEG] embedding (model.prompt.seg_query_rows), with the full image (no method)."""
        return self._forward(features, texts)[0]

    def loss(self, features: torch.Tensor, texts: Sequence[str], targets: torch.Tensor,
             clicks: torch.Tensor, point_weight: float,
             delays: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cross-entropy of the head's cell distribution, mean squared distance of the [SEG] prompt
        (``text_hidden_fcs`` of the row) to the click token: the LISA stage's pointing term, and the word head's
        binary cross-entropy to the expressions' word bags, averaged over the vocabulary; 0 without a word head).
        ``delays``: ``B`` reading delays (see ``GroundingSpec.read_delay``), None: none."""
        states, layer_states = self._forward(features, texts, delays)
        cells = cell_cross_entropy(self.head(states).float(), targets)
        point = cells.new_zeros(())
        if point_weight:
            point = ((self.pipe.model.seg_head(states).float() - clicks) ** 2).mean()
        words = cells.new_zeros(())
        if self.word_head is not None and layer_states is not None:
            words = torch.nn.functional.binary_cross_entropy_with_logits(
                self.word_head(layer_states).float(), self.word_bags(texts).to(layer_states.device))
        return cells, point, words

    @torch.no_grad()
    def read(self, data: GroundingData, zero_images: bool = False, batch: int = 64,
             method: Method | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(``M`` bool: whether the head's most likely cell lies on the referent (covers any of it),
        ``M x C`` [SEG] prompts), from one pass of the LLM over every expression; ``method``: an in-LLM method
        (no input selection) to run the LLM under, None: plain."""
        if method is not None:
            n = self.pipe.num_image_tokens
            runner = StageRunner(self.pipe.model.model, method, n)
            if runner.plan.input_keep or method.per_query_reduction or method.input_tokens(n) != n:
                raise ValueError(f"{method.name} selects its input tokens before the LLM; the grounding stage runs "
                                 "in-LLM methods only")
            self.runner = runner
        try:
            return self._read(data, zero_images, batch)
        finally:
            self.runner = self.pipe.runner

    def _read(self, data: GroundingData, zero_images: bool, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        hits, prompts = [], []
        for start in range(0, len(data), batch):
            sl = slice(start, start + batch)
            features = data.features[data.scene[sl]]
            if zero_images:
                features = torch.zeros_like(features)
            states = self.seg_states(features, data.texts[sl])
            hits.append(referent_hits(self.head(states), data.targets[sl]))
            prompts.append(self.pipe.model.seg_head(states).float())
        return torch.cat(hits), torch.cat(prompts)


#: In-LLM cuts at the toy table's ~19 budget (configs/exp/toy_table1_fastv.yaml, toy_table1_random_keep.yaml)
#: whose held-out hit stage 2a reports: where the LLM reads its image shows in how much a random choice costs.
CONTROLS = {"random_keep@2": {"name": "random_keep", "layer": 2, "keep": 4},
            "fastv@2": {"name": "fastv", "layer": 2, "keep": 4}}


def grounding_metrics(stage: GroundingStage, data: GroundingData) -> dict:
    """Held-out hit rates (fractions of expressions), overall, per expression type, with the image tokens
    zeroed (features of zeros through the projector: what the LLM can guess from the words alone) and under
    the in-LLM cuts of :data:`CONTROLS`."""
    was_training = stage.pipe.model.training
    stage.pipe.model.eval()
    try:
        hits, prompts = stage.read(data)
        zeroed = stage.read(data, zero_images=True)[0].float()
        controls = {name: round(float(stage.read(data, method=build_method(cfg))[0].float().mean()), 4)
                    for name, cfg in CONTROLS.items()}
    finally:
        stage.pipe.model.train(was_training)
    point = float(((prompts - data.clicks) ** 2).mean())
    constant = float(((data.clicks - data.clicks.mean(0)) ** 2).mean())  # the best prompt that ignores everything
    rates = hit_rates(hits, data.types)
    return {"hit": rates["hit"], "hit_zeroed": round(float(zeroed.mean()), 4), "hit_by_type": rates["hit_by_type"],
            "point_mse": round(point, 4), "point_mse_constant": round(constant, 4), "expressions": len(data),
            "hit_under": controls}


def train_grounding(spec: GroundingSpec, out_dir: Path, log: bool = True) -> dict:
    """Run the stage; write ``<out_dir>/lisa`` (released layout, float32), ``grounding.json`` and
    ``grounding_log.jsonl`` (one line per evaluation, written as it goes)."""
    from model.checkpoint import save_lisa_checkpoint

    spec.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = build_toy_lisa(spec.seed, ToySizes(towers=spec.towers))
    pipe = SegmentationPipeline(bundle)
    model = bundle.model
    if spec.residual_init == "depth":
        scale_residual_writes(model.model)
    train = draw_grounding_data(pipe, spec.train_images, seed=spec.seed, stream=TRAIN_STREAM)
    held = draw_grounding_data(pipe, spec.held_out_images, seed=spec.seed, stream=HELD_OUT_STREAM)
    torch.manual_seed(spec.seed)
    words = [w for text in train.texts for w in text.split()] if spec.words else ()
    stage = GroundingStage(pipe, words, spec.words_layer if spec.words else None, spec.read_delay)
    delay_generator = torch.Generator().manual_seed(spec.seed + 1)  # apart: read_delay=0 draws as before
    params = []
    for name, param in model.named_parameters():
        prefixes = TRAINED_PREFIXES + (POINT_PREFIXES if spec.point else ())
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params + stage.heads(), lr=spec.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(spec.seed)
    history, running = [], None
    log_path = out_dir / "grounding_log.jsonl"
    log_path.write_text("")
    model.train()
    t_train = time.time()
    if log:
        print(f"grounding stage: {len(train)} expressions on {spec.train_images} scenes "
              f"({t_train - t0:.0f} s to draw and encode), {spec.steps} steps of {spec.batch}", flush=True)
    for step in range(1, spec.steps + 1):
        pick = torch.randint(len(train), (spec.batch,), generator=generator)
        delays = (torch.randint(spec.read_delay + 1, (spec.batch,), generator=delay_generator)
                  if spec.read_delay else None)
        cells, point, word = stage.loss(train.features[train.scene[pick]], [train.texts[i] for i in pick],
                                        train.targets[pick], train.clicks[pick], spec.point, delays)
        loss = cells + spec.point * point + spec.words * word
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * lr_factor(step - 1, spec.warmup, spec.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + stage.heads(), spec.grad_clip)
        optimizer.step()
        now = torch.stack([cells.detach(), point.detach(), word.detach()])
        running = now if running is None else 0.98 * running + 0.02 * now
        if step % spec.eval_every == 0 or step == spec.steps:
            record = {"step": step, "cell_loss": round(float(running[0]), 4), "point_loss": round(float(running[1]), 4),
                      "word_loss": round(float(running[2]), 4),
                      **grounding_metrics(stage, held),
                      "elapsed_s": round(time.time() - t0, 1)}
            history.append(record)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if log:
                rate = step / (time.time() - t_train)
                controls = ", ".join(f"{k} {v:.3f}" for k, v in record["hit_under"].items())
                print(f"step {step}/{spec.steps}  cell loss {running[0]:.3f}  point loss {running[1]:.3f}  "
                      f"held-out hit {record['hit']:.3f} (zeroed images {record['hit_zeroed']:.3f}; {controls}), "
                      f"held-out point mse {record['point_mse']:.3f} (constant {record['point_mse_constant']:.3f})  "
                      f"word loss {running[2]:.3f}  {rate:.2f} steps/s  ETA {(spec.steps - step) / rate:.0f} s",
                      flush=True)
    stage.close()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    checkpoint = save_lisa_checkpoint(bundle, out_dir / "lisa")
    model.vision_tower.clip.save_pretrained(checkpoint / "vision_tower")
    model.vision_tower.processor.save_pretrained(checkpoint / "vision_tower")
    report = {"spec": asdict(spec), "train_expressions": len(train), "elapsed_s": round(time.time() - t0, 1),
              "final": history[-1], "history": history, "checkpoint": str(checkpoint)}
    (out_dir / "grounding.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.toy_grounding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for lisa/ and grounding.json")
    parser.add_argument("--towers", default=GroundingSpec.towers, help="the pretrained toy towers")
    parser.add_argument("--seed", type=int, default=0, help="the LLM's init, the scenes and the batch order")
    parser.add_argument("--steps", type=int, default=GroundingSpec.steps)
    parser.add_argument("--batch", type=int, default=GroundingSpec.batch)
    parser.add_argument("--lr", type=float, default=GroundingSpec.lr)
    parser.add_argument("--train-images", type=int, default=GroundingSpec.train_images)
    parser.add_argument("--held-out-images", type=int, default=GroundingSpec.held_out_images)
    parser.add_argument("--eval-every", type=int, default=GroundingSpec.eval_every)
    parser.add_argument("--point", type=float, default=GroundingSpec.point, help="weight of the pointing term")
    parser.add_argument("--residual-init", default=GroundingSpec.residual_init, choices=RESIDUAL_INITS,
                        help="depth: GPT-2's scaled init of the LLM's residual writes")
    parser.add_argument("--words", type=float, default=GroundingSpec.words,
                        help="weight of the word-carrying term (0: off)")
    parser.add_argument("--words-layer", type=int, default=GroundingSpec.words_layer,
                        help="the decoder layer (0-based) after which the query row's state predicts the words")
    parser.add_argument("--read-delay", type=int, default=GroundingSpec.read_delay,
                        help="largest number of first layers in which a training expression's text rows do not "
                             "see its image (drawn per expression from 0..this; 0: off)")
    args = parser.parse_args(argv)
    spec = GroundingSpec(towers=args.towers, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
                         train_images=args.train_images, held_out_images=args.held_out_images,
                         eval_every=args.eval_every, point=args.point, residual_init=args.residual_init,
                         words=args.words, words_layer=args.words_layer, read_delay=args.read_delay)
    try:
        spec.check()
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    report = train_grounding(spec, args.out)
    print(json.dumps({"elapsed_s": report["elapsed_s"], "final": report["final"]}))


if __name__ == "__main__":
    main()
