"""User-facing inference: one image, several queries -> masks (teacher-forced or chat).

The vision tower and the SAM image encoder run once per image; the queries of that image run
as one batch through the (optionally scheduled) decoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from csp.accounting import ModelDims
from csp.methods import Method, ReducedImages, VisionFeatures, as_method
from csp.runner import CompileOptions, StageRunner
from csp.schedule import StageSchedule
from csp.strategies import ClusteringInputs
from csp.tokens import KeptImageTokens
from model.bundle import LisaBundle
from model.inference import generate, teacher_forced
from model.prompt import DEFAULT_ANSWER, build_prompt, chat_prompt, expression_span, tokenize_with_image, vqa_prompt
from model.sam import decode_masks, sam_postprocess, sam_preprocess, sam_resized_size, to_rgb_array


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
    kept_image_tokens: list[KeptImageTokens] = field(repr=False, default_factory=list)  # this query's row


@dataclass
class ChatResult:
    text: str
    masks: np.ndarray  # K x H x W bool, one per generated [SEG]
    seg_embeddings: torch.Tensor
    image_tokens: list[int]
    total_tokens: list[int]
    kept_image_tokens: list[KeptImageTokens] = field(repr=False, default_factory=list)
    llm_ms: float = 0.0  # the generation's LLM time (prefill + every decoding step), as Timer measures it


@dataclass
class ImageEncoding:
    """Everything computed once per image."""

    image: Image.Image
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    clip_features: torch.Tensor  # 1 x N x C
    cls_attention: torch.Tensor | None  # 1 x N
    image_embeds: torch.Tensor  # 1 x N x d (projector output)
    sam_embedding: torch.Tensor | None  # 1 x C x 64 x 64 (None: encode_image(sam=False))
    reduced: ReducedImages | None = None  # a before-LLM reducer's tokens (features 1 x M x C)
    reduced_embeds: torch.Tensor | None = None  # 1 x M x d, their projector output
    vision: VisionFeatures | None = None  # CLIP's hidden states, for query-dependent selection (LiteLVLM)


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
    """LISA inference with an optional image-token reduction method.

    ``method``: a registered :class:`~csp.methods.Method` (``csp.config.method_from_config`` builds
    it from a config), None for plain LISA; a :class:`~csp.schedule.StageSchedule` stands for the
    ``csp`` method with those parameters.
    """

    def __init__(self, bundle: LisaBundle, method: Method | StageSchedule | None = None, *,
                 compile: CompileOptions | None = None):
        self.bundle = bundle
        self.model = bundle.model
        self.method = as_method(method)
        tower = self.model.vision_tower
        if self.method is not None:
            self.method.check()  # bad settings (e.g. a missing weights file) fail here, before any image
        self.runner = StageRunner(self.model.model, self.method, tower.num_patches, compile=compile)

    @property
    def selects_input(self) -> bool:
        """Whether the method picks the grid tokens that enter layer 0 (``Method.select_input``)."""
        return self.runner.plan.input_keep

    def extra_cost(self) -> dict[str, float]:
        """The method's cost outside the LLM so far (``Method.extra_cost``; {} for plain LISA)."""
        return self.method.extra_cost() if self.method is not None else {}

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

    def vqa_ids(self, question: str, answer: str | None) -> list[int]:
        """Token ids of a VQA turn (model.prompt.vqa_prompt) for this checkpoint."""
        return tokenize_with_image(vqa_prompt(question, answer, use_im_start_end=self.use_im_start_end),
                                   self.bundle.tokenizer)

    def chat_ids(self, text: str) -> list[int]:
        """Token ids of LISA's chat prompt (chat.py) for ``text`` as typed, ending at ``ASSISTANT:``."""
        return tokenize_with_image(chat_prompt(text, use_im_start_end=self.use_im_start_end), self.bundle.tokenizer)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_config(self.model.config)

    def sam_embedding(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(SAM's ``1 x C x 64 x 64`` image embedding of an ``H x W x 3`` uint8 array, its resized (h, w));
        with gradients where the caller has them on (training a SAM image encoder)."""
        sam_input, resized = sam_preprocess(rgb)
        embedding = self.model.sam.image_encoder(
            sam_input.unsqueeze(0).to(device=self.bundle.device, dtype=self.bundle.dtype))
        return embedding, resized

    @torch.no_grad()
    def encode_image(self, image: Image.Image, sam: bool = True) -> ImageEncoding:
        """``sam=False``: no SAM image embedding (``sam_embedding`` None), for a trainer that runs a
        trainable SAM encoder itself (:meth:`sam_embedding`)."""
        rgb = to_rgb_array(image)
        device, tower = self.bundle.device, self.model.vision_tower
        pixels = tower.processor(images=Image.fromarray(rgb), return_tensors="pt")["pixel_values"].to(device)
        layer = self.method.cls_attention_layer if self.method is not None else None
        features, cls_row, hidden = tower.encode(pixels, cls_attention_layer=layer)
        if sam:
            embedding, resized = self.sam_embedding(rgb)
        else:
            embedding, resized = None, sam_resized_size(rgb.shape[:2])
        reduced, vision = None, None
        if self.method is not None:
            vision = VisionFeatures(hidden_states=hidden, layers=tower.encoder_layers,
                                    select_layer=tower.select_layer, grid=tower.grid)
            reduced = self.method.reduce_images(vision)
        return ImageEncoding(
            image=Image.fromarray(rgb), original_size=rgb.shape[:2], resized_size=resized,
            clip_features=features, cls_attention=cls_row, image_embeds=self.model.project_images(features),
            sam_embedding=embedding, reduced=reduced,
            reduced_embeds=None if reduced is None else self.model.project_images(reduced.features),
            vision=vision,
        )

    def image_inputs(self, enc: ImageEncoding, size: int, texts: list[str] | None = None,
                     image_texts: list[str] | None = None) -> dict[str, torch.Tensor | None]:
        """The image-slot embeddings (and, after a reducer, their validity and grid sources) for
        ``size`` queries of one image, as keyword arguments of teacher_forced / generate. ``texts``: the
        queries' texts, for a method whose image slot depends on the query (``per_query_reduction``);
        ``image_texts``: every query of the image."""
        if self.method is not None and self.method.per_query_reduction:
            if texts is None or len(texts) != size:
                raise ValueError(f"{self.method.name} selects image tokens per query: pass the {size} query texts")
            reduced = self.method.reduce_queries(enc.vision, texts, image_texts)
            if reduced is not None:  # None: the image-level slot below (the N grid tokens or reduce_images')
                return {"image_embeds": self.model.project_images(reduced.features), "image_valid": reduced.valid,
                        "image_source": reduced.source}
        if enc.reduced is None:
            return {"image_embeds": enc.image_embeds.expand(size, -1, -1)}
        return {"image_embeds": enc.reduced_embeds.expand(size, -1, -1),
                "image_valid": enc.reduced.valid.expand(size, -1), "image_source": enc.reduced.source.expand(size, -1)}

    def cluster(self, enc: ImageEncoding, sample_ids: list[str], texts: list[str] | None = None) -> torch.Tensor | None:
        """``B x Nc`` indices kept before the LLM for B queries of one image (None: all tokens);
        ``texts``: the queries' texts (text-guided strategies need them)."""
        if self.method is None or not self.runner.plan.input_keep:
            return None
        size = len(sample_ids)
        tower = self.model.vision_tower
        inputs = ClusteringInputs(
            features=enc.clip_features.expand(size, -1, -1), grid=tower.grid,
            crop_size=tower.config.image_size, images=[enc.image] * size, sample_ids=sample_ids,
            cls_attention=None if enc.cls_attention is None else enc.cls_attention.expand(size, -1),
            texts=texts, image_texts=texts, vision=enc.vision,
        )
        keep = self.method.select_input(inputs)
        if keep is None:  # a forced input stage that keeps every token (StageRunner(always_move_tokens=True))
            keep = torch.arange(inputs.num_tokens, device=enc.clip_features.device).expand(size, -1)
        return keep

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
        texts = [q.text for q in queries]
        keep = self.cluster(enc, sample_ids, texts)  # outside the timer: a detector's cost is reported apart
        step = len(queries) if not queries_per_batch else int(queries_per_batch)
        if step < 1:
            raise ValueError(f"queries_per_batch must be >= 1 or None, got {queries_per_batch!r}")
        results = []
        for start in range(0, len(queries), step):
            chunk = queries[start: start + step]
            chunk_keep = None if keep is None else keep[start: start + step]
            results += self._segment_encoded(enc, chunk, chunk_keep, texts)
        return results

    def teacher_forced(self, enc: ImageEncoding, queries: list[Query], keep: torch.Tensor | None,
                       image_texts: list[str] | None = None) -> Any:
        """The LLM over an encoded image for ``queries`` with the evaluation prompt (answer ``[SEG].``)
        under the method: ``model.inference.teacher_forced``'s output (``seg_embeddings``, records,
        kept tokens). ``keep``: the method's input selection (:meth:`cluster`) or None."""
        ids, prompt_lengths = [], []
        for q in queries:
            ids.append(self.prompt_ids(q.text, q.is_sentence))
            prompt = self.prompt_ids(q.text, q.is_sentence, answer=None)
            if ids[-1][: len(prompt)] != prompt:
                raise ValueError(f"query {q.sample_id!r}: the prompt with its answer does not start with the "
                                 "tokens of the prompt alone, so the last prompt row is undefined")
            prompt_lengths.append(len(prompt))
        tok = self.bundle.token_ids
        spans = [expression_span(q.text, q.is_sentence, self.bundle.tokenizer, use_im_start_end=self.use_im_start_end)
                 for q in queries]  # the user's words (Simignore compares with them)
        return teacher_forced(self.model, self.runner, ids, seg_id=tok.seg, pad_id=tok.pad, cluster_keep=keep,
                              prompt_lengths=prompt_lengths, expression_spans=spans,
                              **self.image_inputs(enc, len(queries), [q.text for q in queries], image_texts))

    def _segment_encoded(self, enc: ImageEncoding, queries: list[Query],
                         keep: torch.Tensor | None, image_texts: list[str] | None = None) -> list[QueryResult]:
        """One LLM batch over an encoded image; ``keep``: ``B x Nc`` clustered indices or None."""
        with Timer(self.bundle.device) as timer:
            out = self.teacher_forced(enc, queries, keep, image_texts)
        results = []
        for i, (query, emb, record) in enumerate(zip(queries, out.seg_embeddings, out.records)):
            masks = self.masks_for(enc, emb)
            results.append(QueryResult(
                sample_id=query.sample_id, mask=masks[0], masks=masks, image_tokens=record.image_tokens,
                total_tokens=record.total_tokens, llm_ms=timer.ms / len(queries), seg_embeddings=emb,
                batch_size=len(queries),
                kept_image_tokens=[replace(k, indices=k.indices[i: i + 1]) for k in out.kept_image_tokens],
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
        keep = self.cluster(enc, [sample_id], [text])  # outside the timer, as in segment()
        with Timer(self.bundle.device) as timer:
            out = generate(self.model, self.runner, ids, seg_id=tok.seg, eos_id=tok.eos, pad_id=tok.pad,
                           max_new_tokens=max_new_tokens, cluster_keep=keep, **self.image_inputs(enc, 1, [text]))
        text_out = self.bundle.tokenizer.decode(out.generated[0], skip_special_tokens=False)
        record = out.records[0]
        return ChatResult(text_out, self.masks_for(enc, out.seg_embeddings[0]), out.seg_embeddings[0],
                          record.image_tokens, record.total_tokens, out.kept_image_tokens, llm_ms=timer.ms)
