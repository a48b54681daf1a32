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

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from evaluation.distributed import (
    barrier,
    context_from_env,
    init_distributed,
    run_stamp,
    share_run_stamp,
    shutdown,
    strip_launcher_args,
)

OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from evaluation.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)  # DeepSpeed appends --local_rank=N, which Hydra rejects
    ctx = init_distributed(context_from_env())
    share_run_stamp(ctx)
    if ctx.rank > 0:  # one .hydra/ and one log file per run directory
        sys.argv += ["hydra.output_subdir=null",
                     f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/eval_ds.rank{ctx.rank}.log"]
    main()
    barrier(ctx)  # leave together and tear the process group down (gloo can abort at exit otherwise)
    shutdown(ctx)
