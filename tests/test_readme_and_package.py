"""What the README and docs/ tell a user works as written: every `python eval_ds.py ...` command composes
and passes the up-front checks (on stand-in model config files and miniature data), a multirun
writes its sweep table, and the project installs as a package usable outside the repository."""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import CLIPVisionConfig, LlamaConfig

from datasets import write_miniature
from evaluation.evaluate import check_samples, load_all_groups, validate_config
from evaluation.report import summarize
from tests.evaluation.test_eval import ENV, MODEL_SHAPES, REPO, compose_cfg

README = REPO / "README.md"
DOCS = REPO / "docs"
COMMAND = re.compile(r"python eval_ds\.py([^`\n#]*)")
PATCH = 14  # CLIP ViT-L/14


def readme_commands() -> list[list[str]]:
    """The argument lists of every `python eval_ds.py ...` in the README and in docs/*.md (code blocks
    and inline)."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in [README, *sorted(DOCS.glob("*.md"))])
    # <placeholders> (which may hold spaces) become one word
    return [shlex.split(re.sub(r"<[^>]+>", "PLACEHOLDER", m.group(1))) for m in COMMAND.finditer(text)]


def expand(args: list[str], weights: Path, data: Path, baseline: Path) -> list[list[str]]:
    """Hydra overrides of one command: placeholders and the README's example paths replaced by
    local ones, launcher-only arguments dropped, a multirun's comma values expanded."""
    multirun = "-m" in args or "--multirun" in args
    out: list[list[str]] = []
    for arg in args:
        if arg in ("-m", "--multirun") or arg.startswith("hydra."):
            continue
        key, _, value = arg.partition("=")
        if key == "baseline" and "PLACEHOLDER" in value:
            value = str(baseline)
        value = value.replace("PLACEHOLDER", f"{weights}/placeholder")  # e.g. model.checkpoint=<run>/final/lisa
        value = value.replace("/data/weights", str(weights)).replace("/x/", f"{weights}/")
        value = re.sub(r"^/data/lisa_data(set)?$", str(data), value)
        values = sweep_values(f"{key}={value}") if multirun and _ else [value]
        out.append([f"{key}={v}" if _ else key for v in values])
    return [list(combo) for combo in itertools.product(*out)]


