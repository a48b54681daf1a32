"""Decoder-mode (mIoU*) epoch time with and without the feature cache; prints JSON.

Two runs of ``train_ds.py mode=decoder`` over the same data and schedule, one image per step:
``mode.cache=false`` recomputes the frozen features (CLIP, SAM's image encoder, the scheduled
LLM, ``text_hidden_fcs``) at every step; ``mode.cache=true`` computes them once into the cache
(``cache_build_s``), after which an epoch runs only the mask decoder. Per-epoch times come from the
steps' ``elapsed_s`` in the run's history (validation and checkpointing are off).

    python -m scripts.benchmark_train                                   # tiny model, miniature data
    python -m scripts.benchmark_train --images 16 --epochs 3
    python -m scripts.benchmark_train --override model=llava7b_224 --override schedule=llava7b_224_p70 \\
        --override dataset_dir=/data/lisa --override train_data=refcoco --no-miniature   # real model, GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from csp.config import method_from_config
from datasets.miniature import MiniatureSpec, write_miniature
from datasets.splits import load_groups
from training.train import train

ROOT = Path(__file__).resolve().parents[1]

TINY_SCHEDULE = ["schedule=llava7b_224_p70", "schedule.Lc=2", "schedule.Nc=64", "schedule.Ls=1", "schedule.Np=16"]


def epoch_times(history: list[dict], steps_per_epoch: int) -> list[float]:
    """Seconds of each epoch from the cumulative ``elapsed_s`` of its last step."""
    ends = [history[i]["elapsed_s"] for i in range(steps_per_epoch - 1, len(history), steps_per_epoch)]
    return [b - a for a, b in zip([0.0, *ends[:-1]], ends)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="training images (miniature data)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="extra train.yaml override (repeatable)")
    parser.add_argument("--no-miniature", action="store_true", help="use dataset_dir instead of miniature data")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="benchmark_train_"))
    overrides = ["mode=decoder", "trainer.batch_size=1", "trainer.grad_accumulation=1", "trainer.samples_per_image=3",
                 "trainer.warmup_steps=0", "trainer.precision=fp32", "trainer.progress_bar=false",
                 "trainer.save_every=0", "trainer.save_released=false", "val.every=0", "train_data.val_splits=[]"]
    if not args.no_miniature:
        data = write_miniature(out / "data", MiniatureSpec(train_images=args.images))
        overrides += [f"dataset_dir={data}", "train_data=refcoco", *TINY_SCHEDULE]
    overrides += args.override
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose(config_name="train", overrides=overrides)
    images = sum(len(load_groups(str(s["split"]), base.dataset_dir)) for s in base.train_data.sources)
    steps = images * args.epochs
    results = {}
    for cached in (False, True):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*overrides, f"trainer.steps={steps}",
                                                          f"mode.cache={str(cached).lower()}",
                                                          f"output_dir={out / ('cached' if cached else 'live')}"])
        start = time.perf_counter()
        result = train(cfg)
        results[cached] = {"total_s": time.perf_counter() - start, "cache_build_s": result["cache_build_s"],
                           "epoch_s": epoch_times(result["history"], images),
                           "losses": [h["loss"] for h in result["history"]]}
    live, cached = results[False], results[True]
    report = {
        "model": base.model.get("name"),
        "method": method_from_config(base).spec,
        "images": images, "epochs": args.epochs, "steps_per_epoch": images,
        "live_epoch_s": live["epoch_s"], "cache_build_s": cached["cache_build_s"], "cached_epoch_s": cached["epoch_s"],
        "speedup_per_epoch": (sum(live["epoch_s"]) / len(live["epoch_s"]))
        / (sum(cached["epoch_s"]) / len(cached["epoch_s"])),
        "same_losses": all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(live["losses"], cached["losses"])),
        "run_dirs": str(out),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
