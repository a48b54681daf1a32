"""Every sweeps/*.yaml: wandb's own rendering of each grid point gives Hydra overrides that compose
with configs/eval.yaml into a schedule valid for the model (invalid combinations are kept out of
the grids; the validator names any that slip in).

Composition costs ~0.1-0.2 s per call, so files with more than ``FULL_COMPOSE`` points are composed
for their first point with every parameter set, and once per distinct value of each parameter;
every point's schedule is then built from the composed config with the point's overrides parsed by
Hydra's own override parser, and validated. Smaller files are composed point by point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from csp.config import method_from_config
from csp.schedule import ScheduleError, StageSchedule
from csp.search import MODEL_SHAPES
from csp.sweeps import COMMAND, SweepFileError, grid_points, load_sweep, overrides

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
FULL_COMPOSE = 16
PARSER = OverridesParser.create()


def compose_eval(args: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="eval", overrides=args)


def wandb_args(point: dict[str, Any]) -> list[str]:
    """What ``${args_no_hyphens}`` expands to for ``point`` (wandb's own function)."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args_no_hyphens"]


def point_schedule(base_schedule: dict[str, Any], args: list[str]) -> StageSchedule:
    """The schedule a point's overrides give on top of the composed base schedule node."""
    schedule = OmegaConf.create(dict(base_schedule))
    for override in PARSER.parse_overrides(args):
        key, value = override.key_or_group, override.value()
        if key == "schedule":
            schedule = OmegaConf.merge(schedule, value)
        elif key.startswith("schedule."):  # nested keys too (schedule.clustering_kwargs.weight)
            OmegaConf.update(schedule, key.split(".", 1)[1], value, merge=True)
    return StageSchedule.from_mapping(OmegaConf.to_container(schedule, resolve=True))


def validate_point(cfg: Any) -> None:
    """The composed point's method (a CSP schedule or a configs/method node) against its model."""
    layers, tokens = MODEL_SHAPES[cfg.model.name]
    method = method_from_config(cfg).method
    assert method is not None, "a sweep point evaluates plain LISA only"
    method.validate(layers.num_layers, tokens)


def invalid_points(sweep: dict[str, Any]) -> list[tuple[list[str], str]]:
    """(overrides, validator message) of the grid points whose schedule (or method) the model rejects."""
    points = grid_points(sweep)
    cfg = compose_eval(wandb_args(points[0]))
    if cfg.get("schedule") is None:  # another method: its points are few, each composed
        bad = []
        for point in points:
            args = wandb_args(point)
            try:
                validate_point(compose_eval(args))
            except ValueError as err:
                bad.append((args, str(err)))
        return bad
    layers, tokens = MODEL_SHAPES[cfg.model.name]
    base = OmegaConf.to_container(cfg.schedule, resolve=True)
    bad = []
    for point in points:
        args = wandb_args(point)
        try:
            point_schedule(base, args).validate(layers.num_layers, tokens)
        except ScheduleError as err:
            bad.append((args, str(err)))
    return bad


def test_there_is_a_sweep_for_every_registered_method() -> None:
    from csp.methods.base import METHODS

    swept = set()
    for path in SWEEPS:
        method = method_from_config(compose_eval(wandb_args(grid_points(load_sweep(path))[0]))).method
        swept.add(method.name)
    assert swept >= set(METHODS), sorted(set(METHODS) - swept)


def test_there_is_a_sweep_per_model_and_resolution() -> None:
    models = set()
    for path in SWEEPS:
        first = grid_points(load_sweep(path))[0]
        models.add(compose_eval(wandb_args(first)).model.name)
    assert {"tiny", "llava7b_224", "llava7b_336", "llava13b_224"} <= models


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
@pytest.mark.slow
def test_sweep_file_composes_and_every_setting_is_valid(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep["command"] == COMMAND and sweep["program"] == "eval_ds.py" and sweep["method"] == "grid"
    points = grid_points(sweep)
    for point in points:
        assert wandb_args(point) == overrides(point)  # our rendering is wandb's
    if len(points) <= FULL_COMPOSE:
        for point in points:
            cfg = compose_eval(wandb_args(point))
            validate_point(cfg)
            assert cfg.name == sweep["parameters"]["name"]["value"]
    else:
        assert compose_eval(wandb_args(points[0])).get("schedule") is not None, "method sweeps stay small"
        first = points[0]
        compose_eval(wandb_args(first))
        for key, spec in sweep["parameters"].items():
            for value in spec.get("values", []):
                cfg = compose_eval(wandb_args({**first, key: value}))
                assert OmegaConf.select(cfg, key.lstrip("+")) == value or key.startswith("+")
    assert invalid_points(sweep) == []
    # the metric wandb optimises is one that evaluation logs: <name>/gIoU_mean
    assert sweep["metric"]["name"] == f"{sweep['parameters']['name']['value']}/gIoU_mean"


def test_invalid_combinations_are_named_by_the_validator(tmp_path: Path) -> None:
    # tiny model, L = 6: Lc + Ls = 4 + 3 = 7 > 6 is the only invalid combination (Lc + Ls = 6 leaves no
    # pruning layer, which the schedule allows: no pruning stage).
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "program": "eval_ds.py", "method": "grid", "command": COMMAND, "metric": {"name": "x/gIoU_mean"},
        "parameters": {"+exp": {"value": "demo_tiny"}, "name": {"value": "x"},
                       "schedule.Lc": {"values": [3, 4]}, "schedule.Ls": {"values": [2, 3]}}}))
    bad = invalid_points(load_sweep(path))
    assert [args for args, _ in bad] == [["+exp=demo_tiny", "name=x", "schedule.Lc=4", "schedule.Ls=3"]]
    assert "Lc + Ls = 4 + 3 = 7 exceeds the model's 6 decoder layers" in bad[0][1]


@pytest.mark.parametrize("change, message", [
    ({"program": "train.py"}, "program must be 'eval_ds.py'"),
    ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "command must be"),
    ({"parameters": {"schedule.Lc": {"values": []}}}, "values must be a non-empty list"),
    ({"parameters": {"schedule.Lc": {"min": 1, "max": 3}}}, "exactly one of 'value' or 'values'"),
])
def test_malformed_sweep_files_are_rejected(tmp_path: Path, change: dict, message: str) -> None:
    sweep = {"program": "eval_ds.py", "method": "grid", "command": COMMAND,
             "parameters": {"+exp": {"value": "demo_tiny"}}, **change}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(SweepFileError, match=message):
        load_sweep(path)
