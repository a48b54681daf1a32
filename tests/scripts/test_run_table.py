"""scripts/run_table.py: the Table 1 grid end to end on the embedded default (tiny LISA, miniature data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets.miniature import MiniatureSpec, write_miniature
from scripts.run_table import TABLES, run

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m "not slow" skips them


def test_table1_grid_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    data = write_miniature(tmp_path / "mini", MiniatureSpec(images_per_split=1, refs_per_image=1, sentences_per_ref=1))
    out = tmp_path / "table1"
    # the presets are for LLaVA-7B's 32 layers: the tiny model gets 32 layers too
    args = ["table=1", f"output_dir={out}", "model=tiny", "model.num_layers=32", f"dataset_dir={data}",
            "max_samples_per_split=1", "data.splits=[refcoco|unc|val]"]
    text = run(args)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["setting", "refcoco", "val"] and lines[0].split()[-5:] == [
        "mIoU_drop", "Navg", "TFLOPs", "T_LVLM", "ms"]
    labels = ["LISA"] + [label for label, _ in TABLES[1]["rows"]]
    assert [line.split()[0] for line in lines[1:]] == [label.split()[0] for label in labels]
    navg = {}
    for preset in ["baseline"] + [p for _, p in TABLES[1]["rows"]]:
        metrics = json.loads((out / preset / "metrics.json").read_text())
        assert metrics["summary"]["evaluated"] == 1 and metrics["summary"]["failed"] == 0
        navg[preset] = metrics["summary"]["Navg"]
    # fixed-count presets measure exactly Table 1's Navg
    assert navg["baseline"] == 256
    assert {p: navg[p] for p in ("table1_csp", "table1_prumerge", "table1_visionzip", "table1_fastv",
                                 "table1_sparsevlm", "table1_pyramiddrop")} == {
        "table1_csp": 73, "table1_prumerge": 75, "table1_visionzip": 80, "table1_fastv": 76,
        "table1_sparsevlm": 76, "table1_pyramiddrop": 81}
    assert navg["table1_simignore"] == (5 * 201 + 27 * 53) / 32
    assert 86 <= navg["table1_prumerge_plus"] <= 108 and 77.75 <= navg["table1_feather"] <= 87.25
    before = {p: (out / p / "results.jsonl").read_text() for p in navg}
    assert run(args) == text  # resumed: nothing re-run, same table
    assert {p: (out / p / "results.jsonl").read_text() for p in navg} == before
    assert (out / "table.txt").read_text() == text + "\n"


@pytest.mark.parametrize("level, band", [("toy19", (15, 24)), ("toy10", (8, 13))])
def test_toy_table_presets_compose_validate_and_reach_their_budget(tmp_path: Path, level: str,
                                                                   band: tuple[int, int]) -> None:
    """Every registered method has a preset at both toy budgets (``table=toy`` runs both); each composes,
    validates against the committed toy LISA (L = 8, N = 64) and prescribes its budget: Navg ~19 (Table 1's
    ~70% cut) and ~10 of the 64 tokens, both bounds of a data-dependent count inside the band."""
    from csp.accounting import navg
    from csp.config import method_from_config
    from csp.methods import METHODS
    from runs.models import layers_and_image_tokens
    from scripts.run_table import TOY_CONTROLS, TOY_PEERS, parse, settings

    assert parse(["table=toy"])[0] == "toy"
    prefix = {"toy19": "toy_table1_", "toy10": "toy_n10_"}[level]
    configured = settings(level, tmp_path, [])
    presets = [cfg.name for _, cfg in configured[1:]]
    peers = [f"{prefix}{suffix}" for _, suffix in TOY_PEERS] if level == "toy19" else []  # CSP's new options
    controls = [f"{prefix}{suffix}" for _, suffix in TOY_CONTROLS]  # random_keep at other layers
    assert sorted(presets) == sorted([f"{prefix}{m}" for m in METHODS] + peers + controls)
    layers, n = layers_and_image_tokens(configured[0][1].model)
    assert (layers, n) == (8, 64)
    assert method_from_config(configured[0][1]).method is None  # the baseline is the plain model
    for _, cfg in configured[1:]:
        method = method_from_config(cfg).method
        counts = method.image_tokens_per_layer(layers, n)
        bounds = [counts] if counts is not None else list(method.count_range(layers, n))
        for per_layer in bounds:  # data-dependent methods: both bounds inside the band
            assert band[0] <= navg(per_layer) <= band[1], (cfg.name, per_layer)


def test_toy_table_combines_models_into_means_and_ranges() -> None:
    """Mean and range of gIoU over the models, and the points lost paired per model: model a (plain 60)
    loses 10 with FastV (50), model b (plain 70) loses 4 (66); unpaired, the range would be [50, 66]."""
    from scripts.run_table import format_toy

    def row(name: str, model: str, giou: float, navg: float) -> dict:
        return {"name": name, "model": model, "splits": {"toyref|unc|val": {"gIoU": giou}}, "summary": {"Navg": navg}}

    results = {"toy19": {"LISA": [row("LISA", "a", 0.6, 64), row("LISA", "b", 0.7, 64)],
                         "FastV": [row("FastV", "a", 0.5, 19), row("FastV", "b", 0.66, 19)]},
               "toy10": {"LISA": [row("LISA", "a", 0.5, 64), row("LISA", "b", 0.6, 64)]}}
    text = format_toy(results, ["a", "b"])
    lines = text.splitlines()
    assert lines[0].split() == ["setting", "gIoU@19", "range", "lost@19", "range", "Navg",
                                "gIoU@10", "range", "lost@10", "range", "Navg"]
    assert lines[1].split() == ["LISA", "65.0", "[60.0,", "70.0]", "0.0", "[0.0,", "0.0]", "64.0",
                                "55.0", "[50.0,", "60.0]", "0.0", "[0.0,", "0.0]", "64.0"]
    assert lines[2].split() == ["FastV", "58.0", "[50.0,", "66.0]", "7.0", "[4.0,", "10.0]", "19.0",
                                "-", "-", "-", "-", "-"]
    assert "2 model(s)" in text and "a, b" in text


def test_toy_grid_reuses_a_finished_grid_and_refuses_another_settings(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid with rows.json is read back (no evaluation runs: the rows are made up), and only for the same
    arguments and the same rows; a grid that has gained a row since runs again (its finished
    settings resume from their own results); the folder of a checkpoint is its path made a file name."""
    import json

    import scripts.run_table as rt

    args = ["model.checkpoint=assets/toy_lisa", "model.vision_tower=assets/toy_lisa/vision_tower"]
    labels = [label for label, _ in rt.settings("toy19", tmp_path, args, [])]
    assert labels[0] == "LISA" and "random_keep (control)" in labels
    rows = [{"name": "LISA", "splits": {"toyref|unc|val": {"gIoU": 0.5}}, "summary": {"Navg": 64.0}}]
    (tmp_path / "rows.json").write_text(json.dumps({"args": args, "labels": labels, "rows": rows}))
    assert rt.toy_grid("toy19", tmp_path, args)[1] == rows
    with pytest.raises(SystemExit, match="written for"):
        rt.toy_grid("toy19", tmp_path, [*args, "eval.max_samples=3"])
    calls = []
    monkeypatch.setattr(rt, "run_grid", lambda level, root, a: calls.append(level) or ("text", rows + rows))
    (tmp_path / "rows.json").write_text(json.dumps({"args": args, "labels": labels[:-1], "rows": rows}))
    assert rt.toy_grid("toy19", tmp_path, args)[1] == rows + rows and calls == ["toy19"]
    assert json.loads((tmp_path / "rows.json").read_text())["labels"] == labels
    assert rt.model_slug("outputs/train/s0/final/lisa") == "outputs_train_s0_final_lisa"


def test_peers_table_composes_at_table1s_budget(tmp_path: Path) -> None:
    """table=peers: LISA, Table 1's CSP and every peer row compose and validate at LLaVA-7B-224's L = 32,
    N = 256 (the tiny model with 32 layers, as the Table 1 test); each prescribes Table 1's budget (both bounds
    of a data-dependent count within 51..80)."""
    from csp.accounting import navg
    from csp.config import method_from_config
    from runs.models import layers_and_image_tokens
    from scripts.run_table import PEERS, settings

    configured = settings("peers", tmp_path, ["model=tiny", "model.num_layers=32"])  # LLaVA-7B-224's L and N
    assert [cfg.name for _, cfg in configured] == ["llava7b_224_baseline", *(f"table1_{s}" for _, s in PEERS)]
    layers, n = layers_and_image_tokens(configured[0][1].model)
    assert (layers, n) == (32, 256)
    for _, cfg in configured[1:]:
        method = method_from_config(cfg).method
        counts = method.image_tokens_per_layer(layers, n)
        bounds = [counts] if counts is not None else list(method.count_range(layers, n))
        for per_layer in bounds:
            assert 51 <= navg(per_layer) <= 80, (cfg.name, per_layer)
