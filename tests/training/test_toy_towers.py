"""The toy world's pretrained towers (training/toy_towers.py, committed in assets/toy_towers): the
stages run end to end and save what the toy LISA loads; the committed towers know what they were
pretrained to know (checked with probes fitted here, not with the pretraining's own heads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.toy import KINDS, Shape, ToySpec, paint
from model.builder import ToySizes, build_toy_lisa, load_toy_towers, load_vision_tower
from model.sam import build_toy_conv_sam
from model.toy_towers import ToyConvImageEncoder
from training import toy_towers as tt

REPO = Path(__file__).resolve().parents[2]
TOWERS = REPO / "assets" / "toy_towers"


def test_conv_encoder_keeps_sams_contract() -> None:
    encoder = ToyConvImageEncoder(out_chans=64).eval()
    with torch.no_grad():
        out = encoder(torch.zeros(2, 3, 1024, 1024))
    assert out.shape == (2, 64, 64, 64) and encoder.img_size == 1024
    sam = build_toy_conv_sam()
    assert sam.prompt_encoder.image_embedding_size == (64, 64) and sam.prompt_encoder.embed_dim == 64


def test_cell_targets_by_hand() -> None:
    """One red square filling cells (row 1..2, col 1..2) of the 8 x 8 grid (16 px cells) exactly."""
    square = Shape("square", "red", 32.0, 32.0, 16 / 0.88)  # half side 16: pixels 16..47
    image, visible, areas = paint([square], np.full((128, 128, 3), 128, np.uint8))
    scenes = tt.Scenes(image[None], [visible], [np.array([KINDS.index("square")])], [np.array([0])], [areas])
    targets = tt.cell_targets(scenes)
    kind = targets["kind"].view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[1:3, 1:3] = KINDS.index("square") + 1
    assert torch.equal(kind, expected)
    assert torch.equal(targets["color"].view(8, 8), (expected > 0).long())  # red is colour 0 -> class 1
    assert targets["size"].view(8, 8)[1, 1] == pytest.approx(float(np.log(32 * 32)), abs=1e-4)
    presence = targets["presence"][0]
    assert presence.sum() == 1 and presence[KINDS.index("square") * 5 + 0] == 1


def test_scenes_are_apart_from_the_toyref_splits() -> None:
    """The pretraining stream differs from the splits' streams (0, 1, 2) and is deterministic."""
    a = tt.draw_scenes(2, seed=0, stream=tt.TRAIN_STREAM)
    b = tt.draw_scenes(2, seed=0, stream=tt.TRAIN_STREAM)
    assert np.array_equal(a.pixels, b.pixels)
    from datasets.toy import generate_image

    assert not np.array_equal(a.pixels[0], generate_image(ToySpec(), "train", 0).pixels)
    assert tt.TRAIN_STREAM not in (0, 1, 2) and tt.HELD_OUT_STREAM not in (0, 1, 2, tt.TRAIN_STREAM)


def test_batched_sam_input_matches_the_evaluation_preprocessing() -> None:
    from model.sam import sam_preprocess

    pixels = tt.draw_scenes(1, seed=0, stream=tt.HELD_OUT_STREAM).pixels
    fast = tt.sam_inputs(pixels)[0]
    reference = sam_preprocess(pixels[0])[0]
    assert (fast - reference).abs().max() < 0.03  # about one grey level of 255 / 58


