"""Measure evaluation on a refer split of real size (docs/performance.md, "RefCOCO-sized data").

    python -m scripts.measure_real_size <dataset_dir> --preset refcoco_val [--max-samples N] [--json out.json]
    python -m scripts.measure_real_size <dataset_dir> --preset refcocog_val --resume-check <run dir>

Writes the split first (:mod:`datasets.real_size`, skipped when present), then in this process:

- **load**: seconds to read the split (``load_groups``: refs pickle, instances.json, samples) and the peak
  resident memory it adds above the tiny model (``ru_maxrss`` after minus before);
- **overhead per sample**: evaluation's loop with the tiny model (``evaluate_setting``: image reading, GT
  masks, records, merge, metrics) minus the time inside ``pipe.segment`` (the model), per sample;
- **run directory**: its size in bytes after the run.

``--resume-check``: runs ``eval_ds.py`` on the split and kills it (SIGKILL) after its first records, fills
its records up to half the split (:func:`resume_check`), starts it again with ``resume=true`` and reports
seconds from start to the first record of the fresh run and to the first *new* record of the resumed one
(their difference is what resuming costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(dataset_dir: Path, split: str, out_dir: Path, max_samples: int | None) -> dict:
    from datasets.splits import load_groups
    from evaluation.evaluate import SettingOptions, evaluate_setting
    from model.builder import build_tiny_lisa
    from model.pipeline import SegmentationPipeline
    from runs.distributed import DistContext

    bundle = build_tiny_lisa(seed=0)
    pipe = SegmentationPipeline(bundle, None)
    before = peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    groups = load_groups(split, dataset_dir, max_samples)
    load_s, load_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    load_peak_mb = peak_rss_mb() - before
    samples = sum(len(g.samples) for g in groups)
    inside = [0.0, 0.0]  # wall, CPU seconds inside the model
    segment = pipe.segment

    def timed_segment(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return segment(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t
            inside[1] += time.process_time() - c

    pipe.segment = timed_segment  # type: ignore[method-assign]
    start, cpu = time.perf_counter(), time.process_time()
    metrics = evaluate_setting(pipe, groups, [split], out_dir, DistContext(), SettingOptions(name="tiny",
                               progress=False))
    eval_s, eval_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {"split": split, "images": len(groups), "samples": samples, "load_s": round(load_s, 3),
            "load_cpu_s": round(load_cpu_s, 3), "load_peak_mb_above_model": round(load_peak_mb, 1),
            "eval_s": round(eval_s, 2), "eval_cpu_s": round(eval_cpu_s, 2),
            "model_ms_per_sample": round(1000 * inside[0] / samples, 3),
            "overhead_ms_per_sample": round(1000 * (eval_s - inside[0]) / samples, 3),
            "model_cpu_ms_per_sample": round(1000 * inside[1] / samples, 3),
            "overhead_cpu_ms_per_sample": round(1000 * (eval_cpu_s - inside[1]) / samples, 3),
            "run_dir_bytes": dir_bytes(out_dir), "failed": metrics["summary"]["failed"]}


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_records(proc: subprocess.Popen, rank_file: Path, above: int, start: float) -> float | None:
    """Seconds from ``start`` until ``rank_file`` holds more than ``above`` lines (None: the process ended)."""
    while proc.poll() is None:
        if lines(rank_file) > above:
            return time.perf_counter() - start
        time.sleep(0.01)
    return None


def resume_check(dataset_dir: Path, split: str, run_dir: Path, samples: int) -> dict:
    """Seconds from start to the first record of a fresh run, and to the first new record of a run resumed
    with half of ``split``'s samples finished.

    The fresh run is killed (SIGKILL) after its first records; the killed half is then completed in its rank
    file with copies of those real records under the next sample ids in split order (what a run killed half
    way leaves, without evaluating half the split first), plus a torn last line as a kill leaves."""
    from datasets.splits import load_split

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(REPO / "eval_ds.py"), "model=tiny", f"dataset_dir={dataset_dir}", f"data.splits={split}",
           "name=real_size", "baseline=null", "progress=false", f"hydra.run.dir={run_dir}"]
    rank_file = run_dir / "results.rank0.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = wait_for_records(proc, rank_file, 0, start)
    wait_for_records(proc, rank_file, 4, start)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    real = [json.loads(line) for line in rank_file.read_text().splitlines()[:4]]
    ids = [s.sample_id for s in load_split(split, dataset_dir)]
    done = {r["sample_id"] for r in real}
    half = samples // 2
    with open(rank_file, "a") as handle:
        for i, sample_id in enumerate([i for i in ids if i not in done][: half - len(real)]):
            handle.write(json.dumps({**real[i % len(real)], "sample_id": sample_id}) + "\n")
        handle.write('{"split": "torn')
    killed_at = lines(rank_file)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd + ["resume=true"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resumed_first = wait_for_records(proc, rank_file, killed_at, start)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"split": split, "samples": samples, "finished_before_resume": killed_at,
            "fresh_first_record_s": round(first or float("nan"), 2),
            "resumed_first_new_record_s": round(resumed_first or float("nan"), 2),
            "resume_cost_s": round((resumed_first or float("nan")) - (first or float("nan")), 2)}


def main(argv: list[str] | None = None) -> None:
    from datasets.real_size import PRESETS, write_real_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--max-samples", type=int, default=None, help="per split (null: all)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: <dataset_dir>/runs/<preset>)")
    parser.add_argument("--resume-check", type=Path, default=None, metavar="RUN_DIR")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = PRESETS[args.preset]
    start = time.perf_counter()
    write_real_size(args.dataset_dir, spec)
    write_s = time.perf_counter() - start
    if args.resume_check is not None:
        result = resume_check(args.dataset_dir, spec.name, args.resume_check, spec.sentences)
    else:
        out = args.out or args.dataset_dir / "runs" / args.preset
        result = measure(args.dataset_dir, spec.name, out, args.max_samples)
    result = {"preset": args.preset, "write_s": round(write_s, 1), **result}
    print(json.dumps(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
