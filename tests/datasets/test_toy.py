"""The toy world (datasets/toy.py): determinism, the refer format, exact masks, unambiguous
expressions, and a tokenizer that knows every word.

Expected values are computed here from the documented geometry and rules (a separate
point-in-polygon test from matplotlib, a separate parser of the expressions), not by the
generator's own helpers.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolyPath
from PIL import Image

from datasets import toy
from datasets.base import UnknownSplitError
from datasets.splits import check_split, load_split, valid_splits
from model.builder import ToySizes
from model.prompt import build_prompt, tokenize_with_image, vqa_prompt
from model.tokenizer import build_tiny_tokenizer
from runs.models import build_from_config, layers_and_image_tokens

SPEC = toy.ToySpec(seed=5, train_images=6, val_images=5, testA_images=3)
SPLIT_NAMES = ("toyref|unc|train", "toyref|unc|val", "toyref|unc|testA")
# The documented colours and geometry (datasets/toy.py docstrings), written out independently.
COLORS = {"red": (220, 40, 40), "green": (40, 175, 60), "blue": (40, 80, 220), "yellow": (235, 210, 30),
          "purple": (150, 55, 190)}
MARGIN, AREA_RATIO = 10.0, 1.5


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy.write_toyref(tmp_path_factory.mktemp("toy"), SPEC)


def _vertices(shape: dict) -> np.ndarray | None:
    x, y, r = shape["cx"], shape["cy"], shape["radius"]
    if shape["kind"] == "circle":
        return None
    if shape["kind"] == "square":
        s = 0.88 * r
        return np.array([[x - s, y - s], [x + s, y - s], [x + s, y + s], [x - s, y + s]])
    if shape["kind"] == "triangle":
        big = 1.3 * r
        half = big * np.sqrt(3) / 2
        return np.array([[x, y - big], [x + half, y + big / 2], [x - half, y + big / 2]])
    outer = 1.4 * r
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else 0.45 * outer
        angle = np.deg2rad(-90 + 36 * k)
        points.append([x + radius * np.cos(angle), y + radius * np.sin(angle)])
    return np.array(points)


def _full_mask(shape: dict, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    verts = _vertices(shape)
    if verts is None:
        return (xs - shape["cx"]) ** 2 + (ys - shape["cy"]) ** 2 <= shape["radius"] ** 2
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
    return PolyPath(verts).contains_points(centres).reshape(size, size)


def _scene(root: Path, sample_image: Path) -> list[dict]:
    scenes = json.loads((root / "refer_seg/toyref/scenes.json").read_text())
    return scenes[sample_image.name]


def _shape_index(instances: dict, ref: dict) -> int:
    """Draw-order index of the ref's shape: annotations are written per image in draw order."""
    return [a["id"] for a in instances["annotations"] if a["image_id"] == ref["image_id"]].index(ref["ann_id"])


def test_toy_splits_are_registered(toy_root: Path) -> None:
    for name in SPLIT_NAMES:
        check_split(name)
    with pytest.raises(UnknownSplitError, match=r"toyref\|unc\|testA"):
        check_split("toyref|unc|test")  # a typo is an error, not an empty split
    assert not any(s.startswith("toyref") for s in valid_splits())  # Table 1's columns unchanged


