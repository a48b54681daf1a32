"""``train(cfg)``: LISA training in three modes (``lisa``, ``decoder``, ``full``).

Order of checks (fail before anything expensive): mode and trainer keys, split names, the method
(``csp.config.method_from_config``: a ``method`` node or a CSP ``schedule``) and its own checks, model
paths, the method against the model's config, then the training splits (layout
errors, empty splits), then the model is loaded and the trainable set is built (LoRA targets).

Per optimizer step: ``grad_accumulation`` micro-batches of ``batch_size`` images each (every image
gives up to ``samples_per_image`` conversations), loss / accumulation backward, gradient clipping,
AdamW, linear warmup then linear decay (DeepSpeed's WarmupDecayLR). A non-finite loss or gradient
norm stops the run naming the step and the samples, before anything is written. Checkpoints every
``save_every`` steps (training/checkpointing.py); validation every ``val.every`` steps through
evaluation's own loop (gIoU, cIoU). At the end: the final checkpoint, ``mask_decoder.safetensors``
(decoder mode) and a released-layout LISA checkpoint (LoRA merged) that ``eval_ds.py`` loads.

By concern: ``training.config`` (the config's checks), ``training.params`` (what each mode trains),
``training.optim`` (optimizer, lr schedule, DeepSpeed config), ``training.data`` (sources, data order),
``training.cache`` (the decoder-mode cache), ``training.checkpointing``, ``training.export`` (the
released layout); this module holds the run itself (resume, the loop, validation, the final files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from csp.config import MethodConfig, method_from_config
from evaluation.evaluate import SettingOptions, evaluate_setting
from runs.data import load_all_groups, prepare_dataset_dir
from runs.distributed import DistContext, barrier, init_distributed, single_process_env
from runs.rundir import output_dir
from training import checkpointing as ckpt
from training.config import MODES, check_config  # noqa: F401  (re-exported)
from training.data import (
    DataOrder,
    EmptyTrainingSetError,
    EncodingCache,
    PromptStyle,
    Source,
    conversations,
    item_rng,
    load_sources,
)
from training.export import save_released
from training.optim import (  # noqa: F401  (re-exported)
    build_optimizer,
    deepspeed_config,
    image_scale,
    param_groups,
    warmup_decay,
)
from training.params import (  # noqa: F401  (re-exported)
    ALWAYS_FROZEN,
    DECODER_TRAINABLE,
    LISA_TRAINABLE,
    Trainable,
    setup_trainable,
)

log = logging.getLogger(__name__)

#: Trainer keys a checkpoint restores (optimizer, schedule, data order): a resume must run with the same values.
RESUMED_KEYS = ("steps", "batch_size", "grad_accumulation", "samples_per_image", "lr", "betas", "weight_decay",
                "warmup_steps", "grad_clip", "lr_scale", "image_ramp")


def check_resumed_settings(path: Path, cfg: DictConfig) -> None:
    """Refuse a resume whose trainer keys differ from the checkpoint's (its ``config.yaml``): the checkpoint's
    optimizer, schedule and data order would train with its own values while this run recorded others."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file).get("trainer") or {}
    for key in RESUMED_KEYS:
        old, new = saved.get(key), cfg.trainer.get(key)
        old = OmegaConf.to_container(old) if OmegaConf.is_config(old) else old
        new = OmegaConf.to_container(new) if OmegaConf.is_config(new) else new
        if old != new:
            raise ValueError(f"trainer.resume: trainer.{key}={new!r} but checkpoint {path.name} was trained with "
                             f"trainer.{key}={old!r}; resume with the checkpoint's value (trainer.{key}={old!r}) or "
                             "start a new run")


def trim_log(path: Path, step: int) -> int:
    """Keep the JSON-lines records of ``path`` up to ``step`` (and no torn last line); returns how many went.

    Steps are numbered from 1 everywhere (the log, checkpoints ``step_N``, validation, error messages): step N
    is the N-th optimizer step."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        path.write_text("".join(f"{line}\n" for line in kept))
    return dropped


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or inf; the message names the step and the samples."""


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0
    cache_build_s: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)


