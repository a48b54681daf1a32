"""Evaluation of LISA (+ LVLM_CSP) on the paper's splits: metrics, sharding, resume, reports.

Entry point: :func:`evaluation.evaluate.evaluate` (``eval_ds.py`` composes the Hydra config and
calls it). Modules: ``metrics`` (I/U, gIoU, cIoU, mIoU_drop), ``loop`` (one setting over image
groups, appending per-sample records), ``records`` (the per-rank JSONL files, resume and merge),
``distributed`` (launcher arguments, process group, sharding), ``report`` (metrics.json and the
table row), ``wandb_logger``.
"""
