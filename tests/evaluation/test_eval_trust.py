"""Evaluation you can trust: bad input ends in a clear error or a recorded failure, resumes and
baselines cannot mix settings, and what a user reads is labelled (issue 7, section 4 and bad input)."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from datasets import UnknownSplitError, load_groups, write_miniature
from datasets.splits import parse_splits
from evaluation.evaluate import (
    MANIFEST,
    EmptySplitError,
    RunDirectoryError,
    SettingOptions,
    evaluate,
    evaluate_setting,
    validate_config,
)
from evaluation.progress import Progress
from evaluation.report import MAX_LISTED_FAILURES, collect_runs, summarize, table
from runs.distributed import DistContext
from tests.evaluation.test_eval import SMALL, FakePipeline, compose_cfg

ONE = ["max_samples_per_split=1"]  # two ReasonSeg samples: the real tiny model stays fast


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_miniature(tmp_path_factory.mktemp("mini") / "data")


def _copy(mini: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(mini, root)
    return root


def _record(split: str, sample_id: str, status: str = "ok") -> dict:
    ok = status == "ok"
    return {"split": split, "sample_id": sample_id, "status": status, "reason": None if ok else "broken",
            "intersection": 1 if ok else None, "union": 2 if ok else None, "navg": 3.0, "tflops": 1e-5,
            "llm_ms": 2.0, "batch_size": 1}


# ---------------------------------------------------------------- configuration, before anything runs

def test_single_split_string_and_comma_list_are_accepted() -> None:
    assert parse_splits("refcoco|unc|val") == ["refcoco|unc|val"]
    assert parse_splits("refcoco|unc|val, ReasonSeg|val") == ["refcoco|unc|val", "ReasonSeg|val"]
    assert validate_config(compose_cfg(["data.splits=refcoco|unc|val"])).splits == ["refcoco|unc|val"]
    with pytest.raises(UnknownSplitError, match=r"data.splits must be split names, got 3 .*one split"):
        parse_splits(3, "data.splits")
    with pytest.raises(UnknownSplitError, match="unknown split 'refcoco|unc|vall'"):
        validate_config(compose_cfg(["data.splits=refcoco|unc|vall"]))


@pytest.mark.parametrize(("overrides", "error", "match"), [
    (["schedule.clustering=kmeans"], ValueError, "unknown clustering strategy 'kmeans'"),
    (["schedule.clustering=seg_first"], ValueError, "seg_first needs a YOLO11-seg weights file"),
    (["schedule.clustering=seg_first", "+schedule.clustering_kwargs.weights=/nowhere/yolo.pt"], FileNotFoundError,
     "YOLO segmentation weights not found: /nowhere/yolo.pt"),
    (["schedule.clustering=cls_attention", "+schedule.clustering_kwargs.depth=3"], ValueError,
     "bad arguments {'depth': 3} for clustering strategy 'cls_attention'"),
])
def test_bad_strategy_fails_before_any_data_or_model(tmp_path: Path, overrides, error, match) -> None:
    cfg = compose_cfg(["+exp=demo_tiny", f"dataset_dir={tmp_path / 'nowhere'}", "miniature=null",
                       f"output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(error, match=match):
        evaluate(cfg)  # baseline=same_run: before the fix plain LISA was evaluated first
    assert not (tmp_path / "run").exists()


def test_seg_first_weights_as_documented(tmp_path: Path) -> None:
    missing = tmp_path / "yolo11n-seg.pt"
    cfg = compose_cfg(["+exp=t4_nc16_seg_first", f"schedule.clustering_kwargs.weights={missing}"])
    with pytest.raises(FileNotFoundError, match="schedule.clustering='seg_first'.*yolo11n-seg.pt"):
        validate_config(cfg, check_model_files=False)
    missing.write_bytes(b"weights")
    validate_config(cfg, check_model_files=False)
    with pytest.raises(ValueError, match="seg_first needs a YOLO11-seg weights file"):
        validate_config(compose_cfg(["+exp=t4_nc16_seg_first"]), check_model_files=False)


# ---------------------------------------------------------------- run directory: overwrite, resume, manifest

@pytest.mark.slow
def test_existing_run_dir_is_not_overwritten_silently(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "baseline").mkdir(parents=True)
    (run / "baseline" / "results.jsonl").write_text('{"split": "s", "sample_id": "a", "status": "ok"}\n')
    cfg = compose_cfg(SMALL + [f"output_dir={run}", "miniature=null", f"dataset_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(RunDirectoryError, match=r"already holds results.*resume=true.*overwrite=true"):
        evaluate(cfg)
    assert (run / "baseline" / "results.jsonl").is_file()
    with pytest.raises(RunDirectoryError, match="already holds results"):
        evaluate_setting(FakePipeline(), [], [], run / "baseline", DistContext(), SettingOptions("f"))


@pytest.mark.slow
def test_resume_refuses_another_setting_and_an_empty_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = SMALL + [f"output_dir={run}", "miniature=null", f"dataset_dir={tmp_path / 'nowhere'}"]
    with pytest.raises(RunDirectoryError, match=r"holds no run \(no run_manifest.json\)"):
        evaluate(compose_cfg(base + ["resume=true"]))
    setting = validate_config(compose_cfg(base)).setting
    run.mkdir()
    (run / MANIFEST).write_text(json.dumps({**setting, "max_samples_per_split": 5,
                                            "schedule": {**setting["schedule"], "Np": 8}}))
    with pytest.raises(RunDirectoryError, match=r"different setting.*max_samples_per_split: 5 vs None; "
                                                r"schedule.Np: 8 vs 16"):
        evaluate(compose_cfg(base + ["resume=true"]))


@pytest.mark.slow
def test_resume_after_interruption_in_the_baseline_counts_its_samples(tmp_path: Path, mini: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C during the same_run baseline, then resume: before the fix the method's (empty) directory
    made it print "holds no finished samples" although the baseline's were there and were kept."""
    run = tmp_path / "run"
    args = ["+exp=demo_tiny", "data=reasonseg", "miniature=null", f"dataset_dir={mini}", f"output_dir={run}", *ONE]
    evaluate(compose_cfg(args))
    for path in [*run.glob("results*.jsonl"), run / "metrics.json"]:  # as if stopped before the method ran
        path.unlink()
    with caplog.at_level(logging.INFO, logger="evaluation.evaluate"):
        evaluate(compose_cfg(args + ["resume=true"]))
    text = caplog.text
    assert "holds no finished samples" not in text
    assert "LISA (tiny): 2 of 2 samples already finished" in text
    assert "0 of 2 samples already finished" in text


