"""SAM pre/post-processing against references written here, and awkward images end to end.

References: segment-anything's ResizeLongestSide goes through torchvision's ``to_pil_image``
+ ``resize`` with its default ``InterpolationMode.BILINEAR``, i.e. PIL's bilinear resize, so
the preprocessing reference calls PIL directly. The postprocessing reference is a plain numpy
bilinear interpolation with half-pixel centres (``align_corners=False``), edges clamped.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import LisaBundle
from model.pipeline import Query, QueryResult, SegmentationPipeline
from model.sam import sam_postprocess, sam_postprocess_separable, sam_preprocess, to_rgb_array
from tests.conftest import random_pil_image

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
QUERIES = [Query("dog", False, "q0"), Query("the cup on the table", True, "q1")]


# -- references -----------------------------------------------------------------------------------
def target_size(h: int, w: int) -> tuple[int, int]:
    scale = 1024 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def reference_preprocess(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """``H x W x 3`` uint8 -> (``3 x 1024 x 1024`` float64, resized (h, w))."""
    h, w = target_size(*rgb.shape[:2])
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    out = np.zeros((1024, 1024, 3))
    out[:h, :w] = (resized - MEAN) / STD
    return out.transpose(2, 0, 1), (h, w)


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` matrix of 1-D linear interpolation, half-pixel centres, edges clamped."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in))
    weights[np.arange(n_out), lo] += 1 - frac
    weights[np.arange(n_out), hi] += frac
    return weights


def bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``H x W`` -> ``size`` (separable: rows then columns)."""
    return linear_weights(image.shape[0], size[0]) @ image @ linear_weights(image.shape[1], size[1]).T


def reference_postprocess(low_res: np.ndarray, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    return np.stack([bilinear(bilinear(m, (1024, 1024))[: resized[0], : resized[1]], original) for m in low_res[:, 0]])


# -- preprocessing --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(17, 23), (40, 500), (500, 40), (300, 300), (1100, 700), (1024, 640)])
def test_sam_preprocess_matches_reference(size: tuple[int, int]) -> None:
    rgb = np.asarray(random_pil_image(*size, seed=sum(size)))
    x, resized = sam_preprocess(rgb)
    expected, expected_size = reference_preprocess(rgb)
    assert resized == expected_size
    assert x.shape == (3, 1024, 1024) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-5)
    h, w = resized
    assert not x[:, h:, :].any() and not x[:, :, w:].any()


def test_target_size_rounds_half_up() -> None:
    # 17 * 1024 / 23 = 756.87 -> 757 (truncation would give 756); 40 * 1024 / 500 = 81.92 -> 82
    assert sam_preprocess(np.zeros((17, 23, 3), np.uint8))[1] == (757, 1024)
    assert sam_preprocess(np.zeros((40, 500, 3), np.uint8))[1] == (82, 1024)
    assert sam_preprocess(np.zeros((500, 40, 3), np.uint8))[1] == (1024, 82)


