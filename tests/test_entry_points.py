"""A user's mistake in any entry point ends in one line naming what to fix and exit status 2; with
HYDRA_FULL_ERROR=1 the traceback comes back; a bug (any other exception) keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs.cli import user_errors_in_one_line

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LVLM_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    if debug:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["eval_ds.py", "+exp=demo_tiny", "data.splits=[nope|x|y]"], "nope|x|y"),
    (["eval_ds.py", "+exp=toy_baseline", "model.checkpoint=/no/such/dir", "model.vision_tower=/no/such/clip"],
     "/no/such"),
    (["train_ds.py", "mode=full", "+miniature.seed=0", "train_data=miniature", "trainer.lr=abc"],
     "trainer.lr='abc'"),
    (["-m", "scripts.run_table", "table=toy", "models=[/no/such/model]"], "/no/such/model"),
    (["-m", "scripts.search_schedule", "--model", "tiny", "--reduction", "2.5"], "reduction"),
    (["-m", "scripts.chat", "--preset", "llava7b_224_p70", "--image", "assets/toy_towers/clip/config.json",
      "--query", "q"], "8 decoder layers"),
    (["-m", "scripts.collect_runs", "/no/such/sweep"], "/no/such/sweep is not a directory"),
])
def test_user_errors_are_one_line_with_exit_status_2(args: list[str], needle: str) -> None:
    one_line_error(run(args), needle)


@pytest.mark.slow
def test_debug_switch_brings_the_traceback_back() -> None:
    result = run(["train_ds.py", "mode=full", "+miniature.seed=0", "train_data=miniature", "trainer.lr=abc"], debug=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "trainer.lr='abc'" in result.stderr


def test_the_wrapper_passes_bugs_through_and_names_key_errors(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("LVLM_DEBUG", raising=False)

    @user_errors_in_one_line
    def bug() -> None:
        raise ZeroDivisionError("a bug")

    @user_errors_in_one_line
    def mistake() -> None:
        raise KeyError("model.checkpoint: no such key")

    with pytest.raises(ZeroDivisionError):
        bug()
    with pytest.raises(SystemExit) as exit_info:
        mistake()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: model.checkpoint: no such key")
