"""Visual question answering sources in LLaVA-Instruct's JSON format (LISA's ``vqa`` data).

LISA trains on ``llava_dataset/llava_instruct_150k.json`` with the images in ``coco/train2017``;
the toy world writes ``llava_dataset/toyvqa_train.json`` (questions about its shapes) in the same
format. A file is a list of items::

    {"id": "...", "image": "<file name under the image directory>",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is ...?"},
                       {"from": "gpt", "value": "red."}, ...]}

Human and gpt turns alternate, human first. Each (question, answer) turn of an item becomes its
own single-turn training conversation with the image (the ``<image>`` placeholder is removed from
the question, which is stripped and follows ``<image>\n``, as LISA's ``preprocess_multimodal`` does
for the turn that holds the image). LISA keeps a
multi-turn item as one conversation; with one turn per conversation the loss needs no masking of
the human turns, and an item's turns share the image encoding as a refer image's queries do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datasets.base import AnnotationError

IMAGE_PLACEHOLDER = "<image>"
LLAVA_DIR = "llava_dataset"


@dataclass(frozen=True)
class VQAGroup:
    """One image of a VQA source with its (question, answer) turns."""

    image_path: Path
    item_id: str
    turns: tuple[tuple[str, str], ...]
    split: str


def vqa_json_path(dataset_dir: Path, name: str) -> Path:
    return Path(dataset_dir) / LLAVA_DIR / f"{name}.json"


def load_llava_instruct(json_path: Path, image_dir: Path, split: str) -> list[VQAGroup]:
    """Read and check an LLaVA-Instruct file; errors name the file, the item and the key."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise FileNotFoundError(f"VQA source {split}: {json_path} not found (LLaVA-Instruct JSON, e.g. "
                                f"{LLAVA_DIR}/llava_instruct_150k.json)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"VQA source {split}: image directory {image_dir} not found")
    items = json.loads(json_path.read_text())
    if not isinstance(items, list):
        raise AnnotationError(f"{json_path}: expected a JSON list of items, got {type(items).__name__}")
    groups = []
    for index, item in enumerate(items):
        where = f"{json_path} item {index}"
        for key in ("image", "conversations"):
            if key not in item:
                raise AnnotationError(f"{where}: no '{key}' key (have {sorted(item)})")
        turns = item["conversations"]
        if not turns or len(turns) % 2:
            raise AnnotationError(f"{where}: 'conversations' must hold human/gpt pairs, got {len(turns)} turns")
        pairs = []
        for k in range(0, len(turns), 2):
            roles = (turns[k].get("from"), turns[k + 1].get("from"))
            if roles != ("human", "gpt"):
                raise AnnotationError(f"{where}: turns {k}, {k + 1} are from {roles}; expected ('human', 'gpt')")
            question = turns[k]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            answer = turns[k + 1]["value"].strip()
            if not question or not answer:
                raise AnnotationError(f"{where}: turn {k // 2} has an empty question or answer")
            pairs.append((question, answer))
        image_path = image_dir / item["image"]
        if not image_path.is_file():
            raise FileNotFoundError(f"{where}: image {image_path} not found")
        groups.append(VQAGroup(image_path, str(item.get("id", index)), tuple(pairs), split))
    return groups
