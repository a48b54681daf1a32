"""LISA's web demo (gradio), with the image-token schedule made visible.

    python app.py                                   # the committed toy LISA, toy-world examples
    python app.py --version /x/LISA-7B-v1 --vision-tower /x/clip-vit-large-patch14 --precision bf16
    python app.py --host 0.0.0.0 --port 7860        # default: 127.0.0.1:7860 (this machine only)

Upload (or pick) an image, type a query, choose a method and one of its presets (plain LISA, any
LVLM_CSP preset, any baseline preset of ``configs/exp`` and ``configs/schedule`` whose counts fit the
loaded model), and see the answer, the mask overlay, the token map of every stage (the paper's
Figure 5, as ``scripts/chat.py`` draws it), Navg, TFLOPs and the measured LLM time. "Side by side"
runs plain LISA on the same query beside the method.

The method of a preset is what the composed config selects (``csp.config.method_from_config``, as
``eval_ds.py`` and ``scripts/chat.py`` resolve it); the answer comes from
``model.pipeline.SegmentationPipeline.chat`` through ``scripts.chat.answer``. Without ``--version``
the model is the committed toy LISA (``assets/toy_lisa``) and a few toy-world val images
(``datasets.toy``, generated at start) are offered as examples.

Bad input (no image, a file that is not an image, an image over ``--max-pixels``, an empty or overlong
query, a preset that does not fit the model) gets a message in the page; the app keeps serving.
Nothing reaches the network: gradio's analytics are off, no share link is made, the page uses the
system fonts. ``--stop-after SECONDS`` stops the server by itself (the tests use it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import tempfile
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# before gradio is imported: no analytics, no version check, no hub calls
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from csp.accounting import TokenRecord  # noqa: E402
from csp.config import PLAIN, MethodConfig, method_from_config  # noqa: E402
from model.pipeline import SegmentationPipeline  # noqa: E402
from scripts.chat import (  # noqa: E402
    PRECISIONS,
    ChatOutput,
    answer,
    compared_strategies,
    default_checkpoint,
    load_bundle,
    resolve_preset,
)

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
PLAIN_LABEL = "plain LISA"
PLAIN_PRESET = "(none)"
#: Images above this many pixels are refused with a message (decoding them costs memory for nothing:
#: CLIP sees 224 or 336 pixels a side, SAM 1024).
MAX_PIXELS = 4096 * 4096
MAX_QUERY_CHARS = 1000
#: Toy-world val images offered as examples with the default model.
EXAMPLE_INDICES = (0, 1, 2, 3)


# ------------------------------------------------------------------ presets

@dataclass(frozen=True)
class Preset:
    """A ``configs/exp`` or ``configs/schedule`` preset and the method it selects."""

    name: str
    kind: str  # "exp" | "schedule"
    method: str  # registered method name


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _group_node(group: str, choice: Any, inline: Any) -> dict[str, Any] | None:
    node = None if choice in (None, "null") else _load_yaml(CONFIGS / group / f"{choice}.yaml")
    if isinstance(inline, dict):
        node = {**(node or {}), **inline}
    return node


def quick_method_nodes(kind: str, name: str) -> dict[str, Any] | None:
    """The ``method`` / ``schedule`` nodes of a preset read straight from its YAML (defaults-list
    overrides merged with the preset's own nodes), without Hydra: fast enough to list every preset
    at start. Running a preset composes it with Hydra (:func:`scripts.chat.resolve_preset`); this
    only decides what is offered. None: not an evaluation preset (a training experiment)."""
    data = _load_yaml(CONFIGS / kind / f"{name}.yaml")
    if kind == "schedule":
        return {"method": None, "schedule": data}
    choices = {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                choices[str(key).replace("override", "").strip().lstrip("/")] = value
    if "mode" in choices or "train_data" in choices:
        return None
    return {"method": _group_node("method", choices.get("method"), data.get("method")),
            "schedule": _group_node("schedule", choices.get("schedule"), data.get("schedule"))}


def list_presets(num_layers: int, num_image_tokens: int) -> list[Preset]:
    """Every preset whose method builds and fits a model of ``num_layers`` layers and
    ``num_image_tokens`` image tokens (plain-LISA presets left out: "plain LISA" is one choice)."""
    found, seen = [], set()
    for kind in ("exp", "schedule"):  # resolve_preset's order: an exp of the same name wins
        for path in sorted((CONFIGS / kind).glob("*.yaml")):
            if path.stem in seen:
                continue
            try:
                nodes = quick_method_nodes(kind, path.stem)
                if nodes is None:
                    continue
                resolved = method_from_config(nodes)
                if resolved.method is None:
                    continue
                resolved.method.check()
                resolved.method.validate(num_layers, num_image_tokens)
            except Exception:  # noqa: BLE001 - a preset that does not fit is simply not offered
                continue
            seen.add(path.stem)
            found.append(Preset(path.stem, kind, resolved.name))
    return found


# ------------------------------------------------------------------ the demo's state and one request

class InputError(ValueError):
    """Something the user can fix: shown in the page."""


def check_image(path: str | None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The uploaded file as an RGB image, or an :class:`InputError` saying why not."""
    if path is None or not str(path).strip():
        raise InputError("Upload an image (or pick an example) first.")
    from runs.images import image_size, open_image

    try:
        width, height = image_size(path)  # the header only: refuse a huge image before decoding it
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"The uploaded file is not an image this demo can read ({type(err).__name__}).") from err
    if width * height > max_pixels:
        raise InputError(f"The image is {width} x {height} = {width * height / 1e6:.1f} megapixels; "
                         f"this demo takes at most {max_pixels / 1e6:.1f} megapixels. Please upload a smaller one.")
    try:
        return open_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"The uploaded file is not an image this demo can read ({type(err).__name__}).") from err