def test_generator_is_deterministic_and_split_independent(tmp_path: Path, toy_root: Path) -> None:
    again = toy.write_toyref(tmp_path / "again", SPEC)
    files = sorted(p.relative_to(toy_root) for p in toy_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (toy_root / rel).read_bytes() == (again / rel).read_bytes(), rel
    # A val image depends on (seed, split, index) only, not on how many train images were written.
    fewer = toy.write_toyref(tmp_path / "fewer", toy.ToySpec(seed=5, train_images=1, val_images=2, testA_images=0))
    name = "refer_seg/images/mscoco/images/train2014/toyref_val_000001.jpg"
    assert (fewer / name).read_bytes() == (toy_root / name).read_bytes()
    other_seed = toy.write_toyref(tmp_path / "seed6", toy.ToySpec(seed=6, train_images=0, val_images=2, testA_images=0))
    assert (other_seed / name).read_bytes() != (toy_root / name).read_bytes()


def test_refer_format_and_exact_masks(toy_root: Path) -> None:
    refs = pickle.loads((toy_root / "refer_seg/toyref/refs(unc).p").read_bytes())
    instances = json.loads((toy_root / "refer_seg/toyref/instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    for name, split in zip(SPLIT_NAMES, toy.SPLITS):
        samples = load_split(name, toy_root)
        split_refs = [r for r in refs if r["split"] == split]
        assert len(samples) == len(split_refs) >= SPEC.images(split)  # one sentence per ref, >= 1 ref per image
        assert len({s.image_path for s in samples}) == SPEC.images(split)
        for sample, ref in zip(samples, split_refs):
            assert sample.sample_id == f"ref{ref['ref_id']}_s0" and sample.text == ref["sentences"][0]["sent"]
            shapes = _scene(toy_root, sample.image_path)
            full = [_full_mask(s, SPEC.image_size) for s in shapes]
            target = _shape_index(instances, ref)
            visible = full[target] & ~np.any(full[target + 1:], axis=0) if target + 1 < len(full) else full[target]
            gt = sample.gt_mask()
            assert gt.dtype == np.uint8 and set(np.unique(gt)) <= {0, 1}
            assert np.array_equal(gt == 1, visible), f"{name} {sample.sample_id}: mask differs from the drawn shape"
            assert anns[ref["ann_id"]]["area"] == int(visible.sum())
            assert visible.sum() >= 0.6 * full[target].sum()  # occlusion stays partial
            with Image.open(sample.image_path) as image:
                assert image.format == "JPEG" and image.size == (SPEC.image_size, SPEC.image_size)
                pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
            colour = np.array(COLORS[shapes[target]["color"]], dtype=np.float64)
            assert np.abs(pixels[visible] - colour).mean() < 20, "the JPEG shows the shape's colour under its mask"


def test_vqa_file_asks_about_each_referred_shape(toy_root: Path) -> None:
    """llava_dataset/toyvqa_<split>.json: per image, for each ref in order, "where is <expr>?" (the third of
    the image holding the shape's centre, rows then columns) and "which object is <expr>?" (colour and
    kind); the answers are recomputed from scenes.json. The file reads back through the VQA loader."""
    from datasets.vqa import load_llava_instruct

    refs = pickle.loads((toy_root / "refer_seg/toyref/refs(unc).p").read_bytes())
    instances = json.loads((toy_root / "refer_seg/toyref/instances.json").read_text())
    files = {i["id"]: i["file_name"] for i in instances["images"]}
    scenes = json.loads((toy_root / "refer_seg/toyref/scenes.json").read_text())
    thirds = (lambda v: "top" if v < 128 / 3 else "middle" if v < 256 / 3 else "bottom",
              lambda v: "left" if v < 128 / 3 else "middle" if v < 256 / 3 else "right")
    for split in toy.SPLITS:
        items = json.loads((toy_root / f"llava_dataset/toyvqa_{split}.json").read_text())
        assert len(items) == SPEC.images(split)
        for item in items:
            expected = []
            for ref in (r for r in refs if files[r["image_id"]] == item["image"]):
                shape, text = scenes[item["image"]][_shape_index(instances, ref)], ref["sentences"][0]["sent"]
                expected += [f"where is {text}?", f"{thirds[0](shape['cy'])} {thirds[1](shape['cx'])}.",
                             f"which object is {text}?", f"a {shape['color']} {shape['kind']}."]
            turns = item["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert [t["value"].removeprefix("<image>\n") for t in turns] == expected
        groups = load_llava_instruct(toy_root / f"llava_dataset/toyvqa_{split}.json",
                                     toy_root / "refer_seg/images/mscoco/images/train2014", f"vqa:toyvqa_{split}")
        assert [len(g.turns) for g in groups] == [len(i["conversations"]) // 2 for i in items]
        assert all(g.image_path.is_file() for g in groups)
        first = items[0]["conversations"]
        assert groups[0].turns[0] == (first[0]["value"].removeprefix("<image>\n"), first[1]["value"])


# -- unambiguity, checked with an independent parser ---------------------------------------------
DESC = r"(?:(?P<{p}color>red|green|blue|yellow|purple) )?(?P<{p}kind>circle|square|triangle|star|shape)"
PATTERNS = {
    "attribute": re.compile(rf"^the {DESC.format(p='t')}$"),
    "position": re.compile(rf"^the {DESC.format(p='t')} (?P<word>on the left|on the right|at the top|at the bottom)$"),
    "relation": re.compile(rf"^the {DESC.format(p='t')} (?P<word>above|below|to the left of|to the right of) "
                           rf"the {DESC.format(p='a')}$"),
    "superlative": re.compile(rf"^the (?P<word>largest|smallest) {DESC.format(p='t')}$"),
}
# Signed distance "a is <word> of b" in pixels (image y grows downwards).
AHEAD = {"left": lambda a, b: b["cx"] - a["cx"], "right": lambda a, b: a["cx"] - b["cx"],
         "top": lambda a, b: b["cy"] - a["cy"], "bottom": lambda a, b: a["cy"] - b["cy"]}
WORDS = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
         "to the left of": "left", "to the right of": "right", "above": "top", "below": "bottom"}


def _matching(shapes: list[dict], color: str | None, kind: str) -> list[int]:
    return [i for i, s in enumerate(shapes) if color in (None, s["color"]) and kind in ("shape", s["kind"])]


def _check_unambiguous(text: str, shapes: list[dict], areas: list[int], target: int) -> str:
    kind, match = next((k, m) for k, p in PATTERNS.items() if (m := p.match(text)))
    cands = _matching(shapes, match["tcolor"], match["tkind"])
    assert target in cands
    others = [j for j in cands if j != target]
    if kind == "attribute":
        assert not others
    elif kind == "position":
        ahead = AHEAD[WORDS[match["word"]]]
        assert others and all(ahead(shapes[target], shapes[j]) >= MARGIN for j in others)
    elif kind == "relation":
        anchors = _matching(shapes, match["acolor"], match["akind"])
        assert len(anchors) == 1 and anchors[0] != target
        anchor = shapes[anchors[0]]
        ahead = AHEAD[WORDS[match["word"]]]
        assert ahead(shapes[target], anchor) >= MARGIN
        assert all(ahead(shapes[j], anchor) <= -MARGIN for j in others if j != anchors[0])
    else:
        assert others
        if match["word"] == "largest":
            assert all(areas[target] >= AREA_RATIO * areas[j] for j in others)
        else:
            assert all(areas[j] >= AREA_RATIO * areas[target] for j in others)
    return kind


def test_every_expression_names_exactly_its_shape(tmp_path: Path) -> None:
    spec = toy.ToySpec(seed=1, train_images=40, val_images=0, testA_images=0)
    root = toy.write_toyref(tmp_path, spec)
    instances = json.loads((root / "refer_seg/toyref/instances.json").read_text())
    refs = pickle.loads((root / "refer_seg/toyref/refs(unc).p").read_bytes())
    seen = set()
    for sample, ref in zip(load_split("toyref|unc|train", root), refs, strict=True):
        shapes = _scene(root, sample.image_path)
        areas = [int(_full_mask(s, spec.image_size).sum()) for s in shapes]
        target = _shape_index(instances, ref)
        seen.add(_check_unambiguous(sample.text, shapes, areas, target))
    assert seen == set(PATTERNS), "every expression type occurs"


def test_expression_type_reads_back_the_generators_type(toy_root: Path) -> None:
    refs = pickle.loads((toy_root / "refer_seg/toyref/refs(unc).p").read_bytes())
    types = [(toy.expression_type(r["sentences"][0]["sent"]), r["expression_type"]) for r in refs]
    assert all(a == b for a, b in types) and {b for _, b in types} == set(toy.EXPRESSION_TYPES)
    # hand-written ones: "on the left" is a position, "to the left of the circle" a relation
    assert toy.expression_type("the red shape on the left") == "position"
    assert toy.expression_type("the square to the left of the circle") == "relation"
    assert toy.expression_type("the smallest circle") == "superlative"
    assert toy.expression_type("the blue star") == "attribute"


def test_target_description_against_the_independent_parser(toy_root: Path, tmp_path: Path) -> None:
    """How the target is named, read by this file's own regular expressions (the anchor is not the target)."""
    texts = [s.text for name in SPLIT_NAMES for s in load_split(name, toy_root)]
    texts += ["the red shape to the left of the blue circle", "the square above the red star",
              "the largest green shape"]
    for text in texts:
        match = next(m for m in (p.match(text) for p in PATTERNS.values()) if m)
        named = [w for w, g in (("colour", "tcolor"), ("kind", "tkind")) if match.group(g) not in (None, "shape")]
        assert toy.target_description(text) == "+".join(named), text
    assert toy.target_description("the square above the red star") == "kind"
    with pytest.raises(ValueError, match="names neither"):
        toy.target_description("the shape")
    # gIoU by type and by description from a results.jsonl (means by hand)
    from scripts.toy_metrics import giou_by_type

    rows = [("the red circle", 0.9), ("the circle", 0.2), ("the star", 0.4), ("the blue shape on the left", 0.5)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps({"status": "ok", "sample_id": str(i), "text": t, "iou": v}) + "\n"
                               for i, (t, v) in enumerate(rows)))
    assert giou_by_type(results) == {"attribute": {"samples": 3, "gIoU": pytest.approx(0.5)},
                                     "position": {"samples": 1, "gIoU": 0.5}}
    assert giou_by_type(results, by_description=True) == {
        "attribute": {"colour+kind": {"samples": 1, "gIoU": 0.9}, "kind": {"samples": 2, "gIoU": pytest.approx(0.3)}},
        "position": {"colour": {"samples": 1, "gIoU": 0.5}}}


def test_referents_flags_ambiguity() -> None:
    """Hand-made scenes: two circles 5 px apart are not 'the circle on the left'; 30 px apart they are."""
    def circle(cx: float, color: str = "red", radius: float = 10.0) -> toy.Shape:
        return toy.Shape("circle", color, cx, 60.0, radius)

    left = toy.Expression("position", toy.Description(None, "circle"), "left")
    areas = [314.0, 314.0]
    assert toy.referents(left, [circle(40), circle(45)], areas) == [0, 1]
    assert toy.referents(left, [circle(40), circle(70)], areas) == [0]
    assert toy.referents(left, [circle(40)], [314.0]) == []  # "on the left" presupposes two circles
    largest = toy.Expression("superlative", toy.Description("red", None), "largest")
    assert toy.referents(largest, [circle(30), circle(90)], [400.0, 300.0]) == [0, 1]  # ratio 1.33 < 1.5
    assert toy.referents(largest, [circle(30), circle(90)], [460.0, 300.0]) == [0]


def test_spec_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_shapes"):
        toy.write_toyref(tmp_path, toy.ToySpec(min_shapes=1))
    with pytest.raises(ValueError, match="image counts"):
        toy.write_toyref(tmp_path, toy.ToySpec(val_images=-1))
    with pytest.raises(ValueError, match="image_size"):
        toy.write_toyref(tmp_path, toy.ToySpec(image_size=60))


def test_command_line_writes_the_data_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toy.main(["--out", str(tmp_path), "--train-images", "1", "--val-images", "2", "--testA-images", "0"])
    assert "toyref" in capsys.readouterr().out
    assert len({s.image_path for s in load_split("toyref|unc|val", tmp_path)}) == 2


# -- tokenizer and model preset ------------------------------------------------------------------
def test_tokenizer_knows_every_toy_word(toy_root: Path) -> None:
    tokenizer = build_tiny_tokenizer(toy.TOKENIZER_WORDS)
    unk = tokenizer.unk_token_id
    texts = [s.text for name in SPLIT_NAMES for s in load_split(name, toy_root)]
    words = {"attribute": [None], "position": list(toy.POSITIONS), "relation": list(toy.RELATIONS),
             "superlative": ["largest", "smallest"]}
    descriptions = [toy.Description(c, k) for c in (None, *toy.COLORS) for k in (None, *toy.KINDS)]
    texts += [toy.Expression(kind, d, w, d).text() for kind in toy.EXPRESSION_TYPES for w in words[kind]
              for d in descriptions]
    for text in texts:
        ids = tokenize_with_image(build_prompt(text, is_sentence=False), tokenizer)
        assert unk not in ids, f"<unk> in the prompt of {text!r}"
    for split in toy.SPLITS:  # and every VQA question and answer
        for item in json.loads((toy_root / f"llava_dataset/toyvqa_{split}.json").read_text()):
            for question, answer in zip(item["conversations"][::2], item["conversations"][1::2]):
                ids = tokenize_with_image(vqa_prompt(question["value"].removeprefix("<image>\n"), answer["value"]),
                                          tokenizer)
                assert unk not in ids, f"<unk> in the VQA turn {question['value']!r} -> {answer['value']!r}"


def test_toy_preset_sizes() -> None:
    cfg = {"kind": "toy", "seed": 0, "num_layers": 4, "hidden_size": 64, "heads": 4, "intermediate_size": 96,
           "clip_image_size": 112, "clip_patch_size": 14, "clip_hidden_size": 32, "dtype": "float32"}
    assert layers_and_image_tokens(cfg) == (4, 64)  # N = (112 / 14)^2
    bundle = build_from_config(cfg)
    assert bundle.model.num_layers == 4 and bundle.model.vision_tower.num_patches == 64
    assert bundle.model.config.sam_arch == "toy" and bundle.model.sam.image_encoder.patch_embed.proj.out_channels == 16
    assert ToySizes().num_image_tokens == 64


def test_sincos_position_embedding_by_hand() -> None:
    """Grid 2, width 4: one frequency (1 rad per patch); channels [sin row, cos row, sin col, cos col]."""
    from model.vision import sincos_position_embedding

    s1, c1 = 0.8414709848078965, 0.5403023058681398
    expected = [[0, 1, 0, 1], [0, 1, s1, c1], [s1, c1, 0, 1], [s1, c1, s1, c1]]  # raster order (row, col)
    assert np.allclose(sincos_position_embedding(2, 4).numpy(), expected, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        sincos_position_embedding(2, 6)


def _position_r2(features: np.ndarray, grid: int, train_images: int) -> float:
    """Held-out R^2 of a least-squares probe from a CLIP token's features to its (row, col)."""
    images, tokens, width = features.shape
    rows, cols = np.divmod(np.arange(tokens), grid)
    target = np.tile(np.stack([rows, cols], 1).astype(np.float64), (images, 1))
    x = np.concatenate([features.reshape(-1, width), np.ones((images * tokens, 1))], 1).astype(np.float64)
    cut = train_images * tokens
    w = np.linalg.solve(x[:cut].T @ x[:cut] + 1e-2 * np.eye(x.shape[1]), x[:cut].T @ target[:cut])
    err = ((x[cut:] @ w - target[cut:]) ** 2).sum(0)
    return float((1 - err / ((target[cut:] - target[cut:].mean(0)) ** 2).sum(0)).min())


def test_toy_clip_tokens_know_their_position(toy_root: Path) -> None:
    """The toy's random, frozen CLIP stands in for a pretrained one: with the sin-cos position codes a
    linear probe reads each image token's row and column back (on toy images); with CLIP's own random
    init (N(0, 0.02)) the patch content drowns them."""
    from model.pipeline import SegmentationPipeline

    images = sorted((toy_root / "refer_seg/images/mscoco/images/train2014").glob("*.jpg"))
    assert len(images) == 14
    r2 = {}
    for position in ("sincos", "random"):
        bundle = build_from_config({"kind": "toy", "dtype": "float32", "clip_position_embedding": position})
        pipe = SegmentationPipeline(bundle)
        with torch.no_grad():
            feats = np.stack([pipe.encode_image(Image.open(p).convert("RGB")).clip_features[0].numpy()
                              for p in images])
        r2[position] = _position_r2(feats, grid=8, train_images=10)
    assert r2["sincos"] > 0.9 and r2["random"] < 0.5, r2
    with pytest.raises(ValueError, match="clip_position_embedding.*'learned'"):
        build_from_config({"kind": "toy", "dtype": "float32", "clip_position_embedding": "learned"})


def test_toy_sam_position_embedding_by_hand_and_in_its_features(toy_root: Path) -> None:
    """``sam_position_embedding: sincos`` writes 2-D sin-cos codes into the toy SAM encoder's (1, 64, 64, 16)
    position embedding (4 frequencies 1, 0.1, 0.01, 0.001 per axis; values by hand for cell (row 0, col 1));
    its image embedding then tells a linear probe each cell's row and column, the zero init does not."""
    from model.sam import build_toy_sam, sam_preprocess, to_rgb_array

    pos = build_toy_sam(position_embedding="sincos").image_encoder.pos_embed
    assert pos.shape == (1, 64, 64, 16)
    sin = [0.841470985, 0.0998334166, 0.00999983333, 0.000999999833]
    cos = [0.540302306, 0.995004165, 0.99995, 0.9999995]
    assert np.allclose(pos[0, 0, 1].detach().numpy(), [0, 0, 0, 0, 1, 1, 1, 1, *sin, *cos], atol=1e-6)
    assert not build_toy_sam().image_encoder.pos_embed.any()
    with pytest.raises(ValueError, match="sam_position_embedding.*'learned'"):
        build_toy_sam(position_embedding="learned")
    images = sorted((toy_root / "refer_seg/images/mscoco/images/train2014").glob("*.jpg"))[:6]
    r2 = {}
    for position in ("sincos", "zeros"):
        torch.manual_seed(0)
        encoder = build_toy_sam(position_embedding=position).image_encoder.eval()
        with torch.no_grad():
            feats = np.stack([encoder(sam_preprocess(to_rgb_array(Image.open(p)))[0][None])[0]
                              .permute(1, 2, 0).reshape(64 * 64, -1).numpy() for p in images])
        r2[position] = _position_r2(feats, grid=64, train_images=4)  # 128 px -> 1024: the image fills the grid
    assert r2["sincos"] > 0.7 and r2["zeros"] < 0.2, r2  # measured: 0.80 and -0.19


def test_training_experiments_compose() -> None:
    """train_ds.py +exp=toy (full mode on the toy world) and +exp=toy_decoder (the mIoU* fine-tune)."""
    from hydra import compose, initialize_config_dir

    from tests.evaluation.test_eval import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        full = compose(config_name="train", overrides=["+exp=toy"])
        decoder = compose(config_name="train", overrides=["+exp=toy_decoder", "schedule=toy_p70"])
    assert full.mode.name == "full" and full.model.kind == "toy" and full.toy.train_images > 0
    assert [s.split for s in full.train_data.sources] == ["toyref|unc|train"]
    assert list(full.train_data.val_splits) == ["toyref|unc|val"]
    assert decoder.mode.name == "decoder" and decoder.model.name == "toy_trained"
    assert (decoder.schedule.Lc, decoder.schedule.Nc, decoder.schedule.Ls, decoder.schedule.Np) == (2, 20, 2, 4)
    assert layers_and_image_tokens(full.model) == (8, 64)
    # the recipe's per-module learning rates name real parameters of the toy model (else training stops)
    from runs.models import build_from_config
    from training.train import param_groups, setup_trainable

    model = build_from_config(full.model).model
    trainable = setup_trainable(model, full.mode)
    groups = param_groups(model, trainable.params(model), full.trainer)
    assert [g["lr"] for g in groups] == [pytest.approx(3e-4), 1e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[1] for p in groups[0]["params"] if names[id(p)].startswith("model.")} == {
        "layers", "embed_tokens", "norm"}
    assert any(names[id(p)].startswith("model.visual_model.mask_decoder") for p in groups[1]["params"])
    assert list(full.trainer.image_ramp) == [800, 1100]
