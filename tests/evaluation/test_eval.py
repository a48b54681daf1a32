"""eval_ds / evaluation: configs compose, the demo runs, failures are recorded, several processes
and an interrupted + resumed run give the metrics of one uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from csp.accounting import ModelDims
from csp.config import method_from_config
from datasets import DatasetLayoutError, MiniatureSpec, UnknownSplitError, load_groups, write_miniature
from datasets.splits import check_split
from evaluation.evaluate import SettingOptions, evaluate, evaluate_setting
from evaluation.loop import SampleFailedError
from runs.distributed import DistContext, shard, strip_launcher_args

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
#: Evaluation experiments (training ones, e.g. exp/toy.yaml for train_ds.py, override the training `mode` group).
EXPS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml") if "override /mode:" not in p.read_text())
#: Row names of the two demos (the toy world's and the tiny random model's).
DEMO_NAMES = {"demo": "demo_toy_csp", "demo_tiny": "demo_tiny_csp"}
#: (L, N) of each model config: LLaMA-7B 32 layers, 13B 40; CLIP 224 -> 256 tokens, 336 -> 576; tiny: 6, 256.
MODEL_SHAPES = {"tiny": (6, 256), "llava7b_224": (32, 256), "llava7b_336": (32, 576), "llava13b_224": (40, 256),
                "toy_trained": (8, 64)}
#: Single-threaded subprocesses: identical float reductions in 1- and 2-process runs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
#: Small, fast demo variant: one setting on the two ReasonSeg splits (6 images).
SMALL = ["+exp=demo_tiny", "data=reasonseg", "baseline=null"]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("exp", EXPS)
def test_every_experiment_composes(exp: str) -> None:
    cfg = compose_cfg([f"+exp={exp}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["name"] == DEMO_NAMES.get(exp, exp)
    for split in cfg.data.splits:
        check_split(split)
    layers, tokens = MODEL_SHAPES[cfg.model.name]
    method = method_from_config(cfg).method  # a schedule (CSP) or a configs/method node
    assert (method is None) == exp.endswith("_baseline")
    if method is not None:
        method.validate(layers, tokens)
    if exp.startswith(("llava7b_224", "llava7b_336", "llava13b_224")):
        assert exp.startswith(cfg.model.name)
    if exp.startswith(("t4_", "t5_")):
        assert list(cfg.data.splits) == ["refcoco+|unc|val", "refcoco+|unc|testA", "refcoco+|unc|testB",
                                         "refcocog|umd|val", "refcocog|umd|test"]
        assert cfg.model.name == "llava7b_224"


def test_every_schedule_preset_has_an_experiment() -> None:
    presets = {p.stem for p in (CONFIGS / "schedule").glob("*.yaml")}
    assert presets and presets <= set(EXPS), sorted(presets - set(EXPS))


def test_root_config_defaults_and_groups() -> None:
    cfg = compose_cfg([])
    assert cfg.schedule is None and cfg.logger is None and cfg.model.name == "tiny" and len(cfg.data.splits) == 12
    wandb_cfg = compose_cfg(["+exp=table1", "logger=wandb"])
    assert wandb_cfg.logger.project and wandb_cfg.baseline == "same_run"
    for data in ("refcoco", "refcoco_plus", "refcocog", "reasonseg", "rio", "all5", "ablation", "table2", "table3"):
        for split in compose_cfg([f"data={data}"]).data.splits:
            check_split(split)


def test_strip_launcher_args() -> None:
    argv = ["eval_ds.py", "--local_rank=3", "+exp=demo", "--local_rank", "2", "--local-rank=1", "resume=true"]
    assert strip_launcher_args(argv) == ["eval_ds.py", "+exp=demo", "resume=true"]


def test_sharding_is_deterministic_and_complete() -> None:
    items = list(range(11))
    parts = [shard(items, DistContext(rank, 3)) for rank in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


# ---------------------------------------------------------------- bad input

def test_missing_checkpoint_fails_before_data(tmp_path: Path) -> None:
    cfg = compose_cfg(["+exp=llava7b_224_p70", f"dataset_dir={tmp_path / 'nowhere'}", f"output_dir={tmp_path}",
                       f"model.checkpoint={tmp_path / 'no_ckpt'}", f"model.vision_tower={tmp_path / 'no_clip'}"])
    with pytest.raises(FileNotFoundError, match="no_ckpt") as info:
        evaluate(cfg)
    assert not isinstance(info.value, DatasetLayoutError)


def test_schedule_too_deep_for_the_model_fails_before_data(tmp_path: Path) -> None:
    """The tiny model has 6 layers: Lc + Ls = 8 is a configuration error, raised before the (missing)
    dataset directory is even looked at."""
    from csp.schedule import ScheduleError

    cfg = compose_cfg(["+exp=demo_tiny", f"dataset_dir={tmp_path / 'nowhere'}", f"output_dir={tmp_path}",
                       "miniature=null", "schedule.Lc=5", "schedule.Ls=3"])
    with pytest.raises(ScheduleError, match="exceeds the model's 6 decoder layers"):
        evaluate(cfg)


def test_missing_dataset_and_unknown_split(tmp_path: Path) -> None:
    cfg = compose_cfg([f"dataset_dir={tmp_path / 'nowhere'}", f"output_dir={tmp_path}", "data=rio"])
    with pytest.raises(DatasetLayoutError, match="RIO_common_all_thing.json"):
        evaluate(cfg)
    cfg = compose_cfg([f"output_dir={tmp_path}", "data.splits=[refcoco|unc|test]"])
    with pytest.raises(UnknownSplitError, match=r"refcoco\|unc\|testA"):
        evaluate(cfg)
    cfg = compose_cfg(SMALL + [f"output_dir={tmp_path}", f"baseline={tmp_path / 'none.json'}"])
    with pytest.raises(FileNotFoundError, match="none.json"):
        evaluate(cfg)


# ---------------------------------------------------------------- the loop with a stand-in pipeline

@dataclass
class FakeResult:
    sample_id: str
    mask: np.ndarray
    image_tokens: list[int]
    total_tokens: list[int]
    llm_ms: float
    batch_size: int = 1


class FakePipeline:
    """Same interface as SegmentationPipeline: predicts the left half of the image; 2 layers of 4 tokens."""

    dims = ModelDims(hidden_size=8, intermediate_size=16, num_layers=2)

    def __init__(self, fail_after: int | None = None):
        self.calls: list[int] = []
        self.fail_after = fail_after

    def segment(self, image: Image.Image, queries: list, *, queries_per_batch: int | None = None) -> list[FakeResult]:
        if self.fail_after is not None and sum(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("injected interruption")
        step = queries_per_batch or len(queries)
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[:, : image.width // 2] = True
        out = []
        for start in range(0, len(queries), step):
            chunk = queries[start: start + step]
            self.calls.append(len(chunk))
            out += [FakeResult(q.sample_id, mask, [4, 2], [10, 8], 1.0, len(chunk)) for q in chunk]
        return out

    def extra_cost(self) -> dict[str, float]:
        return {}


def _groups(root: Path, splits: list[str]) -> list:
    return [g for split in splits for g in load_groups(split, root)]


def _break_fixture(root: Path) -> None:
    """Delete one RIO image, corrupt one ReasonSeg annotation."""
    next((root / "rio" / "val2014").glob("*.jpg")).unlink()
    broken = sorted((root / "reason_seg/ReasonSeg/val").glob("*.json"))[0]
    anno = json.loads(broken.read_bytes().decode("utf-8", errors="replace"))
    anno["shapes"][0]["points"] = "garbage"
    broken.write_text(json.dumps(anno))


def test_failures_are_recorded_and_counted(tmp_path: Path) -> None:
    root = write_miniature(tmp_path / "mini")
    _break_fixture(root)
    splits = ["ReasonSeg|val", "RIO|common"]
    groups = _groups(root, splits)
    metrics = evaluate_setting(FakePipeline(), groups, splits, tmp_path / "run", DistContext(), SettingOptions("fake"))
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == sum(len(g.samples) for g in groups)
    assert any("cannot read image" in r["reason"] for r in failed)
    assert any("malformed" in r["reason"] for r in failed)
    assert metrics["summary"]["failed"] == len(failed) >= 2
    assert sum(m["failed"] for m in metrics["splits"].values()) == len(failed)
    assert len(metrics["summary"]["failures"]) == len(failed)
    with pytest.raises(SampleFailedError, match="strict"):
        evaluate_setting(FakePipeline(), groups, splits, tmp_path / "strict", DistContext(),
                         SettingOptions("fake", strict=True))


def test_loop_metrics_equal_independent_computation(tmp_path: Path) -> None:
    root = write_miniature(tmp_path / "mini")
    splits = ["refcoco|unc|val"]
    groups = _groups(root, splits)
    pipe = FakePipeline()
    metrics = evaluate_setting(pipe, groups, splits, tmp_path / "run", DistContext(),
                               SettingOptions("fake", queries_per_batch=3))
    ious, inter, union = [], 0, 0
    for group in groups:
        for sample in group.samples:
            gt = sample.gt_mask()
            pred = np.zeros(gt.shape, dtype=bool)
            pred[:, : gt.shape[1] // 2] = True
            i, u = int((pred & (gt == 1)).sum()), int((pred | (gt == 1)).sum())
            ious.append(i / u if u else 1.0)
            inter, union = inter + i, union + u
    split = metrics["splits"]["refcoco|unc|val"]
    assert split["evaluated"] == split["samples"] == len(ious) and split["failed"] == 0
    assert split["gIoU"] == pytest.approx(np.mean(ious))
    assert split["cIoU"] == pytest.approx(inter / union)
    assert metrics["summary"]["Navg"] == pytest.approx(3.0)  # (4 + 2) / 2
    flops = sum(2 * (4 * n * 64 + 2 * n * n * 8 + 3 * n * 8 * 16) for n in (10, 8)) / 1e12
    assert metrics["summary"]["TFLOPs"] == pytest.approx(flops)
    assert max(pipe.calls) <= 3 and sum(pipe.calls) == len(ious)


def test_interrupted_and_resumed_loop_equals_uninterrupted(tmp_path: Path) -> None:
    root = write_miniature(tmp_path / "mini")
    splits = ["refcoco|unc|val", "RIO|common"]
    groups = _groups(root, splits)
    full = evaluate_setting(FakePipeline(), groups, splits, tmp_path / "full", DistContext(), SettingOptions("f"))
    with pytest.raises(KeyboardInterrupt):
        evaluate_setting(FakePipeline(fail_after=5), groups, splits, tmp_path / "cut", DistContext(),
                         SettingOptions("f"))
    written = len((tmp_path / "cut" / "results.rank0.jsonl").read_text().splitlines())
    assert 0 < written < full["summary"]["evaluated"]
    resumed_pipe = FakePipeline()
    resumed = evaluate_setting(resumed_pipe, groups, splits, tmp_path / "cut", DistContext(),
                               SettingOptions("f", resume=True))
    assert sum(resumed_pipe.calls) == full["summary"]["evaluated"] - written  # finished samples are skipped
    assert resumed == full
    assert (tmp_path / "cut" / "results.jsonl").read_text() == (tmp_path / "full" / "results.jsonl").read_text()


def test_wandb_offline_logs_metrics_and_overlays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluation.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = write_miniature(tmp_path / "mini")
    splits = ["ReasonSeg|val"]
    cfg = compose_cfg(SMALL + ["logger=wandb", "logger.num_overlays=2", f"logger.dir={tmp_path / 'wandb_dir'}"])
    logger = WandbLogger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), tmp_path / "run")
    evaluate_setting(FakePipeline(), _groups(root, splits), splits, tmp_path / "run", DistContext(),
                     SettingOptions("fake"), logger=logger)
    logger.finish()
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    tables = list(runs[0].rglob("*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 2  # num_overlays rows
    images = [p for p in runs[0].rglob("*.png") if "mask" not in p.parts]
    masks = [p for p in runs[0].rglob("*.png") if "mask" in p.parts]
    assert len(images) == 2 and len(masks) == 4  # two overlays, each with prediction and ground-truth layers


# ---------------------------------------------------------------- the real model, end to end

@pytest.mark.slow
def test_demo_through_the_function(tmp_path: Path) -> None:
    cfg = compose_cfg(["+exp=demo", "data=rio", f"output_dir={tmp_path}"])
    results = evaluate(cfg)
    spec = MiniatureSpec()
    entries = spec.rio_entries_per_split
    per_subset = (entries + 1) // 2 + (entries // 2) * spec.expressions_per_entry  # string / list entries alternate
    base, method = results["baseline"], results["method"]
    for metrics in (base, method):
        assert [m["evaluated"] for m in metrics["splits"].values()] == [per_subset, per_subset]
        assert metrics["summary"]["failed"] == 0
    # toy model: L = 8, N = 64; schedule (Lc, Nc, Ls, Np) = (2, 20, 2, 4) -> (2*20 + 2*64 + 4*4) / 8 = 23
    assert base["summary"]["Navg"] == pytest.approx(64.0)
    assert method["summary"]["Navg"] == pytest.approx((2 * 20 + 2 * 64 + 4 * 4) / 8)
    assert method["summary"]["TFLOPs"] < base["summary"]["TFLOPs"]
    drop = 100 * np.mean([base["splits"][s]["gIoU"] - method["splits"][s]["gIoU"] for s in method["splits"]])
    assert method["summary"]["mIoU_drop"] == pytest.approx(drop)
    assert json.loads((tmp_path / "metrics.json").read_text()) == method
    assert json.loads((tmp_path / "baseline" / "metrics.json").read_text()) == base


def run_eval(args: list[str], run_dir: Path, launcher: list[str] | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(REPO / "eval_ds.py"), *args, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-6000:]}\n{out.stdout[-2000:]}"
    return out


def comparable(run_dir: Path) -> tuple[dict, list]:
    """metrics.json and results.jsonl without wall-clock latency and run-specific paths."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["summary"].pop("T_LVLM_ms")
    assert metrics.pop("dataset_dir") == str(run_dir / "miniature")
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("llm_ms", None)
        record["image"] = str(Path(record["image"]).relative_to(run_dir))
    return metrics, records


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_eval(SMALL, run_dir)
    return run_dir


