"""Evaluation data sets in LISA's ``dataset_dir`` layout: RefCOCO/+/g, ReasonSeg and RIO.

This package shadows Hugging Face ``datasets``; nothing this project imports needs that package
(``tests/datasets/test_datasets.py`` imports transformers, peft and wandb from the repository root).
"""

from datasets.base import (
    IGNORE_LABEL,
    AnnotationError,
    DatasetLayoutError,
    ImageGroup,
    Sample,
    UnknownSplitError,
    group_by_image,
)
from datasets.miniature import MiniatureSpec, write_miniature
from datasets.splits import SPLIT_LOADERS, check_split, load_groups, load_split, valid_splits

__all__ = [
    "IGNORE_LABEL", "SPLIT_LOADERS", "AnnotationError", "DatasetLayoutError", "ImageGroup", "MiniatureSpec",
    "Sample", "UnknownSplitError", "check_split", "group_by_image", "load_groups", "load_split",
    "valid_splits", "write_miniature",
]
