"""Wall-clock benchmark of LISA with image-token reduction, against the device's roofline.

Random weights in the real shapes (no download): ``--shape 7b`` is LLaMA-7B with CLIP ViT-L/14-224
and SAM ViT-H (use it on a GPU, bf16), ``13b`` LLaMA-13B with the same towers, ``cpu32`` a
32-layer LLaMA narrowed to fit a CPU (d=512) with tiny CLIP/SAM towers (N = 256), ``tiny`` a
32-layer d=64 LLaMA (tests).

Two modes:

- one preset (default): the LLM forward of plain LISA, one LVLM_CSP schedule and the method presets
  of ``--methods`` (default: the Table 1 presets, configs/exp/table1_<method>.yaml), interleaved,
  median of repeats; JSON with the measured speed-up, the FLOPs ratio and the roofline speed-up;
  before-LLM methods (PruMerge, PruMerge+, VisionZip) run the LLM on their number of image tokens
  (the upper bound where it depends on the data); their CLIP-side cost is not in the LLM time;
- ``--suite``: every preset of a model (``configs/schedule/<model>_p*.yaml``) and every registered
  method of ``csp.methods`` (its ``configs/method/<name>.yaml``), at batch 1 and batched (several
  queries of one image, as evaluation runs them); per-component times (vision tower, the method's
  module before the LLM incl. seg_first's detector, LLM, SAM encoder, SAM decoder), end-to-end
  samples/s, CUDA peak memory, roofline; a JSON report and a printed table.

The roofline: the device's matmul throughput and memory bandwidth are measured in the same run by
small microbenchmarks at the model's shapes; per stage, roofline time = max(FLOPs / throughput,
bytes / bandwidth) with FLOPs and bytes from ``csp.accounting`` (the shared calculator).

    python -m scripts.benchmark --preset llava7b_224_p70 --shape cpu32
    python -m scripts.benchmark --suite --shape cpu32 --out bench.json
    python -m scripts.benchmark --suite --shape 7b --device cuda --dtype bf16 --compiled --out bench_7b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlamaModel

from csp.accounting import ModelDims, counts_row, roofline, static_row, total_flops
from csp.config import SCHEDULE_METHOD, MethodConfig, method_from_config
from csp.methods import METHODS, Method, VisionFeatures, build_method
from csp.runner import CompileOptions, DecoderInputs, StageRunner
from model.builder import build_random_lisa
from model.bundle import LisaBundle, cast_model, resolve_dtype
from model.cpu_linear import prepack_cpu_linears
from model.inference import teacher_forced
from model.pipeline import SegmentationPipeline, Timer
from model.prompt import IMAGE_PLACEHOLDER_ID, SpecialTokenIds
from model.sam import build_sam_vit_h, build_tiny_sam, decode_masks, sam_postprocess, sam_preprocess
from model.vision import tiny_clip_config
from scripts.flops_table import load_method_presets

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "cpu32": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=32, num_attention_heads=4),
}
#: The model whose presets a shape runs by default (``--model``), and the towers it comes with.
DEFAULT_MODEL = {"7b": "llava7b_224", "13b": "llava13b_224", "cpu32": "llava7b_224", "tiny": "llava7b_224"}
REAL_TOWERS = ("7b", "13b")  # CLIP ViT-L/14 and SAM ViT-H; the others get tiny towers
VOCAB = 32004
SEG_ID, PAD_ID, PERIOD_ID = 32000, 0, 29889
COMPONENTS = ("vision", "reduce", "llm", "sam_encoder", "sam_decoder")
#: Default relative spread (max - min) / median of a configuration's repeats above which the report
#: warns (``--max-spread``).
SPREAD_WARNING = 0.25


# -- models -------------------------------------------------------------------------------
def llama_config(shape: str) -> LlamaConfig:
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    return config


def build_llm(shape: str, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """The decoder alone (one-preset mode), random weights."""
    with torch.device(device):
        torch.manual_seed(0)
        llm = LlamaModel(llama_config(shape))
    return cast_model(llm, dtype=dtype, device=device).eval()


def vit_l14_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14 at 224 (LLaVA-1.5's tower for the 224 presets), N = 256."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=768)


def build_bundle(shape: str, dtype: torch.dtype, device: torch.device) -> LisaBundle:
    """Whole LISA at ``shape`` with random weights, built directly in ``dtype`` on ``device``."""
    config = llama_config(shape)
    real = shape in REAL_TOWERS
    clip_config = vit_l14_config() if real else tiny_clip_config()
    config.mm_hidden_size = clip_config.hidden_size
    config.mm_projector_type = "mlp2x_gelu" if real else "linear"
    config.mm_vision_select_layer = -2
    config.out_dim = 256 if real else 32
    sam = build_sam_vit_h if real else (lambda: build_tiny_sam(config.out_dim))
    # no tokenizer: prompts are built as ids here, with LISA-7B's special-token ids
    ids = SpecialTokenIds(seg=SEG_ID, im_start=32001, im_end=32002, eos=2, pad=PAD_ID)
    return build_random_lisa(config, clip_config, sam, token_ids=ids, dtype=dtype, device=device)


# -- methods ------------------------------------------------------------------------------
def load_preset(preset: str) -> MethodConfig:
    """The CSP method of a schedule preset (``configs/schedule/<preset>.yaml``), as ``schedule=<preset>``
    resolves in evaluation."""
    path = ROOT / "configs" / "schedule" / f"{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown preset {preset!r}: {path} does not exist")
    return method_from_config({"schedule": yaml.safe_load(path.read_text())})


def model_presets(model: str) -> list[str]:
    """The pruning presets of a model (``configs/schedule/<model>_p*.yaml``), in ratio order."""
    names = sorted(p.stem for p in (ROOT / "configs" / "schedule").glob(f"{model}_p*.yaml"))
    if not names:
        raise SystemExit(f"no presets configs/schedule/{model}_p*.yaml; models: llava7b_224, llava7b_336, llava13b_224")
    return names


def registered_methods() -> list[tuple[str, Method | None, str | None]]:
    """Every registered method except CSP (its presets are the schedules): (name, method, why not).

    A method runs at its Table 1 setting (``configs/exp/table1_<name>.yaml``) where there is one,
    else with its own defaults (``configs/method/<name>.yaml``).
    """
    presets = load_method_presets()
    out = []
    for name in sorted(METHODS):
        if name == SCHEDULE_METHOD:
            continue
        path = ROOT / "configs" / "method" / f"{name}.yaml"
        if f"table1_{name}" in presets:
            params, source = presets[f"table1_{name}"][1], f"table1_{name}.yaml"
        else:
            params, source = (yaml.safe_load(path.read_text()) if path.is_file() else {}), path.name
        try:
            out.append((name, build_method({**(params or {}), "name": name}), None))
        except (ValueError, TypeError) as err:
            out.append((name, None, f"cannot build from {source}: {err}"))
    return out


def peer_csp_presets() -> list[tuple[str, Method]]:
    """CSP with the newer clustering strategies and pruning scorer (``configs/exp/table1_csp_*.yaml``, the
    peers table): (name, method)."""
    presets = load_method_presets()
    out = []
    for name, (_, spec) in presets.items():
        if name.startswith("table1_csp_"):
            out.append((name.removeprefix("table1_"), method_from_config(spec_config(spec)).method))
    return out


def spec_config(spec: dict[str, Any]) -> dict[str, Any]:
    """A preset's method spec as ``method_from_config`` reads it (CSP's parameters are its schedule)."""
    if spec.get("name") == SCHEDULE_METHOD:
        return {"schedule": {k: v for k, v in spec.items() if k != "name"}}
    return {"method": spec}


class WordIds:
    """A stand-in tokenizer for random text towers: one id per word (hashed), BOS 1, EOS the largest id."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, return_tensors="pt", truncation=True, padding=True):
        rows = [[1, *[2 + hash(w) % (self.vocab - 3) for w in t.split()][:75], self.vocab - 1] for t in text]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def random_text_side(vision_width: int, device: torch.device, dtype: torch.dtype):
    """LiteLVLM's CLIP text side with random weights in ViT-L/14's text shape (width 768, 12 layers,
    projection 768) for the real towers, a small one otherwise (timing only; no download)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from csp.litelvlm import ClipTextSide

    big = vision_width >= 1024
    cfg = CLIPTextConfig(hidden_size=768 if big else 64, intermediate_size=3072 if big else 128,
                         num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else 2,
                         projection_dim=768 if big else 64)
    side = ClipTextSide(CLIPTextModelWithProjection(cfg), torch.nn.LayerNorm(vision_width),
                        torch.nn.Linear(vision_width, cfg.projection_dim, bias=False), WordIds(cfg.vocab_size))
    return side.to(device=device, dtype=dtype).eval()


def with_text_side(method: Method | None, vision_width: int, device: torch.device, dtype: torch.dtype) -> None:
    """Give a LiteLVLM method / clustering strategy a random CLIP text side (the suite has no real CLIP)."""
    if method is None:
        return
    side = None
    if getattr(method, "name", None) == "litelvlm":
        side = random_text_side(vision_width, device, dtype)
        method.text_side = side
    schedule = getattr(method, "schedule", None)
    if schedule is not None and schedule.clustering == "litelvlm":
        from csp.strategies import build_strategy

        method._strategy = build_strategy("litelvlm", text_side=random_text_side(vision_width, device, dtype))


@dataclass
class Setting:
    """One row of the suite: a method (None = plain LISA) under a name."""

    name: str
    kind: str  # plain | csp | method
    method: Method | None
    compiled: bool = False  # the compiled path (torch.compile; CUDA graphs per stage shape on a GPU)


# -- inputs -------------------------------------------------------------------------------
def query_ids(batch: int, text_tokens: int, sys_tokens: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``batch`` prompts ``sys | <image> | user | [SEG] .`` about one image; query i has
    ``text_tokens + 2 i - (batch - 1)`` text tokens (different lengths as in evaluation, mean
    ``text_tokens``). Returns the ids and the prompt lengths without the answer."""
    gen = np.random.default_rng(seed)
    ids, prompt_lengths = [], []
    for i in range(batch):
        text = text_tokens + 2 * i - (batch - 1)
        user = text - sys_tokens - 2  # the answer is [SEG] .
        if user < 1:
            raise SystemExit(f"--text-tokens {text_tokens} leaves no user tokens after {sys_tokens} system tokens")
        sys_part = [1] + gen.integers(3, 31999, sys_tokens - 1).tolist()
        prompt = sys_part + [IMAGE_PLACEHOLDER_ID] + gen.integers(3, 31999, user).tolist()
        ids.append(prompt + [SEG_ID, PERIOD_ID])
        prompt_lengths.append(len(prompt))
    return ids, prompt_lengths


