"""What does a grounded toy LLM's [SEG] query row hold, layer by layer? Its attention, and the expression's words.

Stage 2a (``training.toy_grounding``) trains the toy LLM to put the referent's cell distribution in the row LISA
reads the [SEG] embedding from (the *query row*). This experiment reads a stage-2a (or any toy LISA) checkpoint
on stage 2a's held-out expressions and reports, for every decoder layer:

- per attention head, how often the query row's most attended image token lies on the referent (*pointer
  hit*), the attention mass on the image rows, and the mass on the referent's cells;
- how well the expression's colour word and kind word can be read from the query row's state after that
  layer: a linear probe (softmax regression on standardised states, fitted on stage 2a's training
  expressions, scored on the held-out ones), against always answering the most frequent class.

It is how docs/toy_world.md (run M) found what bound stage 2a: without a term that asks for them, the query
row did not hold the expression's words (colour decodable 0.39 against a majority 0.26), so it could not know
what to look for; stage 2a's word-carrying term (``--words``) lifts that.

    python -m experiments.toy_query_row_probe --checkpoint outputs/toy_grounded/s0/lisa --out outputs/query_row_probe/s0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from model.checkpoint import load_lisa_checkpoint
from model.inference import decoder_inputs, expand_image_slots
from model.pipeline import SegmentationPipeline
from model.prompt import DEFAULT_ANSWER, seg_query_rows
from training.toy_grounding import HELD_OUT_STREAM, TRAIN_STREAM, draw_grounding_data

#: The toy world's words of each probed slot (datasets/toy.py); an expression without one is class "none".
COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
KIND_WORDS = ("circle", "square", "triangle", "star", "shape")


def word_classes(texts: Sequence[str], words: Sequence[str]) -> torch.Tensor:
    """``M`` class index: the first of ``words`` the expression holds (its first such word), ``len(words)`` if none."""
    out = []
    for text in texts:
        tokens = text.split()
        out.append(next((words.index(t) for t in tokens if t in words), len(words)))
    return torch.tensor(out)


def pointer_stats(attention: torch.Tensor, image: torch.Tensor, targets: torch.Tensor) -> dict:
    """``attention``: ``M x H x T`` the query row's attention over its keys; ``image``: ``M x T`` True on the image
    rows (``N`` per sample, in grid order); ``targets``: ``M x N`` the referent's cell distribution ->
    per head: pointer hit, mass on the image rows, mass on the referent's cells (means over ``M``)."""
    m, heads, _ = attention.shape
    on_image = torch.stack([attention[i][:, image[i]] for i in range(m)])  # M x H x N
    covered = (targets > 0).unsqueeze(1)
    hit = covered.squeeze(1).gather(1, on_image.argmax(-1)).float().mean(0)  # H
    return {"pointer_hit": [round(float(x), 4) for x in hit],
            "image_mass": [round(float(x), 4) for x in on_image.sum(-1).mean(0)],
            "referent_mass": [round(float(x), 4) for x in (on_image * covered).sum(-1).mean(0)]}


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          classes: int, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of softmax regression (Adam 1e-2, full batch) on states standardised by the training set."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe((train_x - mean) / std), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe((test_x - mean) / std).argmax(-1) == test_y).float().mean())


@torch.no_grad()
def query_row_views(pipe: SegmentationPipeline, features: torch.Tensor, texts: Sequence[str],
                    batch: int = 50) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(per layer ``M x H x T`` the query row's attention, per layer ``M x d`` its state after the layer,
    ``M x T`` image-row mask), from the LLM's own forward with eager attention over the full sequence."""
    llm, tok = pipe.model.model, pipe.bundle.token_ids
    saved = llm.config._attn_implementation
    llm.config._attn_implementation = "eager"
    keep: dict[int, torch.Tensor] = {}

    def keeper(i: int):
        def hook(module: torch.nn.Module, args: tuple, output) -> None:
            keep[i] = output[0] if isinstance(output, tuple) else output
        return hook

    hooks = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(llm.layers)]
    attention: list[list[torch.Tensor]] = [[] for _ in llm.layers]
    states: list[list[torch.Tensor]] = [[] for _ in llm.layers]
    images = []
    width = 0
    try:
        for start in range(0, len(texts), batch):
            chunk = list(texts[start:start + batch])
            embeds = pipe.model.project_images(features[start:start + batch])
            ids = [pipe.prompt_ids(t, False, answer=DEFAULT_ANSWER) for t in chunk]
            packed = expand_image_slots(ids, embeds.shape[1], tok.pad)
            rows = [seg_query_rows(i[: int(n)], tok.seg) for i, n in zip(packed.ids, packed.lengths)]
            inputs = decoder_inputs(pipe.model, packed, embeds, rows, None)
            out = llm(inputs_embeds=inputs.embeds, attention_mask=inputs.valid.long(), output_attentions=True)
            at = inputs.query_rows[:, 0]
            pick = torch.arange(len(chunk))
            for i, att in enumerate(out.attentions):
                attention[i].append(att[pick, :, at])  # b x H x T
                states[i].append(keep[i][pick, at])
            images.append(inputs.is_image)
            width = max(width, inputs.is_image.shape[1])
    finally:
        for hook in hooks:
            hook.remove()
        llm.config._attn_implementation = saved

    def pad(chunks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in chunks])

    return [pad(a) for a in attention], [torch.cat(s) for s in states], pad(images).bool()


