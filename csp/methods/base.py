"""The method registry: every image-token reduction method is one small class.

A method may act in two places:

- before the LLM, on the CLIP tower's output: ``select_input`` (pick grid tokens that enter layer
  0; CSP's clustering) or ``reduce_images`` (new image-slot features, merged tokens included,
  each with the grid index it came from or -1; PruMerge, VisionZip);
- inside the LLM: ``plan`` returns the per-layer :class:`~csp.plan.TokenPlan` that
  :class:`csp.runner.StageRunner` executes (FastV, PyramidDrop, ...; CSP's scattering/pruning).

Add a method: a dataclass subclass of :class:`Method` in ``csp/methods/<name>.py`` decorated with
``@register_method("<name>")``, imported in ``csp/methods/__init__.py``, and a
``configs/method/<name>.yaml``; the registry-driven tests pick it up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from csp.plan import TokenPlan
from csp.strategies.base import ClusteringInputs


@dataclass
class VisionFeatures:
    """The CLIP tower's hidden states for a batch, for before-LLM reducers.

    Attributes:
        hidden_states: CLIP's ``output_hidden_states``; entry i (``B x (1 + N) x C``, CLS first) is
            the input of encoder layer i, the last entry the output of the last layer.
        layers: CLIP's encoder layers (to recompute a layer's attention or keys).
        select_layer: the hidden state LLaVA feeds the projector (-2).
        grid: (rows, cols) of the patch grid.
    """

    hidden_states: tuple[torch.Tensor, ...]
    layers: nn.ModuleList
    select_layer: int
    grid: tuple[int, int]

    def layer_input(self, layer: int) -> torch.Tensor:
        """Input hidden states of encoder layer ``layer`` (Python indexing, -1 = last)."""
        return self.hidden_states[layer % len(self.layers)]

    @property
    def features(self) -> torch.Tensor:
        """``B x (1 + N) x C`` hidden states LLaVA projects (CLS included)."""
        return self.hidden_states[self.select_layer]


@dataclass
class ReducedImages:
    """Image-slot features after a before-LLM reducer.

    Attributes:
        features: ``B x M x C`` CLIP-space features (projected by the caller), right padded.
        source: ``B x M`` grid index each came from (kept/merged-into tokens, ascending), or -1
            for tokens not on the grid (extra/contextual/CLS tokens).
        valid: ``B x M`` False on padding (per-sample counts differ, e.g. PruMerge's IQR).
    """

    features: torch.Tensor
    source: torch.Tensor
    valid: torch.Tensor


class Method(ABC):
    """One image-token reduction method (see the module docstring)."""

    name: ClassVar[str]

    #: CLIP layer whose CLS attention row ``select_input`` needs (None: not needed).
    cls_attention_layer: int | None = None

    @abstractmethod
    def plan(self, num_layers: int, num_image_tokens: int, *, always_move_tokens: bool = False) -> TokenPlan:
        """The in-LLM plan for a model with L layers and N grid tokens.

        ``always_move_tokens``: keep the stages whose event would keep every token (tests use it to
        check that gathering/scattering everything changes nothing).
        """

    def validate(self, num_layers: int, num_image_tokens: int) -> None:
        """Raise a ValueError naming the bad setting if the method cannot run on this model."""
        self.plan(num_layers, num_image_tokens).validate(num_layers)

    def select_input(self, inputs: ClusteringInputs) -> torch.Tensor | None:
        """``B x K`` grid indices entering layer 0 (ascending), or None (all of them)."""
        return None

    def reduce_images(self, vision: VisionFeatures) -> ReducedImages | None:
        """New image-slot features (merged tokens included), or None (the N grid tokens)."""
        return None

    #: Whether the image slot depends on the query (``reduce_queries``), not only on the image.
    per_query_reduction: bool = False

    def reduce_queries(self, vision: VisionFeatures, texts: Sequence[str],
                       image_texts: Sequence[str] | None = None) -> ReducedImages | None:
        """Per query text (B of them, all about the image of ``vision``), new image-slot features (in any
        order; ``source`` lists each one's grid index), or None: the image-level slot (``reduce_images``, or
        the N grid tokens). ``image_texts``: every query of the image. Used where ``per_query_reduction``
        (LiteLVLM's own order)."""
        return None

    def input_tokens(self, num_image_tokens: int) -> int | None:
        """Image-slot tokens entering the LLM per sample (None: data-dependent)."""
        return num_image_tokens

    def image_tokens_per_layer(self, num_layers: int, num_image_tokens: int) -> list[int] | None:
        """Image tokens each layer processes (length L), or None when they depend on the data."""
        n_in = self.input_tokens(num_image_tokens)
        if n_in is None:
            return None
        return self.plan(num_layers, num_image_tokens).image_tokens_per_layer(num_layers, n_in)

    def data_dependent(self) -> str | None:
        """Why the token counts depend on the data (None: they do not)."""
        return None

    def count_range(self, num_layers: int, num_image_tokens: int) -> tuple[list[int], list[int]] | None:
        """Least and most image tokens per layer where counts depend on the data (None: unbounded
        or not data-dependent)."""
        return None

    def check(self) -> None:
        """Raise on settings that can be checked without a model (an unknown option, a missing
        weights file); runs before any data or weights are read. Nothing heavy is loaded here."""
        return None

    def check_model(self, model: Mapping[str, Any]) -> None:
        """Raise where the settings cannot run on the model config ``model`` (its ``model`` node: e.g. a CLIP
        text side of another width than its vision tower); reads config files only, like :meth:`check`."""
        return None

    def extra_cost(self) -> dict[str, float]:
        """Cost this method spent outside the LLM so far (e.g. a detector before it), reported in
        its own columns: ``segmenter_calls``, ``segmenter_ms`` (per image), ``segmenter_gflops``."""
        return {}

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({fields})"

    @classmethod
    def from_config(cls, params: Mapping[str, Any]) -> Method:
        """Build from a config mapping (``configs/method/<name>.yaml`` without ``name``)."""
        try:
            return cls(**dict(params))
        except TypeError as err:
            raise ValueError(f"bad parameters {dict(params)} for method {cls.name!r}: {err}") from err


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def build_method(cfg: Mapping[str, Any]) -> Method:
    """``{name: <registered name>, ...parameters}`` -> a method; unknown names list the valid ones."""
    if "name" not in cfg:
        raise ValueError(f"method config {dict(cfg)} has no 'name'; registered: {sorted(METHODS)}")
    name = str(cfg["name"])
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name].from_config({k: v for k, v in cfg.items() if k != "name"})


def check_int(owner: str, field: str, value: Any, minimum: int) -> None:
    """ValueError naming ``owner.field`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{field} must be an integer >= {minimum}, got {value!r}")


def check_layers(owner: str, field: str, layers: Any, num_layers: int, minimum: int = 1) -> None:
    """Layer indices must be ascending and within ``minimum..L-1``."""
    values = list(layers)
    if values != sorted(set(values)) or any(not minimum <= v < num_layers for v in values):
        raise ValueError(f"{owner}.{field} = {values}: expected distinct ascending layers in "
                         f"{minimum}..{num_layers - 1} (the model has {num_layers} layers)")


def check_layer_counts(owner: str, layers: Any, keep: Any, num_layers: int, num_image_tokens: int) -> None:
    """Prune points ``layers`` (ascending) with one kept count each, non-increasing and <= N
    (PyramidDrop's and SparseVLM's ``layers`` / ``keep``)."""
    check_layers(owner, "layers", layers, num_layers)
    if len(keep) != len(layers):
        raise ValueError(f"{owner}.keep {list(keep)} needs one count per layer of {list(layers)}")
    for k in keep:
        check_int(owner, "keep[]", k, 1)
    if list(keep) != sorted(keep, reverse=True) or keep[0] > num_image_tokens:
        raise ValueError(f"{owner}.keep {list(keep)} must be non-increasing and <= N = {num_image_tokens}")