def test_both_stages_run_and_the_toy_lisa_loads_them(tmp_path: Path) -> None:
    clip_spec = tt.ClipSpec(hidden_size=32, layers=2, heads=2, steps=2, batch=4, train_scenes=6, held_out_scenes=3)
    report = tt.pretrain_clip(clip_spec, tmp_path, log_every=1)
    assert [h["step"] for h in report["history"]] == [1, 2] and "kind_acc_fg" in report["history"][-1]
    sam_spec = tt.SamSpec(steps=1, batch=1, prompts_per_image=1, train_scenes=2, held_out_scenes=1)
    report = tt.pretrain_sam(sam_spec, tmp_path, log_every=1)
    assert 0.0 <= report["history"][-1]["point_miou"] <= 1.0
    scaled = tt.PromptScaleSpec(pe_scale=0.5, steps=1, batch=1, prompts_per_image=1, train_scenes=2, held_out_scenes=1)
    before = load_toy_towers(tmp_path)[1]
    report = tt.rescale_sam_prompts(scaled, tmp_path, log_every=1)
    assert [h["step"] for h in report["history"]] == [0, 1]
    tower, sam = load_toy_towers(tmp_path)
    gaussian = "pe_layer.positional_encoding_gaussian_matrix"
    assert torch.equal(sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
                       0.5 * before.prompt_encoder.state_dict()[gaussian])  # stored in float32, exactly halved
    assert torch.equal(sam.image_encoder.neck[0].weight, before.image_encoder.neck[0].weight)  # encoder frozen
    assert tower.num_patches == 64 and tower.config.hidden_size == 32
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    bundle = build_toy_lisa(0, ToySizes(num_layers=2, hidden_size=32, heads=2, intermediate_size=48,
                                        towers=str(tmp_path)))
    assert bundle.model.config.sam_arch == "toy_conv" and bundle.model.config.mm_hidden_size == 32
    assert torch.equal(bundle.model.sam.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_missing_towers_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.towers=.*clip/config.json and sam.safetensors"):
        load_toy_towers(tmp_path)


@pytest.fixture(scope="module")
def held_out() -> tt.Scenes:
    return tt.draw_scenes(160, seed=0, stream=tt.HELD_OUT_STREAM)


def test_committed_clip_tokens_carry_kind_colour_and_position(held_out: tt.Scenes) -> None:
    """A least-squares probe fitted here on 120 held-out scenes reads each foreground token's kind and
    colour, and every token's row and column, on the 40 others (the features LLaVA reads: layer -2)."""
    tower = load_vision_tower(TOWERS / "clip")
    tower.clip.float()
    with torch.no_grad():
        feats = tower(tt.clip_pixels(held_out, tower.config.image_size))[0].double()  # M x 64 x C
    targets = tt.cell_targets(held_out)
    x = torch.cat([feats.reshape(-1, feats.shape[-1]), torch.ones(feats.shape[0] * 64, 1, dtype=torch.double)], 1)
    cut = 120 * 64

    def probe_accuracy(labels: torch.Tensor, mask: torch.Tensor) -> float:
        onehot = torch.nn.functional.one_hot(labels.flatten()).double()
        w = torch.linalg.solve(x[:cut].T @ x[:cut] + 1e-3 * torch.eye(x.shape[1], dtype=torch.double),
                               x[:cut].T @ onehot[:cut])
        pred = (x[cut:] @ w).argmax(1)
        m = mask.flatten()[cut:]
        return float((pred[m] == labels.flatten()[cut:][m]).double().mean())

    fg = targets["kind"] > 0
    cells = torch.arange(64).expand(len(held_out.pixels), -1)
    acc = {"kind": probe_accuracy(targets["kind"], fg), "colour": probe_accuracy(targets["color"], fg),
           "row": probe_accuracy(cells // 8, torch.ones_like(fg)), "col": probe_accuracy(cells % 8, torch.ones_like(fg))}
    assert acc["kind"] > 0.8 and acc["colour"] > 0.9 and acc["row"] > 0.9 and acc["col"] > 0.9, acc


def test_committed_sam_segments_the_shape_under_a_point(held_out: tt.Scenes) -> None:
    """The committed SAM's recorded held-out point mIoU, and a fresh measurement on 10 scenes."""
    _, sam = load_toy_towers(TOWERS)
    recorded = json.loads((TOWERS / "sam_pretraining.json").read_text())["history"][-1]["point_miou"]
    sub = tt.Scenes(held_out.pixels[:10], held_out.masks[:10], held_out.kinds[:10], held_out.colors[:10],
                    held_out.areas[:10])
    measured = tt.sam_metrics(sam, sub)["point_miou"]
    assert recorded > 0.7 and measured > 0.7, (recorded, measured)


def test_pointing_targets_click_the_visible_pixel_nearest_the_centroid() -> None:
    """An L-shaped mask whose centroid lies outside it: the click goes to the nearest mask pixel, scaled
    into SAM's 1024 frame, and the target is the prompt encoder's own token for that click."""
    from model.training import pointing_targets

    sam = build_toy_conv_sam().eval()
    gt = torch.zeros(1, 128, 128)
    gt[0, 10:40, 10:14] = 1  # vertical bar x 10..13, y 10..39
    gt[0, 36:40, 10:40] = 1  # horizontal bar x 10..39, y 36..39
    ys, xs = torch.nonzero(gt[0] > 0, as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    assert gt[0, int(cy), int(cx)] == 0  # the centroid (about 30.1, 19.9) is outside the L
    d = (ys.float() - cy) ** 2 + (xs.float() - cx) ** 2
    k = int(d.argmin())
    click = torch.tensor([[[(float(xs[k]) + 0.5) * 8, (float(ys[k]) + 0.5) * 8]]])
    expected, _ = sam.prompt_encoder(points=(click, torch.ones(1, 1, dtype=torch.int)), boxes=None, masks=None)
    got = pointing_targets(sam, gt, (1024, 1024), (128, 128))
    assert got.shape == (1, 64)
    torch.testing.assert_close(got, expected[:, 0])
    with pytest.raises(ValueError, match="empty target mask"):
        pointing_targets(sam, torch.zeros(1, 8, 8), (1024, 1024), (8, 8))


def test_committed_sam_click_code_is_smooth_at_the_clip_cell_scale() -> None:
    """Stage 1c: clicks one CLIP cell (16 px of 128) apart get close prompt tokens, clicks far apart do not;
    measured through segment-anything's own prompt encoder (sparse tokens of single positive clicks)."""
    _, sam = load_toy_towers(TOWERS)
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(400, 2, generator=gen) * 96 + 16  # original pixels, away from the border

    def tokens(xy: torch.Tensor) -> torch.Tensor:
        coords = (xy * 1024 / 128).unsqueeze(1)
        with torch.no_grad():
            sparse, _ = sam.prompt_encoder(points=(coords, torch.ones(len(xy), 1, dtype=torch.int)), boxes=None,
                                           masks=None)
        return sparse[:, 0]

    base = tokens(points)
    one_cell = ((tokens(points + torch.tensor([16.0, 0.0])) - base) ** 2).mean()
    far = ((tokens(points.flip(0)) - base) ** 2).mean()
    assert one_cell < 0.3 * far, (float(one_cell), float(far))
