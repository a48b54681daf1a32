"""The random_keep control: a subset that is a function of the sample alone, uniform over the grid."""

from __future__ import annotations

import torch

from csp.methods import build_method
from csp.methods.random_keep import SeededRandomScores
from csp.plan import TopK
from csp.runner import DecoderInputs, StageRunner
from tests.csp.test_csp_oracle import tiny_llm


def batch(embeds: list[torch.Tensor], num_image: int) -> DecoderInputs:
    """Right-padded batch of ``T_i x d`` samples whose rows 1..num_image are the image."""
    width = max(e.shape[0] for e in embeds)
    d = embeds[0].shape[1]
    x = torch.zeros(len(embeds), width, d)
    valid = torch.zeros(len(embeds), width, dtype=torch.bool)
    for i, e in enumerate(embeds):
        x[i, : e.shape[0]] = e
        valid[i, : e.shape[0]] = True
    is_image = torch.zeros_like(valid)
    is_image[:, 1: 1 + num_image] = True
    last = torch.tensor([[e.shape[0] - 1] for e in embeds])
    return DecoderInputs(x, valid, is_image, last, torch.ones_like(last, dtype=torch.bool), last_rows=last)


def kept(runner: StageRunner, inputs: DecoderInputs) -> list[list[int]]:
    with torch.no_grad():
        out = runner.forward(inputs)
    rows = out.kept_image_tokens[-1].indices
    return [r[r >= 0].tolist() for r in rows]


def test_subset_depends_on_the_sample_only_not_on_batch_or_padding() -> None:
    llm = tiny_llm(4, 4, 2, seed=1)
    runner = StageRunner(llm, build_method({"name": "random_keep", "layer": 1, "keep": 5}), 20)
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randn(n, llm.config.hidden_size, generator=gen) for n in (30, 26, 33)]
    together = kept(runner, batch(samples, 20))
    alone = [kept(runner, batch([s], 20))[0] for s in samples]
    reordered = kept(runner, batch(samples[::-1], 20))[::-1]
    assert together == alone == reordered
    assert all(len(k) == 5 for k in together)
    assert len({tuple(k) for k in together}) == 3  # three samples, three subsets


def test_seed_changes_the_subset_and_answer_rows_do_not() -> None:
    llm = tiny_llm(4, 4, 2, seed=1)
    sample = torch.randn(30, llm.config.hidden_size, generator=torch.Generator().manual_seed(3))
    runs = {seed: kept(StageRunner(llm, build_method({"name": "random_keep", "layer": 1, "keep": 6, "seed": seed}),
                                   20), batch([sample], 20))[0] for seed in (0, 1)}
    assert runs[0] != runs[1]
    # rows after the last prompt row (the answer in teacher forcing) do not enter the key
    inputs = batch([sample], 20)
    longer = torch.cat([sample, torch.randn(4, sample.shape[1])])
    extended = batch([longer], 20)
    extended.last_rows = inputs.last_rows
    extended.query_rows = inputs.query_rows
    runner = StageRunner(llm, build_method({"name": "random_keep", "layer": 1, "keep": 6}), 20)
    assert kept(runner, extended)[0] == runs[0]


def test_every_grid_token_is_kept_about_equally_often() -> None:
    """Over 2000 samples, keep 16 of 64: each index is kept with probability 1/4 (binomial sd ~0.0097)."""
    scorer = SeededRandomScores(seed=0)
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(2000, 70, 8, generator=gen)
    valid = torch.ones(2000, 70, dtype=torch.bool)
    keys = scorer.sample_keys(embeds, valid)
    assert len(set(keys.tolist())) == 2000
    from csp.methods.random_keep import _GOLDEN, mix64

    grid = torch.arange(64)
    hashed = mix64(mix64(keys[:, None] + (grid + 1) * _GOLDEN))
    scores = (hashed & ((1 << 53) - 1)).double() / float(1 << 53)
    keep = TopK(16).keep(scores, torch.ones_like(scores, dtype=torch.bool), grid.expand(2000, -1))
    freq = keep.double().mean(dim=0)
    assert float((freq - 0.25).abs().max()) < 0.05
    assert 0.0 <= float(scores.min()) and float(scores.max()) < 1.0
