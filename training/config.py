"""The training config's own checks (``configs/train.yaml``: mode, trainer, data sources), run before
anything is loaded; each error names the key and what was expected."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from datasets.splits import check_split
from runs.distributed import context_from_env
from training.data import check_source_spec, source_name

MODES = ("lisa", "decoder", "full")


def number(key: str, value: object, *, integer: bool = False, minimum: float | None = None,
           above: float | None = None, optional: bool = False) -> float | int | None:
    """``value`` as a number, or a ValueError naming ``key``, the value and what was expected."""
    kind = "an integer" if integer else "a number"
    bound = f" >= {minimum}" if minimum is not None else f" > {above}" if above is not None else ""
    if value is None and optional:
        return None
    expected = f"{key}={value!r}; expected {kind}{bound}" + (" or null" if optional else "")
    if isinstance(value, bool) or value is None:
        raise ValueError(expected)
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        raise ValueError(expected) from None
    if integer and parsed != int(parsed):
        raise ValueError(expected)
    if (minimum is not None and parsed < minimum) or (above is not None and not parsed > above):
        raise ValueError(expected)
    return int(parsed) if integer else parsed


def check_numbers(cfg: DictConfig) -> None:
    """Every numeric key of the trainer, validation and loss weights is a number in its range."""
    t = cfg.trainer
    number("trainer.lr", t.lr, above=0)
    number("trainer.warmup_steps", t.warmup_steps, integer=True, minimum=0)
    number("trainer.weight_decay", t.get("weight_decay", 0.0), minimum=0)
    number("trainer.grad_clip", t.get("grad_clip"), minimum=0, optional=True)
    betas = t.get("betas")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"trainer.betas={list(betas)!r}; expected two numbers in [0, 1)")
        for i, beta in enumerate(betas):
            if number(f"trainer.betas[{i}]", beta, minimum=0) >= 1:
                raise ValueError(f"trainer.betas[{i}]={beta!r}; expected a number in [0, 1)")
    number("trainer.save_every", t.get("save_every", 0), integer=True, minimum=0)
    number("trainer.keep_checkpoints", t.get("keep_checkpoints"), integer=True, minimum=1, optional=True)
    number("trainer.encoding_cache", t.get("encoding_cache", 0), integer=True, minimum=0)
    number("trainer.stop_after", t.get("stop_after"), integer=True, minimum=1, optional=True)
    if cfg.get("val") is not None:
        number("val.every", cfg.val.get("every", 0), integer=True, minimum=0)
        number("val.max_samples_per_split", cfg.val.get("max_samples_per_split"), integer=True, minimum=1,
               optional=True)
    for name, weight in (cfg.mode.get("loss_weights") or {}).items():
        number(f"mode.loss_weights.{name}", weight, minimum=0)
    for i, group in enumerate(t.get("lr_scale") or []):
        number(f"trainer.lr_scale[{i}].scale", group.get("scale"), minimum=0)


def check_config(cfg: DictConfig) -> None:
    """Mode, trainer numbers and split names; raises naming the key and what was expected."""
    mode = cfg.mode.get("name")
    if mode not in MODES:
        raise ValueError(f"mode.name={mode!r}; expected one of {MODES} (mode=lisa|decoder|full)")
    t = cfg.trainer
    positive = {"steps": t.steps, "batch_size": t.batch_size, "grad_accumulation": t.grad_accumulation,
                "samples_per_image": t.samples_per_image}
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"trainer.{key}={value!r}; expected an integer >= 1")
    check_numbers(cfg)
    for spec in cfg.train_data.sources:
        check_source_spec(spec)
        if mode == "decoder" and "vqa" in spec:
            raise ValueError(f"train_data.sources {source_name(spec)}: mode=decoder trains the mask decoder only, "
                             "a VQA source has no masks (remove it)")
    for split in cfg.train_data.get("val_splits") or []:
        check_split(str(split))
    world = context_from_env().world_size
    if mode == "lisa" and not cfg.mode.get("lora"):
        raise ValueError("mode=lisa needs mode.lora {r, alpha, dropout, targets}")
    for i, group in enumerate(t.get("lr_scale") or []):
        if not group.get("prefixes") or group.get("scale") is None or not float(group["scale"]) >= 0:
            raise ValueError(f"trainer.lr_scale[{i}]={OmegaConf.to_container(group)!r}; expected "
                             "{prefixes: [parameter-name prefixes], scale: >= 0}")
    if (t.get("lr_scale") or t.get("image_ramp")) and (world > 1 or t.get("deepspeed")):
        raise ValueError("trainer.lr_scale / trainer.image_ramp are plain-process options (the toy world); DeepSpeed's "
                         "WarmupDecayLR sets one lr for every group: leave them null with DeepSpeed")
    if (world > 1 or t.get("deepspeed")) and int(t.warmup_steps) < 1:
        raise ValueError(f"trainer.warmup_steps={t.warmup_steps}; DeepSpeed's WarmupDecayLR needs >= 1 (it warms up "
                         "over at least 2 steps)")
    ramp = t.get("image_ramp")
    if ramp is not None:
        if mode == "decoder":
            raise ValueError("trainer.image_ramp has no effect in mode=decoder (the LLM is frozen and cached); "
                             "set it null")
        if len(ramp) != 2 or not 0 <= int(ramp[0]) <= int(ramp[1]):
            raise ValueError(f"trainer.image_ramp={list(ramp)!r}; expected [start, end] optimizer steps, "
                             "0 <= start <= end")
