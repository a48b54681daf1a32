"""Efficiency accounting for LVLM_CSP (paper section 3.4 and 4.1, eqs. 9-11).

Units: token counts are plain integers; FLOPs are floating-point operations with one
multiply-add counted as 2 FLOPs (the convention of the paper's TFLOPs column); ``TFLOPs`` keys
hold FLOPs / 1e12. Only the LLM decoder layers are counted (attention and FFN), as in the paper:
no embedding, LM head, vision tower, projector, SAM, or clustering-module cost.

Two sources of per-layer token counts are supported:

- static: a :class:`~csp.schedule.StageSchedule` or any registered method (csp.methods) and an
  assumed text length (:func:`static_row`), which reproduces the paper's tables; methods whose
  counts depend on the data (PruMerge's IQR, FEATHER's grid union) have no static row;
- runtime: what each layer actually processed for each sample (:class:`TokenRecord`,
  produced by the model runner), summarised by :func:`summarize_records`.

The roofline (:func:`roofline`) uses the same per-layer FLOPs and a bytes model
(:func:`layer_weight_bytes`, :func:`layer_activation_bytes`) with a device's measured matmul
throughput and memory bandwidth; ``scripts/benchmark.py`` is its only consumer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class TokenCounts(Protocol):
    """Anything that prescribes per-layer image-token counts: a StageSchedule or a Method."""

    def validate(self, num_layers: int, num_image_tokens: int) -> None: ...

    def image_tokens_per_layer(self, num_layers: int, num_image_tokens: int) -> list[int] | None: ...


class DataDependentCountError(ValueError):
    """The method's token counts depend on the data, so there is no static Navg / TFLOPs."""

#: Text tokens (system + user prompt + answer) of a typical LISA evaluation prompt; with it the
#: LLaVA-1.5-7B / 224 baseline comes to 4.17 TFLOPs (the paper's Table 6: 4.12).
DEFAULT_TEXT_TOKENS = 62

TERA = 1e12


@dataclass(frozen=True)
class ModelDims:
    """Decoder dimensions that the FLOPs formula needs.

    Attributes:
        hidden_size: d, the hidden state size.
        intermediate_size: m, the FFN intermediate size.
        num_layers: L, the number of decoder layers.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """Read d, m, L from a Hugging Face LLaMA-style config (attributes or a mapping)."""
        get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k)
        return cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
        )


#: The language models of the paper (LLaVA-1.5 uses LLaMA-2 7B / 13B).
MODEL_DIMS: dict[str, ModelDims] = {
    "llama7b": ModelDims(hidden_size=4096, intermediate_size=11008, num_layers=32),
    "llama13b": ModelDims(hidden_size=5120, intermediate_size=13824, num_layers=40),
    # the toy LISA of configs/model/toy.yaml (trained here on the toy world)
    "toy": ModelDims(hidden_size=128, intermediate_size=256, num_layers=8),
}


def layer_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one decoder layer over n tokens (paper eq. 10-11).

    The paper's cost is 4nd^2 + 2n^2 d + 3ndm multiply-adds: Q, K, V and output projections
    (4nd^2), attention scores and weighted values (2n^2 d) and the gated FFN (3ndm). A
    multiply-add is counted as 2 FLOPs, so this returns 2 * (4nd^2 + 2n^2 d + 3ndm) FLOPs.
    """
    return 2.0 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)


def navg(image_tokens_per_layer: Sequence[int]) -> float:
    """Mean number of image tokens per decoder layer (eq. 9 generalised), in tokens."""
    if len(image_tokens_per_layer) == 0:
        raise ValueError("navg needs at least one layer")
    return sum(image_tokens_per_layer) / len(image_tokens_per_layer)


def total_flops(total_tokens_per_layer: Sequence[int], dims: ModelDims) -> float:
    """FLOPs of all decoder layers, layer i processing ``total_tokens_per_layer[i]`` tokens.

    Eq. 11 generalised to any per-layer token counts. Returns FLOPs (not TFLOPs).
    """
    _check_num_layers(total_tokens_per_layer, dims, "total_tokens_per_layer")
    d, m = dims.hidden_size, dims.intermediate_size
    return sum(layer_flops(n, d, m) for n in total_tokens_per_layer)


