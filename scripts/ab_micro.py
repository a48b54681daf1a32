"""Before/after microbenchmarks of the runner's pieces, old and new checkout in one process,
interleaved (the figures of docs/performance.md, "Overheads removed").

    git archive ea54b70 | tar -x -C /tmp/before
    python scripts/ab_micro.py ops /tmp/before .        # TokenState.select / scatter_into / rows_of / mask
    python scripts/ab_micro.py scorer /tmp/before .     # query_attention_scores vs one decoder layer
    python scripts/ab_micro.py overhead /tmp/before     # forward time outside the decoder layers (one checkout)
    python scripts/ab_micro.py overhead .

``ops`` and ``scorer`` load the two checkouts' ``csp/tokens.py`` / ``csp/scoring.py`` as separate
modules; ``overhead`` imports the given checkout's runner (run it once per checkout, alternating).
All on CPU with 1 thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ops(before: Path, after: Path) -> dict[str, Any]:
    mods = {"before": load(before / "csp" / "tokens.py", "tokens_before"),
            "after": load(after / "csp" / "tokens.py", "tokens_after")}
    out: dict[str, Any] = {}
    for batch, dim in ((1, 512), (8, 512), (8, 4096)):
        for _ in range(2):  # interleaved twice; the second pass is reported
            for name, mod in mods.items():
                out[f"B={batch} d={dim} {name}"] = _ops_case(mod, batch, dim)
    return out


def _ops_case(mod: ModuleType, batch: int, dim: int, length: int = 318, n_img: int = 256,
              kept: int = 80) -> dict[str, float]:
    """Right-padded batch (lengths 318, 316, ...); keep the text and ``kept`` image tokens."""
    lengths = [length - 2 * i for i in range(batch)]
    valid = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    is_image[:, 36:36 + n_img] = True
    full = mod.TokenState.full(torch.randn(batch, length, dim), valid, is_image)
    keep = ~full.is_image
    keep[:, 36:36 + kept] = True
    queries = torch.tensor([[n - 4] for n in lengths])
    width = max(n - n_img + kept for n in lengths)
    active = full.select(keep)
    with_length = "length" in inspect.signature(mod.TokenState.select).parameters
    with_padded = "padded" in inspect.signature(mod.attention_mask).parameters
    return {
        "select": median_ms(lambda: full.select(keep, width) if with_length else full.select(keep), 30),
        "scatter_into": median_ms(lambda: active.scatter_into(full), 30),
        "rows_of": median_ms(lambda: active.rows_of(queries), 30),
        "attention_mask": median_ms(lambda: mod.attention_mask(active.valid, padded=batch > 1) if with_padded
                                    else mod.attention_mask(active.valid), 30),
    }


def scorer(before: Path, after: Path) -> dict[str, Any]:
    sys.path.insert(0, str(after))
    from scripts.benchmark import build_llm

    mods = {"before": load(before / "csp" / "scoring.py", "scoring_before"),
            "after": load(after / "csp" / "scoring.py", "scoring_after")}
    llm = build_llm("cpu32", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        return {f"B={batch}": _scorer_case(mods, llm, batch) for batch in (1, 8)}


def _scorer_case(mods: dict[str, ModuleType], llm: torch.nn.Module, batch: int, length: int = 318) -> dict[str, float]:
    hidden = torch.randn(batch, length, llm.config.hidden_size)
    positions = torch.arange(length)[None].expand(batch, length)
    rotary, layer = llm.rotary_emb(hidden, positions), llm.layers[13]
    keys = torch.ones(batch, length, dtype=torch.bool)
    cols, cols_valid = torch.full((batch, 1), length - 4), torch.ones(batch, 1, dtype=torch.bool)

    def score(mod: ModuleType) -> torch.Tensor:
        return mod.query_attention_scores(layer, hidden, rotary, keys, cols, cols_valid)

    if not torch.allclose(score(mods["before"]), score(mods["after"]), atol=1e-6):
        raise SystemExit("the two scorers disagree")
    calls = {"before": lambda: score(mods["before"]), "after": lambda: score(mods["after"]),
             "layer": lambda: layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(10):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead(tree: Path) -> dict[str, Any]:
    sys.path.insert(0, str(tree))
    from csp.runner import DecoderInputs, StageRunner
    from csp.schedule import StageSchedule
    from scripts.benchmark import build_llm

    llm = build_llm("cpu32", torch.float32, torch.device("cpu"))
    inside = {"ms": 0.0, "start": 0.0}

    def pre(module: torch.nn.Module, args: tuple) -> None:
        inside["start"] = time.perf_counter()

    def post(module: torch.nn.Module, args: tuple, output: Any) -> None:
        inside["ms"] += (time.perf_counter() - inside["start"]) * 1e3

    for layer in llm.layers:
        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    host = "lengths" in inspect.signature(DecoderInputs).parameters
    schedule = StageSchedule(Lc=7, Nc=80, Ls=7, Np=8)
    out: dict[str, Any] = {}
    for batch in (1, 8):
        lengths = [318 - 2 * i for i in range(batch)]
        width = max(lengths)
        embeds = torch.randn(batch, width, llm.config.hidden_size)
        valid = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
        is_image = torch.zeros(batch, width, dtype=torch.bool)
        is_image[:, 36:292] = True
        query = torch.tensor([[n - 4] for n in lengths])
        extra = {"lengths": lengths, "image_counts": [256] * batch} if host else {}
        inputs = DecoderInputs(embeds, valid, is_image, query, torch.ones_like(query, dtype=torch.bool),
                               cluster_keep=(torch.arange(80) * 3)[None].expand(batch, -1), **extra)
        runner = StageRunner(llm, schedule, 256)
        totals, outside = [], []
        with torch.no_grad():
            for i in range(4):
                inside["ms"] = 0.0
                start = time.perf_counter()
                runner.forward(inputs)
                total = (time.perf_counter() - start) * 1e3
                if i:
                    totals.append(total)
                    outside.append(total - inside["ms"])
        out[f"p70 B={batch}"] = {"forward_ms": statistics.median(totals),
                                 "outside_layers_ms": statistics.median(outside)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("ops", "scorer", "overhead"))
    parser.add_argument("trees", nargs="+", type=Path, help="before and after checkouts (overhead: one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trees = [t.resolve() for t in args.trees]
    if args.what == "overhead":
        result = overhead(trees[0])
    elif len(trees) != 2:
        raise SystemExit(f"{args.what} needs two checkouts: before and after")
    else:
        result = (ops if args.what == "ops" else scorer)(*trees)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
