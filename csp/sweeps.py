"""wandb sweep files (``sweeps/*.yaml``) for ``eval_ds.py``: reading, expanding and writing.

A sweep file is a wandb sweep configuration whose ``command`` hands the parameters to Hydra as
plain overrides (wandb's ``${args_no_hyphens}`` renders each parameter as ``name=value``)::

    program: eval_ds.py
    method: grid
    command: [${env}, ${interpreter}, ${program}, ${args_no_hyphens}]
    parameters:
      +exp: {value: llava7b_224_p70}
      schedule.Lc: {values: [6, 7, 8]}

Run it with ``wandb sweep sweeps/<file>.yaml`` then ``wandb agent <id>`` from the repository root.
A parameter ``schedule`` whose values are strings like ``{Lc:7,Nc:80,Ls:7,Np:8}`` sets the four
numbers together (Hydra merges a dict override into the schedule node): that is how a list of
specific settings (e.g. the schedule search's candidates) is written as a grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from csp.schedule import StageSchedule

COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
PROGRAM = "eval_ds.py"


class SweepFileError(ValueError):
    """A sweep file that wandb or eval_ds.py would not run as intended."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file: program, command, grid parameters."""
    path = Path(path)
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict):
        raise SweepFileError(f"{path}: expected a mapping (a wandb sweep configuration)")
    if sweep.get("program") != PROGRAM:
        raise SweepFileError(f"{path}: program must be {PROGRAM!r}, got {sweep.get('program')!r}")
    if sweep.get("command") != COMMAND:
        raise SweepFileError(f"{path}: command must be {COMMAND} (Hydra takes name=value overrides), "
                             f"got {sweep.get('command')!r}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepFileError(f"{path}: parameters must be a non-empty mapping")
    for name, spec in params.items():
        if not isinstance(spec, dict) or ("value" in spec) == ("values" in spec):
            raise SweepFileError(f"{path}: parameters.{name} needs exactly one of 'value' or 'values' "
                                 "(grid sweeps only use fixed values and lists)")
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise SweepFileError(f"{path}: parameters.{name}.values must be a non-empty list")
    return sweep


def grid_points(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every parameter combination of a grid sweep, in wandb's order (the last parameter fastest)."""
    params = sweep["parameters"]
    names = list(params)
    axes = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]


def overrides(point: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides wandb passes for ``point`` (``${args_no_hyphens}``: ``f"{name}={value}"``)."""
    return [f"{name}={value}" for name, value in point.items()]


def schedule_override(schedule: StageSchedule) -> str:
    """``{Lc:7,Nc:80,Ls:7,Np:8}``: the four numbers as one Hydra dict value (merged into ``schedule``)."""
    return f"{{Lc:{schedule.Lc},Nc:{schedule.Nc},Ls:{schedule.Ls},Np:{schedule.Np}}}"


def sweep_config(base: Sequence[str], grid: Mapping[str, Sequence[Any]], *, name: str,
                 metric: str | None = None, description: str | None = None) -> dict[str, Any]:
    """A grid sweep over ``grid`` (parameter -> values) with the fixed Hydra overrides ``base``
    (``key=value`` strings); ``name`` becomes the run's ``name`` (and the metric's prefix)."""
    params: dict[str, Any] = {}
    for item in base:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepFileError(f"base override {item!r} is not key=value")
        params[key] = {"value": value}  # kept as typed: wandb renders it back verbatim
    params["name"] = {"value": name}
    for key, values in grid.items():
        params[key] = {"values": list(values)}
    sweep: dict[str, Any] = {"program": PROGRAM, "method": "grid", "name": name}
    if description:
        sweep["description"] = description
    sweep["metric"] = {"name": metric or f"{name}/gIoU_mean", "goal": "maximize"}
    sweep["command"] = list(COMMAND)
    sweep["parameters"] = params
    return sweep


def write_sweep(path: str | Path, sweep: Mapping[str, Any], header: str = "") -> Path:
    """Write ``sweep`` as YAML (with ``header`` as leading comment lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(dict(sweep), sort_keys=False, width=120))
    return path
