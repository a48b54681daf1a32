"""DeepSpeed ZeRO-2 on CPU (DS_ACCELERATOR=cpu, gloo), 2 ranks under the ``deepspeed`` launcher.

One launch (tests/training/ds_driver.py) trains ``lisa`` (LoRA), ``decoder`` and a ``lisa`` run stopped
after step 2 and resumed; each is compared with the plain single-process loop on the same global batch
(2 images per step: 1 per rank under ZeRO-2, 2 accumulated micro-batches of 1 in one process) under the
schedule DeepSpeed's WarmupDecayLR actually runs (:func:`training.optim.deepspeed_warmup_decay`).
The first DeepSpeed start on a machine JIT-builds its shared-memory communication op (about 2 minutes,
cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from datasets import MiniatureSpec, write_miniature
from training import optim
from training.optim import deepspeed_warmup_decay, warmup_decay

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from ds_driver import DECODER, LISA, overrides  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
#: float tolerance of ZeRO-2 (2 ranks, gloo all-reduce) against one process: fp32 sums in another order
TOL = {"rtol": 1e-4, "atol": 1e-5}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_launcher(n: int = 2) -> list[str]:
    """``deepspeed --num_gpus n --master_port <free>`` with this interpreter (CPU ranks under DS_ACCELERATOR=cpu)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(free_port())]


def run_group(cmd: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group; on a timeout the launcher and every rank it started are killed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s\n{err[-6000:]}\n{out[-3000:]}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-6000:]}\n{out[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_deepspeed_schedule_is_what_warmupdecaylr_runs() -> None:
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    for warmup, total in ((2, 4), (1, 6), (5, 12)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = WarmupDecayLR(opt, total_num_steps=total, warmup_min_lr=0, warmup_max_lr=1.0,
                              warmup_num_steps=warmup, warmup_type="linear")
        seen = []
        for _ in range(total):  # the engine: optimizer step at the lr in place, then the scheduler
            seen.append(opt.param_groups[0]["lr"])
            sched.step()
        assert seen == pytest.approx([deepspeed_warmup_decay(s, warmup, total) for s in range(total)])
    # the plain loop's curve after two steps at lr 0: its warmup two steps later, its decay one step later
    assert [deepspeed_warmup_decay(s, 4, 10) for s in range(10)] == pytest.approx(
        [0.0, 0.0, *(warmup_decay(s, 4, 10) for s in range(3)), *(warmup_decay(s, 4, 10) for s in range(4, 9))])


@pytest.fixture(scope="module")
def ds_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training images with one sentence each (rank 0 and rank 1 see different images)."""
    spec = MiniatureSpec(images_per_split=1, refs_per_image=1, sentences_per_ref=1, train_images=2)
    return write_miniature(tmp_path_factory.mktemp("ds_data"), spec)


@pytest.fixture(scope="module")
def ds_runs(ds_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds_runs")
    cmd = [*deepspeed_launcher(2), str(REPO / "tests" / "training" / "ds_driver.py"), str(ds_data), str(out)]
    proc = run_group(cmd)
    for name in ("lisa", "decoder", "split_a", "split_b"):
        assert f"ds_driver {name}: step" in proc.stdout, proc.stdout[-3000:]
    return out


def plain(data: Path, out: Path, mode: list[str], monkeypatch: pytest.MonkeyPatch, *extra: str) -> dict:
    """The plain loop on the same global batch (2 accumulated micro-batches) under DeepSpeed's schedule."""
    from training.train import train

    monkeypatch.setattr(optim, "warmup_decay", deepspeed_warmup_decay)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides(data, out, mode, "trainer.grad_accumulation=2", *extra))
    return train(cfg)


def final_trainable(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "step_0000004" / "trainable.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)
    moved = [k for k in initial if initial[k].numel() and not torch.equal(a[k], initial[k])]
    lora_b = [k for k in initial if "lora_B" in k and a[k].abs().sum() > 0]
    assert moved or lora_b  # it trained


def initial_of(names: set[str], mode: str = "") -> dict[str, torch.Tensor]:
    """The tiny model's step-0 tensors of ``names`` (LoRA's B matrices start at zero; A is left out)."""
    from model.builder import build_tiny_lisa

    named = dict(build_tiny_lisa(seed=0, num_layers=3).model.named_parameters())
    return {n: named[n].detach().clone() if n in named else torch.zeros(0) for n in names if "lora_A" not in n}


@pytest.mark.slow
def test_zero2_lisa_equals_plain_loop_and_export_loads_in_eval(ds_runs: Path, ds_data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ref = plain(ds_data, tmp_path / "plain", LISA, monkeypatch, "trainer.save_released=true")
    zero = final_trainable(ds_runs / "lisa")
    assert any("lora_A" in k for k in zero)
    assert_close(zero, final_trainable(tmp_path / "plain"), initial_of(set(zero), "lisa"))
    import json

    ds_lrs = [json.loads(line)["lr"] for line in (ds_runs / "lisa" / "train_log.jsonl").read_text().splitlines()]
    assert ds_lrs == pytest.approx([h["lr"] for h in ref["history"]]) == [0.0, 0.0, 0.005, 0.01]
    # the released layout written after ZeRO-2 loads as eval_ds.py loads it (model=trained) and evaluates
    from evaluation.evaluate import evaluate
    from model.checkpoint import load_lisa_checkpoint

    released = ds_runs / "lisa" / "final" / "lisa"
    a = load_lisa_checkpoint(released, released / "vision_tower").model.checkpoint_state_dict()
    out = ref["outputs"]
    b = load_lisa_checkpoint(out["checkpoint"], out["vision_tower"]).model.checkpoint_state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "model=trained", f"model.checkpoint={released}", f"dataset_dir={ds_data}", "data=refcoco",
            "data.splits=refcoco|unc|val", f"output_dir={tmp_path / 'eval'}", "progress=false"])
    metrics = evaluate(cfg)["method"]
    assert metrics["summary"]["failed"] == 0 and metrics["splits"]["refcoco|unc|val"]["evaluated"] == 1


@pytest.mark.slow
def test_zero2_decoder_equals_plain_loop(ds_runs: Path, ds_data: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    plain(ds_data, tmp_path / "plain", DECODER, monkeypatch)
    zero = final_trainable(ds_runs / "decoder")
    assert zero and all(k.startswith("model.visual_model.mask_decoder.") for k in zero)
    assert_close(zero, final_trainable(tmp_path / "plain"), initial_of(set(zero), "decoder"))
    assert (ds_runs / "decoder" / "decoder_cache").is_dir()


@pytest.mark.slow
def test_zero2_resume_reads_each_ranks_partition_and_equals_uninterrupted(ds_runs: Path) -> None:
    step2 = ds_runs / "split" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in step2.glob("optimizer.rank*.safetensors")) == \
        ["optimizer.rank0.safetensors", "optimizer.rank1.safetensors"]
    a, b = (load_file(str(step2 / f"optimizer.rank{r}.safetensors")) for r in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in set(a) & set(b) if a[k].shape == b[k].shape)  # own partitions
    whole, split = final_trainable(ds_runs / "lisa"), final_trainable(ds_runs / "split")
    assert set(whole) == set(split)
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=0, atol=0, msg=key)
    import json

    def log(run: str) -> list[dict]:
        records = [json.loads(line) for line in (ds_runs / run / "train_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    assert log("split") == log("lisa") and len(log("split")) == 4
