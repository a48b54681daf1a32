"""SAM from the segment-anything package: builders, LISA's pre/post-processing, prompting."""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide

SAM_IMAGE_SIZE = 1024
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam(
    *, encoder_embed_dim: int, encoder_depth: int, encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...], prompt_embed_dim: int = 256,
    vit_patch_size: int = 16, window_size: int = 14, decoder_dim: int | None = None,
    decoder_mlp_dim: int = 2048, decoder_heads: int = 8,
) -> Sam:
    """Assemble a SAM from explicit sizes (ViT-H: 1280, 32, 16, (7, 15, 23, 31))."""
    image_embedding_size = SAM_IMAGE_SIZE // vit_patch_size
    decoder_dim = decoder_dim or prompt_embed_dim
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth, embed_dim=encoder_embed_dim, img_size=SAM_IMAGE_SIZE, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=encoder_num_heads,
            patch_size=vit_patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=encoder_global_attn_indexes, window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=decoder_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_heads
            ),
            transformer_dim=decoder_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD),
    )


def build_sam_vit_h() -> Sam:
    return build_sam(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    )


def build_tiny_sam(prompt_embed_dim: int = 32) -> Sam:
    """Real SAM classes at tiny width; keeps the 1024 input and 64x64 embedding grid."""
    return build_sam(
        encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
        prompt_embed_dim=prompt_embed_dim, window_size=8, decoder_mlp_dim=64, decoder_heads=2,
    )


def build_toy_sam(prompt_embed_dim: int = 64, position_embedding: str = "zeros") -> Sam:
    """The toy world's SAM: a tiny image encoder with windowed attention only, a 64-wide decoder.

    Keeps the 1024 input and 64 x 64 embedding grid; without the global-attention block (a
    4096 x 4096 attention map) the encoder runs in tens of milliseconds on a CPU instead of a second.
    The decoder is wider than the tiny SAM's (64: its upscaled mask features have 64 / 8 = 8
    channels instead of 4), which learns to tell shapes apart from scratch several times faster.

    ``position_embedding``: the encoder's absolute position embedding, ``zeros`` (segment-anything's init)
    or ``sincos`` (2-D sine-cosine codes of the 64 x 64 grid). SAM's decoder attends with positional
    encodings added to its queries and keys but not to its values, so what it reads from the image carries
    a position only if the encoder's features do, as a trained SAM's do; a random encoder with a zero
    position embedding gives features without one.
    """
    sam = build_sam(
        encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(),
        prompt_embed_dim=prompt_embed_dim, window_size=8, decoder_mlp_dim=2 * prompt_embed_dim, decoder_heads=4,
    )
    if position_embedding == "sincos":
        from model.vision import sincos_position_embedding

        pos = sam.image_encoder.pos_embed
        grid, width = pos.shape[1], pos.shape[3]
        with torch.no_grad():
            pos.copy_(sincos_position_embedding(grid, width).reshape(1, grid, grid, width))
    elif position_embedding != "zeros":
        raise ValueError(f"model.sam_position_embedding: expected 'zeros' or 'sincos', got {position_embedding!r}")
    return sam


def build_toy_conv_sam(prompt_embed_dim: int = 64) -> Sam:
    """The toy world's pretrained SAM (``sam_arch: toy_conv``): a convolutional image encoder
    (model.toy_towers.ToyConvImageEncoder: 1024 input, 64 x 64 embedding) with SAM's own prompt encoder
    and mask decoder (64 wide, as :func:`build_toy_sam`). Its weights come from training/toy_towers.py."""
    from model.toy_towers import ToyConvImageEncoder

    grid = SAM_IMAGE_SIZE // 16
    return Sam(
        image_encoder=ToyConvImageEncoder(out_chans=prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2 * prompt_embed_dim,
                                          num_heads=4),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD),
    )


