"""Clustering strategies; importing this package registers all of them."""

from csp.strategies import (
    seg_first,  # noqa: F401  (registers seg_first; ultralytics loads lazily)
    simple,  # noqa: F401  (registers uniform, random, cls_attention)
    spatial,  # noqa: F401  (registers kcenter, stratified)
    text_guided,  # noqa: F401  (registers litelvlm)
)
from csp.strategies.base import (
    CLUSTERING_STRATEGIES,
    ClusteringInputs,
    ClusteringStrategy,
    build_strategy,
    check_strategy,
    register_strategy,
    topk_sorted,
)

__all__ = [
    "CLUSTERING_STRATEGIES",
    "ClusteringInputs",
    "ClusteringStrategy",
    "build_strategy",
    "check_strategy",
    "register_strategy",
    "topk_sorted",
]
