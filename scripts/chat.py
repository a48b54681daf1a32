"""Chat with LISA (+ a token-reduction method): answer, one mask overlay per [SEG], and the token map.

    python -m scripts.chat --version /x/LISA-7B-v1 --vision-tower /x/clip-vit-large-patch14 \\
        --precision bf16 --preset llava7b_224_p70 --image dog.jpg --query "Where is the dog?"
    python -m scripts.chat --preset demo --image dog.jpg       # tiny/toy model; asks for queries

LISA's flags (``--version``, ``--vision-tower``, ``--precision``, ``--vis_save_path``) keep their
meaning. Without ``--version`` the toy LISA trained by ``train_ds.py`` is used when
``assets/toy_lisa/`` exists (:data:`TOY_CHECKPOINT`), else the tiny random-weight LISA (answers
and masks are then noise; the token maps still show what each stage keeps).

``--preset NAME`` names an experiment (``configs/exp/NAME.yaml``, composed as ``+exp=NAME`` over
``configs/eval.yaml``) or a schedule preset (``configs/schedule/NAME.yaml``, composed as
``schedule=NAME``); ``--override`` adds Hydra overrides (``schedule.Np=8``, ``method.keep=32``). The
method is what the composed config selects (``csp.config.method_from_config``, as evaluation
resolves it: ``--preset table1_fastv`` runs FastV); its model choice is ignored (the model is
``--version``).

Written into ``--out-dir`` per query: ``<image>_masked_img_<k>.png`` (the image with the k-th
[SEG]'s mask tinted) and ``<image>_token_map.png`` (the paper's Figure 5 for this query: the
clustering selection of each strategy, the tokens of every stage, the mask).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from csp.config import PLAIN, MethodConfig, method_from_config
from csp.geometry import TokenGeometry
from model.builder import build_tiny_lisa
from model.bundle import LisaBundle, cast_model, resolve_dtype
from model.pipeline import SegmentationPipeline
from visualize.token_maps import draw_mask, new_token_map, strategy_selections, token_map

ROOT = Path(__file__).resolve().parents[1]

#: The toy LISA of the training issue (a LISA checkpoint directory in ``save_lisa_checkpoint``'s
#: layout with its CLIP directory in ``vision_tower/``, as train_ds.py writes it); the default model when it exists.
TOY_CHECKPOINT = ROOT / "assets" / "toy_lisa"
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Strategies compared in the token map that need no extra files (seg_first needs YOLO weights).
COMPARED_STRATEGIES = ("uniform", "random", "cls_attention")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=None,
                        help="LISA checkpoint directory (default: assets/toy_lisa if present, else tiny random LISA)")
    parser.add_argument("--vision-tower", "--vision_tower", dest="vision_tower", default=None,
                        help="CLIP directory (default: <version>/vision_tower for the toy model)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                        help="default: bf16 on GPU (LISA's default), fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--preset", default=None, help="configs/exp or configs/schedule name (default: plain LISA)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override applied with the preset, e.g. schedule.Np=8 (repeatable)")
    parser.add_argument("--image", default=None, help="image path (asked for when missing)")
    parser.add_argument("--query", default=None, help="the question (asked for, repeatedly, when missing)")
    parser.add_argument("--out-dir", "--vis_save_path", dest="out_dir", default="./vis_output")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--strategies", default="auto",
                        help="clustering strategies compared in the token map: comma list, 'none', or 'auto' "
                             f"({', '.join(COMPARED_STRATEGIES)} when the schedule clusters)")
    parser.add_argument("--max-side", type=int, default=448, help="longest side of each token-map panel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random model")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ model and schedule

def default_checkpoint() -> tuple[Path, Path] | None:
    """(checkpoint, CLIP dir) of the toy LISA when ``assets/toy_lisa/`` exists, else None
    (looked up at run time, so that a later checkout with the toy model uses it)."""
    if not TOY_CHECKPOINT.is_dir():
        return None
    return TOY_CHECKPOINT, TOY_CHECKPOINT / "vision_tower"  # train_ds.py writes its CLIP tower there


def load_bundle(args: argparse.Namespace) -> LisaBundle:
    """``--version`` (released or toy checkpoint), else the toy, else the tiny random LISA."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = resolve_dtype(PRECISIONS[precision])
    checkpoint, clip_dir = (Path(args.version), None) if args.version else (default_checkpoint() or (None, None))
    if checkpoint is None:
        bundle = build_tiny_lisa(args.seed)
        cast_model(bundle.model, dtype=dtype, device=device)
        return bundle
    from model.checkpoint import load_lisa_checkpoint

    clip_dir = Path(args.vision_tower) if args.vision_tower else clip_dir
    if clip_dir is None:
        raise SystemExit("--vision-tower is required with --version (LISA checkpoints carry no CLIP weights)")
    return load_lisa_checkpoint(checkpoint, clip_dir, dtype=dtype, device=device)


def resolve_preset(name: str | None, overrides: Sequence[str] = ()) -> MethodConfig:
    """The method of a ``configs/exp`` or ``configs/schedule`` preset (``csp.config.PLAIN``: plain LISA)."""
    if name is None or name in ("", "none", "plain"):
        if overrides:
            raise SystemExit(f"--override {list(overrides)} needs a --preset")
        return PLAIN
    configs = ROOT / "configs"
    if (configs / "exp" / f"{name}.yaml").is_file():
        base = [f"+exp={name}"]
    elif (configs / "schedule" / f"{name}.yaml").is_file():
        base = [f"schedule={name}"]
    else:
        known = sorted({p.stem for p in (configs / "exp").glob("*.yaml")} |
                       {p.stem for p in (configs / "schedule").glob("*.yaml")})
        raise SystemExit(f"--preset {name!r}: no configs/exp/{name}.yaml or configs/schedule/{name}.yaml; "
                         f"known presets: {', '.join(known)}")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[*base, *overrides])
    return method_from_config(cfg)