def test_normalisation_constants_on_flat_image() -> None:
    # a flat 0-255 colour normalises to (value - mean) / std everywhere inside the resized area
    rgb = np.empty((10, 20, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    x, (h, w) = sam_preprocess(rgb)
    expected = (np.array([200, 100, 50]) - MEAN) / STD
    np.testing.assert_allclose(x[:, :h, :w].numpy(), np.broadcast_to(expected[:, None, None], (3, h, w)), atol=1e-5)


# -- postprocessing -------------------------------------------------------------------------------
def test_numpy_bilinear_reference_sanity() -> None:
    # upsampling 2 -> 4 with half-pixel centres: [a, .75a+.25b, .25a+.75b, b]
    np.testing.assert_allclose(bilinear(np.array([[0.0, 4.0]]), (1, 4)), [[0.0, 1.0, 3.0, 4.0]])
    np.testing.assert_allclose(bilinear(np.array([[0.0, 4.0, 8.0, 12.0]]), (1, 2)), [[2.0, 10.0]])


@pytest.mark.parametrize("original", [(37, 53), (53, 37), (17, 23), (300, 120)])
def test_sam_postprocess_matches_numpy_bilinear(original: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(7)
    low_res = torch.randn(2, 1, 16, 16, generator=gen) * 4
    resized = target_size(*original)
    out = sam_postprocess(low_res, resized, original)
    assert out.shape == (2, *original)
    expected = reference_postprocess(low_res.double().numpy(), resized, original)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("original", [(37, 53), (53, 37), (300, 120), (128, 128)])
def test_separable_postprocess_matches_numpy_bilinear_and_gradients(original: tuple[int, int]) -> None:
    # the training loss's matrix form against the same independent numpy reference, and its gradient
    # against the gradient through LISA's two F.interpolate calls
    gen = torch.Generator().manual_seed(11)
    low_res = (torch.randn(3, 1, 16, 16, generator=gen) * 4).requires_grad_(True)
    resized = target_size(*original)
    out = sam_postprocess_separable(low_res, resized, original)
    assert out.shape == (3, *original)
    expected = reference_postprocess(low_res.detach().double().numpy(), resized, original)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-4)
    weight = torch.randn(3, *original, generator=gen)
    (grad_sep,) = torch.autograd.grad((out * weight).sum(), low_res)
    (grad_ref,) = torch.autograd.grad((sam_postprocess(low_res, resized, original) * weight).sum(), low_res)
    torch.testing.assert_close(grad_sep, grad_ref, rtol=1e-4, atol=1e-4)  # sums of ~1e4 terms in float32


# -- awkward images through segment() ------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_bundle: LisaBundle) -> SegmentationPipeline:
    return SegmentationPipeline(tiny_bundle)


def check_masks(results: list[QueryResult], size: tuple[int, int]) -> None:
    assert [r.sample_id for r in results] == [q.sample_id for q in QUERIES]
    for r in results:
        assert r.mask.shape == size and r.mask.dtype == bool
        assert r.masks.shape == (1, *size)


def assert_same_masks(a: list[QueryResult], b: list[QueryResult]) -> None:
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.masks, y.masks)
        assert torch.equal(x.seg_embeddings, y.seg_embeddings)


@pytest.mark.parametrize("size", [(40, 500), (500, 40), (17, 23)])
def test_extreme_and_tiny_images(pipe: SegmentationPipeline, size: tuple[int, int]) -> None:
    check_masks(pipe.segment(random_pil_image(*size, seed=3), QUERIES), size)


def test_grayscale_is_gray_rgb(pipe: SegmentationPipeline) -> None:
    gray = random_pil_image(30, 44, "L", seed=4)
    rgb = Image.fromarray(np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    results = pipe.segment(gray, QUERIES)
    check_masks(results, (30, 44))
    assert_same_masks(results, pipe.segment(rgb, QUERIES))


def test_rgba_drops_alpha(pipe: SegmentationPipeline) -> None:
    rgba = random_pil_image(30, 44, "RGBA", seed=5)
    rgb = Image.fromarray(np.asarray(rgba)[..., :3].copy())
    results = pipe.segment(rgba, QUERIES)
    check_masks(results, (30, 44))
    assert_same_masks(results, pipe.segment(rgb, QUERIES))


def test_palette_uses_palette_colours(pipe: SegmentationPipeline) -> None:
    pal = random_pil_image(30, 44, "P", seed=6)
    palette = np.array(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    rgb = Image.fromarray(palette[np.asarray(pal)])
    results = pipe.segment(pal, QUERIES)
    check_masks(results, (30, 44))
    assert_same_masks(results, pipe.segment(rgb, QUERIES))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_high_bit_depth_images(pipe: SegmentationPipeline, mode: str) -> None:
    image = random_pil_image(30, 44, "I;16", seed=7)
    if mode == "I":
        image = image.convert("I")
    assert image.mode == mode
    check_masks(pipe.segment(image, QUERIES), (30, 44))


def exif_rotated_jpeg(height: int, width: int, orientation: int) -> Image.Image:
    """A JPEG stored ``width x height`` whose EXIF says how to rotate it for display."""
    stored = random_pil_image(height, width, seed=8)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    buf.seek(0)
    return Image.open(buf)


def test_exif_rotated_jpeg(pipe: SegmentationPipeline) -> None:
    jpeg = exif_rotated_jpeg(30, 52, orientation=6)
    assert jpeg.size == (52, 30) and jpeg.getexif()[0x0112] == 6
    # orientation 6: the stored pixels are shown rotated 90 degrees clockwise
    upright = Image.fromarray(np.rot90(np.asarray(jpeg.convert("RGB")), k=-1).copy())
    results = pipe.segment(jpeg, QUERIES)
    check_masks(results, (52, 30))
    assert_same_masks(results, pipe.segment(upright, QUERIES))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_to_rgb_array_shape_and_dtype(mode: str) -> None:
    arr = to_rgb_array(random_pil_image(9, 13, mode, seed=9))
    assert arr.shape == (9, 13, 3) and arr.dtype == np.uint8


def test_16bit_grayscale_is_scaled_like_cv2() -> None:
    """cv2.imread (LISA's reader) keeps the high byte of 16-bit pixels; independent check."""

    values = np.array([[0, 255, 256, 4660], [65535, 32768, 511, 1024]], dtype=np.uint16)
    image = Image.fromarray(values)  # uint16 arrays become mode I;16
    assert image.mode == "I;16"
    expected = np.array([[0, 0, 1, 18], [255, 128, 1, 4]], dtype=np.uint8)  # v // 256 by hand
    rgb = to_rgb_array(image)
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], expected)


@pytest.mark.slow
def test_postprocess_benchmark_reports_both_paths_and_their_agreement(capsys: pytest.CaptureFixture) -> None:
    from scripts.benchmark_postprocess import main

    report = main(["--size", "40x50", "--masks", "2", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out) == report
    (row,) = report["sizes"]
    assert row["original_size"] == [40, 50] and row["resized_size"] == [819, 1024] and row["masks"] == 2
    assert row["interpolate_median_s"] > 0 and row["separable_median_s"] > 0
    assert row["speedup"] == pytest.approx(row["interpolate_median_s"] / row["separable_median_s"])
    assert row["max_abs_logit_diff"] < 1e-4 and row["max_abs_grad_diff"] < 1e-6
    with pytest.raises(SystemExit):
        main(["--size", "40by50"])
    # the README's command as written: the toy and a COCO-sized image
    assert [row["original_size"] for row in main([])["sizes"]] == [[128, 128], [480, 640]]