def sweep_values(override: str) -> list[str]:
    """The values a multirun sweeps for ``key=value``, as Hydra's own override parser reads them
    (``1,2,3``, ``'{Lc:1,...},{Lc:2,...}'``); a plain value is one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not parsed.is_sweep_override():
        return [override.partition("=")[2]]
    return list(parsed.sweep_string_iterator())


def stub_model_files(cfg, weights: Path) -> None:
    """config.json of the configured LISA checkpoint and CLIP directory (L and N of the real ones)."""
    if cfg.model.kind != "lisa" or (REPO / str(cfg.model.checkpoint)).is_dir():  # committed (assets/toy_lisa)
        return
    layers, tokens = MODEL_SHAPES.get(cfg.model.name, MODEL_SHAPES["tiny"])  # e.g. model=trained: any shape
    ckpt, clip = Path(cfg.model.checkpoint), Path(cfg.model.vision_tower)
    assert weights in ckpt.parents and weights in clip.parents, "README paths must be under LISA_WEIGHTS or /x/"
    if not (ckpt / "config.json").is_file():
        ckpt.mkdir(parents=True, exist_ok=True)
        LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    vocab_size=100).to_json_file(ckpt / "config.json")
    if not (clip / "config.json").is_file():
        CLIPVisionConfig(image_size=int(tokens ** 0.5) * PATCH, patch_size=PATCH).save_pretrained(clip)


@pytest.mark.slow
def test_readme_eval_commands_compose_and_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_commands()
    assert len(commands) >= 8, commands  # the Evaluation and weights sections
    assert any("schedule.clustering_kwargs.weights=/data/weights/yolo11n-seg.pt" in c for c in commands)
    weights, data = tmp_path / "weights", write_miniature(tmp_path / "data")
    weights.mkdir()
    (weights / "yolo11n-seg.pt").write_bytes(b"stand-in: seg_first is only validated, never run here")
    monkeypatch.setenv("LISA_WEIGHTS", str(weights))
    monkeypatch.setenv("LISA_DATASET_DIR", str(data))
    # the baseline file the README's commands pass: a baseline run of the same model on the same samples
    base_cfg = compose_cfg(["+exp=llava7b_224_baseline"])
    stub_model_files(base_cfg, weights)
    plan = validate_config(base_cfg)
    groups = load_all_groups(plan.splits, data, None)
    records = [{"split": s.split, "sample_id": s.sample_id, "status": "ok", "intersection": 1, "union": 2,
                "navg": 256.0, "tflops": 3.0, "llm_ms": 1.0} for g in groups for s in g.samples]
    baseline = tmp_path / "metrics.json"
    import json

    baseline.write_text(json.dumps(summarize(records, plan.splits, name="b", extra={"setting": plan.setting})))
    checked = 0
    for args in commands:
        for overrides in expand(args, weights, data, baseline):
            cfg = compose_cfg(overrides)
            stub_model_files(cfg, weights)
            if cfg.model.get("mask_decoder"):  # a fine-tuned decoder from a training run: only its existence is checked
                Path(cfg.model.mask_decoder).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg.model.mask_decoder).touch()
            plan = validate_config(cfg)
            if cfg.get("miniature") is None and cfg.get("toy") is None:  # generated data is written by the run
                check_samples(load_all_groups(plan.splits, Path(cfg.dataset_dir), cfg.max_samples_per_split), plan,
                              strict=True)
            checked += 1
    assert checked >= len(commands) + 8  # the sweep expands to 9 jobs


@pytest.mark.slow
def test_multirun_writes_one_table_for_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "eval_ds.py"), "-m", "+exp=demo_tiny", "data=reasonseg", "baseline=null",
           "max_samples_per_split=1", f"miniature.dir={tmp_path / 'mini'}", "schedule.Np=8,16", "progress=false",
           f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = (sweep / "sweep_table.txt").read_text().splitlines()
    assert lines[0].startswith("setting") and len(lines) == 3
    assert lines[1].startswith("demo_tiny_csp (Lc=2, Nc=64, Ls=1, Np=8, uniform)")
    assert lines[2].startswith("demo_tiny_csp (Lc=2, Nc=64, Ls=1, Np=16, uniform)")


@pytest.mark.slow
def test_package_installs_and_imports_outside_the_repository(tmp_path: Path) -> None:
    """A wheel built from pyproject.toml holds every package; imported from elsewhere, it works."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", "eval_ds.py", "train_ds.py"):
        shutil.copy(REPO / name, src / name)
    for package in ("model", "csp", "datasets", "runs", "evaluation", "training", "visualize", "scripts"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("lvlm_csp-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    for path in ("model/pipeline.py", "csp/strategies/seg_first.py", "csp/methods/fastv.py", "datasets/reason_seg.py",
                 "evaluation/evaluate.py", "training/train.py", "visualize/token_maps.py", "scripts/benchmark.py",
                 "eval_ds.py", "train_ds.py"):
        assert path in names, sorted(names)
    code = ("import model.pipeline, model.checkpoint, csp.methods, datasets.splits, runs.models, evaluation.evaluate, "
            "training.train, visualize.token_maps, eval_ds, train_ds; "
            "print(model.pipeline.__file__)")
    env = {**ENV, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith(str(site))


def test_readme_is_short_and_every_link_resolves_inside_the_repository() -> None:
    """The README stays a README (<= 350 lines); every relative link of it and of docs/ names a file of
    this repository, and nothing cites a document that is not in it."""
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 350
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
        for target in targets:
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which is not in the repository"
    roots = ["csp", "datasets", "model", "runs", "evaluation", "training", "visualize", "scripts", "tests", "configs",
             "docs", "sweeps"]
    files = [p for root in roots for p in (REPO / root).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".sh"}]
    files += [p for p in REPO.iterdir() if p.suffix in {".py", ".md", ".toml", ".txt"}]
    brief = "DESIGN" + ".md"  # the outside design brief's file name, spelt so that this file does not cite it
    cited = [p for p in files if brief in p.read_text(encoding="utf-8", errors="ignore")]
    assert not cited, f"these files cite {brief}, which is not part of the repository: {cited}"
