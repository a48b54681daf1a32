"""``evaluate(cfg)``: one model, plain LISA and/or one method (any registered method, resolved by
``csp.config.method_from_config``: a ``method`` node, or a ``schedule`` for LVLM_CSP), on the configured splits.

Order of checks (fail before anything expensive): split names, the method's name and parameters, its
own checks (``Method.check``: e.g. a weights file), the baseline file, the model paths and the method
against the model's config files (:func:`validate_config`); then the run directory
(a resumed run must have been produced by the same setting, a fresh run must not silently delete
an earlier one's records); then the data sets (layout errors, empty splits, the baseline's sample
ids); only then is the model loaded. Outputs in the run directory: ``run_manifest.json`` (the
setting, checked on resume), ``metrics.json``, ``table.txt`` (the printed rows), ``results.jsonl``
(merged) and, while running, ``results.rank<r>.jsonl`` (append-only, for resume); with ``baseline:
same_run`` the plain model's files go to ``<run dir>/baseline/``. In a Hydra multirun every job
also rewrites ``<sweep dir>/sweep_table.txt``, the table of every finished job of the sweep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from csp.config import PLAIN, MethodConfig, method_from_config
from csp.methods import Method
from datasets.base import ImageGroup
from datasets.splits import check_split, parse_splits
from evaluation import records as rec
from evaluation.loop import Pipeline, SampleFailedError, SampleOutcome, evaluate_group
from evaluation.progress import Progress
from evaluation.report import (
    BaselineInfo,
    baseline_sample_differences,
    collect_runs,
    giou_by_split,
    read_baseline,
    summarize,
    table,
    write_metrics,
)
from runs.data import load_all_groups, prepare_dataset_dir, toy_spec  # noqa: F401  (toy_spec: re-exported)
from runs.distributed import DistContext, barrier, broadcast_object, gather_to_main, init_distributed, shard
from runs.rundir import MANIFEST, RunDirectoryError, check_run_dir, output_dir, setting_differences

SAME_RUN = "same_run"
SWEEP_TABLE = "sweep_table.txt"
#: Manifest keys a baseline must share with the run it is compared with.
BASELINE_KEYS = ("model", "dataset_dir", "max_samples_per_split")

log = logging.getLogger(__name__)


class EmptySplitError(ValueError):
    """A configured split has no samples and ``strict=true``."""


@dataclass(frozen=True)
class SettingOptions:
    """How one setting is run and reported."""

    name: str
    resume: bool = False
    strict: bool = False
    queries_per_batch: int | None = None
    extra: Mapping[str, Any] | None = None
    overwrite: bool = False
    progress: bool = True
    progress_interval_s: float = 30.0
    vis_samples: int = 0  # token maps of the first N samples of each split (vis.num_samples)
    vis_max_side: int | None = 448


@dataclass
class Plan:
    """What :func:`validate_config` checked: everything but the data and the weights."""

    splits: list[str]
    method_cfg: MethodConfig
    baseline: BaselineInfo | None = None
    same_run: bool = False
    setting: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Method | None:
        """The configured method (None: plain LISA)."""
        return self.method_cfg.method


def validate_config(cfg: DictConfig, *, check_model_files: bool = True) -> Plan:
    """Every check that needs no data set and no weights, in the order of the module docstring.

    ``check_model_files=False`` skips the model paths and the method-vs-model check (for configs
    composed where the weights do not exist, e.g. documentation tests).
    """
    splits = parse_splits(cfg.data.splits, "data.splits")
    for split in splits:
        check_split(split)
    method_cfg = method_from_config(cfg)
    method = method_cfg.method
    if method is not None:
        method.check()  # unknown option, missing weights file: now, not after the baseline
    baseline, same_run = None, cfg.get("baseline") == SAME_RUN
    if cfg.get("baseline") not in (None, SAME_RUN):
        baseline = read_baseline(str(cfg.baseline))
        if missing := [s for s in splits if s not in baseline.giou]:
            raise ValueError(f"baseline {baseline.path} has no gIoU for the configured splits {missing}; "
                             f"it has {sorted(baseline.giou)}")
    mask_decoder = cfg.model.get("mask_decoder")
    if mask_decoder and not Path(str(mask_decoder)).is_file():
        raise FileNotFoundError(f"model.mask_decoder={str(mask_decoder)!r}: no such file (expected the "
                                "mask_decoder.safetensors written by train_ds.py mode=decoder)")
    if check_model_files:
        _check_model_paths(cfg.model)
        if method is not None:
            from runs.models import layers_and_image_tokens

            method.validate(*layers_and_image_tokens(cfg.model))  # before any data or weights are read
    plan = Plan(splits, method_cfg, baseline, same_run)
    plan.setting = run_setting(cfg, plan)
    if baseline is not None:
        check_baseline_setting(baseline, plan.setting)
    return plan


def run_setting(cfg: DictConfig, plan: Plan) -> dict[str, Any]:
    """The manifest: what makes two runs' records comparable (``model`` without its device)."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "device"}
    mini = cfg.get("miniature")
    if mini is not None:  # written by a seeded generator: the spec identifies the data, not the path
        spec = {k: v for k, v in OmegaConf.to_container(mini, resolve=True).items() if k != "dir"}
        dataset_dir = "miniature " + json.dumps(spec, sort_keys=True)
    else:
        dataset_dir = str(cfg.get("dataset_dir"))
    return {"model": model, **plan.method_cfg.record(), "splits": plan.splits, "dataset_dir": dataset_dir,
            "max_samples_per_split": cfg.get("max_samples_per_split")}


