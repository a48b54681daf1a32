"""The decoder-mode feature cache: SAM image embeddings and [SEG] prompt embeddings on disk.

In the mIoU* setting everything upstream of SAM's mask decoder is frozen (CLIP, LLaVA with the
method in the LLM, ``text_hidden_fcs``, SAM's image and prompt encoders), so the decoder's inputs are
computed once per sample. Layout of a cache directory::

    meta.json                         {"version", "fingerprint", "method", "model_name", "prompts"}
    <split with | as _>/<group>.safetensors
        sam_embedding                 1 x C x 64 x 64
        prompt/<sample_id>            K x out_dim ([SEG] embeddings after text_hidden_fcs)
        metadata: image, resized "h,w", original "H,W"

The key is checkpoint (fingerprint of the frozen weights) + method with its parameters + sample:
opening a cache written for another model or method is an error, never a silent mix; a sample missing from its
image's file is an error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from datasets.base import ImageGroup, Sample
from model.pipeline import Query, SegmentationPipeline
from model.training import DecoderFeatures
from runs.images import open_image

CACHE_VERSION = 2  # 2: keyed by the method (any method), prompts run as evaluation runs them


@torch.no_grad()
def group_features(pipe: SegmentationPipeline, group: ImageGroup,
                   encoded: tuple[Any, Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """Decoder inputs of every query of ``group``: ``({sample_id: K x out_dim}, encoding)``.

    All queries of the image run as one teacher-forced batch with the evaluation prompt under the
    pipeline's method (``SegmentationPipeline.teacher_forced``), exactly as evaluation runs them, so
    the decoder is fine-tuned on the embeddings it will be given.
    ``encoded``: the (image, encoding) pair when already computed (frozen encoders).
    """
    enc = encoded[1] if encoded is not None else pipe.encode_image(open_image(group.image_path))
    queries = [Query(s.text, s.is_sentence, s.sample_id) for s in group.samples]
    out = pipe.teacher_forced(enc, queries, pipe.cluster(enc, [q.sample_id for q in queries]))
    return {s.sample_id: e.detach() for s, e in zip(group.samples, out.seg_embeddings, strict=True)}, enc


def features_for(prompts: dict[str, torch.Tensor], enc: Any, samples: Sequence[Sample]) -> list[DecoderFeatures]:
    return [DecoderFeatures(enc.sam_embedding, prompts[s.sample_id], tuple(enc.resized_size),
                            tuple(enc.original_size)) for s in samples]


class DecoderCache:
    """One cache directory bound to one key (fingerprint, method, model name, prompt style)."""

    def __init__(self, root: str | Path, key: dict[str, Any]):
        self.root = Path(root)
        self.key = {"version": CACHE_VERSION, **key}
        meta = self.root / "meta.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != self.key:
                diff = {k: (found.get(k), self.key.get(k)) for k in set(found) | set(self.key)
                        if found.get(k) != self.key.get(k)}
                raise ValueError(f"decoder cache {self.root} was built for another model or method: "
                                 f"(cached, this run) differ in {diff}; use another mode.cache_dir or delete it")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(self.key, indent=1))

    def path(self, group: ImageGroup, index: int) -> Path:
        return self.root / group.split.replace("|", "_") / f"{index:07d}.safetensors"

    def has(self, group: ImageGroup, index: int) -> bool:
        return self.path(group, index).is_file()

    def put(self, group: ImageGroup, index: int, prompts: dict[str, torch.Tensor], enc: Any) -> None:
        path = self.path(group, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"sam_embedding": enc.sam_embedding.detach().contiguous().cpu()}
        tensors.update({f"prompt/{k}": v.contiguous().cpu() for k, v in prompts.items()})
        meta = {"image": str(group.image_path), "resized": ",".join(map(str, enc.resized_size)),
                "original": ",".join(map(str, enc.original_size))}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.rename(path)  # a file is either complete or absent

    def get(self, group: ImageGroup, index: int, samples: Sequence[Sample],
            device: torch.device) -> list[DecoderFeatures]:
        path = self.path(group, index)
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        if meta.get("image") != str(group.image_path):
            raise ValueError(f"decoder cache file {path} holds image {meta.get('image')}, expected "
                             f"{group.image_path}: the split changed since the cache was built")
        tensors = load_file(str(path), device=str(device))
        missing = [s.sample_id for s in samples if f"prompt/{s.sample_id}" not in tensors]
        if missing:
            raise KeyError(f"decoder cache file {path} has no entry for samples {missing}")
        resized = tuple(int(v) for v in meta["resized"].split(","))
        original = tuple(int(v) for v in meta["original"].split(","))
        return [DecoderFeatures(tensors["sam_embedding"], tensors[f"prompt/{s.sample_id}"], resized, original)
                for s in samples]
