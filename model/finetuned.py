"""Fine-tuned SAM mask decoders (the paper's mIoU* setting) and weight fingerprints.

A fine-tuned decoder file is safetensors with the ``mask_decoder`` state dict (keys relative to
``model.visual_model.mask_decoder``) and metadata: the fingerprint of the frozen weights it was
trained on (everything but the decoder), the method with its parameters in the LLM (``method``:
JSON of ``{name, ...params}``, ``null`` for plain LISA; ``csp.config.MethodConfig.spec``) and the
model name. Loading it into another model is an error; so is evaluating it under another method or
other parameters (a Table 6 column is one decoder). Files written before methods other than CSP
could be fine-tuned carry ``schedule`` (CSP's parameters, ``null``) instead; they are read as
``{"name": "csp", ...schedule}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MASK_DECODER_PREFIX = "model.visual_model.mask_decoder."
#: Elements per tensor that enter a fingerprint (strided sample; the whole tensor when smaller).
FINGERPRINT_SAMPLES = 4096


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], exclude: tuple[str, ...] = ()) -> str:
    """A sha256 over names, shapes, dtypes and a strided sample of every tensor's values.

    Cheap for a 13B model (no full pass over the weights) and different for any two checkpoints
    that differ beyond a vanishing chance (a sample of 4096 values per tensor).
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        if name.startswith(exclude):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].float().cpu().numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:32]


def upstream_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of everything the mask decoder's inputs depend on (all weights but the decoder)."""
    return weights_fingerprint(model.named_parameters(), exclude=(MASK_DECODER_PREFIX,))


def method_json(method: Mapping[str, Any] | None) -> str:
    """``{name, ...params}`` (None: plain LISA) -> the JSON that identifies it."""
    return json.dumps(dict(method) if method is not None else None, sort_keys=True)


def recorded_method(meta: Mapping[str, str]) -> str | None:
    """The method JSON of a decoder file's metadata (older files: from their CSP ``schedule``)."""
    if "method" in meta:
        return meta["method"]
    if "schedule" not in meta:
        return None
    schedule = json.loads(meta["schedule"])
    return method_json(None if schedule is None else {"name": "csp", **schedule})


def save_mask_decoder(model: torch.nn.Module, path: str | Path, *, method: Mapping[str, Any] | None,
                      model_name: str, fingerprint: str | None = None) -> Path:
    """Write ``model``'s mask decoder with the metadata that ties it to its frozen upstream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k[len(MASK_DECODER_PREFIX):]: v.detach().contiguous().cpu()
             for k, v in model.named_parameters() if k.startswith(MASK_DECODER_PREFIX)}
    meta = {"fingerprint": fingerprint or upstream_fingerprint(model), "method": method_json(method),
            "model_name": str(model_name), "kind": "lisa_mask_decoder"}
    save_file(state, str(path), metadata=meta)
    return path


def load_mask_decoder(model: torch.nn.Module, path: str | Path, *, method: Mapping[str, Any] | None,
                      check_method: bool = True) -> dict[str, str]:
    """Load a fine-tuned decoder into ``model`` (strict); returns its metadata.

    ``method``: ``{name, ...params}`` of the method this evaluation runs (None: plain LISA).
    Errors (before any weight changes): a missing file, a file of another kind, a decoder trained
    on other frozen weights, or (``check_method``) one trained under another method or parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.mask_decoder={str(path)!r}: no such file (expected the "
                                "mask_decoder.safetensors written by train_ds.py mode=decoder)")
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    if meta.get("kind") != "lisa_mask_decoder":
        raise ValueError(f"{path} is not a fine-tuned mask decoder written by train_ds.py (metadata {meta})")
    own = upstream_fingerprint(model)
    if meta.get("fingerprint") != own:
        raise ValueError(f"{path} was fine-tuned on another model ({meta.get('model_name')}, fingerprint "
                         f"{meta.get('fingerprint')}) than the one configured (fingerprint {own})")
    if check_method and recorded_method(meta) != method_json(method):
        raise ValueError(f"{path} was fine-tuned under method {recorded_method(meta)} but this evaluation runs "
                         f"{method_json(method)}; one decoder per method and parameters (Table 6 column)")
    state = load_file(str(path))
    decoder = dict(model.named_parameters())
    expected = {k[len(MASK_DECODER_PREFIX):] for k in decoder if k.startswith(MASK_DECODER_PREFIX)}
    if set(state) != expected:
        raise KeyError(f"{path}: keys differ from the model's mask decoder: missing "
                       f"{sorted(expected - set(state))[:10]}, unexpected {sorted(set(state) - expected)[:10]}")
    for key, tensor in state.items():  # every shape first: a mismatch leaves the model untouched
        target = decoder[MASK_DECODER_PREFIX + key]
        if target.shape != tensor.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, model {tuple(target.shape)}")
    with torch.no_grad():
        for key, tensor in state.items():
            target = decoder[MASK_DECODER_PREFIX + key]
            target.copy_(tensor.to(target.dtype))
    return meta