# ------------------------------------------------------------------ one query

@dataclass
class ChatOutput:
    """What one query produced: the answer and the files written."""

    text: str
    overlays: list[Path] = field(default_factory=list)
    token_map: Path | None = None
    masks: np.ndarray | None = None
    token_map_obj: object | None = None
    overlay_images: list[np.ndarray] = field(default_factory=list)  # H x W x 3 uint8, one per [SEG]
    result: object | None = None  # the pipeline's ChatResult (token counts, LLM time)


def overlay_name(image_path: Path, index: int) -> str:
    return f"{image_path.stem}_masked_img_{index}.png"


def compared_strategies(spec: str, pipe: SegmentationPipeline) -> list[str]:
    """Clustering strategies drawn beside the method's own input selection (none when the method
    selects no input tokens)."""
    if spec == "none" or not pipe.selects_input:
        return []
    if spec == "auto":
        return list(COMPARED_STRATEGIES)
    return [s.strip() for s in spec.split(",") if s.strip()]


def answer(pipe: SegmentationPipeline, image: Image.Image, query: str, *, strategies: Sequence[str] = (),
           max_new_tokens: int = 32, max_side: int | None = 448) -> ChatOutput:
    """Answer ``query`` about ``image`` in memory: the text, the masks, one overlay per [SEG]
    (``overlay_images``: the image at its size with the mask tinted) and the token map (what
    :func:`run_query` saves, and what ``app.py`` shows)."""
    result = pipe.chat(image, query, max_new_tokens=max_new_tokens)
    geometry = TokenGeometry.for_tower(pipe.model.vision_tower, image.height, image.width)
    output = ChatOutput(text=result.text, masks=result.masks, result=result)
    plain = new_token_map(image, geometry, max_side=None)
    output.overlay_images = [draw_mask(plain, mask) for mask in result.masks]
    compared = {}
    if strategies:  # as many tokens as the method's own selection keeps before layer 0
        kept = pipe.method.image_tokens_per_layer(pipe.num_layers, pipe.num_image_tokens)
        if kept is not None:
            compared = strategy_selections(pipe, image, strategies, kept[0])
    output.token_map_obj = token_map(image, geometry, result.kept_image_tokens, num_layers=pipe.num_layers,
                                     masks=result.masks, strategies=compared, caption=_caption(query),
                                     max_side=max_side)
    return output


def run_query(pipe: SegmentationPipeline, image_path: Path, query: str, out_dir: Path, *,
              strategies: Sequence[str] = (), max_new_tokens: int = 32, max_side: int | None = 448) -> ChatOutput:
    """Answer ``query`` about ``image_path``; write the overlays and the token map into ``out_dir``."""
    if not image_path.is_file():
        raise FileNotFoundError(f"image not found: {image_path}")
    from runs.images import open_image

    try:
        image = open_image(image_path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{image_path} is not an image this can read ({type(err).__name__}: {err})") from err
    output = answer(pipe, image, query, strategies=strategies, max_new_tokens=max_new_tokens, max_side=max_side)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, overlay in enumerate(output.overlay_images):
        path = out_dir / overlay_name(image_path, k)
        Image.fromarray(overlay).save(path)
        output.overlays.append(path)
    output.token_map = out_dir / f"{image_path.stem}_token_map.png"
    output.token_map_obj.save(str(output.token_map))
    return output


class ImageReadError(ValueError):
    """A path that exists but does not hold a readable image."""


def _caption(query: str, limit: int = 120) -> str:
    text = re.sub(r"\s+", " ", query).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None, ask: Callable[[str], str] = input) -> list[ChatOutput]:
    args = parse_args(argv)
    if args.image is not None and not Path(args.image).is_file():
        raise SystemExit(f"--image {args.image}: no such file")
    method = resolve_preset(args.preset, args.override)  # before the model: a bad preset fails fast
    if method.method is not None:
        method.method.check()
    bundle = load_bundle(args)
    pipe = SegmentationPipeline(bundle, method.method)  # validates the method against L and N
    strategies = compared_strategies(args.strategies, pipe)
    print(f"model: {args.version or default_checkpoint() or 'tiny random LISA'}; method: {method.describe()}",
          flush=True)
    outputs = []
    while True:
        query = args.query
        if query is None:
            try:
                query = ask("Please input your prompt: ")
            except EOFError:
                break
            if not query.strip():
                break
        image_path = args.image
        if image_path is None:
            try:
                image_path = ask("Please input the image path: ")
            except EOFError:
                break
        path = Path(image_path.strip())
        try:
            output = run_query(pipe, path, query, Path(args.out_dir), strategies=strategies,
                               max_new_tokens=args.max_new_tokens, max_side=args.max_side)
        except (FileNotFoundError, ImageReadError) as err:
            if args.query is not None:
                raise SystemExit(str(err)) from err
            print(err, flush=True)  # the session goes on: ask again
            continue
        print(f"text_output: {output.text}", flush=True)
        for overlay in output.overlays:
            print(f"{overlay} has been saved.", flush=True)
        print(f"{output.token_map} has been saved.", flush=True)
        outputs.append(output)
        if args.query is not None:
            break
    return outputs


if __name__ == "__main__":
    from runs.cli import user_errors_in_one_line

    user_errors_in_one_line(main)()
