"""datasets.real_size: a refer split of real size in the real format; one preset end to end (slow)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from datasets.real_size import PRESETS, RealSizeSpec, _spread, write_real_size
from datasets.splits import load_groups


def test_spread_and_small_spec_counts(tmp_path: Path) -> None:
    assert _spread(7, 3) == [3, 2, 2] and sum(_spread(10834, 3811)) == 10834
    spec = RealSizeSpec("refcoco", "unc", "testA", images=5, refs=12, sentences=31, total_images=40,
                        total_annotations=60, side=32)
    write_real_size(tmp_path, spec)
    groups = load_groups("refcoco|unc|testA", tmp_path)
    assert len(groups) == 5 and sum(len(g.samples) for g in groups) == 31
    root = tmp_path / "refer_seg" / "refcoco"
    with open(root / "refs(unc).p", "rb") as handle:
        refs = pickle.load(handle)
    assert len([r for r in refs if r["split"] == "testA"]) == 12 and len(refs) == 60
    instances = json.loads((root / "instances.json").read_text())
    assert len(instances["images"]) == 40 and len(instances["annotations"]) == 60
    assert all(s.gt_mask().any() for g in groups for s in g.samples)
    mtime = (root / "instances.json").stat().st_mtime_ns
    write_real_size(tmp_path, spec)  # the same spec again: skipped
    assert (root / "instances.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="images <= refs <= sentences"):
        write_real_size(tmp_path, RealSizeSpec("refcoco", "unc", "val", images=5, refs=4, sentences=9))
    assert {p.sentences for p in PRESETS.values()} == {10834, 5657, 4896}


class StubPipeline:
    """The tiny model's dims and token accounting, a fixed mask (the image's left half), no model call:
    evaluation's own machinery (images, GT masks, records, merge, metrics) over every sample."""

    def __init__(self, stop_after: int | None = None):
        from model.builder import build_tiny_lisa
        from model.pipeline import SegmentationPipeline

        self.real = SegmentationPipeline(build_tiny_lisa(seed=0, num_layers=2), None)
        self.dims = self.real.dims
        self.tokens: tuple | None = None
        self.calls, self.stop_after = 0, stop_after

    def extra_cost(self) -> dict[str, float]:
        return {}

    def segment(self, image, queries, *, queries_per_batch=None):  # noqa: ANN001, ANN201
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt("killed")  # as a kill half way: the records so far are on disk
        self.calls += len(queries)
        if self.tokens is None:
            first = self.real.segment(image, queries[:1])[0]
            self.tokens = (list(first.image_tokens), list(first.total_tokens))
        mask = np.zeros((image.height, image.width), bool)
        mask[:, : image.width // 2] = True
        return [SimpleNamespace(sample_id=q.sample_id, mask=mask, image_tokens=self.tokens[0],
                                total_tokens=self.tokens[1], llm_ms=0.0, batch_size=1) for q in queries]


@pytest.mark.slow
def test_refcocog_val_of_real_size_end_to_end_and_resumed_half_way(tmp_path: Path) -> None:
    from evaluation.evaluate import SettingOptions, evaluate_setting
    from runs.distributed import DistContext

    spec = RealSizeSpec(**{**PRESETS["refcocog_val"].__dict__, "side": 32})
    write_real_size(tmp_path / "data", spec)
    groups = load_groups(spec.name, tmp_path / "data")
    assert len(groups) == 1300 and sum(len(g.samples) for g in groups) == 4896
    whole = evaluate_setting(StubPipeline(), groups, [spec.name], tmp_path / "whole", DistContext(),
                             SettingOptions(name="stub", progress=False))
    assert whole["summary"]["evaluated"] == 4896 and whole["summary"]["failed"] == 0
    assert 0 < whole["splits"][spec.name]["gIoU"] < 1
    with pytest.raises(KeyboardInterrupt):
        evaluate_setting(StubPipeline(stop_after=2448), groups, [spec.name], tmp_path / "split", DistContext(),
                         SettingOptions(name="stub", progress=False))
    rest = StubPipeline()
    resumed = evaluate_setting(rest, groups, [spec.name], tmp_path / "split", DistContext(),
                               SettingOptions(name="stub", progress=False, resume=True))
    assert 2000 < rest.calls < 2900  # only the unfinished half ran
    for key in ("gIoU", "cIoU", "evaluated", "intersection", "union"):
        assert resumed["splits"][spec.name][key] == whole["splits"][spec.name][key], key
