"""Record the toy LISA checkpoint's validation metrics in ``<checkpoint>/metrics.json``.

    python -m scripts.toy_metrics [--checkpoint assets/toy_lisa] [--check-samples 60]

Both numbers come from evaluation itself (``evaluation.evaluate.evaluate``, plain LISA, the
evaluation prompt) on ``toyref|unc|val`` written from the toy spec in ``configs/exp/toy_p70.yaml``:
``gIoU`` / ``cIoU`` over the whole split, gIoU per expression type, ``zeroed_image_tokens`` (the same
evaluation with every projected image token set to zero before the LLM: how much the model reads its
image tokens), and ``check`` over the first ``--check-samples`` samples (24; plain and zeroed), which
``tests/model/test_toy_checkpoint.py`` recomputes (a few seconds) and compares.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SPLIT = "toyref|unc|val"


def val_toy_spec() -> dict[str, Any]:
    """The ``toy:`` node of configs/exp/toy_p70.yaml: the whole val split, as the README's toy table."""
    return dict(OmegaConf.load(REPO / "configs" / "exp" / "toy_p70.yaml")["toy"])


def evaluate_checkpoint(checkpoint: Path, out_dir: Path, max_samples: int | None,
                        zero_image_tokens: bool = False) -> dict[str, Any]:
    """Plain-LISA metrics.json mapping of ``checkpoint`` on the toy val split (first ``max_samples``).

    With ``max_samples`` only that many val images are written (every image has at least one sample,
    and the first images and their sample ids do not depend on how many are written).
    ``zero_image_tokens``: the projector's output is replaced by zeros (a forward hook on this model's
    projector, removed afterwards), so the LLM sees the image slot but nothing of the image.
    """
    from evaluation.evaluate import evaluate
    from runs.models import build_from_config

    spec = val_toy_spec()
    if max_samples is not None:
        spec["val_images"] = min(int(spec["val_images"]), int(max_samples))
    toy = ",".join(f"{k}:{v}" for k, v in spec.items())
    overrides = [
        "model=toy_trained", f"model.checkpoint={checkpoint}", f"model.vision_tower={checkpoint / 'vision_tower'}",
        f"data.splits=[{SPLIT}]", f"dataset_dir={out_dir / 'data'}", f"output_dir={out_dir / 'run'}",
        f"toy={{{toy}}}", f"max_samples_per_split={'null' if max_samples is None else max_samples}",
        "baseline=null",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    if not zero_image_tokens:
        return evaluate(cfg)["method"]
    bundle = build_from_config(cfg.model)
    handle = bundle.model.model.mm_projector.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        return evaluate(cfg, bundle=bundle)["method"]
    finally:
        handle.remove()


def giou_by_type(results: Path, by_description: bool = False) -> dict[str, dict[str, Any]]:
    """gIoU (mean per-sample IoU) and sample count per toy expression type from a ``results.jsonl``;
    ``by_description``: per type, then per way the target is named (colour / kind / colour+kind)."""
    from datasets.toy import EXPRESSION_TYPES, expression_type, target_description

    ious: dict[str, dict[str, list[float]]] = {t: {} for t in EXPRESSION_TYPES}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["status"] != "ok":
            raise ValueError(f"{results}: sample {row['sample_id']} failed ({row['reason']}); gIoU by type needs all")
        key = target_description(row["text"]) if by_description else "all"
        ious[expression_type(row["text"])].setdefault(key, []).append(float(row["iou"]))

    def summary(values: list[float]) -> dict[str, float]:
        return {"samples": len(values), "gIoU": sum(values) / len(values)}

    if not by_description:
        return {t: summary(v["all"]) for t, v in ious.items() if v}
    return {t: {d: summary(v[d]) for d in sorted(v)} for t, v in ious.items() if v}


def record(checkpoint: Path, check_samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        full = evaluate_checkpoint(checkpoint, Path(tmp) / "full", None)
        by_type = giou_by_type(Path(tmp) / "full" / "run" / "results.jsonl")
        by_description = giou_by_type(Path(tmp) / "full" / "run" / "results.jsonl", by_description=True)
        check = evaluate_checkpoint(checkpoint, Path(tmp) / "check", check_samples)
        check_zeroed = evaluate_checkpoint(checkpoint, Path(tmp) / "check_zeroed", check_samples, zero_image_tokens=True)
        zeroed = evaluate_checkpoint(checkpoint, Path(tmp) / "zeroed", None, zero_image_tokens=True)
        zeroed_by_type = giou_by_type(Path(tmp) / "zeroed" / "run" / "results.jsonl")
    split, part = full["splits"][SPLIT], check["splits"][SPLIT]
    return {"split": SPLIT, "toy": val_toy_spec(), "samples": split["evaluated"], "gIoU": split["gIoU"],
            "cIoU": split["cIoU"], "by_expression_type": by_type, "by_type_and_target_description": by_description,
            "zeroed_image_tokens": {"gIoU": zeroed["splits"][SPLIT]["gIoU"], "by_expression_type": zeroed_by_type},
            "check": {"max_samples_per_split": check_samples, "samples": part["evaluated"],
                      "gIoU": part["gIoU"], "cIoU": part["cIoU"],
                      "zeroed_image_tokens_gIoU": check_zeroed["splits"][SPLIT]["gIoU"]}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.toy_metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "toy_lisa")
    parser.add_argument("--check-samples", type=int, default=24)
    args = parser.parse_args(argv)
    metrics = record(args.checkpoint.resolve(), args.check_samples)
    path = args.checkpoint / "metrics.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    metrics = {**{k: v for k, v in previous.items() if k == "training"}, **metrics}
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
