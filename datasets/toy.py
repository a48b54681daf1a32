"""The toy world: a seeded synthetic referring-segmentation data set in the refer format.

Images show a few coloured shapes (circle, square, triangle, star in five colours, several
sizes, random positions, partial occlusion) on a textured grey background. Every referring
expression names exactly one shape, by construction and checked by :func:`referents`:

- attribute: ``the red triangle``, ``the triangle``, ``the red shape``;
- absolute position: ``the circle on the left``, ``the blue shape at the top``;
- relation to a uniquely named anchor: ``the square above the blue star``,
  ``the red shape to the left of the circle``;
- superlative: ``the largest green shape``, ``the smallest circle``.

Layout written under ``root`` (what :func:`datasets.refer.load_refer` reads; splits
``toyref|unc|train``, ``toyref|unc|val``, ``toyref|unc|testA``)::

    refer_seg/toyref/refs(unc).p         pickled list of refs (ref_id, ann_id, image_id, split, sentences)
    refer_seg/toyref/instances.json      COCO images + annotations (RLE of each shape's visible pixels)
    refer_seg/toyref/scenes.json         the drawn shapes per image (kind, colour, centre, size, draw order)
    refer_seg/images/mscoco/images/train2014/toyref_<split>_<index>.jpg
    llava_dataset/toyvqa_<split>.json    questions about the same images, LLaVA-Instruct format

The VQA file (datasets/vqa.py) asks about every referring expression's shape: ``where is <expr>?``
(``top left.``: the third of the image, rows then columns, holding the shape's centre) and ``which
object is <expr>?`` (``a red circle.``), in words the toy tokenizer already knows. It stands in for
LISA's VQA data and LLaVA's pretraining: a toy LLM that answers them has learnt to find a referent
among its image tokens (README "Toy world": in 15 CPU minutes it does not).

Every image is generated from ``(seed, split, index)`` alone, so a split's images do not depend
on how many images the other splits have. Ground truth is the exact set of pixels where the shape
was painted (its rasterisation minus shapes drawn later over it), stored as uncompressed-equivalent
COCO RLE, so masks match the drawn shapes pixel for pixel (the JPEG only blurs colours).

    python -m datasets.toy --out DIR [--seed 0 --train-images 1500 --val-images 100 --testA-images 100]
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from datasets.refer import REFER_IMAGE_DIR
from datasets.vqa import LLAVA_DIR

DATASET = "toyref"
SPLIT_BY = "unc"
SPLITS = ("train", "val", "testA")
KINDS = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 175, 60), "blue": (40, 80, 220), "yellow": (235, 210, 30),
    "purple": (150, 55, 190),
}
#: Words of every expression the generator writes (the tiny tokenizer must know each of them).
VOCABULARY = (
    "the shape on at to of left right top bottom above below largest smallest "
    + " ".join(KINDS) + " " + " ".join(COLORS)
)
#: Words of LISA's question and answer templates (the training prompts), so the toy model's tokenizer
#: never maps a training or evaluation prompt word to <unk>.
TEMPLATE_WORDS = "Can you segment Please respond with output segmentation mask What is in this image It Sure result"
TOKENIZER_WORDS = f"{VOCABULARY} {TEMPLATE_WORDS}"
MARKER = ".toyref.json"
#: Bumped when the files written for one spec change (the marker then no longer matches).
FORMAT = 2
#: The toy VQA source (datasets/vqa.py): ``llava_dataset/toyvqa_<split>.json``, images in the refer image dir.
VQA_NAME = "toyvqa"
#: Thirds of the image, for the answers of "Where is ...?" (rows, then columns).
THIRDS = (("top", "middle", "bottom"), ("left", "middle", "right"))
#: Positions (pixels) must differ by at least this much for "left of", "on the left", ... to count.
MARGIN = 10.0
#: Superlatives need this ratio between the target's area and every other candidate's.
AREA_RATIO = 1.5
#: Every shape keeps at least this fraction of its pixels visible (occlusion stays partial).
MIN_VISIBLE = 0.6
EXPRESSION_TYPES = ("attribute", "position", "relation", "superlative")
RELATIONS = {"above": "above", "below": "below", "left": "to the left of", "right": "to the right of"}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class ToySpec:
    """What :func:`write_toyref` writes; counts are images per split."""

    seed: int = 0
    train_images: int = 1500
    val_images: int = 100
    testA_images: int = 100
    image_size: int = 128
    min_shapes: int = 3
    max_shapes: int = 6
    refs_per_image: int = 3
    min_radius: float = 9.0
    max_radius: float = 21.0

    def images(self, split: str) -> int:
        return {"train": self.train_images, "val": self.val_images, "testA": self.testA_images}[split]

    def check(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot produce a data set."""
        if min(self.train_images, self.val_images, self.testA_images) < 0:
            raise ValueError(f"toy spec: image counts must be >= 0, got {self}")
        if not 2 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"toy spec: need 2 <= min_shapes <= max_shapes, got {self.min_shapes}, {self.max_shapes}")
        if self.refs_per_image < 1:
            raise ValueError(f"toy spec: refs_per_image must be >= 1, got {self.refs_per_image}")
        if not 3 <= self.min_radius <= self.max_radius or self.image_size < 4 * self.max_radius:
            raise ValueError(f"toy spec: radii {self.min_radius}..{self.max_radius} do not fit image_size "
                             f"{self.image_size} (need 3 <= min <= max and image_size >= 4 * max)")