def check_query(query: str | None) -> str:
    text = (query or "").strip()
    if not text:
        raise InputError("Type a query (e.g. \"What is the red circle in this image? Please output segmentation "
                         "mask.\").")
    if len(text) > MAX_QUERY_CHARS:
        raise InputError(f"The query has {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted.")
    return text


@dataclass
class Outcome:
    """What one method produced for one request (what a result column shows)."""

    method: MethodConfig
    preset: str
    output: ChatOutput
    stats: dict[str, Any]

    @property
    def overlay(self) -> np.ndarray | None:
        return self.output.overlay_images[0] if self.output.overlay_images else None

    @property
    def token_map(self) -> Image.Image:
        return self.output.token_map_obj.figure()


class Demo:
    """The loaded model, the presets that fit it, and one pipeline per preset used so far."""

    def __init__(self, bundle: Any, *, model_name: str, max_new_tokens: int = 32, max_side: int = 448,
                 max_pixels: int = MAX_PIXELS):
        self.bundle = bundle
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.pipes: dict[str, tuple[MethodConfig, SegmentationPipeline]] = {}
        self.lock = threading.Lock()
        plain = SegmentationPipeline(bundle, None)
        self.pipes[PLAIN_PRESET] = (PLAIN, plain)
        self.presets = list_presets(plain.num_layers, plain.num_image_tokens)

    def methods(self) -> list[str]:
        names = []
        for preset in self.presets:
            if preset.method not in names:
                names.append(preset.method)
        return [PLAIN_LABEL, *sorted(names, key=lambda n: (n != "csp", n))]

    def presets_of(self, method: str | None) -> list[str]:
        if method in (None, "", PLAIN_LABEL):
            return [PLAIN_PRESET]
        return [p.name for p in self.presets if p.method == method]

    def pipeline(self, preset: str | None) -> tuple[MethodConfig, SegmentationPipeline]:
        """The preset's method (composed with Hydra, resolved by ``method_from_config``) and its pipeline."""
        key = preset if preset not in (None, "", "plain", "none") else PLAIN_PRESET
        if key not in self.pipes:
            try:
                method = resolve_preset(key)
                pipe = SegmentationPipeline(self.bundle, method.method)
            except (SystemExit, ValueError, KeyError, FileNotFoundError) as err:
                raise InputError(f"Preset {key!r} does not run on this model: {err}") from err
            self.pipes[key] = (method, pipe)
        return self.pipes[key]

    def run(self, image: Image.Image, query: str, preset: str | None) -> Outcome:
        method, pipe = self.pipeline(preset)
        strategies = compared_strategies("auto", pipe)
        with self.lock:  # one request at a time on the model
            output = answer(pipe, image, query, strategies=strategies, max_new_tokens=self.max_new_tokens,
                            max_side=self.max_side)
        result = output.result
        tokens = TokenRecord(list(result.image_tokens), list(result.total_tokens)).summarize(pipe.dims)
        stats = {
            "method": describe(method),
            "preset": preset if method.method is not None else None,
            "Navg": round(tokens["Navg"], 3),
            "TFLOPs": float(f"{tokens['TFLOPs']:.6g}"),
            "LLM ms": round(float(result.llm_ms), 2),
            "image tokens per layer": tokens["image_tokens"],
            "[SEG] masks": int(len(output.masks)),
            "mask pixels": [int(m.sum()) for m in output.masks],
        }
        return Outcome(method, preset or PLAIN_PRESET, output, stats)


