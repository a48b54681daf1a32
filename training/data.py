"""Training data: LISA's refer-seg / ReasonSeg sources, a resumable data order, conversations.

Sources are split names as evaluation writes them (``refcoco|unc|train``, ``toyref|unc|train``,
``ReasonSeg|train``) with a sample rate each. A training item is one image: up to
``samples_per_image`` of its queries (LISA's ``num_classes_per_sample`` = 3), each its own
conversation (one [SEG] per answer), as LISA's refer-seg dataset builds them.

Data order (a choice of this project; LISA draws images with replacement): every source is walked
in seeded epoch permutations, and each draw picks a source with probability proportional to its
rate. Everything is a function of ``(seed, draw index)``, so :class:`DataOrder`'s JSON state (the
number of draws per source) is all a resumed run needs to continue with the same batches.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datasets.base import AnnotationError, ImageGroup
from datasets.splits import check_split, load_groups
from datasets.vqa import VQAGroup, load_llava_instruct, vqa_json_path
from model.prompt import ANSWER_LIST, DEFAULT_ANSWER, LONG_QUESTION_LIST, SHORT_QUESTION_LIST
from model.training import TrainingSample
from runs.images import open_image


class EmptyTrainingSetError(ValueError):
    """A configured training split holds no samples (or no source is configured)."""


@dataclass(frozen=True)
class Source:
    """One training split, its sample rate and its image groups (in split order)."""

    split: str
    rate: float
    groups: tuple[ImageGroup | VQAGroup, ...]


def source_name(spec: Mapping[str, Any]) -> str:
    """The name a source spec goes by: its split, or ``vqa:<name>`` for a VQA file."""
    return f"vqa:{spec['vqa']}" if "vqa" in spec else str(spec["split"])


def check_source_spec(spec: Mapping[str, Any]) -> None:
    """One ``train_data.sources`` entry: ``{split, rate}`` (segmentation) or ``{vqa, image_dir, rate}``
    (an LLaVA-Instruct file ``llava_dataset/<vqa>.json``, images under ``<dataset_dir>/<image_dir>``)."""
    if ("split" in spec) == ("vqa" in spec):
        raise ValueError(f"train_data.sources entry {dict(spec)}: expected exactly one of 'split' (a segmentation "
                         "split) or 'vqa' (an LLaVA-Instruct file name under llava_dataset/)")
    if "split" in spec:
        check_split(str(spec["split"]))
    elif not spec.get("image_dir"):
        raise ValueError(f"train_data.sources entry {dict(spec)}: a 'vqa' source needs 'image_dir' (relative to "
                         "dataset_dir; LISA's llava_instruct_150k: coco/train2017)")
    rate = float(spec.get("rate", 1.0))
    if not rate > 0:
        raise ValueError(f"train_data.sources {source_name(spec)}: rate must be > 0, got {rate}")


def load_sources(specs: Sequence[Mapping[str, Any]], dataset_dir: Path) -> list[Source]:
    """``[{split, rate} | {vqa, image_dir, rate}]`` -> sources; unknown names, bad rates and empty
    sources are errors."""
    if not specs:
        raise EmptyTrainingSetError("train_data.sources is empty: configure at least one {split, rate}")
    for spec in specs:
        check_source_spec(spec)
    sources = []
    for spec in specs:
        name = source_name(spec)
        if "vqa" in spec:
            groups = tuple(load_llava_instruct(vqa_json_path(dataset_dir, str(spec["vqa"])),
                                               Path(dataset_dir) / str(spec["image_dir"]), name))
        else:
            groups = tuple(load_groups(name, dataset_dir))
        if not groups:
            raise EmptyTrainingSetError(f"training source {name!r} under {dataset_dir} has no samples")
        sources.append(Source(name, float(spec.get("rate", 1.0)), groups))
    return sources


@dataclass
class DataOrder:
    """Which image comes next: seeded epoch permutations per source, sources drawn by rate.

    ``counts[s]`` images were drawn from source ``s`` so far (the whole state besides ``seed``).
    """

    seed: int
    sizes: list[int]
    rates: list[float]
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def draws(self) -> int:
        return sum(self.counts)

    def next(self) -> tuple[int, int]:
        """(source index, group index) of the next image."""
        if len(self.sizes) == 1:
            source = 0
        else:
            p = np.asarray(self.rates, dtype=np.float64)
            source = int(np.random.default_rng([self.seed, 1, self.draws]).choice(len(p), p=p / p.sum()))
        k = self.counts[source]
        epoch, index = divmod(k, self.sizes[source])
        self.counts[source] += 1
        return source, int(self._perm(source, epoch)[index])

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}  # keep one epoch per source
            self._perms[key] = np.random.default_rng([self.seed, 0, source, epoch]).permutation(self.sizes[source])
        return self._perms[key]

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "sizes": list(self.sizes), "rates": list(self.rates), "counts": list(self.counts)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], sizes: list[int], rates: list[float]) -> DataOrder:
        """Restore a saved order; the sources must be the ones it was saved with."""
        if list(state["sizes"]) != list(sizes) or [float(r) for r in state["rates"]] != [float(r) for r in rates]:
            raise ValueError(f"the saved data order was built for sources of sizes {state['sizes']} with rates "
                             f"{state['rates']}, but the configured sources have sizes {sizes} and rates {rates}")
        return cls(int(state["seed"]), list(sizes), list(rates), [int(c) for c in state["counts"]])


@dataclass(frozen=True)
class PromptStyle:
    """``lisa``: LISA's random question and answer templates; ``eval``: the evaluation prompt
    (``What is {x} in this image? ...`` / the sentence, answer ``[SEG].``), used by decoder mode so
    that the fine-tuned decoder sees the [SEG] embeddings evaluation produces."""

    kind: str = "lisa"

    def __post_init__(self) -> None:
        if self.kind not in ("lisa", "eval"):
            raise ValueError(f"prompts must be 'lisa' or 'eval', got {self.kind!r}")


def item_rng(seed: int, draw: int) -> random.Random:
    """The generator for one image's choices (queries, templates), independent of anything else."""
    return random.Random(f"{seed}:{draw}")