@dataclass(frozen=True)
class Shape:
    """One painted shape; ``radius`` scales the shape (circle radius, half the square's side, ...)."""

    kind: str
    color: str
    cx: float
    cy: float
    radius: float

    def polygon(self) -> np.ndarray | None:
        """``V x 2`` vertices (x, y) of a polygonal kind, None for the circle."""
        x, y, r = self.cx, self.cy, self.radius
        if self.kind == "circle":
            return None
        if self.kind == "square":
            s = 0.88 * r
            return np.array([[x - s, y - s], [x + s, y - s], [x + s, y + s], [x - s, y + s]])
        if self.kind == "triangle":  # pointing up, centred on its circumcentre
            big = 1.3 * r
            angles = np.deg2rad([-90.0, 30.0, 150.0])
            return np.stack([x + big * np.cos(angles), y + big * np.sin(angles)], axis=1)
        if self.kind == "star":  # five points, inner radius 0.45 of the outer
            outer = 1.4 * r
            angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
            radii = np.where(np.arange(10) % 2 == 0, outer, 0.45 * outer)
            return np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], axis=1)
        raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")


def rasterize(shape: Shape, height: int, width: int) -> np.ndarray:
    """``height x width`` bool: pixels whose centre lies inside ``shape`` (even-odd rule)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    poly = shape.polygon()
    if poly is None:
        return (xs - shape.cx) ** 2 + (ys - shape.cy) ** 2 <= shape.radius**2
    inside = np.zeros((height, width), dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


def visible_masks(shapes: Sequence[Shape], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(``S x H x W`` bool visible pixels of each shape, ``S`` full areas in pixels); later shapes
    are painted over earlier ones."""
    full = np.stack([rasterize(s, height, width) for s in shapes])
    visible = full.copy()
    for i in range(len(shapes)):
        visible[i] &= ~full[i + 1:].any(axis=0)
    return visible, full.reshape(len(shapes), -1).sum(axis=1)