def load_sam_checkpoint(sam: Sam, path: str | Path) -> Sam:
    """Load a segment-anything ``.pth`` (e.g. sam_vit_h_4b8939.pth) without executing pickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path} (expected e.g. sam_vit_h_4b8939.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"SAM checkpoint {path} does not match: missing {missing[:10]}, unexpected {unexpected[:10]}")
    return sam


def sam_resized_size(size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an ``size`` image after :func:`sam_preprocess`'s resize (longest side 1024)."""
    return ResizeLongestSide.get_preprocess_shape(int(size[0]), int(size[1]), SAM_IMAGE_SIZE)


def sam_preprocess(image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """``H x W x 3`` uint8 RGB -> (``3 x 1024 x 1024`` float tensor, resized (h, w)).

    Longest side resized to 1024 (segment-anything's ResizeLongestSide), normalised on the
    0-255 scale, zero-padded right/bottom.
    """
    resized = ResizeLongestSide(SAM_IMAGE_SIZE).apply_image(image)
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    h, w = resized.shape[:2]
    return F.pad(x, (0, SAM_IMAGE_SIZE - w, 0, SAM_IMAGE_SIZE - h)), (h, w)


def sam_postprocess(
    low_res_logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """``K x 1 x h x w`` logits -> ``K x H x W`` logits at the original size (LISA's rule)."""
    logits = F.interpolate(
        low_res_logits.float(), (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    logits = logits[..., : resized_size[0], : resized_size[1]]
    logits = F.interpolate(logits, original_size, mode="bilinear", align_corners=False)
    return logits[:, 0]


@lru_cache(maxsize=64)
def _postprocess_matrix(low: int, resized: int, original: int) -> torch.Tensor:
    """``original x low``: :func:`sam_postprocess` along one axis as a matrix (rows of the identity
    through the same two bilinear resizes and the crop)."""
    eye = torch.eye(low).view(low, 1, low, 1)  # float32, as the logits: the same sampling positions and weights
    up = F.interpolate(eye, (SAM_IMAGE_SIZE, 1), mode="bilinear", align_corners=False)[:, :, :resized]
    down = F.interpolate(up, (original, 1), mode="bilinear", align_corners=False)
    return down[:, 0, :, 0].T.contiguous()


def sam_postprocess_separable(
    low_res_logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """:func:`sam_postprocess` as ``M_h @ X @ M_w^T``: both bilinear resizes and the crop are linear and
    act on rows and columns separately, so they fold into one matrix per axis.

    Equal to :func:`sam_postprocess` up to float rounding (about 1e-6 of the logits' scale; tested), and
    several times cheaper (no 1024 x 1024 intermediate, forward or backward): the training loss uses it.
    Evaluation keeps :func:`sam_postprocess`, LISA's own two ``F.interpolate`` calls, so that thresholded
    masks match LISA's bit for bit.
    """
    h, w = low_res_logits.shape[-2:]
    dtype, device = torch.float32, low_res_logits.device
    m_h = _postprocess_matrix(int(h), int(resized_size[0]), int(original_size[0])).to(device, dtype)
    m_w = _postprocess_matrix(int(w), int(resized_size[1]), int(original_size[1])).to(device, dtype)
    return m_h @ low_res_logits.float()[:, 0] @ m_w.T


def decode_masks(sam: Sam, image_embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """One mask per prompt: ``1 x C x 64 x 64`` embedding, ``K x C`` prompts -> ``K x 1 x 256 x 256``.

    Each [SEG] embedding is a sparse prompt; the dense prompt is ``no_mask_embed``;
    ``multimask_output=False`` (LISA).
    """
    prompt_encoder = sam.prompt_encoder
    _, dense = prompt_encoder(points=None, boxes=None, masks=None)
    sparse = prompts.unsqueeze(1).to(image_embedding.dtype)
    dense = dense.to(image_embedding.dtype).expand(prompts.shape[0], -1, -1, -1)
    low_res, _ = sam.mask_decoder(
        image_embeddings=image_embedding,
        image_pe=prompt_encoder.get_dense_pe().to(image_embedding.dtype),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image (grayscale, RGBA, palette, 16-bit, EXIF-rotated) -> ``H x W x 3`` uint8 RGB.

    16-bit grayscale is scaled to 8 bits by dropping the low byte, as ``cv2.imread`` (which LISA
    uses) does, rather than clipped at 255 as PIL's ``convert`` would.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))