# ---------------------------------------------------------------- bad data

def test_reason_seg_image_missing_or_not_jpg_is_a_failed_record(tmp_path: Path, mini: Path) -> None:
    root = _copy(mini, tmp_path)
    split_dir = root / "reason_seg/ReasonSeg/val"
    jpgs = sorted(split_dir.glob("*.jpg"))
    jpgs[0].unlink()
    Image.open(jpgs[1]).save(jpgs[1].with_suffix(".png"))
    jpgs[1].unlink()
    groups = load_groups("ReasonSeg|val", root)
    metrics = evaluate_setting(FakePipeline(), groups, ["ReasonSeg|val"], tmp_path / "run", DistContext(),
                               SettingOptions("f"))
    split = metrics["splits"]["ReasonSeg|val"]
    assert split["samples"] == len(jpgs) and split["failed"] == 2 and split["evaluated"] == len(jpgs) - 2
    reasons = sorted(r["reason"] for r in map(json.loads, (tmp_path / "run/results.jsonl").read_text().splitlines())
                     if r["status"] == "failed")
    assert f"has no image {jpgs[0]}" in reasons[0] or f"has no image {jpgs[0]}" in reasons[1]
    assert any(f"image is {jpgs[1].stem}.png, but ReasonSeg images must be .jpg" in r for r in reasons)


