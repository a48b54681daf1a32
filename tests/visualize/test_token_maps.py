"""Token geometry, the runner's kept-token records, token maps and scripts/chat.py on the tiny LISA.

The token maps are checked pixel by pixel: every token cell of every stage panel is either the
image itself (kept) or the image washed toward white (dropped), and the kept set read back from
the PNG equals the runner's record; the geometry itself is checked against CLIP's processor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csp.geometry import TokenGeometry, clip_crop_geometry
from csp.schedule import StageSchedule
from csp.tokens import KeptImageTokens
from model.bundle import LisaBundle
from model.pipeline import Query, SegmentationPipeline
from model.prompt import IMAGE_PLACEHOLDER_ID, build_prompt, tokenize_with_image
from model.vision import clip_processor_for
from scripts import chat
from visualize.token_maps import DROP_ALPHA, KEPT_EDGE, MASK_ALPHA, MASK_COLOR, OUTSIDE

N = 256
GRID = (16, 16)


def rgb_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Random RGB with values <= 250, so that washing toward white changes every pixel."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 251, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- geometry

def test_geometry_golden_values() -> None:
    # 448 x 896 (H x W): shortest side 448 -> 224, so 224 x 448, crop columns 112..336 (resized),
    # i.e. original x 224..672; patches are 14 resized px = 28 original px.
    assert clip_crop_geometry(448, 896, 224) == (224, 448, 0, 112)
    geo = TokenGeometry(448, 896, 224, GRID)
    boxes = geo.token_boxes()
    assert boxes[0].tolist() == [224.0, 0.0, 252.0, 28.0]
    assert boxes[1].tolist() == [252.0, 0.0, 280.0, 28.0]
    assert boxes[16].tolist() == [224.0, 28.0, 252.0, 56.0]  # row 1, column 0
    assert boxes[255].tolist() == [644.0, 420.0, 672.0, 448.0]
    assert geo.crop_pixel_box() == (224, 0, 672, 448)
    # Portrait 300 x 200: 200 -> 224, 300 -> int(224 * 1.5) = 336; crop rows 56..280 -> original 50..250.
    assert clip_crop_geometry(300, 200, 224) == (336, 224, 56, 0)
    assert TokenGeometry(300, 200, 224, GRID).crop_pixel_box() == (0, 50, 200, 250)


@pytest.mark.parametrize("size", [(300, 500), (427, 640), (211, 97), (224, 224)])
def test_geometry_matches_the_clip_processor(size: tuple[int, int]) -> None:
    """A white rectangle exactly on token t's box (by the geometry) lights up patch t of CLIP's input."""
    height, width = size
    geo = TokenGeometry(height, width, 224, GRID)
    processor = clip_processor_for(224)
    mean, std = np.asarray(processor.image_mean), np.asarray(processor.image_std)
    for token in (0, 15, 17, 120, 240, 255):
        x0, y0, x1, y1 = geo.token_pixel_boxes()[token]
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[y0:y1, x0:x1] = 255
        tensor = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0].numpy()
        value = (tensor.transpose(1, 2, 0) * std + mean).mean(axis=2)  # back to [0, 1]
        patches = value.reshape(16, 14, 16, 14).mean(axis=(1, 3)).flatten()
        assert int(patches.argmax()) == token
        assert patches[token] > 0.6 and np.delete(patches, token).max() < 0.4


# ---------------------------------------------------------------- runner records

@pytest.fixture(scope="module")
def bundle(tiny_bundle: LisaBundle) -> LisaBundle:
    return copy.deepcopy(tiny_bundle)  # hooks are registered on it


def layer_image_positions(pipe: SegmentationPipeline, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """Register pre-hooks that record, per layer, the position ids each layer was called with."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = []
    for i in layers:
        def hook(module, args, kwargs, i=i):  # noqa: ANN001, ANN202
            seen[i].append(kwargs["position_ids"].clone())
        handles.append(pipe.model.model.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    seen["handles"] = handles  # type: ignore[index]
    return seen


def image_tokens_seen(positions: torch.Tensor, first_row: int) -> list[int]:
    """Image-token indices among one sample's position ids (image rows are first_row..first_row+N-1)."""
    return sorted(int(p) - first_row for p in positions if first_row <= int(p) < first_row + N)


@pytest.mark.parametrize("schedule, stages", [
    (StageSchedule(Lc=2, Nc=64, Ls=1, Np=16, clustering="random"), [("clustering", 0, 64), ("scattering", 2, N),
                                                                    ("pruning", 3, 16)]),
    (StageSchedule(Lc=2, Nc=48, Ls=0, Np=8, clustering="uniform"), [("clustering", 0, 48), ("pruning", 2, 8)]),
    (None, [("input", 0, N)]),
])
def test_runner_kept_tokens_are_what_the_layers_ran_on(bundle: LisaBundle, make_image, schedule, stages) -> None:
    pipe = SegmentationPipeline(bundle, schedule)
    queries = [Query("the cat", False, "a"), Query("what would keep the rain off the table here", True, "b")]
    seen = layer_image_positions(pipe, [first for _, first, _ in stages])
    try:
        results = pipe.segment(make_image(90, 130), queries)
    finally:
        for handle in seen.pop("handles"):
            handle.remove()
    # every query's image slot follows the same system prompt: image token 0 sits at the same row
    ids = tokenize_with_image(build_prompt("x", False), pipe.bundle.tokenizer)
    first_row = ids.index(IMAGE_PLACEHOLDER_ID)
    for b, result in enumerate(results):
        kept = result.kept_image_tokens
        assert [(k.stage, k.first_layer) for k in kept] == [(s, f) for s, f, _ in stages]
        for entry, (_, first, width), in zip(kept, stages):
            assert isinstance(entry, KeptImageTokens) and entry.num_extra == 0
            assert entry.indices.shape == (1, width) and entry.indices.dtype == torch.long
            row = entry.indices[0].tolist()
            assert -1 not in row and row == sorted(set(row)) and 0 <= row[0] and row[-1] < N
            assert row == image_tokens_seen(seen[first][0][b], first_row)
            # the record of that layer counts the same tokens
            assert result.image_tokens[first] == width
        if schedule is not None and schedule.Ls == 0:
            assert set(kept[1].indices[0].tolist()) <= set(kept[0].indices[0].tolist())
    if schedule is not None and schedule.clustering == "random":  # per-sample randomness: samples differ
        assert results[0].kept_image_tokens[0].indices.tolist() != results[1].kept_image_tokens[0].indices.tolist()


# ---------------------------------------------------------------- token maps from chat

def cell_states(panel: np.ndarray, base: np.ndarray, boxes: np.ndarray) -> list[str]:
    """'kept' / 'dropped' per token cell, read from its interior pixels (the 1-px border may hold
    the kept outline); anything else fails the test."""
    washed = np.rint(DROP_ALPHA * 255.0 + (1.0 - DROP_ALPHA) * base.astype(np.float64)).astype(np.uint8)
    states = []
    for token, (x0, y0, x1, y1) in enumerate(boxes):
        inner = (slice(y0 + 1, y1 - 1), slice(x0 + 1, x1 - 1))
        if np.array_equal(panel[inner], base[inner]):
            states.append("kept")
            edge = panel[y0, x0:x1]
            assert (edge == KEPT_EDGE).all(), f"token {token}: kept cell without its outline"
        elif np.array_equal(panel[inner], washed[inner]):
            states.append("dropped")
        else:
            raise AssertionError(f"token {token}: cell is neither the image nor the washed image")
    return states


def forced_answer(bundle: LisaBundle, answer: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Make greedy decoding emit ``answer`` (then eos) by a forward hook on this bundle's lm_head."""
    step = {"i": 0}

    def hook(module, args, output):  # noqa: ANN001, ANN202
        token = answer[step["i"]] if step["i"] < len(answer) else bundle.token_ids.eos
        step["i"] += 1
        forced = torch.full_like(output, -1e4)
        forced[..., token] = 1e4
        return forced
    return bundle.model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("max_side", [None, 300])
def test_chat_token_map_pixels_equal_the_runner_selection(bundle: LisaBundle, tmp_path: Path, max_side) -> None:
    schedule = StageSchedule(Lc=2, Nc=64, Ls=1, Np=16, clustering="cls_attention")
    pipe = SegmentationPipeline(bundle, schedule)
    image_path = tmp_path / "scene.png"
    rgb_image(150, 260).save(image_path)  # landscape: the crop cuts off the left and right
    seg = bundle.token_ids.seg
    handle = forced_answer(bundle, [seg, seg])
    try:
        out = chat.run_query(pipe, image_path, "where is the lamp?", tmp_path / "vis",
                             strategies=["uniform", "cls_attention"], max_side=max_side)
    finally:
        handle.remove()
    # one overlay per [SEG], tinted exactly where the mask is
    assert len(out.overlays) == 2 and out.masks.shape == (2, 150, 260)
    original = np.asarray(Image.open(image_path).convert("RGB"))
    for path, mask in zip(out.overlays, out.masks):
        overlay = np.asarray(Image.open(path).convert("RGB"))
        expected = original.copy()
        expected[mask] = np.rint(MASK_ALPHA * np.asarray(MASK_COLOR, float)
                                 + (1 - MASK_ALPHA) * original[mask].astype(float)).astype(np.uint8)
        assert np.array_equal(overlay, expected)
    # the token map PNG, read back: panel by panel
    tmap = out.token_map_obj
    figure = np.asarray(Image.open(out.token_map).convert("RGB"))
    geo = TokenGeometry(150, 260, 224, GRID)
    assert tmap.geometry == geo
    boxes = geo.token_pixel_boxes(tmap.scale)
    height, width = tmap.base.shape[:2]
    panels = [figure[y:y + height, x:x + width] for x, y in tmap.panel_origins()]
    titles = [p.title.split(":")[0] for p in tmap.panels]
    assert titles == ["uniform", "cls_attention", "clustering L0-1", "scattering L2", "pruning L3-5", "mask [SEG] 0",
                      "mask [SEG] 1"]
    runner_sets = [entry.indices[0].tolist() for entry in tmap.kept_entries]
    read_back = []
    for panel in panels[:5]:
        states = cell_states(panel, tmap.base, boxes)
        read_back.append([t for t, s in enumerate(states) if s == "kept"])
        x0, y0, x1, y1 = geo.crop_pixel_box(tmap.scale)
        assert (panel[:, : x0] == OUTSIDE).all() and (panel[:, x1:] == OUTSIDE).all()
    assert read_back[2:] == runner_sets
    assert read_back[1] == read_back[2]  # the configured strategy's comparison panel = the clustering stage
    assert read_back[0] == [i * 4 for i in range(64)]  # uniform, eq. 2: i * floor(256 / 64)
    assert len(read_back[4]) == 16 and len(read_back[3]) == N


@pytest.mark.slow
def test_chat_cli_runs_on_the_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "TOY_CHECKPOINT", tmp_path / "no_toy")  # the tiny model even after the toy lands
    image = tmp_path / "photo.jpg"
    rgb_image(64, 80).save(image)
    out_dir = tmp_path / "out"
    [result] = chat.main(["--preset", "demo_tiny", "--override", "schedule.Np=8", "--image", str(image), "--precision",
                          "bf16", "--query", "what is on the left?", "--out-dir", str(out_dir), "--max-new-tokens", "3",
                          "--strategies", "none"])
    assert result.token_map == out_dir / "photo_token_map.png" and result.token_map.is_file()
    kept = result.token_map_obj.kept_entries
    assert [(k.stage, k.indices.shape[1]) for k in kept] == [("clustering", 64), ("scattering", N), ("pruning", 8)]


@pytest.mark.slow
def test_chat_cli_runs_the_method_of_a_baseline_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--preset table1_fastv runs FastV (resolved as evaluation resolves it), not plain LISA."""
    monkeypatch.setattr(chat, "TOY_CHECKPOINT", tmp_path / "no_toy")
    assert chat.resolve_preset("table1_fastv").spec == {"name": "fastv", "layer": 2, "keep": 64}
    assert chat.resolve_preset("table1_fastv", ["method.keep=32"]).method.keep == 32
    assert chat.resolve_preset(None).method is None
    image = tmp_path / "photo.png"
    rgb_image(64, 80).save(image)
    [result] = chat.main(["--preset", "table1_fastv", "--image", str(image), "--query", "what is on the left?",
                          "--out-dir", str(tmp_path / "out"), "--max-new-tokens", "2"])
    kept = result.token_map_obj.kept_entries
    # FastV (K = 2, R = 64): all 256 tokens in layers 0-1, the 64 ranked by the last prompt row from layer 2
    assert [(k.stage, k.first_layer, k.indices.shape[1]) for k in kept] == [("input", 0, N), ("pruning", 2, 64)]


@pytest.mark.slow
def test_chat_cli_defaults_to_the_toy_checkpoint_and_asks_for_queries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_tiny_checkpoint) -> None:
    import shutil

    real = chat.default_checkpoint()  # the committed toy LISA (train_ds.py +exp=toy) is the default
    assert real is not None and all((path / "config.json").is_file() for path in real)
    toy = tmp_path / "assets" / "toy_lisa"  # the layout scripts/chat.py expects: checkpoint + vision_tower/
    shutil.copytree(saved_tiny_checkpoint.checkpoint, toy)
    shutil.copytree(saved_tiny_checkpoint.clip_dir, toy / "vision_tower")
    monkeypatch.setattr(chat, "TOY_CHECKPOINT", toy)
    assert chat.default_checkpoint() == (toy, toy / "vision_tower")
    image = tmp_path / "photo.png"
    rgb_image(64, 80).save(image)
    answers = iter(["first question", "second question", ""])  # no --query: ask until an empty line
    results = chat.main(["--image", str(image), "--out-dir", str(tmp_path / "out"), "--max-new-tokens", "1"],
                        ask=lambda prompt: next(answers))
    assert len(results) == 2 and [k.stage for k in results[0].token_map_obj.kept_entries] == ["input"]


def test_chat_cli_rejects_bad_input_before_loading(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    rgb_image(32, 32).save(image)
    with pytest.raises(SystemExit, match="no_such_preset.*known presets.*demo"):
        chat.main(["--preset", "no_such_preset", "--image", str(image), "--query", "q"])
    with pytest.raises(SystemExit, match="missing.png: no such file"):
        chat.main(["--image", str(tmp_path / "missing.png"), "--query", "q"])
    # Table 6 presets assume 32 layers: the default model (the 8-layer toy LISA) rejects them with the
    # schedule's own message
    with pytest.raises(ValueError, match="exceeds the model's 8 decoder layers"):
        chat.main(["--preset", "llava7b_224_p70", "--image", str(image), "--query", "q"])


# ---------------------------------------------------------------- token maps from evaluation

@pytest.mark.slow
def test_eval_writes_token_maps_of_the_first_samples_and_logs_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    from datasets import load_groups
    from evaluation.evaluate import evaluate
    from visualize.eval_maps import first_samples, safe_name
    from visualize.token_maps import new_token_map

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "+exp=demo_tiny", "data=reasonseg", "baseline=null", "max_samples_per_split=1", "vis.num_samples=1",
            "vis.max_side=200", f"output_dir={tmp_path / 'run'}", "logger=wandb", f"logger.dir={tmp_path / 'wb'}"])
    evaluate(cfg)
    mini = tmp_path / "run" / "miniature"
    groups = [g for split in cfg.data.splits for g in load_groups(split, mini, 1)]
    targets = first_samples(groups, 1)
    assert {split for split, _ in targets} == {"ReasonSeg|val", "ReasonSeg|test"} and len(targets) == 2
    written = sorted((tmp_path / "run" / "token_maps").rglob("*.png"))
    assert written == sorted(tmp_path / "run" / "token_maps" / safe_name(s) / f"{safe_name(i)}.png" for s, i in targets)
    by_id = {(s.split, s.sample_id): (g, s) for g in groups for s in g.samples}
    for split, sample_id in targets:
        group, _ = by_id[(split, sample_id)]
        image = Image.open(group.image_path).convert("RGB")
        geo = TokenGeometry(image.height, image.width, 224, GRID)
        tmap = new_token_map(image, geo, max_side=200)  # the same base picture and scale as evaluation's
        tmap.panels = [None] * 4  # clustering, scattering, pruning, mask
        png = tmp_path / "run" / "token_maps" / safe_name(split) / f"{safe_name(sample_id)}.png"
        figure = np.asarray(Image.open(png))
        h, w = tmap.base.shape[:2]
        kept = []
        for x, y in tmap.panel_origins()[:3]:
            states = cell_states(figure[y:y + h, x:x + w, :3], tmap.base, geo.token_pixel_boxes(tmap.scale))
            kept.append([t for t, s in enumerate(states) if s == "kept"])
        # demo schedule (Lc, Nc, Ls, Np) = (2, 64, 1, 16), uniform clustering: eq. 2 picks i * 4
        assert kept[0] == [4 * i for i in range(64)] and kept[1] == list(range(N)) and len(kept[2]) == 16
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    logged = [p for p in runs[0].rglob("*.png") if "token_maps" in p.name]
    assert len(runs) == 1 and len(logged) == 2


@pytest.mark.slow
def test_chat_session_reports_a_file_that_is_not_an_image_and_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_tiny_checkpoint) -> None:
    """Interactive chat: a path that exists but holds no image is reported and the session asks again
    (the next, real image is answered); with --query the same is a one-line exit naming the path. With
    ultralytics imported (it patches PIL's Image.open), as in any process that ran seg_first."""
    import shutil

    import ultralytics  # noqa: F401

    toy = tmp_path / "assets" / "toy_lisa"
    shutil.copytree(saved_tiny_checkpoint.checkpoint, toy)
    shutil.copytree(saved_tiny_checkpoint.clip_dir, toy / "vision_tower")
    monkeypatch.setattr(chat, "TOY_CHECKPOINT", toy)
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    image = tmp_path / "photo.png"
    rgb_image(64, 80).save(image)
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    answers = iter(["q1", str(bogus), "q2", str(image), ""])
    results = chat.main(["--out-dir", str(tmp_path / "out"), "--max-new-tokens", "1"], ask=lambda prompt: next(answers))
    assert len(results) == 1
    assert any(f"{bogus} is not an image this can read" in line for line in printed)
    with pytest.raises(SystemExit, match="notes.png is not an image this can read"):
        chat.main(["--image", str(bogus), "--query", "q", "--out-dir", str(tmp_path / "out"), "--max-new-tokens", "1"])