def describe(method: MethodConfig) -> str:
    """``plain LISA``, ``csp (Lc=2, ...)``, ``fastv(layer=1, keep=2)``."""
    text = method.describe()
    return text if method.name is None or text.startswith(method.name) else f"{method.name} {text}"


def example_images(out_dir: Path, indices: Sequence[int] = EXAMPLE_INDICES) -> list[tuple[str, str]]:
    """Write toy-world val images into ``out_dir``; (image path, a query about one of its shapes) each."""
    from datasets.toy import ToySpec, generate_image

    out_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in indices:
        toy = generate_image(ToySpec(), "val", index)
        path = out_dir / f"toy_val_{index:02d}.png"
        Image.fromarray(toy.pixels).save(path)
        expression = toy.refs[0][1].text()
        examples.append((str(path), f"What is {expression} in this image? Please output segmentation mask."))
    return examples


# ------------------------------------------------------------------ the page

def _tolerant_preprocess(component: Any) -> None:
    """Let a file that PIL cannot open reach the handler (which answers with a message) instead of
    failing inside gradio's image preprocessing."""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except Exception:  # noqa: BLE001 - check_image explains it to the user
            return None if payload is None or getattr(payload, "path", None) is None else str(payload.path)

    component.preprocess = preprocess


def page_theme() -> Any:
    """gradio's default theme on the system fonts (its own web fonts would be fetched from the internet)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_ui(demo: Demo, examples: Sequence[tuple[str, str]] = ()) -> Any:
    import gradio as gr

    def result_column(title: str, prefix: str, visible: bool = True) -> tuple[Any, ...]:
        with gr.Column(visible=visible) as column:
            gr.Markdown(f"### {title}", elem_id=f"{prefix}_title")
            text = gr.Textbox(label="answer", interactive=False, elem_id=f"{prefix}_answer")
            overlay = gr.Image(label="mask overlay", type="numpy", format="png", interactive=False,
                               elem_id=f"{prefix}_overlay")
            tmap = gr.Image(label="token map: what each stage keeps", type="pil", format="png", interactive=False,
                            elem_id=f"{prefix}_token_map")
            stats = gr.JSON(label="Navg, TFLOPs, LLM time", elem_id=f"{prefix}_stats")
        return column, text, overlay, tmap, stats

    methods = demo.methods()
    first_method = "csp" if "csp" in methods else PLAIN_LABEL
    with gr.Blocks(title="LISA + LVLM_CSP", analytics_enabled=False) as ui:
        gr.Markdown(f"## LISA with LVLM_CSP: reasoning segmentation, and which image tokens each decoder stage "
                    f"keeps\nModel: `{demo.model_name}` ({demo.pipes[PLAIN_PRESET][1].num_layers} layers, "
                    f"N = {demo.pipes[PLAIN_PRESET][1].num_image_tokens} image tokens).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="filepath", sources=["upload"], elem_id="image")
                _tolerant_preprocess(image)
            with gr.Column():
                query = gr.Textbox(label="query", lines=2, elem_id="query",
                                   placeholder="What is the red circle in this image? Please output segmentation mask.")
                method = gr.Dropdown(methods, value=first_method, label="method", elem_id="method")
                preset = gr.Dropdown(demo.presets_of(first_method), value=demo.presets_of(first_method)[0],
                                     label="preset (configs/exp, configs/schedule)", elem_id="preset",
                                     allow_custom_value=True)  # the choices follow the method; checked on submit
                compare = gr.Checkbox(label="side by side with plain LISA", value=False, elem_id="compare")
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
        message = gr.Markdown("", elem_id="message")
        with gr.Row():
            _, *outputs_a = result_column("method", "a")
            column_b, *outputs_b = result_column("plain LISA", "b", visible=False)
        if examples:
            gr.Examples([list(e) for e in examples], inputs=[image, query], label="toy-world examples")

        def on_method(name: str) -> Any:
            choices = demo.presets_of(name)
            return gr.Dropdown(choices=choices, value=choices[0])

        method.change(on_method, inputs=method, outputs=preset, api_name=False)

        empty = (None, None, None, None)

        def on_submit(image_path: str | None, text: str | None, method_name: str, preset_name: str,
                      side_by_side: bool) -> tuple[Any, ...]:
            hide_b = gr.Column(visible=bool(side_by_side))
            try:
                picture = check_image(image_path, demo.max_pixels)
                query_text = check_query(text)
                chosen = PLAIN_PRESET if method_name in (None, "", PLAIN_LABEL) else preset_name
                if chosen not in demo.presets_of(method_name):
                    raise InputError(f"Preset {chosen!r} is not a preset of {method_name!r} for this model.")
                a = demo.run(picture, query_text, chosen)
                b = demo.run(picture, query_text, PLAIN_PRESET) if side_by_side else None
            except InputError as err:
                return (f"**{err}**", *empty, hide_b, *empty)
            except Exception as err:  # noqa: BLE001 - the page says what failed; the app keeps serving
                traceback.print_exc()
                return (f"**The request failed: {type(err).__name__}: {err}**", *empty, hide_b, *empty)
            done = f"Done: {a.stats['method']}" + (" and plain LISA." if b is not None else ".")
            out_b = empty if b is None else (b.output.text, b.overlay, b.token_map, b.stats)
            return (done, a.output.text, a.overlay, a.token_map, a.stats, hide_b, *out_b)

        submit.click(on_submit, inputs=[image, query, method, preset, compare],
                     outputs=[message, *outputs_a, column_b, *outputs_b], api_name="segment",
                     concurrency_limit=1)
    return ui


# ------------------------------------------------------------------ CLI

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=None,
                        help="LISA checkpoint directory (default: assets/toy_lisa, the committed toy LISA)")
    parser.add_argument("--vision-tower", "--vision_tower", dest="vision_tower", default=None,
                        help="CLIP directory (default: <version>/vision_tower for the toy model)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                        help="default: bf16 on GPU (LISA's default), fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="0: any free port (printed)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=448, help="longest side of each token-map panel")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest image accepted (pixels)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random model (no toy checkpoint)")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="stop serving after this many seconds (default: serve until interrupted)")
    return parser.parse_args(argv)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.vision_tower and not args.version:
        raise SystemExit("--vision-tower needs --version")
    bundle = load_bundle(args)
    model_name = args.version or str(default_checkpoint()[0].relative_to(ROOT) if default_checkpoint() else
                                      "tiny random LISA")
    demo = Demo(bundle, model_name=model_name, max_new_tokens=args.max_new_tokens, max_side=args.max_side,
                max_pixels=args.max_pixels)
    example_dir = Path(tempfile.mkdtemp(prefix="lisa_app_examples_"))
    examples = example_images(example_dir) if args.version is None else []
    ui = build_ui(demo, examples)
    ui.queue(max_size=16, default_concurrency_limit=1)
    for attempt in range(5):  # --port 0: a free port, chosen again if another process took it meanwhile
        port = args.port or free_port(args.host)
        try:
            ui.launch(server_name=args.host, server_port=port, share=False, inbrowser=False, show_error=True,
                      prevent_thread_lock=True, theme=page_theme(), allowed_paths=[str(example_dir)],
                      max_file_size="50mb", quiet=True)
            break
        except OSError:
            if args.port or attempt == 4:
                raise
    print(f"serving on http://{args.host}:{port}/ ({model_name}; {len(demo.presets)} presets fit it)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(timeout=args.stop_after)
    ui.close()
    shutil.rmtree(example_dir, ignore_errors=True)
    print("stopped", flush=True)


if __name__ == "__main__":
    from runs.cli import user_errors_in_one_line

    user_errors_in_one_line(main)()
