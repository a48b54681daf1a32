"""The toy CLIP's text side for LiteLVLM (training/toy_text_tower.py, assets/toy_towers/text): the trainer end
to end at a tiny size, and the committed asset through the loader users call (``ClipTextSide.from_dir``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from csp.litelvlm import ClipTextSide, check_text_side_dir
from training.toy_text_tower import (
    CLIP_DIR,
    HELD_OUT_START,
    build_text_tokenizer,
    draw_regions,
    load_clip,
    main,
    retrieval,
    sha256,
)

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets" / "toy_towers" / "text"


def test_trainer_runs_end_to_end_and_writes_what_the_loader_reads(tmp_path: Path) -> None:
    out = tmp_path / "text"
    main(["--out", str(out), "--clip", str(ROOT / CLIP_DIR), "--steps", "3", "--scenes", "4", "--held-out", "2"])
    check_text_side_dir(out)
    report = json.loads((out / "toy_text.json").read_text())
    assert report["spec"]["steps"] == 3 and report["spec"]["train_scenes"] == 4
    assert report["clip"]["sha256"] == sha256(ROOT / CLIP_DIR / "model.safetensors")
    assert 0 <= report["held_out"]["top1"] <= 1 and report["held_out"]["expressions"] > 0
    side = ClipTextSide.from_dir(out)
    embeds = side.text_embeds(["the red triangle", "the largest shape on the left"])
    assert embeds.shape == (2, report["spec"]["projection_dim"]) and embeds.dtype == torch.float32
    assert side.project_image(torch.randn(1, 64, report["clip"]["width"])).shape == (1, 64, embeds.shape[1])
    with pytest.raises(ValueError, match="width"):  # a vision tower it was not trained against
        side.project_image(torch.randn(1, 64, report["clip"]["width"] // 2))


def test_tokenizer_knows_every_word_of_the_toy_expressions() -> None:
    from datasets.toy import ToySpec, generate_image

    tokenizer = build_text_tokenizer(24)
    for index in range(20):
        for _, expr in generate_image(ToySpec(), "train", index).refs:
            ids = tokenizer(expr.text())["input_ids"]
            assert tokenizer.unk_token_id not in ids, expr.text()
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id == len(tokenizer) - 1


def test_committed_text_side_loads_pairs_with_the_toy_clip_and_beats_chance() -> None:
    """Expression -> referent among the scene's shapes on held-out scenes (never trained on), through
    ``ClipTextSide.from_dir`` as the litelvlm method loads it; the asset is small and names its CLIP."""
    report = json.loads((ASSET / "toy_text.json").read_text())
    assert report["clip"]["sha256"] == sha256(ROOT / CLIP_DIR / "model.safetensors")
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 1_000_000
    side = ClipTextSide.from_dir(ASSET)
    start = HELD_OUT_START + report["spec"]["held_out_scenes"]  # scenes beyond the ones the report scored
    held = draw_regions(range(start, start + 12), load_clip(ROOT / CLIP_DIR))
    with torch.no_grad():
        metrics = retrieval(side.text_embeds(held.texts), side.visual_projection(held.pooled), held)
    assert metrics["top1"] >= metrics["chance"] + 0.3, metrics
    assert report["held_out"]["top1"] >= report["held_out"]["chance"] + 0.3


@pytest.mark.parametrize("level", ["toy19", "toy10"])
def test_toy_litelvlm_rows_are_available_on_the_committed_toy_lisa(tmp_path: Path, level: str) -> None:
    """``run_table.py table=toy`` checks every row before running any: on the committed assets/toy_lisa (its
    vision tower is the toy CLIP stand-in) the LiteLVLM rows are available; on a checkpoint whose CLIP has
    another width (the first toy world's random 64-wide CLIP; config files, as run_toy passes them) they are
    listed as unavailable, with the reason, instead of failing at their first sample."""
    import json
    import shutil

    from scripts.run_table import settings

    want = {"toy19": {"toy_table1_litelvlm", "toy_table1_csp_litelvlm"}, "toy10": {"toy_n10_litelvlm"}}[level]
    missing: list[tuple[str, str]] = []
    configured = settings(level, tmp_path / "grid", [], unavailable=missing)  # the committed assets/toy_lisa
    assert missing == []
    assert want <= {cfg.name for _, cfg in configured}
    ckpt = tmp_path / "toy_clip64"
    (ckpt / "vision_tower").mkdir(parents=True)
    shutil.copy(ROOT / "assets" / "toy_lisa" / "config.json", ckpt / "config.json")
    clip = json.loads((ROOT / CLIP_DIR / "config.json").read_text())
    clip["hidden_size"] = 64
    (ckpt / "vision_tower" / "config.json").write_text(json.dumps(clip))
    overrides = [f"model.checkpoint={ckpt}", f"model.vision_tower={ckpt / 'vision_tower'}"]
    settings(level, tmp_path / "grid64", overrides, unavailable=missing)
    assert {why.split(":")[0] for _, why in missing} == want
    assert all("width 128" in why and "width 64" in why for _, why in missing)


def test_toy_litelvlm_runs_on_a_toy_lisa_built_on_the_towers() -> None:
    """The toy row's method (its preset's ``clip``) in the pipeline on a toy LISA whose CLIP is the toy CLIP
    stand-in: the kept tokens are LiteLVLM's rule applied with the committed text side."""
    from PIL import Image

    from csp.methods import build_method
    from datasets.toy import ToySpec, generate_image
    from model.builder import ToySizes, build_toy_lisa
    from model.pipeline import Query, SegmentationPipeline

    bundle = build_toy_lisa(0, ToySizes(towers=str(ROOT / "assets" / "toy_towers")))
    spec = dict(yaml.safe_load((ROOT / "configs" / "exp" / "toy_table1_litelvlm.yaml").read_text())["method"])
    assert spec["clip"] == "assets/toy_towers/text"  # repository-relative, as eval_ds.py runs from the root
    method = build_method({"name": "litelvlm", **{**spec, "clip": str(ROOT / spec["clip"])}})
    method.check()
    pipe = SegmentationPipeline(bundle, method)
    toy = generate_image(ToySpec(), "train", HELD_OUT_START)
    queries = [Query(expr.text(), False, str(i)) for i, (_, expr) in enumerate(toy.refs)]
    results = pipe.segment(Image.fromarray(toy.pixels), queries)
    want = method.retained(pipe.encode_image(Image.fromarray(toy.pixels)).vision, [q.text for q in queries])
    for r, row in zip(results, want, strict=True):
        assert r.image_tokens == [19] * pipe.num_layers
        assert sorted(r.kept_image_tokens[0].indices[0].tolist()) == sorted(row.tolist())
    assert len({tuple(sorted(row.tolist())) for row in want}) > 1  # the selection follows the expression