def static_row(
    dims: ModelDims,
    schedule: TokenCounts | None,
    num_image_tokens: int,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
) -> dict[str, Any]:
    """Navg and TFLOPs that a schedule (or method) prescribes, for one sample with ``text_tokens``
    text tokens.

    ``schedule=None`` is the plain model (all N image tokens in every layer). Returns a dict with
    ``Navg`` (float, tokens), ``Navg_floor`` (int, the paper rounds down), ``TFLOPs``
    (FLOPs / 1e12), ``image_tokens`` and ``total_tokens`` (per-layer lists, length L, where
    total = text_tokens + image tokens). Raises DataDependentCountError for data-dependent counts.
    """
    layers = dims.num_layers
    if schedule is None:
        image = [num_image_tokens] * layers
    else:
        schedule.validate(layers, num_image_tokens)
        image = schedule.image_tokens_per_layer(layers, num_image_tokens)
        if image is None:
            raise DataDependentCountError(f"{schedule!r}: its token counts depend on the data")
    return counts_row(dims, image, text_tokens)


def counts_row(dims: ModelDims, image: Sequence[int], text_tokens: int = DEFAULT_TEXT_TOKENS) -> dict[str, Any]:
    """:func:`static_row` for explicit per-layer image-token counts (length L)."""
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    _check_num_layers(image, dims, "image token counts")
    total = [text_tokens + n for n in image]
    return _summary(list(image), total, dims)


@dataclass
class TokenRecord:
    """Tokens that each decoder layer actually processed for one sample (length L each).

    Attributes:
        image_tokens: image tokens in layer i's input sequence.
        total_tokens: all tokens (text + image) in layer i's input sequence.
    """

    image_tokens: list[int]
    total_tokens: list[int]

    def __post_init__(self) -> None:
        if len(self.image_tokens) != len(self.total_tokens):
            raise ValueError(
                f"TokenRecord has {len(self.image_tokens)} image counts but "
                f"{len(self.total_tokens)} total counts"
            )
        if any(i > t for i, t in zip(self.image_tokens, self.total_tokens, strict=True)):
            raise ValueError("TokenRecord: a layer has more image tokens than tokens")

    def summarize(self, dims: ModelDims) -> dict[str, Any]:
        """Navg (tokens), Navg_floor, TFLOPs (FLOPs / 1e12) and the per-layer lists."""
        _check_num_layers(self.image_tokens, dims, "TokenRecord.image_tokens")
        return _summary(list(self.image_tokens), list(self.total_tokens), dims)


def summarize_records(records: Sequence[TokenRecord], dims: ModelDims) -> dict[str, float]:
    """Mean Navg (tokens) and mean TFLOPs (FLOPs / 1e12) per sample over ``records``."""
    if len(records) == 0:
        raise ValueError("summarize_records needs at least one record")
    summaries = [record.summarize(dims) for record in records]
    count = len(summaries)
    return {
        "num_samples": count,
        "Navg": sum(s["Navg"] for s in summaries) / count,
        "TFLOPs": sum(s["TFLOPs"] for s in summaries) / count,
    }


def _summary(image: list[int], total: list[int], dims: ModelDims) -> dict[str, Any]:
    return {
        "Navg": navg(image),
        "Navg_floor": sum(image) // len(image),
        "TFLOPs": total_flops(total, dims) / TERA,
        "image_tokens": image,
        "total_tokens": total,
    }


def _check_num_layers(per_layer: Sequence[int], dims: ModelDims, what: str) -> None:
    if len(per_layer) != dims.num_layers:
        raise ValueError(
            f"{what} has {len(per_layer)} entries, the model has {dims.num_layers} layers"
        )