def test_image(seed: int = 0) -> Image.Image:
    """A 480 x 640 random RGB image (COCO-like size)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8))


# -- timing helpers -----------------------------------------------------------------------
def spread(values: list[float]) -> float:
    """(max - min) / median."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid > 0 else 0.0


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": spread(values), "all": values}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Median ms of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            fn()
        times.append(timer.ms)
    return statistics.median(times)


# -- device roofs -------------------------------------------------------------------------
def measure_device(dims: ModelDims, tokens: int, dtype: torch.dtype, device: torch.device,
                   repeats: int = 5) -> dict[str, Any]:
    """Matmul throughput at the decoder's GEMM shapes (``tokens`` rows: d->d, d->m, m->d) and memory
    bandwidth (a reduction over a buffer much larger than the caches, read once per call)."""
    d, m = dims.hidden_size, dims.intermediate_size
    gemms = []
    with torch.no_grad():
        for k, n in ((d, d), (d, m), (m, d)):
            x = torch.randn(tokens, k, device=device, dtype=dtype)
            w = torch.randn(k, n, device=device, dtype=dtype)
            ms = timed(device, lambda x=x, w=w: x @ w, repeats)
            gemms.append({"m": tokens, "k": k, "n": n, "ms": ms, "flops_per_s": 2.0 * tokens * k * n / (ms / 1e3)})
        element = torch.finfo(dtype).bits // 8
        # 4x the largest last-level cache we expect (H100 L2 50 MB; server CPUs' L3 tens of MB)
        nbytes = 1 << (30 if device.type == "cuda" else 27)
        buf = torch.ones(nbytes // element, device=device, dtype=dtype)
        ms = timed(device, buf.sum, repeats)
    return {
        "matmul_flops_per_s": max(g["flops_per_s"] for g in gemms), "matmul": gemms,
        "bandwidth_bytes_per_s": nbytes / (ms / 1e3), "bandwidth_buffer_bytes": nbytes,
        "element_bytes": element,
    }


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info = {"device": str(device), "dtype": str(dtype).split(".")[-1], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "processor": platform.processor()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            info["device_name"] = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        except OSError:
            info["device_name"] = platform.processor()
    return info


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory of ``fn`` above what was allocated before it (MiB); None on CPU, where the
    process RSS high-water mark is not a sound measure (the allocator reuses freed heap)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def count_cuda_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host synchronisations torch reports for ``fn`` (``set_sync_debug_mode('warn')``); None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


# -- one-preset mode ----------------------------------------------------------------------
def sample_inputs(llm: LlamaModel, n_img: int, text: int, sys_tokens: int) -> DecoderInputs:
    """One sequence ``sys | img | usr+out``; the query row is the token before the final [SEG], which
    is also taken as the last prompt row (``ASSISTANT:`` then ``[SEG]``)."""
    length = text + n_img
    device, dtype = llm.embed_tokens.weight.device, llm.embed_tokens.weight.dtype
    embeds = torch.randn(1, length, llm.config.hidden_size, device=device, dtype=dtype)
    is_image = torch.zeros(1, length, dtype=torch.bool, device=device)
    is_image[0, sys_tokens:sys_tokens + n_img] = True
    valid = torch.ones(1, length, dtype=torch.bool, device=device)
    query = torch.tensor([[length - 4]], device=device)
    return DecoderInputs(embeds, valid, is_image, query, torch.ones_like(query, dtype=torch.bool), last_rows=query,
                         lengths=[length], image_counts=[n_img])


def method_image_tokens(method: Method, num_layers: int, n_img: int) -> int:
    """Image-slot tokens entering the LLM (upper bound for data-dependent before-LLM counts)."""
    count = method.input_tokens(n_img)
    if count is None:
        bounds = method.count_range(num_layers, n_img)
        if bounds is None:
            raise SystemExit(f"method {method.describe()} has no bounded token count; give it a fixed count")
        count = bounds[1][0]
    return count


def load_methods(names: str | None, n_img: int) -> dict[str, Method]:
    """The named configs/exp method presets (default: every table1_* preset but CSP's) with N = n_img."""
    presets = load_method_presets()
    wanted = names.split(",") if names else [n for n in presets if n.startswith("table1_") and n != "table1_csp"]
    unknown = [n for n in wanted if n not in presets]
    if unknown:
        raise SystemExit(f"unknown method presets {unknown}; known: {sorted(presets)}")
    return {name: build_method(presets[name][1]) for name in wanted}


def method_report(method: Method, runner: StageRunner, inputs: DecoderInputs, ms: list[float],
                  plain_ms: list[float], base_row: dict, dims: ModelDims, text_tokens: int,
                  device: torch.device, roofs: dict[str, Any]) -> dict:
    """Median ms, speedup over plain, the FLOPs ratio and the roofline speed-up of the image tokens
    the run processed."""
    with torch.no_grad():
        record = runner.forward(inputs).records[0]
    row = counts_row(dims, record.image_tokens, text_tokens)
    speedup = statistics.median(plain_ms) / statistics.median(ms)
    flops_ratio = base_row["TFLOPs"] / row["TFLOPs"]
    roof = roofline_fields(dims, roofs, [base_row["total_tokens"]], [row["total_tokens"]])
    return {"method": method.describe(), "ms_median": statistics.median(ms), "ms_all": ms, "speedup": speedup,
            "navg": row["Navg"], "tflops": row["TFLOPs"], "flops_ratio": flops_ratio,
            "speedup_over_flops_ratio": speedup / flops_ratio, "data_dependent": method.data_dependent(),
            "roofline_speedup": roof["roofline_speedup"],
            "speedup_over_roofline_speedup": speedup / roof["roofline_speedup"],
            "peak_mb": peak_mb(lambda: runner.forward(inputs), device)}


def time_runner(runner: StageRunner, inputs: DecoderInputs, repeats: int, warmup: int) -> list[float]:
    device = inputs.embeds.device
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            with Timer(device) as timer:
                runner.forward(inputs)
            if i >= warmup:
                times.append(timer.ms)
    return times


def roofline_fields(dims: ModelDims, roofs: dict[str, Any], plain_tokens: list[list[int]],
                    tokens: list[list[int]]) -> dict[str, Any]:
    """Roofline of plain and method from ``csp.accounting.roofline`` with the measured roofs."""
    kw = {"flops_per_s": roofs["matmul_flops_per_s"], "bytes_per_s": roofs["bandwidth_bytes_per_s"],
          "element_bytes": roofs["element_bytes"]}
    plain, mine = roofline(plain_tokens, dims, **kw), roofline(tokens, dims, **kw)
    return {"roofline_ms_plain": plain["seconds"] * 1e3, "roofline_ms": mine["seconds"] * 1e3,
            "roofline_speedup": plain["seconds"] / mine["seconds"], "roofline_stages": mine["stages"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if args.schedule:
        values = dict(zip(("Lc", "Nc", "Ls", "Np"), (int(v) for v in args.schedule.split(",")), strict=True))
        resolved = method_from_config({"schedule": values})
    else:
        resolved = load_preset(args.preset)
    schedule = resolved.method
    llm = build_llm(args.shape, dtype, device)
    if args.cpu_prepack:
        prepack_cpu_linears(llm.layers)
    n_img = args.image_tokens
    schedule.validate(len(llm.layers), n_img)
    inputs = sample_inputs(llm, n_img, args.text_tokens, args.sys_tokens)
    options = CompileOptions(enabled=args.compiled, backend=args.compile_backend, bucket=args.bucket)
    plain, csp = StageRunner(llm, None, n_img, compile=options), StageRunner(llm, schedule, n_img, compile=options)
    if csp.plan.input_keep:  # a uniform input selection of the size the method keeps before layer 0
        kept = schedule.image_tokens_per_layer(len(llm.layers), n_img)[0]
        inputs.cluster_keep = torch.arange(kept, device=device)[None] * (n_img // kept)
    methods = load_methods(args.methods, n_img) if args.methods != "none" else {}
    others = {}
    for name, method in methods.items():
        tokens = method_image_tokens(method, len(llm.layers), n_img)
        others[name] = (method, StageRunner(llm, method, n_img, compile=options),
                        inputs if tokens == n_img else sample_inputs(llm, tokens, args.text_tokens, args.sys_tokens))
    plain_ms, csp_ms = [], []
    method_ms: dict[str, list[float]] = {name: [] for name in others}
    for _ in range(args.rounds):  # interleave so drift affects all alike
        plain_ms += time_runner(plain, inputs, args.repeats, args.warmup)
        csp_ms += time_runner(csp, inputs, args.repeats, args.warmup)
        for name, (_, runner, method_inputs) in others.items():
            method_ms[name] += time_runner(runner, method_inputs, args.repeats, args.warmup)
    dims = ModelDims.from_config(llm.config)
    base_row = static_row(dims, None, n_img, args.text_tokens)
    csp_row = static_row(dims, schedule, n_img, args.text_tokens)
    speedup = statistics.median(plain_ms) / statistics.median(csp_ms)
    flops_ratio = base_row["TFLOPs"] / csp_row["TFLOPs"]
    roofs = measure_device(dims, args.text_tokens + n_img, dtype, device)
    roof = roofline_fields(dims, roofs, [base_row["total_tokens"]], [csp_row["total_tokens"]])
    with torch.no_grad():
        syncs = count_cuda_syncs(lambda: csp.forward(inputs), device)
    report = {
        "shape": args.shape, "device": str(device), "dtype": str(dtype).split(".")[-1],
        "machine": machine_info(device, dtype),
        "schedule": {k: resolved.params[k] for k in ("Lc", "Nc", "Ls", "Np")},
        "image_tokens": n_img, "text_tokens": args.text_tokens, "repeats": len(plain_ms),
        "cpu_prepack": args.cpu_prepack,
        "plain_ms_median": statistics.median(plain_ms), "csp_ms_median": statistics.median(csp_ms),
        "plain_ms_all": plain_ms, "csp_ms_all": csp_ms,
        "plain_spread": spread(plain_ms), "csp_spread": spread(csp_ms),
        "speedup": speedup, "tflops_plain": base_row["TFLOPs"], "tflops_csp": csp_row["TFLOPs"],
        "flops_ratio": flops_ratio, "speedup_over_flops_ratio": speedup / flops_ratio,
        "device_roofs": roofs, **roof,
        "speedup_over_roofline_speedup": speedup / roof["roofline_speedup"],
        "navg": csp_row["Navg"],
        "peak_mb_plain": peak_mb(lambda: plain.forward(inputs), device),
        "peak_mb_csp": peak_mb(lambda: csp.forward(inputs), device),
        "cuda_syncs_per_forward": syncs,
        "methods": {name: method_report(method, runner, method_inputs, method_ms[name], plain_ms, base_row, dims,
                                        args.text_tokens, device, roofs)
                    for name, (method, runner, method_inputs) in others.items()},
    }
    report["warnings"] = [f"{name} repeats spread {value:.0%} (max - min over median)"
                          for name, value in (("plain", report["plain_spread"]), ("csp", report["csp_spread"]))
                          if value > args.max_spread]
    return report


# -- suite --------------------------------------------------------------------------------
class SuiteRunner:
    """One LISA bundle; runs one sample (an image and its queries) of a setting, timed per component."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.bundle = build_bundle(args.shape, dtype, device)
        self.model = self.bundle.model
        if args.cpu_prepack:  # the LLM's decoder layers (what the methods change); plain and methods alike
            prepack_cpu_linears(self.model.model.layers)
        self.image = test_image()
        rgb = np.asarray(self.image)
        tower = self.model.vision_tower
        # host-side preprocessing (data loading work) stays outside the timed components
        self.pixels = tower.processor(images=self.image, return_tensors="pt")["pixel_values"].to(device)
        sam_input, self.resized = sam_preprocess(rgb)
        self.sam_input = sam_input.unsqueeze(0).to(device=device, dtype=dtype)
        self.pipes: dict[str, SegmentationPipeline] = {}
        self.compile = CompileOptions(enabled=True, backend=args.compile_backend, bucket=args.bucket)
        self.embedding: torch.Tensor | None = None

    @torch.no_grad()
    def sam_encoder(self) -> float:
        """ms of SAM's image encoder on the image. It does not see the method or the queries, so the
        suite times it once per round and adds its median to every row's end-to-end time."""
        with Timer(self.device) as t:
            self.embedding = self.model.sam.image_encoder(self.sam_input)
        return t.ms

    def pipe(self, setting: Setting) -> SegmentationPipeline:
        if setting.name not in self.pipes:
            tower = self.model.vision_tower
            with_text_side(setting.method, tower.config.hidden_size, self.device, self.dtype)
            options = self.compile if setting.compiled else None
            self.pipes[setting.name] = SegmentationPipeline(self.bundle, method=setting.method, compile=options)
        return self.pipes[setting.name]

    @torch.no_grad()
    def sample(self, setting: Setting, batch: int) -> tuple[dict[str, float], float, list]:
        """(component ms, end-to-end ms without the SAM encoder, token records) of one image with ``batch``
        queries (the SAM encoder: :meth:`sam_encoder`)."""
        pipe, model, device = self.pipe(setting), self.model, self.device
        tower, sam = model.vision_tower, model.sam
        ids, prompt_lengths = query_ids(batch, self.args.text_tokens, self.args.sys_tokens)
        sample_ids = [f"q{i}" for i in range(batch)]
        method = setting.method
        ms: dict[str, float] = {}
        with Timer(device) as total:
            with Timer(device) as t:
                layer = method.cls_attention_layer if method is not None else None
                features, cls_row, hidden = tower.encode(self.pixels, cls_attention_layer=layer)
                image_embeds = model.project_images(features)
            ms["vision"] = t.ms
            with Timer(device) as t:  # the method's module before the LLM (clustering incl. a detector, merging)
                enc = _Encoding(features, cls_row, image_embeds, self.image)
                texts = [f"the object number {i} in the picture" for i in range(batch)]
                if method is not None:
                    enc.vision = VisionFeatures(hidden_states=hidden, layers=tower.encoder_layers,
                                                select_layer=tower.select_layer, grid=tower.grid)
                    enc.reduced = method.reduce_images(enc.vision)
                    if enc.reduced is not None:
                        enc.reduced_embeds = model.project_images(enc.reduced.features)
                keep = pipe.cluster(enc, sample_ids, texts)
                images = pipe.image_inputs(enc, batch, texts)  # LiteLVLM's selection per query runs here
            ms["reduce"] = t.ms
            with Timer(device) as t:
                out = teacher_forced(model, pipe.runner, ids, seg_id=SEG_ID, pad_id=PAD_ID, cluster_keep=keep,
                                     prompt_lengths=prompt_lengths, **images)
            ms["llm"] = t.ms
            if self.embedding is None:
                self.sam_encoder()
            with Timer(device) as t:
                prompts = torch.cat(out.seg_embeddings)
                low_res = decode_masks(sam, self.embedding, prompts)
                masks = sam_postprocess(low_res, self.resized, self.image.size[::-1])
                (masks > 0).cpu()  # the evaluation reads the masks on the host
            ms["sam_decoder"] = t.ms
        return ms, total.ms, out.records


@dataclass
class _Encoding:
    """The fields of ``model.pipeline.ImageEncoding`` that ``cluster``/``image_inputs`` read."""

    clip_features: torch.Tensor
    cls_attention: torch.Tensor | None
    image_embeds: torch.Tensor
    image: Image.Image
    reduced: Any = None
    reduced_embeds: torch.Tensor | None = None
    vision: Any = None


def suite_settings(args: argparse.Namespace, num_layers: int, num_image_tokens: int) -> tuple[list[Setting], list[str]]:
    """Plain, every preset of the model, an extra seg_first variant, every other registered method."""
    settings, skipped = [Setting("plain", "plain", None)], []
    model = args.model or DEFAULT_MODEL[args.shape]
    presets = model_presets(model)
    for preset in presets:
        settings.append(Setting(preset.removeprefix(model + "_"), "csp", load_preset(preset).method))
    if args.seg_first:
        base = load_preset(next((p for p in presets if p.endswith("_p70")), presets[0])).params
        seg_first = method_from_config({"schedule": {
            **base, "clustering": "seg_first",
            "clustering_kwargs": {"weights": args.seg_first, "imgsz": args.seg_first_imgsz}}})
        settings.append(Setting("p70+seg_first", "csp", seg_first.method))
    for name, method, why in registered_methods():
        if method is not None:
            try:
                method.validate(num_layers, num_image_tokens)
            except ValueError as err:
                method, why = None, f"does not fit L={num_layers}, N={num_image_tokens}: {err}"
        if method is None:
            skipped.append(f"{name}: {why}")
        else:
            settings.append(Setting(name, "method", method))
    for name, method in peer_csp_presets():  # the peers table's CSP rows (Table 1's schedule, 224 px)
        try:
            method.validate(num_layers, num_image_tokens)
        except ValueError as err:
            skipped.append(f"{name}: does not fit L={num_layers}, N={num_image_tokens}: {err}")
            continue
        settings.append(Setting(name, "csp", method))
    if args.only:
        wanted = set(args.only.split(","))
        settings = [s for s in settings if s.name in wanted or s.kind == "plain"]
    if args.compiled:  # every row once more on the compiled path, so the report shows whether it pays
        settings += [replace(s, name=s.name + "+compiled", compiled=True) for s in settings]
    return settings, skipped


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    runner = SuiteRunner(args, device, dtype)
    dims = ModelDims.from_config(runner.model.config)
    n_img = runner.model.vision_tower.num_patches
    settings, skipped = suite_settings(args, dims.num_layers, n_img)
    batches = [int(b) for b in (args.batches or ("1,8" if device.type == "cuda" else "1,2")).split(",")]
    times: dict[tuple[str, int], dict[str, list[float]]] = {}
    records: dict[tuple[str, int], list] = {}
    # first calls (allocations, lazy loading such as the YOLO weights); compiled rows compile a graph
    # per stage shape, so they warm up at every batch size
    for _ in range(args.warmup):
        runner.sam_encoder()
        for setting in settings:
            for batch in (batches if setting.compiled else batches[:1]):
                runner.sample(setting, batch)
    sam_ms = []
    for _ in range(args.rounds):  # interleaved: every setting once per round
        sam_ms.append(runner.sam_encoder())
        for batch in batches:
            for setting in settings:
                ms, e2e, recs = runner.sample(setting, batch)
                slot = times.setdefault((setting.name, batch), {c: [] for c in (*COMPONENTS, "e2e")})
                for c in COMPONENTS:
                    if c != "sam_encoder":
                        slot[c].append(ms[c])
                slot["e2e"].append(e2e)
                records[(setting.name, batch)] = recs
    sam_median = statistics.median(sam_ms)
    for slot in times.values():
        slot["sam_encoder"] = sam_ms
        slot["e2e"] = [t + sam_median for t in slot["e2e"]]
    roofs = measure_device(dims, args.text_tokens + n_img, dtype, device)
    kw = {"flops_per_s": roofs["matmul_flops_per_s"], "bytes_per_s": roofs["bandwidth_bytes_per_s"],
          "element_bytes": roofs["element_bytes"]}
    results, warns = [], []
    for batch in batches:
        plain_tokens = [r.total_tokens for r in records[("plain", batch)]]
        plain_roof = roofline(plain_tokens, dims, **kw)
        plain_flops = sum(total_flops(t, dims) for t in plain_tokens)
        plain_llm = statistics.median(times[("plain", batch)]["llm"])
        plain_e2e = statistics.median(times[("plain", batch)]["e2e"])
        for setting in settings:
            key = (setting.name, batch)
            tokens = [r.total_tokens for r in records[key]]
            roof = roofline(tokens, dims, **kw)
            flops = sum(total_flops(t, dims) for t in tokens)
            comp = {c: stats(times[key][c]) for c in COMPONENTS}
            llm, e2e = comp["llm"]["median"], statistics.median(times[key]["e2e"])
            speedup, flops_ratio = plain_llm / llm, plain_flops / flops
            roof_speedup = plain_roof["seconds"] / roof["seconds"]
            row = {
                "name": setting.name, "kind": setting.kind, "batch": batch,
                "method": setting.method.describe() if setting.method is not None else "plain LISA",
                "components_ms": comp, "e2e_ms": stats(times[key]["e2e"]),
                "samples_per_s": batch / (e2e / 1e3), "e2e_speedup": plain_e2e / e2e,
                "llm_ms": llm, "speedup": speedup,
                "tflops": flops / 1e12, "flops_ratio": flops_ratio, "speedup_over_flops_ratio": speedup / flops_ratio,
                "roofline_ms": roof["seconds"] * 1e3, "roofline_speedup": roof_speedup,
                "speedup_over_roofline_speedup": speedup / roof_speedup,
                "roofline_stages": roof["stages"],
                "image_tokens_per_layer": [r.image_tokens for r in records[key]],
                "total_tokens_per_layer": tokens,
                "peak_mb": peak_mb(lambda s=setting, b=batch: runner.sample(s, b), device),
            }
            results.append(row)
            for c in ("llm", "e2e"):
                s = row["e2e_ms"]["spread"] if c == "e2e" else comp["llm"]["spread"]
                if s > args.max_spread:
                    warns.append(f"{setting.name} batch {batch}: {c} repeats spread {s:.0%} (max - min over median)")
    syncs = None
    if device.type == "cuda":
        first = next((s for s in settings if s.kind == "csp"), settings[0])
        syncs = count_cuda_syncs(lambda: runner.sample(first, 1), device)
    return {
        "mode": "suite", "shape": args.shape, "model": args.model or DEFAULT_MODEL[args.shape],
        "machine": machine_info(device, dtype), "device_roofs": roofs,
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "batches": batches,
                     "text_tokens": args.text_tokens, "image_tokens": n_img, "compiled": args.compiled,
                     "cpu_prepack": args.cpu_prepack,
                     "bucket": args.bucket, "components": list(COMPONENTS),
                     "sam_encoder": "timed once per round (it sees neither method nor queries); its median "
                                    "is added to every row's end-to-end time"},
        "cuda_syncs_per_sample": syncs, "results": results, "skipped": skipped, "warnings": warns,
    }


def format_table(report: dict[str, Any]) -> str:
    """The printed table: one block per batch size."""
    m = report["machine"]
    lines = [f"{report['shape']} ({report['model']}) on {m.get('device_name') or m['device']}, {m['dtype']}, "
             f"{m['threads']} threads; roofs: matmul {report['device_roofs']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
             f"bandwidth {report['device_roofs']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
             f"medians of {report['settings']['rounds']} interleaved rounds"
             + ("; LLM linears oneDNN-prepacked" if report["settings"].get("cpu_prepack") else "")]
    head = ("| setting | batch | LLM ms (spread) | speed-up | FLOPs ratio | roofline sp. | sp/FLOPs | sp/roofline "
            "| vision | reduce | SAM enc | SAM dec | e2e ms | samples/s | peak MiB |")
    lines += ["", head, "|" + " --- |" * (head.count("|") - 1)]
    for r in report["results"]:
        c = r["components_ms"]
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['llm_ms']:.1f} ({c['llm']['spread']:.0%}) | {r['speedup']:.2f} "
            f"| {r['flops_ratio']:.2f} | {r['roofline_speedup']:.2f} | {r['speedup_over_flops_ratio']:.2f} "
            f"| {r['speedup_over_roofline_speedup']:.2f} | {c['vision']['median']:.1f} | {c['reduce']['median']:.1f} "
            f"| {c['sam_encoder']['median']:.1f} | {c['sam_decoder']['median']:.1f} | {r['e2e_ms']['median']:.1f} "
            f"| {r['samples_per_s']:.2f} | {peak} |")
    for note in report.get("skipped", []):
        lines.append(f"skipped: {note}")
    for note in report.get("warnings", []):
        lines.append(f"WARNING: {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="store_true", help="every preset and method, batch 1 and batched")
    parser.add_argument("--preset", default="llava7b_224_p70", help="a configs/schedule/<name>.yaml (one-preset mode)")
    parser.add_argument("--schedule", help="explicit Lc,Nc,Ls,Np (overrides --preset)")
    parser.add_argument("--model", help="suite: whose presets (llava7b_224, llava7b_336, llava13b_224)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image-tokens", type=int, default=256, help="one-preset mode (the suite uses the tower's)")
    parser.add_argument("--text-tokens", type=int, default=62)
    parser.add_argument("--sys-tokens", type=int, default=36, help="text tokens before the image")
    parser.add_argument("--repeats", type=int, default=5, help="one-preset mode: repeats per round")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per round / suite: per setting")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, suite 3)")
    parser.add_argument("--batches", help="suite: comma-separated queries per image (default 1,8 on CUDA, 1,2 on CPU)")
    parser.add_argument("--only", help="suite: comma-separated setting names to run (plain always runs)")
    parser.add_argument("--seg-first", default="yolo11n-seg.yaml",
                        help="suite: YOLO-seg weights for the p70+seg_first row (default: the packaged yolo11n-seg "
                             "architecture with random weights, no download); '' to skip the row")
    parser.add_argument("--seg-first-imgsz", type=int, default=640)
    parser.add_argument("--compiled", action="store_true",
                        help="one-preset mode: time the compiled path (csp.runner.CompileOptions) instead of eager; "
                             "suite: add a '+compiled' row for every setting")
    parser.add_argument("--cpu-prepack", action=argparse.BooleanOptionalAction, default=None,
                        help="the LLM's linear layers on oneDNN-prepacked weights (model.cpu_linear), for plain and "
                             "every method alike; default: on for fp32 on a CPU (as eval_ds.py's "
                             "model.cpu_prepack=auto), off elsewhere; --no-cpu-prepack: eager F.linear")
    parser.add_argument("--bucket", type=int, default=16, help="compiled path: stage widths rounded up to this")
    parser.add_argument("--compile-backend", default="inductor", help="compiled path: torch.compile backend")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default 1 on CPU: on a shared machine OpenMP threads spin against other "
                             "processes and an elementwise op can take 100x longer; 0 = torch's default)")
    parser.add_argument("--methods", help="one-preset mode: comma-separated configs/exp method presets to time beside "
                        "plain and CSP (default: every table1_* preset; 'none' for none)")
    parser.add_argument("--max-spread", type=float, default=SPREAD_WARNING,
                        help="warn when a timing's repeats spread more than this fraction of their median "
                             "((max - min) / median)")
    parser.add_argument("--out", "--output", dest="output", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.suite else 2
    if args.warmup is None:
        args.warmup = 1 if args.suite else 2
    if args.cpu_prepack is None:  # auto: on where it can run (fp32 CPU with oneDNN)
        from runs.models import prepack_supported

        args.cpu_prepack = prepack_supported(torch.device(args.device), resolve_dtype(args.dtype))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    report = run_suite(args) if args.suite else run(args)
    for warning in report.get("warnings", []):
        print(f"WARNING: {warning}: the machine was probably busy; re-run with more --repeats/--rounds "
              "on an idle machine", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    if args.suite:
        print(format_table(report))
        if args.output:
            print(f"JSON report: {args.output}")
    else:
        print(text)
    return report


if __name__ == "__main__":
    main()
