"""User-facing inference: one image, several queries -> masks (teacher-forced or chat).

The vision tower and the SAM image encoder run once per image; the queries of that image run
as one batch through the (optionally scheduled) decoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from csp.accounting import ModelDims
from csp.runner import StageRunner
from csp.schedule import StageSchedule
from csp.strategies import ClusteringInputs, ClusteringStrategy, build_strategy
from model.builder import LisaBundle
from model.inference import generate, teacher_forced
from model.prompt import DEFAULT_ANSWER, build_prompt, chat_prompt, tokenize_with_image
from model.sam import decode_masks, sam_postprocess, sam_preprocess, to_rgb_array


@dataclass(frozen=True)
class Query:
    """One referring expression / question about an image."""

    text: str
    is_sentence: bool
    sample_id: str


@dataclass
class QueryResult:
    """Masks for one query. ``mask``: ``H x W`` bool at the original size (first [SEG])."""

    sample_id: str
    mask: np.ndarray
    image_tokens: list[int]
    total_tokens: list[int]
    llm_ms: float
    masks: np.ndarray | None = field(repr=False, default=None)  # K x H x W, one per [SEG]
    seg_embeddings: torch.Tensor | None = field(repr=False, default=None)
    batch_size: int = 1  # queries that ran through the LLM together (llm_ms is their time / batch_size)


@dataclass
class ChatResult:
    text: str
    masks: np.ndarray  # K x H x W bool, one per generated [SEG]
    seg_embeddings: torch.Tensor
    image_tokens: list[int]
    total_tokens: list[int]


@dataclass
class ImageEncoding:
    """Everything computed once per image."""

    image: Image.Image
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    clip_features: torch.Tensor  # 1 x N x C
    cls_attention: torch.Tensor | None  # 1 x N
    image_embeds: torch.Tensor  # 1 x N x d (projector output)
    sam_embedding: torch.Tensor  # 1 x C x 64 x 64


class Timer:
    """Milliseconds of a region: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1000.0