# -- bytes and the roofline -------------------------------------------------------------------
#
# The roofline bounds the time of a decoder layer from below by what the device must do at least:
# its FLOPs at the device's matmul throughput, or the bytes it must read at the device's memory
# bandwidth, whichever is larger. FLOPs are ``layer_flops`` (the paper's count); bytes count the
# same weight matrices that eq. 10 counts (read once per layer per batch, however many samples)
# plus the activations an unfused LLaMA layer reads per token.

def layer_weight_bytes(d: int, m: int, element_bytes: float) -> float:
    """Bytes of one decoder layer's projection weights (4d^2 + 3dm elements; MHA as in eq. 10)."""
    return element_bytes * (4 * d * d + 3 * d * m)


def layer_activation_bytes(n: int, d: int, m: int, element_bytes: float) -> float:
    """Bytes of activations one decoder layer reads over n tokens, as an unfused layer reads them.

    Per token, in d-vectors: input norm 1, q/k/v projections 3, RoPE on q and k 2, attention reads
    q, k, v 3 (flash-style, no n x n matrix), o projection 1, residual add 2, post-attention norm 1,
    gate and up projections 2, residual add 2: 17 d; in m-vectors: SiLU(gate) * up reads 2, the down
    projection 1: 3 m. Total ``element_bytes * n * (17 d + 3 m)``.
    """
    return element_bytes * n * (17 * d + 3 * m)


def roofline(tokens_per_layer: Sequence[Sequence[int]], dims: ModelDims, *, flops_per_s: float,
             bytes_per_s: float, element_bytes: float) -> dict[str, Any]:
    """Roofline time of the decoder layers for a batch, per stage and in total.

    Args:
        tokens_per_layer: per sample, the total tokens each layer processed (length L each), e.g.
            the ``total_tokens`` of the runner's :class:`TokenRecord` s; one entry = batch 1.
        dims: the model's d, m, L.
        flops_per_s: the device's measured matmul throughput (FLOP/s).
        bytes_per_s: the device's measured memory bandwidth (bytes/s).
        element_bytes: bytes per weight/activation element (2 for bf16, 4 for fp32).

    Returns a dict: ``seconds`` (sum over layers of max(FLOPs / throughput, bytes / bandwidth)),
    ``flops`` (:func:`layer_flops` summed over samples and layers), ``bytes`` (weights once per layer
    plus every sample's activations), and ``stages``: one entry per run of consecutive layers with
    the same token counts, each with ``first_layer``, ``num_layers``, ``tokens`` (per sample),
    ``flops``, ``bytes``, ``seconds`` and ``bound`` (``compute`` or ``memory``).
    """
    if len(tokens_per_layer) == 0:
        raise ValueError("roofline needs at least one sample")
    if flops_per_s <= 0 or bytes_per_s <= 0:
        raise ValueError(f"roofline needs positive throughput and bandwidth, got {flops_per_s}, {bytes_per_s}")
    for sample in tokens_per_layer:
        _check_num_layers(sample, dims, "tokens_per_layer[i]")
    d, m = dims.hidden_size, dims.intermediate_size
    stages: list[dict[str, Any]] = []
    for layer in range(dims.num_layers):
        tokens = [int(sample[layer]) for sample in tokens_per_layer]
        flops = sum(layer_flops(n, d, m) for n in tokens)
        nbytes = layer_weight_bytes(d, m, element_bytes) + sum(layer_activation_bytes(n, d, m, element_bytes)
                                                               for n in tokens)
        seconds = max(flops / flops_per_s, nbytes / bytes_per_s)
        if stages and stages[-1]["tokens"] == tokens:
            stage = stages[-1]
            stage["num_layers"] += 1
            stage["flops"] += flops
            stage["bytes"] += nbytes
            stage["seconds"] += seconds
        else:
            stages.append({"first_layer": layer, "num_layers": 1, "tokens": tokens, "flops": flops,
                           "bytes": nbytes, "seconds": seconds,
                           "bound": "compute" if flops / flops_per_s >= nbytes / bytes_per_s else "memory"})
    return {
        "seconds": sum(s["seconds"] for s in stages),
        "flops": sum(s["flops"] for s in stages),
        "bytes": sum(s["bytes"] for s in stages),
        "stages": stages,
    }
