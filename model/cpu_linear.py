"""fp32 CPU inference speed-up (the default there, `model.cpu_prepack: auto`): the LLM's linear layers run oneDNN
GEMMs on prepacked weights.

Why: on a CPU, a GEMM with few rows pays for packing its weight matrix on every call, a cost that
does not shrink with the rows. A pruned LLaMA layer (~64-94 rows) therefore runs its seven GEMMs at
~75 GFLOP/s where the 318-row plain layer reaches ~90 (docs/performance.md, "Where the CPU gap
is"); with the weights packed once into oneDNN's blocked layout, both run at ~96-103. This is what
inductor's CPU "freezing" does for a compiled graph, done here for the eager runner.

How: :func:`prepack_cpu_linears` gives each ``nn.Linear`` of the decoder layers a packed copy of its
weight (a non-persistent buffer, so state dicts and checkpoints are unchanged) and an instance-level
``forward`` (no class is patched) that calls ``torch.ops.mkldnn._linear_pointwise``. Outputs equal
``F.linear`` up to fp32 rounding (different summation order). When gradients are needed the layer
falls back to ``F.linear`` on the real weight, and a weight changed in place (an optimizer step) is
repacked on the next call, so a stale copy is never used.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

PACKED = "_prepacked_weight"


def _pack(linear: nn.Linear) -> None:
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
    linear.register_buffer(PACKED, packed, persistent=False)
    linear._prepacked_version = linear.weight._version


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
        return F.linear(x, self.weight, self.bias)
    if self.weight._version != self._prepacked_version:  # changed in place since it was packed
        _pack(self)
    return torch.ops.mkldnn._linear_pointwise(x, getattr(self, PACKED), self.bias, "none", [], "")


def check_prepack_supported(device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming what is wrong unless prepacking can run (fp32 on a CPU with oneDNN)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        raise ValueError(f"cpu_prepack needs a float32 model on the CPU, got {dtype} on {device} (on a GPU the "
                         "GEMM libraries pack internally; leave cpu_prepack false there)")
    if not torch.backends.mkldnn.is_available():
        raise ValueError("cpu_prepack needs a torch built with oneDNN (torch.backends.mkldnn.is_available() is False)")


def prepack_cpu_linears(layers: nn.Module) -> int:
    """Prepack every ``nn.Linear`` under ``layers`` (e.g. ``model.model.layers``); returns how many.

    Apply after the model has its final device and dtype (the packed copy does not follow ``.to``).
    """
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("prepack_cpu_linears: no nn.Linear under the given module")
    weight = linears[0].weight
    check_prepack_supported(weight.device, weight.dtype)
    for linear in linears:
        _pack(linear)
        linear.forward = types.MethodType(_packed_forward, linear)
    return len(linears)


def is_prepacked(linear: nn.Module) -> bool:
    return hasattr(linear, PACKED)
