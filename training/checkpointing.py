"""Training checkpoints without pickles: safetensors for tensors, JSON for everything else.

A checkpoint directory ``<run dir>/checkpoints/step_<NNNNNNN>/`` holds

- ``trainable.safetensors``: the trainable parameters by name (LoRA adapters under peft's names),
  with the model fingerprint in the file's metadata;
- ``config.yaml``: the resolved config that produced them;
- ``state.json``: step, mode, fingerprint, data order, scheduler state, the optimizer's structure
  (tensors replaced by references into ``optimizer.safetensors``);
- ``optimizer.safetensors`` and ``rng.safetensors`` (torch CPU/CUDA generator states).

Directories are written under a temporary name and renamed when complete, and
``checkpoints/latest.json`` is replaced atomically afterwards, so an interrupted save (or a run
stopped by a NaN loss) always leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
TENSOR_REF = "__tensor__"


# -- nested state <-> (JSON skeleton, flat tensors) ------------------------------------------------
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """A JSON-able skeleton of ``obj`` (dicts, lists, tuples, numbers, strings, None, tensors);
    tensors go to ``tensors`` under their path and are referenced as ``{"__tensor__": path}``.
    Dict keys keep their type (int keys of optimizer states) through ``[[key, value], ...]`` lists.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().cpu()
        return {TENSOR_REF: path}
    if isinstance(obj, Mapping):
        return {"__dict__": [[k, flatten_state(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint (JSON/safetensors only)")


def storable_items(state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``state`` that :func:`flatten_state` can store. DeepSpeed's ZeRO optimizer
    state also holds helper objects (its loss scaler, fragment addresses) that it rebuilds itself
    when an entry is absent; the tensors and numbers it needs to resume are kept."""
    kept = {}
    for key, value in state.items():
        try:
            flatten_state(value, {})
        except TypeError:
            continue
        kept[key] = value
    return kept


def unflatten_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if TENSOR_REF in obj:
            return tensors[obj[TENSOR_REF]]
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# -- RNG --------------------------------------------------------------------------------------------
def rng_tensors() -> dict[str, torch.Tensor]:
    """torch's CPU generator state and every CUDA device's (uint8 tensors)."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    return out


def restore_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# -- save / load ------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(root: Path, step: int, *, trainable: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                    optimizer_state: Any, cfg: DictConfig, fingerprint: str, keep: int | None = None,
                    rank_suffix: str = "", write_latest: bool = True) -> Path:
    """Write checkpoint ``step`` under ``root`` (atomically) and point ``latest.json`` at it.

    ``optimizer_state``: any nested state (torch's ``Optimizer.state_dict()``, a DeepSpeed
    partition); ``rank_suffix`` names per-rank optimizer files (ZeRO partitions).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"),
              metadata={"fingerprint": fingerprint, "step": str(step)})
    opt_tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(optimizer_state, opt_tensors)
    save_file(opt_tensors, str(tmp / f"optimizer{rank_suffix}.safetensors"))
    (tmp / f"optimizer{rank_suffix}.json").write_text(json.dumps(skeleton))
    save_file(rng_tensors(), str(tmp / f"rng{rank_suffix}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "fingerprint": fingerprint}, indent=1))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if write_latest:
        mark_latest(root, step)
    if keep:
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
        for path in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(path)
    return final


def save_rank_files(path: Path, optimizer_state: Any, rank_suffix: str) -> None:
    """Another rank's optimizer partition and RNG state, into checkpoint ``path`` written by rank 0."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(optimizer_state, tensors)
    save_file(tensors, str(path / f"optimizer{rank_suffix}.safetensors"))
    (path / f"optimizer{rank_suffix}.json").write_text(json.dumps(skeleton))
    save_file(rng_tensors(), str(path / f"rng{rank_suffix}.safetensors"))


def mark_latest(root: Path, step: int) -> None:
    """Point ``latest.json`` at step ``step`` (atomically: the old pointer stays valid until then)."""
    _write_json_atomic(root / LATEST, {"step": step, "dir": step_dir_name(step)})


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``latest.json`` points at (None when there is none)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / json.loads(pointer.read_text())["dir"]
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file, the step and what to do."""


def _read(path: Path, name: str, reader: Any) -> Any:
    """``reader(path / name)``, or a CheckpointError naming the file, the checkpoint's step and the
    other complete checkpoints a run could resume from instead."""
    try:
        return reader(path / name)
    except (OSError, ValueError, SafetensorError) as err:  # missing, truncated, not JSON, a torn header
        others = sorted(p for p in path.parent.glob("step_*") if p != path and (p / "state.json").is_file())
        hint = (f"resume from an earlier complete checkpoint with trainer.resume={others[-1]}" if others else
                "no other complete checkpoint is left (trainer.keep_checkpoints); start the run again")
        raise CheckpointError(f"checkpoint {path.name} (step {_step_of(path)}): {path / name} cannot be read "
                              f"({type(err).__name__}: {err}); {hint}") from err


def _step_of(path: Path) -> str:
    return path.name.split("_")[-1].lstrip("0") or "0"


def load_checkpoint(path: Path, fingerprint: str, rank_suffix: str = "") -> dict[str, Any]:
    """``{"trainable", "state", "optimizer", "rng"}`` of a checkpoint directory; a checkpoint of
    another model / mode / method (fingerprint) is an error, never a silent mix; a damaged file is an
    error naming it and the step (:class:`CheckpointError`)."""
    state = _read(path, "state.json", lambda p: json.loads(p.read_text()))
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"checkpoint {path} was written for another model, mode or method (fingerprint "
            f"{state.get('fingerprint')!r}, this run {fingerprint!r}); compare {path / 'config.yaml'} with this config"
        )
    structure = _read(path, f"optimizer{rank_suffix}.json", lambda p: json.loads(p.read_text()))
    tensors = _read(path, f"optimizer{rank_suffix}.safetensors", lambda p: load_file(str(p)))
    return {"trainable": _read(path, "trainable.safetensors", lambda p: load_file(str(p))), "state": state,
            "optimizer": unflatten_state(structure, tensors),
            "rng": _read(path, f"rng{rank_suffix}.safetensors", lambda p: load_file(str(p)))}


def safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
