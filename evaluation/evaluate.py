"""``evaluate(cfg)``: one model, plain LISA and/or one LVLM_CSP schedule, on the configured splits.

Order of checks (fail before anything expensive): split names, the schedule's keys, the baseline
file, the model paths, then the data sets (layout errors), then the model is loaded. Outputs in
the run directory: ``metrics.json``, ``table.txt`` (the printed rows), ``results.jsonl`` (merged)
and ``results.rank<r>.jsonl`` (append-only, for resume); with ``baseline: same_run`` the plain model's files go to
``<run dir>/baseline/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from csp.schedule import StageSchedule
from datasets.base import ImageGroup
from datasets.miniature import MiniatureSpec, write_miniature
from datasets.splits import check_split, load_groups
from datasets.toy import ToySpec, write_toyref
from evaluation import records as rec
from evaluation.distributed import DistContext, barrier, broadcast_object, gather_to_main, init_distributed, shard
from evaluation.loop import Pipeline, SampleFailedError, SampleOutcome, evaluate_group
from evaluation.report import giou_by_split, read_baseline, summarize, table, write_metrics

SAME_RUN = "same_run"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingOptions:
    """How one setting is run and reported."""

    name: str
    resume: bool = False
    strict: bool = False
    queries_per_batch: int | None = None
    extra: Mapping[str, Any] | None = None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns ``{"method": metrics, "baseline": metrics | None}`` on every rank."""
    ctx = init_distributed()
    torch.manual_seed(int(cfg.get("seed", 0)))
    out_dir = output_dir(cfg)
    splits = [str(s) for s in cfg.data.splits]
    for split in splits:
        check_split(split)
    schedule_cfg = OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") is not None else None
    schedule = StageSchedule.from_mapping(schedule_cfg)
    baseline = cfg.get("baseline")
    baseline_giou = read_baseline(baseline) if baseline not in (None, SAME_RUN) else None
    if baseline_giou is not None and (missing := [s for s in splits if s not in baseline_giou]):
        raise ValueError(f"baseline {baseline} has no gIoU for the configured splits {missing}; "
                         f"it has {sorted(baseline_giou)}")
    _check_model_paths(cfg.model)
    if schedule is not None:
        from model.builder import layers_and_image_tokens

        schedule.validate(*layers_and_image_tokens(cfg.model))  # before any data or weights are read
    dataset_dir = prepare_dataset_dir(cfg, out_dir, ctx)
    groups = load_all_groups(splits, dataset_dir, cfg.get("max_samples_per_split"))

    from model.builder import build_from_config
    from model.pipeline import SegmentationPipeline

    bundle = build_from_config(cfg.model)
    logger = make_logger(cfg, out_dir, ctx)
    common = {"resume": bool(cfg.get("resume", False)), "strict": bool(cfg.get("strict", False)),
              "queries_per_batch": cfg.get("queries_per_batch")}
    model_info = {"model": cfg.model.get("name"), "dataset_dir": str(dataset_dir)}
    results: dict[str, Any] = {"baseline": None}
    if schedule is None or baseline == SAME_RUN:
        plain = SegmentationPipeline(bundle, schedule=None)
        name = f"LISA ({cfg.model.get('name')})"
        base_dir = out_dir if schedule is None else out_dir / "baseline"
        opts = SettingOptions(name=name, extra={**model_info, "schedule": None}, **common)
        base_ref = None if baseline == SAME_RUN else baseline_giou
        metrics = evaluate_setting(plain, groups, splits, base_dir, ctx, opts, baseline_giou=base_ref, logger=logger)
        if baseline == SAME_RUN:
            baseline_giou = giou_by_split(metrics)
            metrics = _zero_drop(metrics, base_dir, ctx)
        results["baseline" if schedule is not None else "method"] = metrics
    if schedule is not None:
        pipe = SegmentationPipeline(bundle, schedule=schedule)
        schedule.validate(pipe.num_layers, pipe.num_image_tokens)
        opts = SettingOptions(name=str(cfg.get("name") or schedule.describe()),
                              extra={**model_info, "schedule": schedule_cfg}, **common)
        results["method"] = evaluate_setting(pipe, groups, splits, out_dir, ctx, opts,
                                             baseline_giou=baseline_giou, logger=logger)
    if ctx.is_main:
        rows = [m for m in (results["baseline"], results["method"]) if m is not None]
        text = table(rows)
        (out_dir / "table.txt").write_text(text + "\n")
        print(text, flush=True)
    if logger is not None:
        logger.finish()
    return results