@pytest.mark.parametrize("data", ["reasonseg", "rio", "refcoco"])
@pytest.mark.slow
def test_empty_split_warns_loudly_and_fails_with_strict(tmp_path: Path, mini: Path, data: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = _copy(mini, tmp_path)
    if data == "reasonseg":
        split, cfg_split = "ReasonSeg|val", "ReasonSeg|val"
        for path in (root / "reason_seg/ReasonSeg/val").iterdir():
            path.unlink()
    elif data == "rio":
        split, cfg_split = "RIO|common", "RIO|common"
        (root / "rio/RIO_common_all_thing.json").write_text("[]")
    else:
        import pickle

        split, cfg_split = "refcoco|unc|testB", "refcoco|unc|testB"
        refs_path = root / "refer_seg/refcoco/refs(unc).p"
        refs = pickle.loads(refs_path.read_bytes())
        refs_path.write_bytes(pickle.dumps([r for r in refs if r["split"] != "testB"]))
    args = [f"dataset_dir={root}", f"data.splits=[{cfg_split},ReasonSeg|test]", *ONE]  # plain LISA
    with pytest.raises(EmptySplitError, match=rf"strict=true: split\(s\) \['{split}'\] have NO samples"):
        evaluate(compose_cfg(args + [f"output_dir={tmp_path / 'strict'}", "strict=true"]))
    assert not (tmp_path / "strict" / MANIFEST).exists()  # before anything was loaded or written
    if data != "reasonseg":
        return  # the warning path is the same for every data set: run the model once
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(compose_cfg(args + [f"output_dir={tmp_path / 'run'}"]))["method"]
    assert f"['{split}'] have NO samples" in caplog.text
    assert metrics["summary"]["empty_splits"] == [split]
    text = (tmp_path / "run" / "table.txt").read_text()
    assert f"WARNING LISA (tiny): split {split} has NO samples" in text


# ---------------------------------------------------------------- baselines

@pytest.mark.slow
def test_baseline_not_json_other_setting_other_samples_and_recorded(tmp_path: Path, mini: Path) -> None:
    args = ["+exp=demo_tiny", "data=reasonseg", "miniature=null", f"dataset_dir={mini}", *ONE]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=rf"baseline='{broken}' is not JSON"):
        validate_config(compose_cfg(args + [f"baseline={broken}"]))
    plain = ["data=reasonseg", f"dataset_dir={mini}", *ONE, f"output_dir={tmp_path / 'base'}"]
    base = evaluate(compose_cfg(plain))
    base_file = tmp_path / "base" / "metrics.json"
    assert base["method"]["setting"]["dataset_dir"] == str(mini)
    with pytest.raises(ValueError, match=r"different setting \(baseline vs this run\): model.seed: 0 vs 1"):
        validate_config(compose_cfg(args + [f"baseline={base_file}", "model.seed=1"]))
    with pytest.raises(ValueError, match=r"max_samples_per_split: 1 vs 2"):
        validate_config(compose_cfg(args + [f"baseline={base_file}", "max_samples_per_split=2"]))
    # same setting, but the baseline's samples differ from this run's (a sample renamed in its results)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "base", other)
    data = json.loads((other / "metrics.json").read_text())
    data["sample_ids"]["ReasonSeg|val"]["sha256"] = "0" * 64
    (other / "metrics.json").write_text(json.dumps(data))
    lines = (other / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    old_id, first["sample_id"] = first["sample_id"], "renamed"
    (other / "results.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"does not cover the same samples.*ReasonSeg\|val: 1 samples of this run "
                                         rf"are missing from the baseline \(e.g. \['{old_id}'\]\), 1 baseline "
                                         r"samples are not in this run \(e.g. \['renamed'\]\)"):
        evaluate(compose_cfg(args + [f"baseline={other / 'metrics.json'}", f"output_dir={tmp_path / 'x'}"]))
    method = evaluate(compose_cfg(args + [f"baseline={base_file}", f"output_dir={tmp_path / 'csp'}"]))["method"]
    assert method["baseline"]["path"] == str(base_file)
    assert method["baseline"]["setting"] == base["method"]["setting"]
    assert method["summary"]["mIoU_drop_failed"] == {"this_run": 0, "baseline": 0}


# ---------------------------------------------------------------- what a user reads

def test_metrics_units_counts_and_long_failure_lists(tmp_path: Path) -> None:
    n_failed = MAX_LISTED_FAILURES + 3
    records = [_record("ReasonSeg|val", f"f{i:02d}", "failed") for i in range(n_failed)]
    records += [_record("ReasonSeg|val", "ok1")]
    metrics = summarize(records, ["ReasonSeg|val", "ReasonSeg|test"], name="x", baseline_giou={"ReasonSeg|val": 0.6})
    summary = metrics["summary"]
    assert (summary["evaluated"], summary["failed"], summary["samples"]) == (1, n_failed, n_failed + 1)
    assert metrics["splits"]["ReasonSeg|val"]["evaluated"] == 1 and "count" not in metrics["splits"]["ReasonSeg|val"]
    assert summary["failures"][-1] == "... and 3 more, see results.jsonl"
    assert len(summary["failures"]) == MAX_LISTED_FAILURES + 1
    assert summary["mIoU_drop"] == pytest.approx(10.0)  # 100 * (0.6 - 1/2)
    assert "points" in metrics["units"]["mIoU_drop"] and "fraction" in metrics["units"]["gIoU"]
    assert summary["empty_splits"] == ["ReasonSeg|test"]
    text = table([metrics])
    assert "10.0*" in text and f"{n_failed} of {n_failed + 1} samples failed" in text and "3 not listed" in text


def test_table_has_no_negative_zero_and_one_tflops_format() -> None:
    def row(name: str, drop: float, tflops: float) -> dict:
        return {"name": name, "splits": {"ReasonSeg|val": {"gIoU": 0.5}},
                "summary": {"mIoU_drop": drop, "Navg": 10.0, "TFLOPs": tflops, "T_LVLM_ms": 1.0, "failed": 0,
                            "samples": 1}}

    lines = table([row("a", -0.04, 1.59), row("b", 0.0, 0.0123)]).splitlines()
    assert "-0.0" not in " ".join(lines)
    assert lines[1].split()[-3:-1] == ["10.0", "1.59e+00"] and lines[2].split()[-3:-1] == ["10.0", "1.23e-02"]
    big = table([row("a", 1.0, 1.59), row("b", 2.0, 0.75)]).splitlines()
    assert big[1].split()[-2] == "1.59" and big[2].split()[-2] == "0.75"


def test_single_process_run_keeps_no_duplicate_rank_file(tmp_path: Path, mini: Path) -> None:
    groups = load_groups("ReasonSeg|val", mini)
    evaluate_setting(FakePipeline(), groups, ["ReasonSeg|val"], tmp_path, DistContext(), SettingOptions("f"))
    assert sorted(p.name for p in tmp_path.glob("results*.jsonl")) == ["results.jsonl"]
    again = evaluate_setting(FakePipeline(), groups, ["ReasonSeg|val"], tmp_path, DistContext(),
                             SettingOptions("f", resume=True))
    assert again["summary"]["evaluated"] == sum(len(g.samples) for g in groups)


def test_detector_cost_reaches_metrics_and_table(tmp_path: Path, mini: Path) -> None:
    pipe = FakePipeline()
    pipe.extra_cost = lambda: {"segmenter_calls": 4.0, "segmenter_ms": 12.5, "segmenter_gflops": 10.4}
    groups = load_groups("ReasonSeg|val", mini)
    metrics = evaluate_setting(pipe, groups, ["ReasonSeg|val"], tmp_path, DistContext(), SettingOptions("f"))
    assert (metrics["summary"]["detector_ms"], metrics["summary"]["detector_GFLOPs"]) == (12.5, 10.4)
    header, line = table([metrics]).splitlines()[:2]
    assert header.endswith("detector ms  detector GFLOPs") and line.split()[-2:] == ["12.5", "10.4"]


@pytest.mark.slow
def test_seg_first_cost_reaches_metrics_end_to_end(tmp_path: Path, mini: Path) -> None:
    """The real pipeline with seg_first (an injected segmenter): its cost is in metrics.json."""
    import numpy as np

    from csp.schedule import StageSchedule
    from csp.strategies.seg_first import InstanceSegmenter, SegFirstStrategy
    from model.builder import build_tiny_lisa
    from model.pipeline import SegmentationPipeline

    class Boxes(InstanceSegmenter):
        def __call__(self, image: Image.Image):
            masks = np.zeros((1, image.height, image.width), dtype=bool)
            masks[0, : image.height // 2] = True
            return masks, np.array([0.9])

        @property
        def gflops(self) -> float:
            return 10.4

    pipe = SegmentationPipeline(build_tiny_lisa(seed=0), StageSchedule(Lc=2, Nc=32, Ls=1, Np=16))
    pipe.method._strategy = SegFirstStrategy(segmenter=Boxes())  # an injected segmenter (no YOLO weights)
    groups = load_groups("ReasonSeg|val", mini)[:2]
    metrics = evaluate_setting(pipe, groups, ["ReasonSeg|val"], tmp_path, DistContext(), SettingOptions("s"))
    assert metrics["summary"]["detector_images"] == 2 and metrics["summary"]["detector_GFLOPs"] == 10.4
    assert metrics["summary"]["detector_ms"] > 0


def test_row_names_carry_the_schedule_and_sweeps_get_one_table(tmp_path: Path) -> None:
    from evaluation.evaluate import setting_name

    names = []
    for lc in (1, 2):
        cfg = compose_cfg(["+exp=demo_tiny", f"schedule.Lc={lc}"])
        names.append(setting_name(cfg, validate_config(cfg).method))
    assert names == ["demo_tiny_csp (Lc=1, Nc=64, Ls=1, Np=16, uniform)",
                     "demo_tiny_csp (Lc=2, Nc=64, Ls=1, Np=16, uniform)"]
    for job, name in enumerate(names):
        metrics = summarize([_record("ReasonSeg|val", "a")], ["ReasonSeg|val"], name=name)
        (tmp_path / str(job) / "baseline").mkdir(parents=True)
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(metrics))
        base = summarize([_record("ReasonSeg|val", "a")], ["ReasonSeg|val"], name="LISA (tiny)")
        (tmp_path / str(job) / "baseline" / "metrics.json").write_text(json.dumps(base))
    rows = collect_runs(tmp_path)
    assert [r["name"] for r in rows] == ["LISA (tiny)", names[0], names[1]]  # the shared baseline once
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "scripts.collect_runs", str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert names[0] in out and names[1] in out and (tmp_path / "sweep_table.txt").read_text().strip() == out.strip()


def test_progress_logs_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    stream = io.StringIO()  # not a TTY, like a log file
    with caplog.at_level(logging.INFO, logger="evaluation.progress"):
        progress = Progress(10, "run", stream=stream, interval_s=6.0, clock=lambda: now[0])
        for i in range(10):
            now[0] += 1.0
            progress.update(failed=i == 3)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["run: 6/10 samples (60%), 1.00 samples/s, ETA 00:00:04, 1 failed",
                     "run: 10/10 samples (100%), 1.00 samples/s, ETA 00:00:00, 1 failed (done)"]
    assert stream.getvalue() == ""  # no carriage-return bar in a file
    caplog.clear()
    off = Progress(10, "run", enabled=False, stream=stream)
    off.update(False)
    off.close()
    assert not caplog.records


def test_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = Progress(3, "run", stream=stream)
    for _ in range(3):
        progress.update(failed=True)
    progress.close()
    assert "3/3" in stream.getvalue() and "failed=3" in stream.getvalue()


def test_collect_runs_names_every_file_it_skips(tmp_path: Path) -> None:
    """A damaged or foreign metrics.json is named with the reason; with nothing readable the message says
    how many were skipped instead of claiming there is no metrics.json."""
    import subprocess
    import sys

    good = summarize([_record("ReasonSeg|val", "a")], ["ReasonSeg|val"], name="LISA (tiny)")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(good))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text('{"splits": {')  # torn
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text('{"other": 1}')
    skipped: list = []
    rows = collect_runs(tmp_path, skipped)
    assert [r["name"] for r in rows] == ["LISA (tiny)"]
    assert [(p.parent.name, why.split(" (")[0]) for p, why in skipped] == [
        ("b", "not readable JSON"), ("c", "not a metrics mapping")]
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "scripts.collect_runs", str(tmp_path)], capture_output=True, text=True,
                         cwd=repo, check=True)
    assert f"skipped {tmp_path / 'b' / 'metrics.json'}: not readable JSON" in out.stderr
    (tmp_path / "a" / "metrics.json").unlink()
    failed = subprocess.run([sys.executable, "-m", "scripts.collect_runs", str(tmp_path)], capture_output=True,
                            text=True, cwd=repo)
    assert failed.returncode == 2 and "no readable metrics.json" in failed.stderr and "2 skipped" in failed.stderr
