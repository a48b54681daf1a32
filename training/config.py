"""The training config's own checks (``configs/train.yaml``: mode, trainer, data sources), run before
anything is loaded; each error names the key and what was expected."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from datasets.splits import check_split
from runs.distributed import context_from_env
from training.data import check_source_spec, source_name

MODES = ("lisa", "decoder", "full")


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
    if not float(t.lr) > 0:
        raise ValueError(f"trainer.lr={t.lr!r}; expected > 0")
    if int(t.warmup_steps) < 0:
        raise ValueError(f"trainer.warmup_steps={t.warmup_steps!r}; expected >= 0")
    for spec in cfg.train_data.sources:
        check_source_spec(spec)
        if mode == "decoder" and "vqa" in spec:
            raise ValueError(f"train_data.sources {source_name(spec)}: mode=decoder trains the mask decoder only, "
                             "a VQA source has no masks (remove it)")
    for split in cfg.train_data.get("val_splits") or []:
        check_split(str(split))
    world = context_from_env().world_size
    if (world > 1 or t.get("deepspeed")) and not str(cfg.model.get("device", "cpu")).startswith("cuda"):
        raise ValueError(f"DeepSpeed training (trainer.deepspeed=true or WORLD_SIZE={world}) needs the model on CUDA "
                         f"GPUs (model.device={cfg.model.get('device', 'cpu')}); on CPU train in one plain process "
                         "(trainer.deepspeed=false, no launcher)")
    if mode == "lisa" and not cfg.mode.get("lora"):
        raise ValueError("mode=lisa needs mode.lora {r, alpha, dropout, targets}")
    for i, group in enumerate(t.get("lr_scale") or []):
        if not group.get("prefixes") or group.get("scale") is None or not float(group["scale"]) >= 0:
            raise ValueError(f"trainer.lr_scale[{i}]={OmegaConf.to_container(group)!r}; expected "
                             "{prefixes: [parameter-name prefixes], scale: >= 0}")
    if (t.get("lr_scale") or t.get("image_ramp")) and (world > 1 or t.get("deepspeed")):
        raise ValueError("trainer.lr_scale / trainer.image_ramp are plain-process options (the toy world); DeepSpeed's "
                         "WarmupDecayLR sets one lr for every group: leave them null with DeepSpeed")
    ramp = t.get("image_ramp")
    if ramp is not None:
        if mode == "decoder":
            raise ValueError("trainer.image_ramp has no effect in mode=decoder (the LLM is frozen and cached); "
                             "set it null")
        if len(ramp) != 2 or not 0 <= int(ramp[0]) <= int(ramp[1]):
            raise ValueError(f"trainer.image_ramp={list(ramp)!r}; expected [start, end] optimizer steps, "
                             "0 <= start <= end")