def evaluate_setting(pipe: Pipeline, groups: Sequence[ImageGroup], splits: Sequence[str], out_dir: Path,
                     ctx: DistContext, opts: SettingOptions, *, baseline_giou: Mapping[str, float] | None = None,
                     logger: Any = None, on_outcome: Callable[[SampleOutcome], None] | None = None) -> dict[str, Any]:
    """Run ``pipe`` over this rank's share of ``groups``, append records, merge and score on rank 0.

    Returns the metrics.json mapping (the same on every rank); writes ``metrics.json`` and
    ``results.jsonl`` in ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and opts.resume:
        rec.repair_all(out_dir)
    elif ctx.is_main:
        rec.clear_results(out_dir)
    barrier(ctx)  # every rank reads the (repaired) files only after this
    skip = rec.finished_keys(out_dir) if opts.resume else set()
    if opts.resume and ctx.is_main:
        log.info("resume: %d finished samples in %s", len(skip), out_dir)
        if not skip:
            log.warning("resume=true but %s holds no finished samples: pass the old run's hydra.run.dir", out_dir)
    with rec.RecordWriter(rec.rank_file(out_dir, ctx.rank)) as writer:
        for group in shard(groups, ctx):
            for outcome in evaluate_group(pipe, group, skip=skip, queries_per_batch=opts.queries_per_batch):
                writer.write(outcome.record)
                if on_outcome is not None:
                    on_outcome(outcome)
                if logger is not None and ctx.is_main and logger.wants(outcome):
                    logger.add_overlay(outcome)
                if opts.strict and outcome.record["status"] != "ok":
                    raise SampleFailedError(f"strict=true: {outcome.record['split']} "
                                            f"{outcome.record['sample_id']} failed: {outcome.record['reason']}")
    own = rec.read_records(rec.rank_file(out_dir, ctx.rank))
    if ctx.is_main:  # records left by ranks of an earlier run with more processes
        own += [r for path in rec.orphan_rank_files(out_dir, ctx.world_size) for r in rec.read_records(path)]
    gathered = gather_to_main(own, ctx)
    metrics = None
    if ctx.is_main:
        targets = [(s.split, s.sample_id) for g in groups for s in g.samples]
        merged = rec.merge_records((r for part in gathered for r in part), targets, splits)
        missing = len(set(targets)) - len(merged)
        if missing:
            raise RuntimeError(f"{missing} samples have no record in {out_dir}; is the run directory shared by "
                               "all ranks?")
        rec.write_merged(out_dir / rec.MERGED, merged)
        metrics = summarize(merged, splits, name=opts.name, baseline_giou=baseline_giou, extra=opts.extra)
        write_metrics(out_dir / "metrics.json", metrics)
        if logger is not None:
            logger.log_setting(opts.name, metrics)
    return broadcast_object(metrics, ctx)


def _zero_drop(metrics: dict[str, Any], out_dir: Path, ctx: DistContext) -> dict[str, Any]:
    """The same-run baseline's own mIoU_drop is 0 by definition (Table 1's first row)."""
    metrics["summary"]["mIoU_drop"] = 0.0
    if ctx.is_main:
        write_metrics(out_dir / "metrics.json", metrics)
    return metrics


def load_all_groups(splits: Sequence[str], dataset_dir: Path, max_samples: int | None) -> list[ImageGroup]:
    """Image groups of every split, split after split (layout errors are raised here)."""
    return [group for split in splits for group in load_groups(split, dataset_dir, max_samples)]


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` if set, else Hydra's run directory."""
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("output_dir is not set and there is no Hydra run directory; set output_dir=<dir>")
    return Path(HydraConfig.get().runtime.output_dir)


def prepare_dataset_dir(cfg: DictConfig, out_dir: Path, ctx: DistContext) -> Path:
    """``cfg.dataset_dir``, or the miniature data sets written first when ``cfg.miniature`` is set;
    with ``cfg.toy`` (datasets.toy.ToySpec fields) the toy world is written into that directory too."""
    mini = cfg.get("miniature")
    if mini is None:
        if not cfg.get("dataset_dir"):
            raise ValueError("dataset_dir is not set: point it at LISA's dataset directory (see configs/data)")
        root = Path(str(cfg.dataset_dir))
    else:
        root = Path(str(mini.get("dir") or out_dir / "miniature"))
        if ctx.is_main:
            spec = {k: v for k, v in OmegaConf.to_container(mini, resolve=True).items() if k != "dir"}
            write_miniature(root, MiniatureSpec(**spec))
    if cfg.get("toy") is not None and ctx.is_main:
        write_toyref(root, toy_spec(cfg.toy))
    barrier(ctx)
    return root


def toy_spec(node: Any) -> ToySpec:
    """``toy:`` config node -> :class:`ToySpec`; unknown keys are an error naming them."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    unknown = sorted(set(values) - set(ToySpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"toy: unknown keys {unknown}; expected ToySpec fields {sorted(ToySpec.__dataclass_fields__)}")
    return ToySpec(**values)


def make_logger(cfg: DictConfig, out_dir: Path, ctx: DistContext) -> Any:
    """The wandb logger on rank 0 when ``logger`` is configured, else None."""
    if cfg.get("logger") is None or not ctx.is_main:
        return None
    from evaluation.wandb_logger import WandbLogger

    config = OmegaConf.to_container(cfg, resolve=True)
    return WandbLogger(cfg.logger, config, out_dir)


def _check_model_paths(model_cfg: Mapping[str, Any]) -> None:
    from model.checkpoint import check_model_paths

    check_model_paths(model_cfg)
