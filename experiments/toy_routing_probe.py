"""How well can the toy CLIP stand-in's tokens be routed? A reader with no LLM, against stage 2a's LLM.

Stage 2a (``training.toy_grounding``) trains the toy LLM to put the referent's cell distribution in its
[SEG] row; after 1200 steps of 32 expressions its held-out hit is about 0.53. This experiment asks whether
the frozen CLIP tokens or the LLM is what limits that figure. It trains, on the same expressions, scenes,
targets and held-out split (``draw_grounding_data`` with the same streams), a two-hop attention reader:

- the expression as a bag of words (it reads every word exactly, in no order);
- keys: a 2-layer MLP of each frozen CLIP token (layer -2, as the LLM reads it);
- hop 1: attention of a query from the words over the 64 tokens (e.g. the anchor of ``above the blue star``);
  hop 2: a query from the words and hop 1's read-out; its attention logits are the cell distribution.

Loss and "hit" are stage 2a's (cross-entropy to the covered-fraction distribution; the most likely cell
lies on the referent). If this reader routes far better than the LLM in far fewer steps, the tokens carry
what routing needs and the toy LLM's optimisation is what binds (docs/toy_world.md, run K).

    python -m experiments.toy_routing_probe --out outputs/toy_routing_probe --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from model.builder import ToySizes, build_toy_lisa
from model.pipeline import SegmentationPipeline
from training.toy_grounding import (HELD_OUT_STREAM, TRAIN_STREAM, GroundingData, cell_cross_entropy,
                                    draw_grounding_data, hit_rates, referent_hits)


class BagOfWordsReader(torch.nn.Module):
    """Two hops of attention from a bag-of-words query over ``B x N x C`` tokens -> ``B x N`` logits."""

    def __init__(self, vocab: Sequence[str], channels: int, width: int = 128):
        super().__init__()
        self.index = {w: i for i, w in enumerate(vocab)}
        self.width = width
        words = len(self.index)
        self.keys = torch.nn.Sequential(torch.nn.Linear(channels, width), torch.nn.GELU(), torch.nn.Linear(width, width))
        self.hop1 = torch.nn.Sequential(torch.nn.Linear(words, width), torch.nn.GELU(), torch.nn.Linear(width, width))
        self.hop2 = torch.nn.Sequential(torch.nn.Linear(words + width, width), torch.nn.GELU(),
                                        torch.nn.Linear(width, width))

    def bag(self, texts: Sequence[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), len(self.index))
        for row, text in enumerate(texts):
            for word in text.split():
                if word not in self.index:
                    raise ValueError(f"word {word!r} of {text!r} is not in the reader's vocabulary")
                x[row, self.index[word]] = 1.0
        return x

    def forward(self, features: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        words = self.bag(texts)
        keys = self.keys(features)
        first = (keys @ self.hop1(words).unsqueeze(-1)).squeeze(-1) / self.width ** 0.5
        context = (first.softmax(-1).unsqueeze(-1) * keys).sum(1)
        query = self.hop2(torch.cat([words, context], -1))
        return (keys @ query.unsqueeze(-1)).squeeze(-1) / self.width ** 0.5


def held_out_hits(reader: BagOfWordsReader, data: GroundingData) -> dict:
    """Stage 2a's hit rate (overall and per expression type) of the reader on ``data``."""
    with torch.no_grad():
        hits = referent_hits(reader(data.features[data.scene], data.texts), data.targets)
    return {**hit_rates(hits, data.types), "expressions": len(data)}


def run_probe(out: Path, *, seed: int, towers: str, train_images: int, held_out_images: int, steps: int,
              batch: int, lr: float, eval_every: int, log: bool = True) -> dict:
    """Train the reader; ``<out>/probe_log.jsonl`` (one line per evaluation, as it goes) and ``report.json``."""
    for key, value in (("steps", steps), ("batch", batch), ("train_images", train_images),
                       ("held_out_images", held_out_images), ("eval_every", eval_every)):
        if value < 1:
            raise ValueError(f"{key}: expected a positive integer, got {value}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = SegmentationPipeline(build_toy_lisa(seed, ToySizes(towers=towers)))
    train = draw_grounding_data(pipe, train_images, seed=seed, stream=TRAIN_STREAM)
    held = draw_grounding_data(pipe, held_out_images, seed=seed, stream=HELD_OUT_STREAM)
    torch.manual_seed(seed)
    vocab = sorted({w for t in train.texts + held.texts for w in t.split()})
    reader = BagOfWordsReader(vocab, train.features.shape[-1])
    optimizer = torch.optim.Adam(reader.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    log_path = out / "probe_log.jsonl"
    log_path.write_text("")
    history, t_train = [], time.time()
    for step in range(1, steps + 1):
        pick = torch.randint(len(train), (batch,), generator=generator)
        logits = reader(train.features[train.scene[pick]], [train.texts[i] for i in pick])
        loss = cell_cross_entropy(logits, train.targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            record = {"step": step, "loss": round(float(loss.detach()), 4), **held_out_hits(reader, held),
                      "elapsed_s": round(time.time() - t0, 1)}
            history.append(record)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if log:
                rate = step / (time.time() - t_train)
                print(f"step {step}/{steps}  loss {record['loss']:.3f}  held-out hit {record['hit']:.3f} "
                      f"{record['hit_by_type']}  {rate:.1f} steps/s  ETA {(steps - step) / rate:.0f} s", flush=True)
    report = {"seed": seed, "towers": towers, "train_expressions": len(train), "steps": steps, "batch": batch,
              "lr": lr, "final": history[-1], "history": history, "elapsed_s": round(time.time() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.toy_routing_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--towers", default="assets/toy_towers")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--held-out-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=300)
    args = parser.parse_args(argv)
    run_probe(args.out, seed=args.seed, towers=args.towers, train_images=args.train_images,
              held_out_images=args.held_out_images, steps=args.steps, batch=args.batch, lr=args.lr,
              eval_every=args.eval_every)


if __name__ == "__main__":
    main()
