"""Wall-clock benchmark of the LLM forward: plain LISA, an LVLM_CSP schedule and every other method,
in one run.

Random weights in a LLaMA shape (no download): ``--shape 7b`` is the real LLaMA-7B (use it on a
GPU, bf16), ``--shape 13b`` LLaMA-13B, ``--shape cpu32`` a 32-layer LLaMA narrowed to fit a CPU.
One sample: ``text`` tokens around N image tokens (teacher forcing, as in evaluation). Prints
JSON: median ms of each, measured speedup, the FLOPs ratio from csp.accounting for the same
dims, their quotient, and peak memory (CUDA only). The spread of the repeats (interquartile range
over median) is in the JSON too; above ``--max-spread`` (10%) a warning is printed and listed under
``warnings``: the machine was busy or the clock noisy, and the medians deserve less trust.
``methods`` holds the same for every method
preset named by ``--methods`` (default: the Table 1 presets, configs/exp/table1_<method>.yaml);
before-LLM methods (PruMerge, PruMerge+, VisionZip) run the LLM on their number of image tokens
(the upper bound where it depends on the data); their CLIP-side cost is not in the LLM time.

    python scripts/benchmark.py --preset llava7b_224_p70 --shape cpu32
    python scripts/benchmark.py --preset llava7b_224_p70 --shape 7b --device cuda --dtype bf16
    python scripts/benchmark.py --methods table1_fastv,table1_pyramiddrop --shape cpu32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from csp.accounting import ModelDims, counts_row, static_row  # noqa: E402
from csp.methods import Method, build_method  # noqa: E402
from csp.runner import DecoderInputs, StageRunner  # noqa: E402
from csp.schedule import StageSchedule  # noqa: E402
from model.builder import cast_model, resolve_dtype  # noqa: E402
from model.pipeline import Timer  # noqa: E402
from scripts.flops_table import load_method_presets  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "cpu32": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=32, num_attention_heads=4),
}


def load_schedule(args: argparse.Namespace) -> StageSchedule:
    if args.schedule:
        lc, nc, ls, np_ = (int(v) for v in args.schedule.split(","))
        return StageSchedule(Lc=lc, Nc=nc, Ls=ls, Np=np_)
    path = ROOT / "configs" / "schedule" / f"{args.preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown preset {args.preset!r}: {path} does not exist")
    return StageSchedule.from_mapping(yaml.safe_load(path.read_text()))


def build_llm(shape: str, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    config = LlamaConfig(vocab_size=32004, max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        torch.manual_seed(0)
        llm = LlamaModel(config)
    return cast_model(llm, dtype=dtype, device=device).eval()


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
    return DecoderInputs(embeds, valid, is_image, query, torch.ones_like(query, dtype=torch.bool), last_rows=query)


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


def peak_mb(fn, device: torch.device) -> float | None:
    """Peak CUDA memory of one forward above what the model and inputs hold (MiB).

    None on CPU: the process RSS high-water mark is not a sound measure there (the allocator
    reuses heap freed after model construction), so the benchmark does not pretend to have one.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def spread(values: list[float]) -> dict[str, float]:
    """Median, interquartile range (inclusive quartiles) and their quotient of repeated timings."""
    median = statistics.median(values)
    if len(values) < 2:
        return {"median": median, "iqr": 0.0, "iqr_over_median": 0.0}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "iqr": q3 - q1, "iqr_over_median": (q3 - q1) / median if median else float("inf")}