def paint(shapes: Sequence[Shape], background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(``H x W x 3`` uint8 image, visible masks, full areas): shapes painted in order on ``background``."""
    height, width = background.shape[:2]
    visible, areas = visible_masks(shapes, height, width)
    image = background.copy()
    for shape, mask in zip(shapes, visible):
        image[mask] = COLORS[shape.color]
    return image, visible, areas


def background_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation grey with stripes, blotches and noise (never close to a shape colour)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    base = rng.uniform(95, 165)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = 10 * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
    blobs = np.zeros_like(xs)
    for _ in range(3):
        bx, by, bs = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(10, 30)
        blobs += rng.uniform(-18, 18) * np.exp(-((xs - bx) ** 2 + (ys - by) ** 2) / (2 * bs**2))
    tint = rng.uniform(-8, 8, 3)
    gray = base + stripes + blobs
    noise = rng.normal(0, 5, (size, size, 3))
    return np.clip(gray[..., None] + tint + noise, 0, 255).astype(np.uint8)


def random_scene(spec: ToySpec, rng: np.random.Generator, max_tries: int = 200) -> list[Shape]:
    """Shapes with a small palette per image (so kinds and colours repeat) and partial occlusion only."""
    size = spec.image_size
    for _ in range(max_tries):
        count = int(rng.integers(spec.min_shapes, spec.max_shapes + 1))
        kinds = rng.choice(KINDS, size=int(rng.integers(2, len(KINDS) + 1)), replace=False)
        colors = rng.choice(list(COLORS), size=int(rng.integers(2, len(COLORS) + 1)), replace=False)
        shapes = []
        for _ in range(count):
            radius = float(rng.uniform(spec.min_radius, spec.max_radius))
            lo, hi = 1.4 * radius + 1, size - 1.4 * radius - 1  # the star's points stay inside
            shapes.append(Shape(str(rng.choice(kinds)), str(rng.choice(colors)), float(rng.uniform(lo, hi)),
                                float(rng.uniform(lo, hi)), radius))
        visible, areas = visible_masks(shapes, size, size)
        if (visible.reshape(count, -1).sum(axis=1) >= MIN_VISIBLE * areas).all() and _same_colors_apart(shapes):
            return shapes
    raise RuntimeError(f"no scene with every shape {MIN_VISIBLE:.0%} visible in {max_tries} tries; "
                       f"reduce max_shapes ({spec.max_shapes}) or max_radius ({spec.max_radius})")


def _same_colors_apart(shapes: Sequence[Shape], gap: int = 3) -> bool:
    """Shapes of one colour must not touch: painted together they would read as one blob."""
    size = int(max(max(s.cx, s.cy) + 2 * s.radius for s in shapes)) + gap + 1
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            near = math.hypot(a.cx - b.cx, a.cy - b.cy) < 1.4 * (a.radius + b.radius) + gap
            if a.color == b.color and near and (_grow(rasterize(a, size, size), gap) & rasterize(b, size, size)).any():
                return False
    return True


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by a square of side ``2 * pixels + 1``."""
    padded = np.pad(mask, pixels)
    out = np.zeros_like(mask)
    height, width = mask.shape
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out |= padded[dy:dy + height, dx:dx + width]
    return out


# -- expressions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Description:
    """A colour and/or a kind: ``red triangle``, ``triangle`` or ``red shape``."""

    color: str | None
    kind: str | None

    def text(self) -> str:
        return f"{self.color or ''} {self.kind or 'shape'}".strip()

    def matches(self, shape: Shape) -> bool:
        return self.color in (None, shape.color) and self.kind in (None, shape.kind)


@dataclass(frozen=True)
class Expression:
    """A structured referring expression; ``text()`` is what the refs file stores.

    ``kind`` is one of :data:`EXPRESSION_TYPES`; ``word`` is the position / relation / superlative
    (``left``, ``above``, ``largest`` ...); ``anchor`` the description of a relation's anchor.
    """

    kind: str
    target: Description
    word: str | None = None
    anchor: Description | None = None

    def text(self) -> str:
        if self.kind == "attribute":
            return f"the {self.target.text()}"
        if self.kind == "position":
            return f"the {self.target.text()} {POSITIONS[self.word]}"
        if self.kind == "relation":
            return f"the {self.target.text()} {RELATIONS[self.word]} the {self.anchor.text()}"
        return f"the {self.word} {self.target.text()}"


def expression_type(text: str) -> str:
    """The :data:`EXPRESSION_TYPES` entry of a toy expression, read back from its text (the grammar of
    :meth:`Expression.text`; the refs file also stores it as ``expression_type``)."""
    words = text.split()
    if len(words) > 1 and words[1] in ("largest", "smallest"):
        return "superlative"
    if any(f" {phrase} the " in f" {text} " for phrase in RELATIONS.values()):
        return "relation"
    if any(text.endswith(f" {phrase}") for phrase in POSITIONS.values()):
        return "position"
    return "attribute"


def target_description(text: str) -> str:
    """How a toy expression names its shape: ``colour``, ``kind`` or ``colour+kind`` (a relation's anchor
    is not counted). A model that cannot tell the kinds apart fails on ``kind``; the colour is visible
    in every image token."""
    for phrase in RELATIONS.values():
        text = text.split(f" {phrase} the ")[0]
    words = set(text.split())
    named = [what for what, vocab in (("colour", COLORS), ("kind", KINDS)) if words & set(vocab)]
    if not named:
        raise ValueError(f"{text!r} names neither a colour nor a kind; not a toy expression")
    return "+".join(named)


def _ahead(word: str, a: Shape, b: Shape) -> float:
    """How far ``a`` is from ``b`` in the direction ``word`` (positive: ``a`` is left of / above ... ``b``)."""
    return {"left": b.cx - a.cx, "right": a.cx - b.cx, "above": b.cy - a.cy, "top": b.cy - a.cy,
            "below": a.cy - b.cy, "bottom": a.cy - b.cy}[word]


def referents(expr: Expression, shapes: Sequence[Shape], areas: Sequence[float]) -> list[int]:
    """Indices of the shapes a careful reader could take ``expr`` to mean (``[i]``: unambiguous).

    Borderline cases count as possible referents, so a single index means the expression holds
    with room to spare: a position needs the target :data:`MARGIN` pixels beyond every other
    candidate (any candidate within the margin of the extreme is a possible referent), a relation
    needs a unique anchor and the target at least the margin beyond it (candidates less than the
    margin on the wrong side still count), a superlative an area ratio of :data:`AREA_RATIO` to
    every other candidate. Positions and superlatives presuppose at least two candidates, and an
    expression whose presupposition fails refers to nothing.
    """
    candidates = [i for i, s in enumerate(shapes) if expr.target.matches(s)]
    if expr.kind == "attribute":
        return candidates
    if expr.kind == "position":
        if len(candidates) < 2:
            return []
        return [i for i in candidates
                if all(_ahead(expr.word, shapes[i], shapes[j]) > -MARGIN for j in candidates if j != i)]
    if expr.kind == "relation":
        anchors = [i for i, s in enumerate(shapes) if expr.anchor.matches(s)]
        if len(anchors) != 1:
            return []
        a = anchors[0]
        possible = [i for i in candidates if i != a and _ahead(expr.word, shapes[i], shapes[a]) > -MARGIN]
        if len(possible) == 1 and _ahead(expr.word, shapes[possible[0]], shapes[a]) < MARGIN:
            return possible * 2  # the only candidate is level with the anchor: neither yes nor no
        return possible
    if expr.kind == "superlative":
        if len(candidates) < 2:
            return []
        sign = 1.0 if expr.word == "largest" else -1.0
        best = max(candidates, key=lambda i: sign * areas[i])
        rivals = [j for j in candidates if j != best]
        if sign > 0:
            return [best] + [j for j in rivals if AREA_RATIO * areas[j] > areas[best]]
        return [best] + [j for j in rivals if areas[j] < AREA_RATIO * areas[best]]
    raise ValueError(f"unknown expression kind {expr.kind!r}; expected one of {EXPRESSION_TYPES}")


def _descriptions(shape: Shape) -> list[Description]:
    return [Description(shape.color, shape.kind), Description(None, shape.kind), Description(shape.color, None)]


def expressions_for(target: int, shapes: Sequence[Shape], areas: Sequence[float]) -> dict[str, list[Expression]]:
    """Every unambiguous expression for ``shapes[target]``, by expression type.

    Positions, relations and superlatives are only offered where the description alone is not
    unique, so that the model has to look at where the shapes are and how big they are.
    """
    found: dict[str, list[Expression]] = {k: [] for k in EXPRESSION_TYPES}
    shape = shapes[target]
    for desc in _descriptions(shape):
        attribute = Expression("attribute", desc)
        if referents(attribute, shapes, areas) == [target]:
            found["attribute"].append(attribute)
            continue
        for word in POSITIONS:
            found["position"].append(Expression("position", desc, word))
        for word in ("largest", "smallest"):
            found["superlative"].append(Expression("superlative", desc, word))
        for a, other in enumerate(shapes):
            if a == target:
                continue
            anchor = next((d for d in _descriptions(other)
                           if referents(Expression("attribute", d), shapes, areas) == [a]), None)
            if anchor is not None:
                found["relation"] += [Expression("relation", desc, word, anchor) for word in RELATIONS]
    return {k: [e for e in v if referents(e, shapes, areas) == [target]] for k, v in found.items()}


# -- writing -------------------------------------------------------------------------------------
@dataclass
class ToyImage:
    """One generated image with its shapes, masks and chosen referring expressions."""

    pixels: np.ndarray  # H x W x 3 uint8
    shapes: list[Shape]
    visible: np.ndarray  # S x H x W bool
    areas: np.ndarray  # S full (unoccluded) areas in pixels
    refs: list[tuple[int, Expression]]  # (shape index, expression)


def generate_image(spec: ToySpec, split: str, index: int) -> ToyImage:
    """Image ``index`` of ``split``: a function of ``(spec.seed, split, index)`` and the spec's sizes."""
    return generate_scene(spec, np.random.default_rng([spec.seed, SPLITS.index(split), index]))


def generate_scene(spec: ToySpec, rng: np.random.Generator) -> ToyImage:
    """A scene with up to ``spec.refs_per_image`` referring expressions drawn from ``rng`` (the toyref splits
    use the stream ``(seed, split index, image index)``; pretraining stages use streams of their own)."""
    shapes = random_scene(spec, rng)
    pixels, visible, areas = paint(shapes, background_texture(spec.image_size, rng))
    options = {i: expressions_for(i, shapes, areas) for i in range(len(shapes))}
    targets = [i for i in range(len(shapes)) if any(options[i].values())]
    rng.shuffle(targets)
    refs = []
    for i in targets[: spec.refs_per_image]:
        kinds = [k for k in EXPRESSION_TYPES if options[i][k]]
        kind = kinds[int(rng.integers(len(kinds)))]  # types first, so that every type is common
        choices = options[i][kind]
        refs.append((i, choices[int(rng.integers(len(choices)))]))
    return ToyImage(pixels, shapes, visible, areas, refs)


def where(shape: Shape, size: int) -> str:
    """``top left``: the thirds of a ``size``-pixel image (rows, then columns) holding the shape's centre."""
    row, col = (min(int(3 * v / size), 2) for v in (shape.cy, shape.cx))
    return f"{THIRDS[0][row]} {THIRDS[1][col]}"


def vqa_turns(toy: ToyImage, size: int) -> list[tuple[str, str]]:
    """(question, answer) pairs about each referred shape of ``toy`` (its location; its colour and kind)."""
    turns = []
    for shape_index, expr in toy.refs:
        shape, text = toy.shapes[shape_index], expr.text()
        turns += [(f"where is {text}?", f"{where(shape, size)}."), (f"which object is {text}?",
                                                                    f"a {shape.color} {shape.kind}.")]
    return turns


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def image_file_name(split: str, index: int) -> str:
    return f"{DATASET}_{split}_{index:06d}.jpg"


def write_toyref(root: str | Path, spec: ToySpec = ToySpec()) -> Path:
    """Write the toy data set under ``root`` (skipped when ``root`` already holds ``spec``)."""
    spec.check()
    root = Path(root)
    ds_dir = root / "refer_seg" / DATASET
    marker = ds_dir / MARKER
    stamp = {**asdict(spec), "format": FORMAT}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return root
    image_dir = root / REFER_IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    ds_dir.mkdir(parents=True, exist_ok=True)
    images, anns, refs, scenes = [], [], [], {}
    vqa: dict[str, list[dict]] = {split: [] for split in SPLITS}
    image_id = ann_id = ref_id = sent_id = 1
    size = spec.image_size
    for split in SPLITS:
        for index in range(spec.images(split)):
            toy = generate_image(spec, split, index)
            file_name = image_file_name(split, index)
            Image.fromarray(toy.pixels).save(image_dir / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            scenes[file_name] = [asdict(s) for s in toy.shapes]
            ann_ids = []
            for shape, mask in zip(toy.shapes, toy.visible):
                ys, xs = np.nonzero(mask)
                bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                anns.append({"id": ann_id, "image_id": image_id, "category_id": KINDS.index(shape.kind) + 1,
                             "iscrowd": 0, "segmentation": _rle(mask), "area": int(mask.sum()), "bbox": bbox})
                ann_ids.append(ann_id)
                ann_id += 1
            for shape_index, expr in toy.refs:
                text = expr.text()
                sentence = {"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id}
                refs.append({"ref_id": ref_id, "ann_id": ann_ids[shape_index], "image_id": image_id,
                             "category_id": KINDS.index(toy.shapes[shape_index].kind) + 1, "split": split,
                             "sentences": [sentence], "sent_ids": [sent_id], "file_name": file_name,
                             "expression_type": expr.kind})
                ref_id, sent_id = ref_id + 1, sent_id + 1
            conversation = []
            for k, (question, answer) in enumerate(vqa_turns(toy, size)):
                conversation += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                                 {"from": "gpt", "value": answer}]
            if conversation:
                vqa[split].append({"id": f"{split}_{index:06d}", "image": file_name, "conversations": conversation})
            image_id += 1
    with open(ds_dir / f"refs({SPLIT_BY}).p", "wb") as handle:
        pickle.dump(refs, handle)
    categories = [{"id": i + 1, "name": k} for i, k in enumerate(KINDS)]
    (ds_dir / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": categories}))
    (ds_dir / "scenes.json").write_text(json.dumps(scenes))
    vqa_dir = root / LLAVA_DIR
    vqa_dir.mkdir(parents=True, exist_ok=True)
    for split, items in vqa.items():
        (vqa_dir / f"{VQA_NAME}_{split}.json").write_text(json.dumps(items))
    marker.write_text(json.dumps(stamp))
    return root


def main(argv: Sequence[str] | None = None) -> None:
    defaults = ToySpec()
    parser = argparse.ArgumentParser(prog="python -m datasets.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset_dir to write refer_seg/toyref into")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    for split in SPLITS:
        parser.add_argument(f"--{split}-images", type=int, default=defaults.images(split), dest=f"{split}_images")
    args = parser.parse_args(argv)
    spec = ToySpec(seed=args.seed, train_images=args.train_images, val_images=args.val_images,
                   testA_images=args.testA_images)
    root = write_toyref(args.out, spec)
    print(f"wrote {DATASET} ({', '.join(f'{s}: {spec.images(s)} images' for s in SPLITS)}) under {root}")


if __name__ == "__main__":
    main()