def check_inputs(checkpoint: Path, train_images: int, held_out_images: int) -> None:
    """The user's mistakes, named, before anything is loaded."""
    for key, value in (("train_images", train_images), ("held_out_images", held_out_images)):
        if value < 1:
            raise ValueError(f"{key}: expected a positive integer, got {value}")
    if not (checkpoint / "config.json").is_file() or not (checkpoint / "vision_tower").is_dir():
        raise FileNotFoundError(f"checkpoint={checkpoint}: expected a released-layout toy LISA with vision_tower/ "
                                "(python -m training.toy_grounding --out <dir> writes <dir>/lisa)")


def run_probe(checkpoint: Path, out: Path, *, seed: int, train_images: int, held_out_images: int,
              log: bool = True) -> dict:
    """Measure ``checkpoint`` on stage 2a's held-out expressions of ``seed``; writes ``<out>/report.json``."""
    check_inputs(checkpoint, train_images, held_out_images)
    bundle = load_lisa_checkpoint(checkpoint, checkpoint / "vision_tower")
    pipe = SegmentationPipeline(bundle)
    train = draw_grounding_data(pipe, train_images, seed=seed, stream=TRAIN_STREAM)
    held = draw_grounding_data(pipe, held_out_images, seed=seed, stream=HELD_OUT_STREAM)
    attention, held_states, image = query_row_views(pipe, held.features[held.scene], held.texts)
    train_states = query_row_views(pipe, train.features[train.scene], train.texts)[1]
    layers = []
    for i, att in enumerate(attention):
        row = {"layer": i, **pointer_stats(att, image, held.targets)}
        for name, words in (("colour", COLOUR_WORDS), ("kind", KIND_WORDS)):
            ytr, yte = word_classes(train.texts, words), word_classes(held.texts, words)
            row[f"{name}_word_accuracy"] = round(linear_probe_accuracy(train_states[i], ytr, held_states[i], yte,
                                                                       len(words) + 1), 4)
        layers.append(row)
        if log:
            print(f"layer {i}: pointer hit per head {row['pointer_hit']}  referent mass {row['referent_mass']}  "
                  f"colour word {row['colour_word_accuracy']:.3f}  kind word {row['kind_word_accuracy']:.3f}",
                  flush=True)
    majority = {}
    for name, words in (("colour", COLOUR_WORDS), ("kind", KIND_WORDS)):
        y = word_classes(held.texts, words)
        majority[name] = round(float((y == y.mode().values).float().mean()), 4)
    report = {"checkpoint": str(checkpoint), "seed": seed, "train_expressions": len(train),
              "held_out_expressions": len(held), "majority_word_accuracy": majority, "layers": layers}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if log:
        print(f"majority class: colour {majority['colour']:.3f}, kind {majority['kind']:.3f}; {out / 'report.json'}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.toy_query_row_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a stage-2a <out>/lisa or a toy LISA")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the scenes of stage 2a's seed")
    parser.add_argument("--train-images", type=int, default=500, help="scenes whose expressions fit the word probes")
    parser.add_argument("--held-out-images", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        check_inputs(args.checkpoint, args.train_images, args.held_out_images)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    run_probe(args.checkpoint, args.out, seed=args.seed, train_images=args.train_images,
              held_out_images=args.held_out_images)


if __name__ == "__main__":
    main()