def check_baseline_setting(baseline: BaselineInfo, setting: Mapping[str, Any]) -> None:
    """The baseline must come from the same model, checkpoint, data and sample limit."""
    if baseline.setting is None:
        raise ValueError(f"baseline {baseline.path} records no setting (model, dataset_dir, ...; written by an "
                         "older version): re-run the baseline, or use baseline=same_run")
    # mIoU*_drop compares a fine-tuned mask decoder with the plain (released) model: not a difference.
    diffs = setting_differences({**baseline.setting, "model": plain_model_setting(baseline.setting.get("model"))},
                                {**setting, "model": plain_model_setting(setting.get("model"))}, BASELINE_KEYS)
    if diffs:
        raise ValueError(f"baseline {baseline.path} was produced by a different setting (baseline vs this run): "
                         + "; ".join(diffs))


def plain_model_setting(model: Any) -> Any:
    """The model part of a setting without a fine-tuned mask decoder (the baseline's model)."""
    if not isinstance(model, Mapping):
        return model
    return {k: v for k, v in model.items() if k != "mask_decoder"}


def evaluate(cfg: DictConfig, bundle: Any = None) -> dict[str, Any]:
    """Evaluate as configured; returns ``{"method": metrics, "baseline": metrics | None}`` on every rank.

    ``bundle``: an already loaded model for ``cfg.model`` (scripts/run_table.py evaluates a whole
    table with one load); None loads it.
    """
    ctx = init_distributed()
    torch.manual_seed(int(cfg.get("seed", 0)))
    plan = validate_config(cfg)
    out_dir = output_dir(cfg)
    resume, overwrite = bool(cfg.get("resume", False)), bool(cfg.get("overwrite", False))
    if resume and overwrite:
        raise ValueError("resume=true and overwrite=true contradict each other: pick one")
    check_run_dir(out_dir, plan.setting, resume=resume, overwrite=overwrite, holds_results=rec.has_results,
                  subdirs=("baseline",))
    strict = bool(cfg.get("strict", False))
    dataset_dir = prepare_dataset_dir(cfg, out_dir, ctx)
    groups = load_all_groups(plan.splits, dataset_dir, cfg.get("max_samples_per_split"))
    check_samples(groups, plan, strict=strict)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).write_text(json.dumps(plan.setting, indent=2) + "\n")
    barrier(ctx)

    from csp.runner import CompileOptions
    from model.pipeline import SegmentationPipeline
    from runs.models import build_from_config

    compile_options = CompileOptions.from_mapping(cfg.get("compile"))  # checked before the model is built
    bundle = bundle if bundle is not None else build_from_config(cfg.model)
    logger = make_logger(cfg, out_dir, ctx)
    vis = cfg.get("vis") or {}
    common = {"resume": resume, "strict": strict, "overwrite": overwrite,
              "queries_per_batch": cfg.get("queries_per_batch"), "progress": bool(cfg.get("progress", True)),
              "progress_interval_s": float(cfg.get("progress_interval_s", 30.0)),
              "vis_samples": int(vis.get("num_samples") or 0), "vis_max_side": vis.get("max_side", 448)}
    model_info = {"model": cfg.model.get("name"), "dataset_dir": str(dataset_dir), "setting": plan.setting}
    method, baseline = plan.method, plan.baseline
    results: dict[str, Any] = {"baseline": None}
    mask_decoder = cfg.model.get("mask_decoder")
    # The method row: the method and/or a fine-tuned mask decoder (mIoU*); plain LISA otherwise.
    has_method = method is not None or bool(mask_decoder)
    if not has_method or plan.same_run:
        # the released mask decoder: a fine-tuned one is loaded below, for the method row
        plain = SegmentationPipeline(bundle, None, compile=compile_options)
        name = f"LISA ({cfg.model.get('name')})"
        base_dir = out_dir if not has_method else out_dir / "baseline"
        setting = {**plan.setting, "model": plain_model_setting(plan.setting["model"]), **PLAIN.record()}
        opts = SettingOptions(name=name, extra={**model_info, **PLAIN.record(), "setting": setting},
                              **common)
        metrics = evaluate_setting(plain, groups, plan.splits, base_dir, ctx, opts,
                                   baseline=None if plan.same_run else baseline, logger=logger)
        if plan.same_run:
            baseline = BaselineInfo(path=SAME_RUN, giou=giou_by_split(metrics), setting=setting,
                                    sample_ids=metrics["sample_ids"], failed=metrics["summary"]["failed"])
            metrics = _zero_drop(metrics, base_dir, ctx)
        results["baseline" if has_method else "method"] = metrics
    if has_method:
        if mask_decoder:
            from model.finetuned import load_mask_decoder

            load_mask_decoder(bundle.model, mask_decoder, method=plan.method_cfg.spec)
            model_info = {**model_info, "mask_decoder": str(mask_decoder)}
        pipe = SegmentationPipeline(bundle, method, compile=compile_options)
        name = setting_name(cfg, method) if method is not None else str(cfg.get("name") or cfg.model.get("name"))
        # mIoU*: the paper's label for accuracy after fine-tuning only SAM's mask decoder (Table 6)
        opts = SettingOptions(name=name + (" (mIoU*)" if mask_decoder else ""),
                              extra={**model_info, **plan.method_cfg.record()}, **common)
        results["method"] = evaluate_setting(pipe, groups, plan.splits, out_dir, ctx, opts, baseline=baseline,
                                             logger=logger)
    if ctx.is_main:
        rows = [m for m in (results["baseline"], results["method"]) if m is not None]
        text = table(rows)
        (out_dir / "table.txt").write_text(text + "\n")
        print(text, flush=True)
        if cfg.get("output_dir") is None:
            write_sweep_table()
    if logger is not None:
        logger.finish()
    return results


