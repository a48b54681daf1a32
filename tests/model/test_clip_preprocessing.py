"""CLIP preprocessing as LISA ran it (transformers 4.31's PIL CLIPImageProcessor), checked against
an independent PIL/numpy computation of the same steps:

- resize the shortest side to the crop size with PIL bicubic on the uint8 image; the longest side
  becomes ``int(size * long / short)`` (4.31 ``get_resize_output_image_size``, truncated);
- center crop at ``top = (h - crop) // 2``, ``left = (w - crop) // 2`` (4.31 ``center_crop``);
- rescale by 1/255, normalise with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std
  (0.26862954, 0.26130258, 0.27577711).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from model.builder import load_vision_tower
from model.pipeline import SegmentationPipeline
from model.vision import clip_processor_for, load_clip_processor
from tests.conftest import random_pil_image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
#: One grey level after normalisation is 1 / 255 / std >= 0.0142; float rounding stays far below.
ATOL = 1e-5


def reference_pixels(image: Image.Image, crop: int) -> np.ndarray:
    """``3 x crop x crop`` float32, computed step by step with PIL and numpy."""
    width, height = image.size
    if width <= height:
        new_w, new_h = crop, int(crop * height / width)
    else:
        new_w, new_h = int(crop * width / height), crop
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    cropped = resized[top:top + crop, left:left + crop].astype(np.float32) / 255.0
    return ((cropped - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("height, width", [(37, 61), (61, 37), (225, 301), (500, 224), (224, 224), (97, 355)])
def test_processor_matches_pil_reference(height: int, width: int) -> None:
    image = random_pil_image(height, width, seed=height * 1000 + width)
    processor = clip_processor_for(224)
    assert isinstance(processor, CLIPImageProcessorPil)
    got = processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()
    expected = reference_pixels(image, 224)
    assert got.shape == expected.shape == (3, 224, 224)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_clip_directory_loads_the_pil_processor(tmp_path: Path) -> None:
    """openai/clip-vit-large-patch14's preprocessor_config.json (old integer size/crop_size form)."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN.tolist(),
        "image_std": STD.tolist(), "resample": 3, "size": 224,
    }))
    processor = load_clip_processor(tmp_path)
    assert isinstance(processor, CLIPImageProcessorPil)
    image = random_pil_image(83, 131, seed=1)
    got = processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()
    np.testing.assert_allclose(got, reference_pixels(image, 224), atol=ATOL, rtol=0)


def test_pipeline_feeds_clip_the_pil_pixels(tiny_bundle, saved_tiny_checkpoint) -> None:
    """A tower loaded from a CLIP directory preprocesses with the PIL class, and the pipeline's
    CLIP features are the tower's output on exactly the reference pixels."""
    assert isinstance(load_vision_tower(saved_tiny_checkpoint.clip_dir).processor, CLIPImageProcessorPil)
    tower = tiny_bundle.model.vision_tower
    image = random_pil_image(45, 77, seed=7)
    expected = torch.from_numpy(reference_pixels(image, tower.config.image_size))[None]
    with torch.no_grad():
        features, _ = tower(expected)
    got = SegmentationPipeline(tiny_bundle).encode_image(image).clip_features
    torch.testing.assert_close(got, features, atol=1e-5, rtol=0)


def test_tower_takes_layer_minus_two_without_cls(tiny_bundle) -> None:
    """LLaVA's feature_select: ``hidden_states[mm_vision_select_layer = -2][:, 1:]`` (CLS dropped)."""
    tower = tiny_bundle.model.vision_tower
    pixels = torch.from_numpy(reference_pixels(random_pil_image(30, 50, seed=3), 224))[None]
    with torch.no_grad():
        hidden = tower.clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        features, _ = tower(pixels)
    assert tower.select_layer == -2 and features.shape == (1, tower.num_patches, tower.config.hidden_size)
    assert torch.equal(features, hidden[len(hidden) - 2][:, 1:])
