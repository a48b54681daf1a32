"""scripts/gpu_check.sh on CPU: it parses, every command in it exists and accepts its arguments, its
limits fit in 8 minutes, and its Python parts (precision check, summary) run here."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def dry_run(tmp_path: Path) -> list[tuple[str, int, list[str]]]:
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": "python"}, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = []
    for line in out.stdout.splitlines():
        assert line.startswith("+ ["), line
        head, command = line[3:].split("] ", 1)
        name, limit = head.split(", <= ")
        steps.append((name, int(limit.rstrip("s")), shlex.split(command)))
    return steps


def test_gpu_check_parses_and_every_command_exists(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert shutil.which("timeout") and shutil.which("bash")
    steps = dry_run(tmp_path)
    assert [s[0] for s in steps] == ["bench_7b", "bench_13b", "precision", "ds_zero2", "summary"]
    assert sum(limit for _, limit, _ in steps) <= 8 * 60
    from scripts import benchmark, gpu_check
    from training.config import check_config

    for name, _, argv in steps:
        assert argv[0] == "python", argv
        if argv[1:3] == ["-m", "scripts.benchmark"]:
            args = benchmark.parse_args(argv[3:])
            assert args.suite and args.device == "cuda" and args.dtype == "bf16" and args.compiled
            assert args.shape in ("7b", "13b") and args.batches == "1,8" and not args.cpu_prepack
            for preset in args.only.split(","):
                assert (REPO / "configs" / "schedule" / f"llava{args.shape}_224_{preset}.yaml").is_file(), preset
        elif argv[1:3] == ["-m", "scripts.gpu_check"]:
            parsed = gpu_check.build_parser().parse_args(argv[3:])
            assert parsed.command in ("precision", "summary") and getattr(parsed, "device", "cuda") == "cuda"
        elif argv[1] == "train_ds.py":
            overrides = [a for a in argv[2:] if not a.startswith("hydra.")]
            with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
            check_config(cfg)
            assert cfg.trainer.deepspeed and cfg.model.device == "cuda" and cfg.trainer.precision == "bf16"
        else:
            raise AssertionError(f"{name}: unknown command {argv}")


def test_gpu_check_python_parts_run_on_cpu(tmp_path: Path) -> None:
    from scripts import gpu_check

    out = tmp_path / "out"
    gpu_check.main(["precision", "--device", "cpu", "--out", str(out / "precision.json")])
    result = json.loads((out / "precision.json").read_text())
    assert len(result["rows"]) == 6 and 0.9 < result["min_seg_cosine"] <= 1.0001
    (out / "status.txt").write_text("bench_7b 0 100\nprecision 0 12\n")
    bench = {"model": "llava7b_224", "machine": {"dtype": "torch.bfloat16"},
             "results": [{"name": "plain", "batch": 1, "llm_ms": 10.0, "speedup": 1.0, "e2e_ms": {"median": 20.0},
                          "samples_per_s": 50.0, "peak_mb": 1234.5}]}
    (out / "bench_7b.json").write_text(json.dumps(bench))
    (out / "ds_zero2").mkdir()
    (out / "ds_zero2" / "train_log.jsonl").write_text('{"step": 1, "loss": 6.5}\n{"step": 2, "loss": 6.1}\n')
    report = gpu_check.summary(out)
    assert report["steps"]["bench_7b"] == {"exit": 0, "seconds": 100} and "7b" in report["benchmarks"]
    table = (out / "gpu_check.md").read_text()
    assert "| plain | 1 | 10.0 | 1.00 | 20.0 | 50.00 | 1234 |" in table and "losses [6.5, 6.1]" in table
    assert json.loads((out / "gpu_check.json").read_text())["deepspeed_zero2"][1]["loss"] == 6.1
