"""wandb logging for evaluation (``logger=wandb``; off by default; rank 0 only).

Logs the composed config, per-split metrics and the summary of every evaluated setting, and a
``wandb.Table`` per setting with sample images carrying predicted and ground-truth mask overlays
(wandb's mask layers; 255 pixels shown as "ignore"), also logged as an image panel.
``mode: offline`` (or ``WANDB_MODE=offline``) needs no network; ``wandb sync`` uploads later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.loop import SampleOutcome

CLASS_LABELS = {0: "background", 1: "target", 255: "ignore"}


class WandbLogger:
    """One wandb run for one ``eval_ds.py`` invocation."""

    def __init__(self, logger_cfg: Mapping[str, Any], config: Mapping[str, Any], run_dir: Path):
        import wandb

        self._wandb = wandb
        wandb_dir = Path(logger_cfg.get("dir") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger_cfg.get("project", "lvlm_csp"), entity=logger_cfg.get("entity"),
            name=logger_cfg.get("run_name") or config.get("name"), mode=logger_cfg.get("mode"),
            tags=list(logger_cfg.get("tags") or []), dir=str(wandb_dir), config=dict(config),
        )
        self.num_overlays = int(logger_cfg.get("num_overlays", 8))
        self._rows: list[list[Any]] = []
        self._per_split: dict[str, int] = {}

    def wants(self, outcome: SampleOutcome) -> bool:
        """Whether ``outcome`` is among the first ``num_overlays`` ok samples of its split."""
        return outcome.pred is not None and self._per_split.get(outcome.record["split"], 0) < self.num_overlays

    def add_overlay(self, outcome: SampleOutcome) -> None:
        """One table row: the image with prediction and ground truth as mask layers."""
        record = outcome.record
        self._per_split[record["split"]] = self._per_split.get(record["split"], 0) + 1
        image = self._wandb.Image(np.asarray(outcome.image), caption=record["text"], masks={
            "prediction": {"mask_data": outcome.pred.astype(np.uint8), "class_labels": CLASS_LABELS},
            "ground_truth": {"mask_data": outcome.gt, "class_labels": CLASS_LABELS},
        })
        self._rows.append([record["split"], record["sample_id"], record["text"], record["iou"], image])

    def log_setting(self, name: str, metrics: Mapping[str, Any]) -> None:
        """Per-split gIoU/cIoU/count/failed, the summary, and the overlay table of one setting."""
        data: dict[str, Any] = {}
        for split, values in metrics["splits"].items():
            for key in ("gIoU", "cIoU", "evaluated", "failed", "Navg", "TFLOPs"):
                if values.get(key) is not None:
                    data[f"{name}/{split}/{key}"] = values[key]
        for key, value in metrics["summary"].items():
            if isinstance(value, (int, float)):
                data[f"{name}/{key}"] = value
        if self._rows:
            table = self._wandb.Table(columns=["split", "sample_id", "text", "iou", "overlay"], data=self._rows)
            data[f"{name}/samples"] = table
            data[f"{name}/overlays"] = [row[-1] for row in self._rows]  # also as an image panel
        self.run.log(data)
        self.run.summary.update({k: v for k, v in data.items() if not k.endswith(("/samples", "/overlays"))})
        self._rows, self._per_split = [], {}

    def finish(self) -> None:
        self.run.finish()
