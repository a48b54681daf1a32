"""Parts of scripts/gpu_check.sh that are Python: the bf16-vs-fp32 check and the summary.

    python -m scripts.gpu_check precision --device cuda --out <dir>/precision.json
    python -m scripts.gpu_check summary <dir>          # -> <dir>/gpu_check.json and <dir>/gpu_check.md

``precision``: the tiny model (random weights, seed 0) in float32 and in bfloat16 on ``--device``, plain
and under a tiny CSP schedule, on a fixed image and queries: the cosine of every [SEG] embedding pair and
the IoU of every mask pair (bf16 against fp32), with their minima.

``summary``: the benchmark reports (``bench_*.json``), ``precision.json``, the DeepSpeed run's
``train_log.jsonl`` (``ds_zero2/``) and ``status.txt`` (each step's exit status and seconds) gathered
into one JSON and one Markdown table, with the device named.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def precision(device: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from csp.schedule import StageSchedule
    from model.pipeline import Query, SegmentationPipeline
    from runs.models import build_from_config

    image = Image.fromarray((np.random.default_rng(2).random((180, 240, 3)) * 255).astype(np.uint8))
    queries = [Query("the red car", False, "a"), Query("the dog on the left", True, "b"),
               Query("what could hold water", True, "c")]
    bundles = {dtype: build_from_config({"kind": "tiny", "seed": 0, "dtype": dtype, "device": device,
                                         "cpu_prepack": False})
               for dtype in ("float32", "bfloat16")}
    rows = []
    for name, schedule in (("plain", None), ("csp", StageSchedule(Lc=2, Nc=48, Ls=2, Np=12))):
        ref = SegmentationPipeline(bundles["float32"], schedule).segment(image, queries)
        got = SegmentationPipeline(bundles["bfloat16"], schedule).segment(image, queries)
        for q, g, r in zip(queries, got, ref):
            cos = torch.nn.functional.cosine_similarity(g.seg_embeddings.float().flatten(),
                                                        r.seg_embeddings.float().flatten(), dim=0)
            a, b = np.asarray(g.mask, bool), np.asarray(r.mask, bool)
            union = int((a | b).sum())
            iou = 1.0 if union == 0 else int((a & b).sum()) / union
            rows.append({"setting": name, "query": q.sample_id, "seg_cosine": float(cos), "mask_iou": iou})
    return {"device": device, "rows": rows, "min_seg_cosine": min(r["seg_cosine"] for r in rows),
            "min_mask_iou": min(r["mask_iou"] for r in rows)}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU (torch {torch.__version__})"


def summary(out: Path) -> dict[str, Any]:
    status = {}
    if (out / "status.txt").is_file():
        for line in (out / "status.txt").read_text().splitlines():
            step, code, seconds = line.split()
            status[step] = {"exit": int(code), "seconds": int(seconds)}
    report: dict[str, Any] = {"device": device_name(), "steps": status, "benchmarks": {}}
    for path in sorted(out.glob("bench_*.json")):
        report["benchmarks"][path.stem[len("bench_"):]] = json.loads(path.read_text())
    if (out / "precision.json").is_file():
        report["precision"] = json.loads((out / "precision.json").read_text())
    log = out / "ds_zero2" / "train_log.jsonl"
    if log.is_file():
        report["deepspeed_zero2"] = [json.loads(line) for line in log.read_text().splitlines()]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"GPU check on {report['device']}", "", "| step | exit | s |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['exit']} | {v['seconds']} |" for k, v in report["steps"].items()]
    for name, bench in report["benchmarks"].items():
        lines += ["", f"Benchmark {name} ({bench.get('model')}, {bench.get('machine', {}).get('dtype')})", "",
                  "| setting | batch | LLM ms | speed-up | e2e ms | samples/s | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in bench.get("results", []):
            peak = row.get("peak_mb")
            lines.append(f"| {row['name']} | {row['batch']} | {row['llm_ms']:.1f} | {row['speedup']:.2f} | "
                         f"{row['e2e_ms']['median']:.1f} | {row['samples_per_s']:.2f} | "
                         f"{'-' if peak is None else round(peak)} |")
    if "precision" in report:
        p = report["precision"]
        lines += ["", f"bf16 vs fp32 (tiny model): min [SEG] cosine {p['min_seg_cosine']:.4f}, "
                      f"min mask IoU {p['min_mask_iou']:.4f}"]
    if "deepspeed_zero2" in report:
        losses = [round(r["loss"], 4) for r in report["deepspeed_zero2"]]
        lines += ["", f"DeepSpeed ZeRO-2, one GPU, {len(losses)} steps: losses {losses}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precision", help="bf16 vs fp32 [SEG] embeddings and masks on the tiny model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary", help="one JSON and one table from a gpu_check.sh output directory")
    s.add_argument("out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "precision":
        result = precision(args.device)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    else:
        print(table(summary(args.out)), end="")


if __name__ == "__main__":
    main()