def setting_name(cfg: DictConfig, method: Method) -> str:
    """Row name of a method: ``<name> <its settings>`` (CSP: ``(Lc=.., Nc=.., Ls=.., Np=.., <clustering>)``),
    so that the jobs of a sweep (which share ``name``) tell apart."""
    described = method.describe()
    name = str(cfg.get("name") or "")
    return f"{name} {described}" if name else described


def check_samples(groups: Sequence[ImageGroup], plan: Plan, *, strict: bool) -> None:
    """Empty splits (a warning; an error with ``strict``) and the baseline's sample ids (an error)."""
    targets = {split: [] for split in plan.splits}
    for group in groups:
        for sample in group.samples:
            targets[sample.split].append(sample.sample_id)
    empty = [split for split, ids in targets.items() if not ids]
    if empty:
        message = (f"split(s) {empty} have NO samples (empty folder, empty JSON list or no refs for the split); "
                   "they will show '-' in the table")
        if strict:
            raise EmptySplitError(f"strict=true: {message}")
        log.warning("WARNING: %s", message)
    if plan.baseline is not None:
        problems = baseline_sample_differences(plan.baseline, targets)
        if problems:
            raise ValueError(f"baseline {plan.baseline.path} does not cover the same samples as this run, so "
                             "mIoU_drop would compare different sets: " + "; ".join(problems))