def conversations(group: ImageGroup | VQAGroup, *, samples_per_image: int, style: PromptStyle, rng: random.Random,
                  image: Image.Image | None = None) -> list[TrainingSample]:
    """Up to ``samples_per_image`` queries of ``group`` (sampled without replacement, in split order
    when all fit) as training conversations sharing one image. Ground truth: pixels == 1 (ReasonSeg's
    ignore label counts as background, as in LISA's training set). ``image``: the opened image.
    A VQA group's turns become conversations without a mask (the answer is text; no [SEG])."""
    image = image if image is not None else open_image(group.image_path)
    if isinstance(group, VQAGroup):
        turns = list(range(len(group.turns)))
        if len(turns) > samples_per_image:
            turns = sorted(rng.sample(turns, samples_per_image))
        empty = np.zeros((0, image.height, image.width), dtype=np.float32)
        return [TrainingSample(image=image, text=group.turns[k][0], is_sentence=True, answer=group.turns[k][1],
                               gt_masks=empty, sample_id=f"{group.item_id}#{k}", message=group.turns[k][0])
                for k in turns]
    chosen = list(group.samples)
    if len(chosen) > samples_per_image:
        chosen = sorted(rng.sample(chosen, samples_per_image), key=group.samples.index)
    out = []
    for sample in chosen:
        try:
            gt = sample.gt_mask()
        except AnnotationError as exc:
            raise AnnotationError(f"training sample {sample.split} {sample.sample_id}: {exc}") from exc
        if gt.shape != (image.height, image.width):
            raise AnnotationError(f"training sample {sample.split} {sample.sample_id}: ground truth {gt.shape} "
                                  f"but image {group.image_path} is {image.height}x{image.width}")
        if style.kind == "lisa":
            templates = LONG_QUESTION_LIST if sample.is_sentence else SHORT_QUESTION_LIST
            question, answer = rng.choice(templates), rng.choice(ANSWER_LIST)
        else:
            question, answer = None, DEFAULT_ANSWER
        out.append(TrainingSample(image=image, text=sample.text, is_sentence=sample.is_sentence, answer=answer,
                                  gt_masks=(gt == 1)[None].astype(np.float32), sample_id=sample.sample_id,
                                  question_template=question))
    return out


class EncodingCache:
    """Opened images and their frozen-encoder outputs (CLIP features, SAM image embedding), most
    recently used first. The CLIP tower and SAM's image encoder never train (they run without
    gradients), so an image's encoding is the same at every step and later epochs skip them."""

    def __init__(self, encode: Callable[[Image.Image], Any], size: int):
        self.encode, self.size = encode, int(size)
        self._items: OrderedDict[Path, tuple[Image.Image, Any]] = OrderedDict()

    def get(self, path: Path) -> tuple[Image.Image, Any]:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        image = open_image(path)
        item = (image, self.encode(image))
        if self.size > 0:
            self._items[path] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return item