def run_fingerprint(initial: str, cfg: DictConfig, trainable: list[str], method: MethodConfig) -> str:
    """What a checkpoint must match to be resumed: the initial weights, the mode, the method with its
    parameters, the trainable names and the data sources."""
    record = method.record()  # CSP and plain LISA: the same parts as before other methods could train
    parts = {"initial": initial, "mode": OmegaConf.to_container(cfg.mode, resolve=True),
             "schedule": record["schedule"] or None,
             "trainable": trainable,
             "sources": OmegaConf.to_container(cfg.train_data.sources, resolve=True)}
    if isinstance(record["method"], Mapping):
        parts["method"] = record["method"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns ``{"step", "history", "val", "outputs"}`` (rank 0's view)."""
    ctx = init_distributed()
    check_config(cfg)
    out_dir = output_dir(cfg)
    method = method_from_config(cfg)
    if method.method is not None:
        method.method.check()
    from runs.models import check_model_paths

    check_model_paths(cfg.model)
    if method.method is not None:
        from runs.models import layers_and_image_tokens

        method.method.validate(*layers_and_image_tokens(cfg.model))
    dataset_dir = prepare_dataset_dir(cfg, out_dir, ctx)
    sources = load_sources(list(cfg.train_data.sources), dataset_dir)
    val_splits = [str(s) for s in (cfg.train_data.get("val_splits") or [])]
    val_groups = load_all_groups(val_splits, dataset_dir, cfg.val.get("max_samples_per_split"))
    empty = [split for split in val_splits if not any(g.split == split for g in val_groups)]
    if empty:
        raise EmptyTrainingSetError(f"validation splits {empty} under {dataset_dir} have no samples")

    seed = int(cfg.seed)
    torch.manual_seed(seed)
    from model.finetuned import weights_fingerprint
    from model.pipeline import SegmentationPipeline
    from runs.models import build_from_config

    bundle = build_from_config(cfg.model, training=True)  # no prepacked linears (model.cpu_linear) in training
    model = bundle.model
    if cfg.trainer.get("save_released", True):  # refused now, not after training, if the export cannot be written
        from model.checkpoint import released_added_tokens

        released_added_tokens(bundle.tokenizer)
    initial = weights_fingerprint(model.named_parameters())
    trainable = setup_trainable(model, cfg.mode)
    fingerprint = run_fingerprint(initial, cfg, trainable.names, method)
    pipe = SegmentationPipeline(bundle, method.method)
    runner = Runner(cfg, ctx, out_dir, bundle, pipe, trainable, sources, fingerprint, method)
    runner.resume_if_asked()
    runner.prepare_cache()
    result = runner.loop(val_groups, val_splits)
    return result


class Runner:
    """One training run's state and steps (kept together so that resume restores all of it)."""

    def __init__(self, cfg: DictConfig, ctx: DistContext, out_dir: Path, bundle: Any, pipe: Any,
                 trainable: Trainable, sources: list[Source], fingerprint: str, method: MethodConfig):
        self.cfg, self.ctx, self.out_dir, self.bundle, self.pipe = cfg, ctx, out_dir, bundle, pipe
        self.model = bundle.model
        self.trainable, self.sources, self.fingerprint = trainable, sources, fingerprint
        self.method = method
        self.t = cfg.trainer
        self.mode = str(cfg.mode.name)
        self.style = PromptStyle(str(cfg.mode.get("prompts", "lisa")))
        self.seed = int(cfg.seed)
        self.order = DataOrder(self.seed, [len(s.groups) for s in sources], [s.rate for s in sources])
        self.state = RunState()
        self.ckpt_root = out_dir / "checkpoints"
        params = trainable.params(self.model)
        self.engine = None
        if ctx.distributed or bool(self.t.get("deepspeed", False)):
            device = self.bundle.device.type
            if device == "cpu":  # DeepSpeed's CPU accelerator (gloo); read when deepspeed is first imported
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if not ctx.distributed:
                single_process_env()
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, model_parameters=params, config=deepspeed_config(self.t, ctx.world_size, device))
            from model.bundle import keep_fp32_buffers

            keep_fp32_buffers(self.model)  # DeepSpeed's bf16 cast also hits RoPE / SAM buffers that must stay fp32
        else:
            self.optimizer, self.scheduler = build_optimizer(self.model, params, self.t)
        self.cache = None
        from model.training import sam_encoder_trains

        # a trainable SAM encoder runs in the loss (with gradients), so its cached output would be stale
        sam = not sam_encoder_trains(self.model)
        self.encodings = EncodingCache(lambda image: pipe.encode_image(image, sam=sam),
                                       int(self.t.get("encoding_cache", 0) or 0))
        self.logger = None
        if cfg.get("logger") is not None and ctx.is_main:
            from evaluation.wandb_logger import WandbLogger

            self.logger = WandbLogger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), out_dir)

    # -- resume ---------------------------------------------------------------------------------------
    def resume_if_asked(self) -> None:
        source = self.cfg.trainer.get("resume")
        if not source:
            return
        path = ckpt.latest_checkpoint(self.ckpt_root) if source is True or str(source) == "latest" \
            else Path(str(source))
        if path is None:
            raise FileNotFoundError(f"trainer.resume={source}: no checkpoint in {self.ckpt_root} (pass the old run's "
                                    "hydra.run.dir, or trainer.resume=<checkpoint dir>)")
        check_resumed_settings(path, self.cfg)
        loaded = ckpt.load_checkpoint(path, self.fingerprint, self._rank_suffix())
        named = dict(self.model.named_parameters())
        if sorted(loaded["trainable"]) != sorted(self.trainable.names):
            raise KeyError(f"checkpoint {path} holds other trainable parameters than this run")
        with torch.no_grad():
            for name, tensor in loaded["trainable"].items():
                named[name].copy_(tensor.to(named[name].dtype))
        state = loaded["state"]
        if self.engine is None:
            self.optimizer.load_state_dict(loaded["optimizer"])
        else:
            # ZeRO-2: every rank reads its own partition file; DeepSpeed indexes the list by dp rank
            self.optimizer.load_state_dict([loaded["optimizer"]] * self.ctx.world_size, load_optimizer_states=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.order = DataOrder.from_state(state["data_order"], self.order.sizes, self.order.rates)
        ckpt.restore_rng(loaded["rng"])
        self.state = RunState(step=int(state["step"]), history=list(state.get("history", [])),
                              val=list(state.get("val", [])))
        if self.ctx.is_main:  # the dead attempt's steps after the checkpoint are not part of this run
            for name in ("train_log.jsonl", "val_log.jsonl"):
                dropped = trim_log(self.out_dir / name, self.state.step)
                if dropped:
                    log.info("%s: dropped %d records after step %d (the interrupted attempt)", name, dropped,
                             self.state.step)
        log.info("resumed from %s at step %d", path, self.state.step)

    def _rank_suffix(self) -> str:
        return f".rank{self.ctx.rank}" if self.engine is not None else ""

    # -- decoder cache --------------------------------------------------------------------------------
    def prepare_cache(self) -> None:
        if self.mode != "decoder" or not self.cfg.mode.get("cache", True):
            return
        from model.finetuned import method_json, upstream_fingerprint
        from training.cache import DecoderCache, group_features

        root = self.cfg.mode.get("cache_dir") or self.out_dir / "decoder_cache"
        key = {"fingerprint": upstream_fingerprint(self.model), "method": method_json(self.method.spec),
               "model_name": str(self.cfg.model.get("name")), "prompts": self.style.kind}
        self.cache = DecoderCache(root, key)
        todo = [(g, i) for s in self.sources for i, g in enumerate(s.groups) if not self.cache.has(g, i)]
        todo = todo[self.ctx.rank::self.ctx.world_size]
        self.model.eval()
        start = time.perf_counter()
        for group, index in progress(todo, "decoder cache", self.ctx.is_main and bool(self.t.progress_bar)):
            prompts, enc = group_features(self.pipe, group)
            self.cache.put(group, index, prompts, enc)
        barrier(self.ctx)
        self.state.cache_build_s = time.perf_counter() - start

    # -- one micro-batch ------------------------------------------------------------------------------
    def next_items(self) -> list[tuple[Source, int, int]]:
        """``batch_size`` images: (source, group index, draw index)."""
        items = []
        for _ in range(int(self.t.batch_size) * self.ctx.world_size):
            draw = self.order.draws
            source, index = self.order.next()
            items.append((self.sources[source], index, draw))
        return items[self.ctx.rank::self.ctx.world_size]  # each rank its share of the global batch

    def micro_loss(self, items: list[tuple[Source, int, int]]) -> tuple[Any, list[str]]:
        """The loss of one micro-batch and the ids of its samples."""
        from model.training import LossWeights, decoder_loss, training_loss

        w = self.cfg.mode.get("loss_weights") or {}
        weights = LossWeights(ce=float(w.get("ce", 1.0)), bce=float(w.get("bce", 2.0)), dice=float(w.get("dice", 0.5)),
                              point=float(w.get("point", 0.0)))
        spi = int(self.t.samples_per_image)
        if self.mode == "decoder":
            from training.cache import features_for, group_features

            feats, gts, ids = [], [], []
            for source, index, draw in items:
                group = source.groups[index]
                convs = conversations(group, samples_per_image=spi, style=self.style, rng=item_rng(self.seed, draw))
                chosen = [s for s in group.samples if s.sample_id in {c.sample_id for c in convs}]
                if self.cache is not None:
                    feats += self.cache.get(group, index, chosen, self.bundle.device)
                else:
                    prompts, enc = group_features(self.pipe, group, self.encodings.get(group.image_path))
                    feats += features_for(prompts, enc, chosen)
                gts += [torch.as_tensor(c.gt_masks) for c in convs]
                ids += [f"{source.split}:{c.sample_id}" for c in convs]
            return decoder_loss(self.model.sam, feats, gts, weights), ids
        samples, ids, encodings = [], [], {}
        for source, index, draw in items:
            group = source.groups[index]
            image, enc = self.encodings.get(group.image_path)
            encodings[id(image)] = enc
            samples += conversations(group, samples_per_image=spi, style=self.style, rng=item_rng(self.seed, draw),
                                     image=image)
            ids += [f"{source.split}:{s.sample_id}" for s in samples[len(ids):]]
        scale = image_scale(self.state.step, self.t.get("image_ramp"))
        with autocast(self.t, self.bundle.device):
            return training_loss(self.pipe, samples, weights, encodings, image_scale=scale), ids

    def train_mode(self) -> None:
        self.model.train()
        self.model.vision_tower.eval()  # frozen encoders: no dropout / batch statistics
        self.model.sam.image_encoder.eval()

    # -- the loop -------------------------------------------------------------------------------------
    def loop(self, val_groups: list[Any], val_splits: list[str]) -> dict[str, Any]:
        steps, accum = int(self.t.steps), int(self.t.grad_accumulation)
        params = self.trainable.params(self.model)
        bar = progress_bar(steps, self.state.step, self.ctx.is_main and bool(self.t.progress_bar))
        log_path = self.out_dir / "train_log.jsonl"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        val_every, save_every = int(self.cfg.val.every or 0), int(self.t.save_every or 0)
        stop_at = self.state.step + int(self.t.stop_after) if self.t.get("stop_after") else None
        start = time.perf_counter()
        while self.state.step < steps:
            step = self.state.step
            self.train_mode()
            parts_sum: dict[str, float] = {}
            lr = float(self.optimizer.param_groups[-1]["lr"])  # this step's plain lr (scaled groups come first)
            for micro in range(accum):
                items = self.next_items()
                parts, ids = self.micro_loss(items)
                value = float(parts.loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"loss is {value} at step {step + 1} (micro-batch {micro}, samples {ids}); nothing of this step "
                        f"was saved; last good checkpoint: {ckpt.latest_checkpoint(self.ckpt_root)}")
                if self.engine is not None:  # DeepSpeed scales by 1/accumulation and steps at the boundary
                    self.engine.backward(parts.loss)
                    self.engine.step()
                else:
                    (parts.loss / accum).backward()
                for key, val in parts.scalars().items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + val / accum
            if self.engine is not None:  # it clipped, stepped and scheduled at the last micro-batch
                grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(self.t.grad_clip)))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {step + 1} (batch samples {ids}); "
                                             f"last good checkpoint: {ckpt.latest_checkpoint(self.ckpt_root)}")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.state.step = step + 1
            record = {"step": self.state.step, "lr": lr, "grad_norm": grad_norm, **parts_sum,
                      "elapsed_s": time.perf_counter() - start}  # since this invocation's loop began
            self.state.history.append(record)
            if self.ctx.is_main:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if self.logger is not None:
                    self.logger.run.log({f"train/{k}": v for k, v in record.items() if k != "step"},
                                        step=self.state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{parts_sum['loss']:.4f}", lr=f"{lr:.2e}")
            last = self.state.step == steps
            if val_groups and val_every and (self.state.step % val_every == 0 or last):
                self.validate(val_groups, val_splits)
            if (save_every and self.state.step % save_every == 0) or last or self.state.step == stop_at:
                self.save()
            if self.state.step == stop_at and not last:  # a time-limited job: resume later from here
                bar.close()
                log.info("stopped at step %d (trainer.stop_after); resume: trainer.resume=true", self.state.step)
                return {"step": self.state.step, "history": self.state.history, "val": self.state.val, "outputs": {}}
        bar.close()
        outputs = self.finish()
        if self.logger is not None:
            self.logger.finish()
        return {"step": self.state.step, "history": self.state.history, "val": self.state.val, "outputs": outputs,
                "cache_build_s": self.state.cache_build_s}

    def validate(self, val_groups: list[Any], val_splits: list[str]) -> dict[str, Any]:
        """gIoU / cIoU on the validation splits through evaluation's own loop (all ranks share it)."""
        self.model.eval()
        step_dir = self.out_dir / "val" / ckpt.step_dir_name(self.state.step)
        with torch.no_grad():
            metrics = evaluate_setting(self.pipe, val_groups, val_splits, step_dir, self.ctx,
                                       SettingOptions(name=f"step {self.state.step}"))
        row = {"step": self.state.step,
               **{f"{split}/{k}": m[k] for split, m in metrics["splits"].items() for k in ("gIoU", "cIoU")}}
        self.state.val.append(row)
        if self.ctx.is_main:
            with open(self.out_dir / "val_log.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.logger is not None:
                self.logger.run.log({f"val/{k}": v for k, v in row.items() if k != "step" and v is not None},
                                    step=self.state.step)
            log.info("step %d validation: %s", self.state.step, row)
        self.train_mode()
        return metrics

    def trainable_state(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.trainable.names}

    def save(self) -> Path | None:
        state = {"mode": self.mode, "scheduler": self.scheduler.state_dict(), "data_order": self.order.state(),
                 "history": self.state.history, "val": self.state.val, "trainable": self.trainable.names}
        optimizer_state = self.optimizer.state_dict()
        path = None
        if self.engine is not None:  # ZeRO-2: rank 0 writes the checkpoint, every other rank its partition
            optimizer_state = ckpt.storable_items(optimizer_state)
            if self.ctx.is_main:
                path = ckpt.save_checkpoint(self.ckpt_root, self.state.step, trainable=self.trainable_state(),
                                            state=state, optimizer_state=optimizer_state, cfg=self.cfg,
                                            fingerprint=self.fingerprint, rank_suffix=self._rank_suffix(),
                                            write_latest=False)
            barrier(self.ctx)
            if not self.ctx.is_main:
                ckpt.save_rank_files(self.ckpt_root / ckpt.step_dir_name(self.state.step), optimizer_state,
                                     self._rank_suffix())
            barrier(self.ctx)
            if self.ctx.is_main:  # only now is the checkpoint complete on every rank
                ckpt.mark_latest(self.ckpt_root, self.state.step)
        elif self.ctx.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.state.step, trainable=self.trainable_state(), state=state,
                                        optimizer_state=optimizer_state, cfg=self.cfg, fingerprint=self.fingerprint,
                                        keep=self.t.get("keep_checkpoints"))
        barrier(self.ctx)
        return path

    def finish(self) -> dict[str, str]:
        """Final artefacts (rank 0): the decoder file, the released-layout checkpoint."""
        outputs: dict[str, str] = {"checkpoints": str(self.ckpt_root)}
        if not self.ctx.is_main:
            return outputs
        from model.finetuned import save_mask_decoder

        self.model.eval()
        if self.mode == "decoder":
            decoder = save_mask_decoder(self.model, self.out_dir / "mask_decoder.safetensors",
                                        method=self.method.spec, model_name=str(self.cfg.model.get("name")))
            outputs["mask_decoder"] = str(decoder)
        if self.t.get("save_released", True):
            outputs.update(save_released(self.bundle, self.trainable, self.out_dir / "final",
                                         dtype=self.t.get("release_dtype")))
        (self.out_dir / "outputs.json").write_text(json.dumps(outputs, indent=1))
        return outputs


# -- small helpers ----------------------------------------------------------------------------------
class autocast:  # noqa: N801 - used like torch.autocast
    """bf16/fp16 autocast on CUDA for ``trainer.precision``; nothing on CPU or for fp32."""

    def __init__(self, t: DictConfig, device: torch.device):
        precision = str(t.get("precision", "fp32"))
        enabled = device.type == "cuda" and precision in ("bf16", "fp16")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.ctx = torch.autocast("cuda", dtype=dtype, enabled=enabled)

    def __enter__(self) -> None:
        self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.ctx.__exit__(*exc)


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm with rate and ETA on stderr (rank 0); a no-op elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def progress(items: list[Any], desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)