def write_sweep_table() -> Path | None:
    """In a Hydra multirun, (re)write ``<sweep dir>/sweep_table.txt`` from every job's metrics.json."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    root = Path(HydraConfig.get().sweep.dir)
    rows = collect_runs(root)
    if not rows:
        return None
    path = root / SWEEP_TABLE
    path.write_text(table(rows) + "\n")
    log.info("sweep table (%d rows so far): %s", len(rows), path)
    return path


def evaluate_setting(pipe: Pipeline, groups: Sequence[ImageGroup], splits: Sequence[str], out_dir: Path,
                     ctx: DistContext, opts: SettingOptions, *, baseline: BaselineInfo | None = None,
                     baseline_giou: Mapping[str, float] | None = None, logger: Any = None,
                     on_outcome: Callable[[SampleOutcome], None] | None = None) -> dict[str, Any]:
    """Run ``pipe`` over this rank's share of ``groups``, append records, merge and score on rank 0.

    Returns the metrics.json mapping (the same on every rank); writes ``metrics.json`` and
    ``results.jsonl`` in ``out_dir``.
    """
    if not opts.resume and not opts.overwrite and rec.has_results(out_dir):
        raise RunDirectoryError(f"{out_dir} already holds results of an earlier run; pass resume=true to continue "
                                "it or overwrite=true to delete them")
    barrier(ctx)  # every rank has looked before rank 0 clears anything
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and opts.resume:
        rec.repair_all(out_dir)
    elif ctx.is_main:
        rec.clear_results(out_dir)
    barrier(ctx)  # every rank reads the (repaired) files only after this
    skip = rec.finished_keys(out_dir) if opts.resume else set()
    mine = shard(groups, ctx)
    todo = sum(1 for g in mine for s in g.samples if (s.split, s.sample_id) not in skip)
    if opts.resume and ctx.is_main:
        total = sum(len(g.samples) for g in groups)
        log.info("resume %s: %d of %d samples already finished in %s", opts.name, len(skip), total, out_dir)
    desc = opts.name if ctx.world_size == 1 else f"{opts.name} (rank 0 of {ctx.world_size})"
    maps = None
    if opts.vis_samples > 0:
        from visualize.eval_maps import TokenMapWriter, first_samples

        maps = TokenMapWriter(pipe, first_samples(groups, opts.vis_samples), out_dir, max_side=opts.vis_max_side)
    progress = Progress(todo, desc, enabled=opts.progress and ctx.is_main, interval_s=opts.progress_interval_s)
    try:
        with rec.RecordWriter(rec.rank_file(out_dir, ctx.rank)) as writer:
            for group in mine:
                for outcome in evaluate_group(pipe, group, skip=skip, queries_per_batch=opts.queries_per_batch):
                    writer.write(outcome.record)
                    progress.update(failed=outcome.record["status"] != "ok")
                    if on_outcome is not None:
                        on_outcome(outcome)
                    if logger is not None and ctx.is_main and logger.wants(outcome):
                        logger.add_overlay(outcome)
                    if maps is not None and maps.wants(outcome):
                        _, tmap = maps.write(outcome)
                        if logger is not None and ctx.is_main:
                            logger.add_token_map(outcome, tmap.figure())
                    if opts.strict and outcome.record["status"] != "ok":
                        raise SampleFailedError(f"strict=true: {outcome.record['split']} "
                                                f"{outcome.record['sample_id']} failed: {outcome.record['reason']}")
    finally:
        progress.close()
    own = rec.read_records(rec.rank_file(out_dir, ctx.rank))
    cost = pipe.extra_cost()  # the method's cost outside the LLM (e.g. seg_first's detector)
    if ctx.is_main:  # a finished earlier run's merged file, and ranks of an earlier run with more processes
        own = rec.read_records(out_dir / rec.MERGED) + own
        own += [r for path in rec.orphan_rank_files(out_dir, ctx.world_size) for r in rec.read_records(path)]
    gathered = gather_to_main((own, cost), ctx)
    metrics = None
    if ctx.is_main:
        targets = [(s.split, s.sample_id) for g in groups for s in g.samples]
        merged = rec.merge_records((r for part, _ in gathered for r in part), targets, splits)
        missing = len(set(targets)) - len(merged)
        if missing:
            raise RuntimeError(f"{missing} samples have no record in {out_dir}; is the run directory shared by "
                               "all ranks?")
        rec.write_merged(out_dir / rec.MERGED, merged)
        if ctx.world_size == 1:  # merged now: the rank file would be a copy of results.jsonl
            rec.rank_file(out_dir, 0).unlink(missing_ok=True)
        metrics = summarize(merged, splits, name=opts.name, baseline=baseline, baseline_giou=baseline_giou,
                            extra=opts.extra, detector=combine_costs([c for _, c in gathered]))
        write_metrics(out_dir / "metrics.json", metrics)
        if logger is not None:
            logger.log_setting(opts.name, metrics)
    return broadcast_object(metrics, ctx)


def combine_costs(costs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Ranks' ``extra_cost()`` -> one: images summed, ms per image weighted by images, GFLOPs per image."""
    costs = [c for c in costs if c]
    if not costs:
        return {}
    calls = sum(c.get("segmenter_calls", 0.0) for c in costs)
    out: dict[str, float] = {"segmenter_calls": calls}
    timed = [c for c in costs if c.get("segmenter_ms") is not None]
    if timed and calls:
        out["segmenter_ms"] = sum(c["segmenter_ms"] * c.get("segmenter_calls", 0.0) for c in timed) / calls
    gflops = [c["segmenter_gflops"] for c in costs if c.get("segmenter_gflops")]
    if gflops:
        out["segmenter_gflops"] = gflops[0]
    return out


def _zero_drop(metrics: dict[str, Any], out_dir: Path, ctx: DistContext) -> dict[str, Any]:
    """The same-run baseline's own mIoU_drop is 0 by definition (Table 1's first row)."""
    metrics["summary"]["mIoU_drop"] = 0.0
    if ctx.is_main:
        write_metrics(out_dir / "metrics.json", metrics)
    return metrics


def make_logger(cfg: DictConfig, out_dir: Path, ctx: DistContext) -> Any:
    """The wandb logger on rank 0 when ``logger`` is configured, else None."""
    if cfg.get("logger") is None or not ctx.is_main:
        return None
    from evaluation.wandb_logger import WandbLogger

    config = OmegaConf.to_container(cfg, resolve=True)
    return WandbLogger(cfg.logger, config, out_dir)


def _check_model_paths(model_cfg: Mapping[str, Any]) -> None:
    from runs.models import check_model_paths

    check_model_paths(model_cfg)