class SegmentationPipeline:
    """LISA inference with an optional LVLM_CSP schedule."""

    def __init__(self, bundle: LisaBundle, schedule: StageSchedule | None = None):
        self.bundle = bundle
        self.model = bundle.model
        self.schedule = schedule
        tower = self.model.vision_tower
        self.runner = StageRunner(self.model.model, schedule, tower.num_patches)
        self.strategy: ClusteringStrategy | None = None
        if schedule is not None and schedule.clusters(tower.num_patches):
            self.strategy = build_strategy(schedule.clustering, **dict(schedule.clustering_kwargs))

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_image_tokens(self) -> int:
        return self.model.vision_tower.num_patches

    @property
    def use_im_start_end(self) -> bool:
        """The checkpoint's ``mm_use_im_start_end``: whether ``<im_start>``/``<im_end>`` frame the image."""
        return self.model.extras.mm_use_im_start_end

    def prompt_ids(self, text: str, is_sentence: bool, answer: str | None = DEFAULT_ANSWER,
                   question_template: str | None = None) -> list[int]:
        """Token ids of LISA's validation/training prompt for this checkpoint (image slot included)."""
        prompt = build_prompt(text, is_sentence, answer, question_template, use_im_start_end=self.use_im_start_end)
        return tokenize_with_image(prompt, self.bundle.tokenizer)

    def chat_ids(self, text: str) -> list[int]:
        """Token ids of LISA's chat prompt (chat.py) for ``text`` as typed, ending at ``ASSISTANT:``."""
        return tokenize_with_image(chat_prompt(text, use_im_start_end=self.use_im_start_end), self.bundle.tokenizer)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_config(self.model.config)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> ImageEncoding:
        rgb = to_rgb_array(image)
        device, tower = self.bundle.device, self.model.vision_tower
        pixels = tower.processor(images=Image.fromarray(rgb), return_tensors="pt")["pixel_values"].to(device)
        layer = self.strategy.cls_attention_layer if self.strategy is not None else None
        features, cls_row = tower(pixels, cls_attention_layer=layer)
        sam_input, resized = sam_preprocess(rgb)
        sam = self.model.sam
        embedding = sam.image_encoder(sam_input.unsqueeze(0).to(device=device, dtype=self.bundle.dtype))
        return ImageEncoding(
            image=Image.fromarray(rgb), original_size=rgb.shape[:2], resized_size=resized,
            clip_features=features, cls_attention=cls_row, image_embeds=self.model.project_images(features),
            sam_embedding=embedding,
        )

    def cluster(self, enc: ImageEncoding, sample_ids: list[str]) -> torch.Tensor | None:
        """``B x Nc`` clustered indices for B queries of one image (None: no clustering stage)."""
        if self.strategy is None:
            return None
        size = len(sample_ids)
        tower = self.model.vision_tower
        inputs = ClusteringInputs(
            features=enc.clip_features.expand(size, -1, -1), grid=tower.grid,
            crop_size=tower.config.image_size, images=[enc.image] * size, sample_ids=sample_ids,
            cls_attention=None if enc.cls_attention is None else enc.cls_attention.expand(size, -1),
        )
        return self.strategy.select(inputs, self.schedule.Nc)

    def masks_for(self, enc: ImageEncoding, prompts: torch.Tensor) -> np.ndarray:
        """``K x out_dim`` prompt embeddings -> ``K x H x W`` bool masks at the original size."""
        if prompts.shape[0] == 0:
            return np.zeros((0, *enc.original_size), dtype=bool)
        low_res = decode_masks(self.model.sam, enc.sam_embedding, prompts)
        logits = sam_postprocess(low_res, enc.resized_size, enc.original_size)
        return (logits > 0).cpu().numpy()

    @torch.no_grad()
    def segment(self, image: Image.Image, queries: list[Query], *,
                queries_per_batch: int | None = None) -> list[QueryResult]:
        """Teacher-forced LISA evaluation (answer ``[SEG].``) for all queries of one image.

        The image encoders (CLIP, SAM's ViT) and the clustering strategy run once for the image;
        the LLM runs the queries in chunks of ``queries_per_batch`` (None: all at once).
        """
        enc = self.encode_image(image)
        sample_ids = [q.sample_id for q in queries]
        keep = self.cluster(enc, sample_ids)  # outside the timer: a detector's cost is reported apart
        step = len(queries) if not queries_per_batch else int(queries_per_batch)
        if step < 1:
            raise ValueError(f"queries_per_batch must be >= 1 or None, got {queries_per_batch!r}")
        results = []
        for start in range(0, len(queries), step):
            chunk = queries[start: start + step]
            chunk_keep = None if keep is None else keep[start: start + step]
            results += self._segment_encoded(enc, chunk, chunk_keep)
        return results

    def _segment_encoded(self, enc: ImageEncoding, queries: list[Query],
                         keep: torch.Tensor | None) -> list[QueryResult]:
        """One LLM batch over an encoded image; ``keep``: ``B x Nc`` clustered indices or None."""
        ids = [self.prompt_ids(q.text, q.is_sentence) for q in queries]
        tok = self.bundle.token_ids
        with Timer(self.bundle.device) as timer:
            out = teacher_forced(self.model, self.runner, ids, enc.image_embeds.expand(len(queries), -1, -1),
                                 tok.seg, tok.pad, cluster_keep=keep)
        results = []
        for query, emb, record in zip(queries, out.seg_embeddings, out.records):
            masks = self.masks_for(enc, emb)
            results.append(QueryResult(
                sample_id=query.sample_id, mask=masks[0], masks=masks, image_tokens=record.image_tokens,
                total_tokens=record.total_tokens, llm_ms=timer.ms / len(queries), seg_embeddings=emb,
                batch_size=len(queries),
            ))
        return results

    @torch.no_grad()
    def chat(self, image: Image.Image, text: str, *, max_new_tokens: int = 32,
             sample_id: str = "chat") -> ChatResult:
        """Generate an answer with the KV cache; one mask per generated [SEG].

        ``text`` is sent as typed, as LISA's chat.py does: to ask for a mask, say so (e.g.
        ``model.prompt.with_mask_request(text)`` appends " Please output segmentation mask.").
        """
        enc = self.encode_image(image)
        ids = [self.chat_ids(text)]
        tok = self.bundle.token_ids
        out = generate(self.model, self.runner, ids, enc.image_embeds, tok.seg, tok.eos, tok.pad,
                       max_new_tokens=max_new_tokens, cluster_keep=self.cluster(enc, [sample_id]))
        text_out = self.bundle.tokenizer.decode(out.generated[0], skip_special_tokens=False)
        record = out.records[0]
        return ChatResult(text_out, self.masks_for(enc, out.seg_embeddings[0]), out.seg_embeddings[0],
                          record.image_tokens, record.total_tokens)