@pytest.mark.slow
def test_demo_command_line(tmp_path: Path) -> None:
    out = run_eval(["+exp=demo", "--local_rank=0"], tmp_path / "run")  # as the DeepSpeed launcher appends it
    lines = out.stdout.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("setting")):]  # after the log lines
    assert lines[0].split()[:3] == ["setting", "refcoco", "val"] and "mIoU_drop" in lines[0]
    assert "toyref val" in lines[0]  # after Table 1's columns
    assert lines[1].startswith("LISA (toy_trained)") and lines[2].startswith("demo_toy_csp")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["splits"]) == 13 and metrics["summary"]["failed"] == 0
    assert metrics["summary"]["mIoU_drop"] is not None and metrics["summary"]["T_LVLM_ms"] > 0
    assert (tmp_path / "run" / "baseline" / "results.jsonl").is_file()


@pytest.mark.slow
def test_two_processes_equal_one(reference_run: Path, tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_eval(SMALL, tmp_path / "run", launcher=launcher)
    assert sorted(p.name for p in (tmp_path / "run").glob("results.rank*.jsonl")) == \
        ["results.rank0.jsonl", "results.rank1.jsonl"]
    assert all(p.read_text() for p in (tmp_path / "run").glob("results.rank*.jsonl"))
    assert comparable(tmp_path / "run") == comparable(reference_run)


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_ranks_equal_one(reference_run: Path, tmp_path: Path) -> None:
    """The same under ``deepspeed --num_gpus 2`` on CPU (DS_ACCELERATOR=cpu): it appends --local_rank=N."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    run_eval(SMALL, tmp_path / "run", launcher=launcher, env={"DS_ACCELERATOR": "cpu"})
    assert sorted(p.name for p in (tmp_path / "run").glob("results.rank*.jsonl")) == \
        ["results.rank0.jsonl", "results.rank1.jsonl"]
    assert comparable(tmp_path / "run") == comparable(reference_run)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "eval_ds.py"), *SMALL, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank_file = run_dir / "results.rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if rank_file.is_file() and len(rank_file.read_text().splitlines()) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    from evaluation.records import read_records

    written = len([r for r in read_records(rank_file) if r["status"] == "ok"])
    total = len((reference_run / "results.jsonl").read_text().splitlines())
    assert proc.returncode == -signal.SIGKILL and 0 < written < total, (proc.returncode, written, total)
    assert not (run_dir / "metrics.json").exists()
    out = run_eval(SMALL + ["resume=true"], run_dir)
    # finished samples were not evaluated again
    assert f"{written} of {total} samples already finished" in out.stdout + out.stderr
    assert not rank_file.exists()  # merged into results.jsonl (a single process keeps no copy)
    assert comparable(run_dir) == comparable(reference_run)


def test_repair_keeps_a_complete_last_record_and_cuts_a_torn_one(tmp_path: Path) -> None:
    from evaluation.records import finished_keys, read_records, repair_all

    complete = tmp_path / "results.rank0.jsonl"
    torn = tmp_path / "results.rank1.jsonl"
    a = '{"split": "s", "sample_id": "a", "status": "ok"}'
    b = '{"split": "s", "sample_id": "b", "status": "ok"}'
    complete.write_text(f"{a}\n{b}")  # killed before the newline of a finished record
    torn.write_text(f'{a.replace(chr(97) + chr(34), "c" + chr(34))}\n{b[:20]}')  # killed mid-record
    before = finished_keys(tmp_path)
    repair_all(tmp_path)
    assert finished_keys(tmp_path) == before == {("s", "a"), ("s", "b"), ("s", "c")}
    assert complete.read_text() == f"{a}\n{b}\n"
    assert [r["sample_id"] for r in read_records(torn)] == ["c"] and torn.read_text().endswith("\n")


def test_baseline_missing_a_configured_split_fails_before_evaluating(tmp_path: Path) -> None:
    baseline = tmp_path / "metrics.json"
    baseline.write_text(json.dumps({"splits": {"ReasonSeg|test": {"gIoU": 0.5}}}))
    cfg = compose_cfg(SMALL[:2] + [f"output_dir={tmp_path}", f"baseline={baseline}"])
    with pytest.raises(ValueError, match=r"no gIoU for the configured splits \['ReasonSeg\|val'\]"):
        evaluate(cfg)


def test_method_and_schedule_resolve_to_one_method() -> None:
    """schedule is CSP's parameters; another method takes its own node and refuses a schedule beside it."""
    resolved = method_from_config(compose_cfg(["+exp=llava7b_224_p70"]))
    csp = resolved.method
    assert csp.name == "csp" and resolved.record()["method"] == "csp" and csp.schedule.Nc == 80
    assert resolved.spec == {"name": "csp", "Lc": 7, "Nc": 80, "Ls": 7, "Np": 8, "clustering": "uniform",
                             "clustering_kwargs": {}}
    # method=csp with its parameters in the method node is the same method
    inline = method_from_config({"method": {"name": "csp", "Lc": 7, "Nc": 80, "Ls": 7, "Np": 8,
                                            "clustering": "uniform", "clustering_kwargs": {}}})
    assert inline.key() == resolved.key() and inline.record() == resolved.record()
    resolved = method_from_config(compose_cfg(["+exp=table1_fastv"]))
    fastv = resolved.method
    assert (fastv.name, fastv.layer, fastv.keep) == ("fastv", 2, 64) and resolved.record()["schedule"] is None
    with pytest.raises(ValueError, match="schedule is LVLM_CSP's config"):
        method_from_config(compose_cfg(["+exp=table1_fastv", "schedule=table1"]))
    with pytest.raises(ValueError, match="method=csp needs a schedule"):
        method_from_config(compose_cfg(["method=csp"]))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_from_config(compose_cfg(["+method.name=nope"]))
    assert method_from_config(compose_cfg([])).method is None
