"""experiments/toy_routing_probe.py: the bag-of-words reader reads its words exactly, learns a routing that a
feature of the target token determines, and the probe runs end to end on the committed towers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.toy_routing_probe import BagOfWordsReader, held_out_hits, run_probe
from training.toy_grounding import GroundingData


def test_bag_counts_each_word_once_and_names_an_unknown_one() -> None:
    reader = BagOfWordsReader(["blue", "red", "the"], channels=4)
    assert reader.bag(["the red the", "blue"]).tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="'green'"):
        reader.bag(["the green"])


def synthetic(count: int, seed: int) -> GroundingData:
    """16 tokens of 6 random channels; the word names one of 4 channels, the target is the token where that
    channel is largest (so only reading the features finds it: chance is 1/16)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(count, 16, 6, generator=g)
    words = ["a", "b", "c", "d"]
    pick = torch.randint(4, (count,), generator=g)
    targets = torch.zeros(count, 16)
    targets[torch.arange(count), features[torch.arange(count), :, pick].argmax(-1)] = 1.0
    return GroundingData(features, torch.arange(count), [f"the {words[i]}" for i in pick], ["attribute"] * count,
                         targets, torch.zeros(count, 2))


def test_reader_learns_to_route_by_a_feature_of_the_target() -> None:
    torch.manual_seed(0)
    train, held = synthetic(2000, 0), synthetic(200, 1)
    reader = BagOfWordsReader(["the", "a", "b", "c", "d"], channels=6, width=32)
    before = held_out_hits(reader, held)["hit"]
    optimizer = torch.optim.Adam(reader.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        pick = torch.randint(len(train), (64,), generator=g)
        logits = reader(train.features[pick], [train.texts[i] for i in pick])
        loss = -(train.targets[pick] * logits.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_hits(reader, held)
    assert before < 0.3 and after["hit"] > 0.8, (before, after)
    assert after["hit_by_type"] == {"attribute": after["hit"]} and after["expressions"] == 200


def test_probe_runs_on_the_committed_towers(tmp_path: Path) -> None:
    report = run_probe(tmp_path, seed=0, towers="assets/toy_towers", train_images=12, held_out_images=4, steps=20,
                       batch=8, lr=3e-3, eval_every=10, log=False)
    lines = [json.loads(x) for x in (tmp_path / "probe_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20] and report["final"] == lines[-1]
    assert 0.0 <= report["final"]["hit"] <= 1.0 and report["final"]["expressions"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["train_expressions"] == report["train_expressions"]
    with pytest.raises(ValueError, match="steps"):
        run_probe(tmp_path, seed=0, towers="assets/toy_towers", train_images=1, held_out_images=1, steps=0,
                  batch=1, lr=1e-3, eval_every=1, log=False)
