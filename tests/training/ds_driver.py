"""Several ZeRO-2 training runs in one launch (DeepSpeed's CPU accelerator), for test_deepspeed.py.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/training/ds_driver.py <data dir> <out dir>

Start-up (imports, the process group) dominates a run on the tiny model, so one launch runs them all:
``lisa`` (4 steps, released export), ``decoder`` (4 steps), and ``split``: ``lisa`` stopped after step 2
with its checkpoint (``trainer.stop_after``), then resumed from that checkpoint by a new Runner (a fresh
engine reads each rank's optimizer partition file) to step 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

#: The settings of every run: one image per rank per step (global batch 2), no accumulation.
COMMON = ["train_data=refcoco", "train_data.val_splits=[]", "trainer.steps=4", "trainer.batch_size=1",
          "trainer.grad_accumulation=1",
          "trainer.samples_per_image=1", "trainer.warmup_steps=2", "trainer.lr=0.01", "trainer.precision=fp32",
          "trainer.progress_bar=false", "trainer.save_released=false", "trainer.encoding_cache=4", "val.every=0",
          "model.num_layers=3", "mode.lora.dropout=0"]
LISA = ["mode=lisa"]
DECODER = ["mode=decoder", "schedule=llava7b_224_p70", "schedule.Lc=1", "schedule.Nc=64", "schedule.Ls=1",
           "schedule.Np=16"]


def overrides(data: Path, out: Path, mode: list[str], *extra: str) -> list[str]:
    # mode first: mode.lora.dropout in COMMON needs the lisa node (decoder mode has none: dropped)
    common = [c for c in COMMON if not (c.startswith("mode.lora") and "mode=lisa" not in mode)]
    return [*mode, f"dataset_dir={data}", f"output_dir={out}", *common, *extra]


def main() -> None:
    from runs.distributed import strip_launcher_args
    from training.train import train

    argv = strip_launcher_args(sys.argv)  # the launcher's --local_rank=N
    data, out = Path(argv[1]), Path(argv[2])
    runs = {"lisa": overrides(data, out / "lisa", LISA, "trainer.save_released=true"),
            "decoder": overrides(data, out / "decoder", DECODER),
            "split_a": overrides(data, out / "split", LISA, "trainer.save_every=2", "trainer.stop_after=2"),
            "split_b": overrides(data, out / "split", LISA, "trainer.save_every=2", "trainer.resume=true")}
    for name, args in runs.items():
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=args + (argv[3:] if name == "lisa" else []))
        result = train(cfg)
        print(f"ds_driver {name}: step {result['step']}", flush=True)
    from runs.distributed import context_from_env, shutdown

    shutdown(context_from_env())


if __name__ == "__main__":
    main()
