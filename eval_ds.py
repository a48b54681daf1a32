"""Evaluate LISA (+ an LVLM_CSP schedule) on the paper's splits; prints the Table 1 row.

    python eval_ds.py +exp=llava7b_224_p70 dataset_dir=/data/lisa_dataset
    python eval_ds.py +exp=demo
    deepspeed --num_gpus 4 eval_ds.py +exp=table1 dataset_dir=...
    torchrun --nproc_per_node 4 eval_ds.py +exp=table1 dataset_dir=...
    python eval_ds.py +exp=table1 resume=true hydra.run.dir=outputs/eval/table1/<stamp>

Thin: launcher arguments are stripped, the ranks share one run directory, then Hydra composes
configs/eval.yaml and :func:`evaluation.evaluate.evaluate` does the work.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from runs.cli import user_errors_in_one_line
from runs.distributed import launch, run_stamp

OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@user_errors_in_one_line
def main(cfg: DictConfig) -> None:
    from evaluation.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    launch(main, "eval_ds")
