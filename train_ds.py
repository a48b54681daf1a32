"""Train LISA: LISA's LoRA recipe, the mIoU* mask-decoder fine-tune, or every module (toy world).

    python train_ds.py mode=lisa train_data=lisa dataset_dir=/data/lisa_dataset model=...
    python train_ds.py mode=decoder +exp=llava7b_224_p70 train_data=refcoco dataset_dir=...
    deepspeed --num_gpus 8 train_ds.py mode=lisa ...
    python train_ds.py ... trainer.resume=true hydra.run.dir=outputs/train/<name>/<stamp>

Thin: launcher arguments are stripped, the ranks share one run directory, then Hydra composes
configs/train.yaml and :func:`training.train.train` does the work.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from runs.cli import user_errors_in_one_line
from runs.distributed import launch, run_stamp

OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@user_errors_in_one_line
def main(cfg: DictConfig) -> None:
    from training.train import train

    train(cfg)


if __name__ == "__main__":
    launch(main, "train_ds")
