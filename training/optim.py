"""The optimizer and learning-rate schedule (AdamW, linear warmup then linear decay as DeepSpeed's
WarmupDecayLR), per-module learning rates, the image-token curriculum, and LISA's DeepSpeed config."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig


def warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR factor of optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then
    linear decay to 0 at ``total`` (DeepSpeed WarmupDecayLR with warmup_type linear, min lr 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def deepspeed_warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR factor DeepSpeed's WarmupDecayLR (linear) gives optimizer step ``step`` (0-based) as the engine runs
    it: the scheduler starts at its min lr (0) and is stepped after each optimizer step, and it warms up over
    at least 2 steps, so steps 0 and 1 run at lr 0 and step s >= 1 at the factor of s - 1. The plain loop's
    :func:`warmup_decay` runs the same curve two steps earlier; the DeepSpeed tests train the plain loop
    under this one to compare weights."""
    if step == 0:
        return 0.0
    s, w = step - 1, max(2, warmup)
    if s < w:
        return s / w
    return max(0.0, (total - s) / max(1.0, total - w))


def image_scale(step: int, ramp: Any) -> float:
    """Factor on the projected image tokens at optimizer step ``step`` (0-based) under ``trainer.image_ramp``
    ``[start, end]``: 0 before ``start``, linear to 1 at ``end``, 1 from then on (None: always 1).

    The toy world's curriculum: a from-scratch LLM first learns to carry the expression to the [SEG] row
    with the image rows silent (zero vectors), then the images come in; evaluation always sees them whole.
    Any factor above ~1e-3 acts almost like 1: the first layer's RMSNorm divides it out of the image rows'
    input (measured on a trained toy model: the CE of one answer is 0.4200 at factor 1e-3, 0.4226 at 1 and
    3.40 at 0), so the ramp is in effect a switch at ``start``; only the image rows' residual stream is scaled.
    """
    if ramp is None:
        return 1.0
    start, end = int(ramp[0]), int(ramp[1])
    if step >= end:
        return 1.0
    if step < start:
        return 0.0
    return (step - start) / max(1, end - start)


def param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], t: DictConfig) -> list[dict[str, Any]]:
    """AdamW groups: ``trainer.lr_scale`` entries ``{prefixes, scale}`` (first match wins) get ``scale`` x lr,
    every other trainable parameter the plain lr (last group). A prefix matching no trainable parameter
    is an error listing the trainable names' prefixes."""
    specs = [(tuple(str(p) for p in g["prefixes"]), float(g["scale"])) for g in (t.get("lr_scale") or [])]
    names = {id(p): n for n, p in model.named_parameters()}
    lr = float(t.lr)
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr * scale} for _, scale in specs]
    rest: dict[str, Any] = {"params": [], "lr": lr}
    for param in params:
        index = next((i for i, (prefixes, _) in enumerate(specs) if names[id(param)].startswith(prefixes)), None)
        (rest if index is None else groups[index])["params"].append(param)
    for (prefixes, _), group in zip(specs, groups):
        if not group["params"]:
            tops = sorted({".".join(names[id(p)].split(".")[:2]) for p in params})
            raise ValueError(f"trainer.lr_scale prefixes {list(prefixes)} match no trainable parameter; "
                             f"trainable: {tops}")
    return [g for g in [*groups, rest] if g["params"]]


def build_optimizer(model: torch.nn.Module, params: list[torch.nn.Parameter], t: DictConfig
                    ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over :func:`param_groups` and the warmup-decay schedule applied to each group's own lr."""
    optimizer = torch.optim.AdamW(param_groups(model, params, t), lr=float(t.lr),
                                  betas=tuple(float(b) for b in t.betas), weight_decay=float(t.weight_decay))
    warmup, total = int(t.warmup_steps), int(t.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_decay(s, warmup, total))
    return optimizer, scheduler


def deepspeed_config(t: DictConfig, world_size: int, device: str = "cuda") -> dict[str, Any]:
    """LISA's DeepSpeed config (ZeRO-2, bf16, clipping, AdamW + WarmupDecayLR) for these settings.

    ``device="cpu"`` (DeepSpeed's CPU accelerator, ``DS_ACCELERATOR=cpu``, gloo) changes only what the CPU
    needs, each named in docs/training.md: fp32 (bf16 / fp16 off, as the plain loop on CPU), torch's AdamW
    (``torch_adam``: DeepSpeed's FusedAdam is a CUDA kernel) and no communication overlap (``overlap_comm``
    uses CUDA streams)."""
    cpu = device.startswith("cpu")
    optimizer_params: dict[str, Any] = {"lr": float(t.lr), "weight_decay": float(t.weight_decay),
                                        "betas": [float(b) for b in t.betas]}
    if cpu:
        optimizer_params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": int(t.batch_size),
        "gradient_accumulation_steps": int(t.grad_accumulation),
        "train_batch_size": int(t.batch_size) * int(t.grad_accumulation) * world_size,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": int(t.steps), "warmup_min_lr": 0, "warmup_max_lr": float(t.lr),
            "warmup_num_steps": int(t.warmup_steps), "warmup_type": "linear"}},
        "bf16": {"enabled": str(t.precision) == "bf16" and not cpu},
        "fp16": {"enabled": str(t.precision) == "fp16" and not cpu},
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": not cpu,
                              "reduce_scatter": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    }