def spread_warnings(spreads: dict[str, dict[str, float]], limit: float) -> list[str]:
    """One warning per timing whose IQR / median exceeds ``limit``."""
    return [f"{name}: repeats spread widely (IQR / median = {s['iqr_over_median']:.0%} > {limit:.0%}); "
            "the machine was probably busy: re-run with more --repeats/--rounds on an idle machine"
            for name, s in spreads.items() if s["iqr_over_median"] > limit]


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    torch.set_num_threads(args.threads) if args.threads else None
    schedule = load_schedule(args)
    llm = build_llm(args.shape, dtype, device)
    n_img = args.image_tokens
    schedule.validate(len(llm.layers), n_img)
    inputs = sample_inputs(llm, n_img, args.text_tokens, args.sys_tokens)
    inputs.cluster_keep = torch.arange(schedule.Nc, device=device)[None] * (n_img // schedule.Nc)
    plain, csp = StageRunner(llm, None, n_img), StageRunner(llm, schedule, n_img)
    methods = load_methods(args.methods, n_img) if args.methods != "none" else {}
    others = {}
    for name, method in methods.items():
        tokens = method_image_tokens(method, len(llm.layers), n_img)
        others[name] = (method, StageRunner(llm, method, n_img),
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
    spreads = {"plain_ms": spread(plain_ms), "csp_ms": spread(csp_ms)}
    warnings = spread_warnings(spreads, args.max_spread)
    return {
        "shape": args.shape, "device": str(device), "dtype": str(dtype).split(".")[-1],
        "schedule": {"Lc": schedule.Lc, "Nc": schedule.Nc, "Ls": schedule.Ls, "Np": schedule.Np},
        "image_tokens": n_img, "text_tokens": args.text_tokens, "repeats": len(plain_ms),
        "plain_ms_median": statistics.median(plain_ms), "csp_ms_median": statistics.median(csp_ms),
        "plain_ms_all": plain_ms, "csp_ms_all": csp_ms,
        "plain_ms_iqr_over_median": spreads["plain_ms"]["iqr_over_median"],
        "csp_ms_iqr_over_median": spreads["csp_ms"]["iqr_over_median"], "warnings": warnings,
        "speedup": speedup, "tflops_plain": base_row["TFLOPs"], "tflops_csp": csp_row["TFLOPs"],
        "flops_ratio": flops_ratio, "speedup_over_flops_ratio": speedup / flops_ratio,
        "navg": csp_row["Navg"],
        "peak_mb_plain": peak_mb(lambda: plain.forward(inputs), device),
        "peak_mb_csp": peak_mb(lambda: csp.forward(inputs), device),
        "methods": {name: method_report(method, runner, method_inputs, method_ms[name], plain_ms, base_row, dims,
                                        n_img, args.text_tokens, device)
                    for name, (method, runner, method_inputs) in others.items()},
    }


def method_report(method: Method, runner: StageRunner, inputs: DecoderInputs, ms: list[float],
                  plain_ms: list[float], base_row: dict, dims: ModelDims, n_img: int, text_tokens: int,
                  device: torch.device) -> dict:
    """Median ms, speedup over plain, and the FLOPs ratio of the image tokens the run processed."""
    with torch.no_grad():
        record = runner.forward(inputs).records[0]
    row = counts_row(dims, record.image_tokens, text_tokens)
    speedup = statistics.median(plain_ms) / statistics.median(ms)
    flops_ratio = base_row["TFLOPs"] / row["TFLOPs"]
    return {"method": method.describe(), "ms_median": statistics.median(ms), "ms_all": ms, "speedup": speedup,
            "navg": row["Navg"], "tflops": row["TFLOPs"], "flops_ratio": flops_ratio,
            "speedup_over_flops_ratio": speedup / flops_ratio, "data_dependent": method.data_dependent(),
            "peak_mb": peak_mb(lambda: runner.forward(inputs), device)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava7b_224_p70", help="a configs/schedule/<name>.yaml")
    parser.add_argument("--schedule", help="explicit Lc,Nc,Ls,Np (overrides --preset)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=62)
    parser.add_argument("--sys-tokens", type=int, default=36, help="text tokens before the image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-spread", type=float, default=0.10,
                        help="warn when a timing's IQR / median exceeds this fraction")
    parser.add_argument("--methods", help="comma-separated configs/exp method presets to time beside plain and "
                        "CSP (default: every table1_* preset; 'none' for none)")
    parser.add_argument("--output", help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    for warning in report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return report


if __name__ == "__main__":
    main()
