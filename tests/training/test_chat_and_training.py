"""Chat with the KV cache vs teacher forcing, and LISA's training objective.

The tiny random model never says [SEG] by itself: a copy gets its ``lm_head`` rows edited so
that [SEG] (then </s>) takes the place of tokens it would have predicted anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from model.builder import build_tiny_lisa
from model.bundle import LisaBundle
from model.inference import GenerationOutput, generate, teacher_forced
from model.pipeline import ImageEncoding, SegmentationPipeline
from model.prompt import IMAGE_PLACEHOLDER_ID, build_prompt, tokenize_with_image, user_message
from model.sam import decode_masks, sam_postprocess
from model.training import (
    LossWeights,
    TrainingSample,
    dice_loss,
    set_trainable,
    sigmoid_ce_loss,
    training_loss,
)
from tests.conftest import random_pil_image

MAX_NEW = 16
TRAINABLE = ["model.visual_model.mask_decoder", "model.text_hidden_fcs"]


# -- a model that says [SEG] ----------------------------------------------------------------------
@dataclass
class SegChat:
    bundle: LisaBundle
    pipe: SegmentationPipeline
    enc: ImageEncoding
    prompt_a: list[int]  # "What is dog in this image? ..." up to ASSISTANT:
    prompt_b: list[int]  # prompt_a + the first two tokens the model generates after it (longer)
    natural: list[int]  # what the unedited model generates after prompt_a

    def run(self, prompts: list[list[int]], max_new_tokens: int = MAX_NEW) -> GenerationOutput:
        tok = self.bundle.token_ids
        embeds = self.enc.image_embeds.expand(len(prompts), -1, -1)
        return generate(self.bundle.model, self.pipe.runner, prompts, embeds, tok.seg, tok.eos, tok.pad,
                        max_new_tokens=max_new_tokens)


def make_say(weight: torch.Tensor, new: int, old: int) -> None:
    """Row ``new`` of lm_head = 1.05 x row ``old``: ``new`` wins wherever ``old`` won with a positive logit."""
    with torch.no_grad():
        weight[new] = weight[old] * 1.05


@pytest.fixture(scope="module")
def seg_chat(tiny_bundle: LisaBundle) -> SegChat:
    bundle = copy.deepcopy(tiny_bundle)
    pipe = SegmentationPipeline(bundle)
    enc = pipe.encode_image(random_pil_image(40, 56, seed=3))
    prompt_a = tokenize_with_image(build_prompt("dog", False, answer=None), bundle.tokenizer)
    chat = SegChat(bundle, pipe, enc, prompt_a, [], [])
    chat.natural = chat.run([prompt_a], max_new_tokens=6).generated[0]
    tok, weight = bundle.token_ids, bundle.model.lm_head.weight
    assert tok.seg not in chat.natural and tok.eos not in chat.natural
    make_say(weight, tok.seg, chat.natural[2])  # [SEG] as the third answer token
    with_seg = chat.run([prompt_a]).generated[0]
    assert with_seg[:3] == [*chat.natural[:2], tok.seg], with_seg
    make_say(weight, tok.eos, with_seg[3])  # then </s>
    chat.prompt_b = prompt_a + chat.natural[:2]
    return chat


def test_edited_model_says_seg_then_stops_at_eos(seg_chat: SegChat) -> None:
    tok = seg_chat.bundle.token_ids
    out = seg_chat.run([seg_chat.prompt_a])
    assert out.generated[0] == [*seg_chat.natural[:2], tok.seg, tok.eos]  # stopped long before MAX_NEW
    assert out.seg_hidden[0].shape == (1, seg_chat.bundle.model.config.hidden_size)
    assert out.seg_embeddings[0].shape == (1, seg_chat.bundle.model.extras.out_dim)


def test_generated_seg_matches_teacher_forced(seg_chat: SegChat) -> None:
    tok = seg_chat.bundle.token_ids
    out = seg_chat.run([seg_chat.prompt_a])
    forced = teacher_forced(seg_chat.bundle.model, seg_chat.pipe.runner, [seg_chat.prompt_a + out.generated[0]],
                            seg_chat.enc.image_embeds, tok.seg, tok.pad)
    torch.testing.assert_close(out.seg_hidden[0], forced.seg_hidden[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.seg_embeddings[0], forced.seg_embeddings[0], atol=1e-5, rtol=0)


def test_generated_seg_matches_llama_forward(seg_chat: SegChat) -> None:
    """The [SEG] state is the final-norm state of the token before [SEG] in a plain HF forward."""
    model, tok = seg_chat.bundle.model, seg_chat.bundle.token_ids
    out = seg_chat.run([seg_chat.prompt_a])
    ids = seg_chat.prompt_a + out.generated[0]
    at = ids.index(IMAGE_PLACEHOLDER_ID)
    with torch.no_grad():
        embeds = torch.cat([model.model.embed_tokens(torch.tensor(ids[:at])), seg_chat.enc.image_embeds[0],
                            model.model.embed_tokens(torch.tensor(ids[at + 1:]))])
        hidden = model.model(inputs_embeds=embeds[None]).last_hidden_state[0]
    n = seg_chat.enc.image_embeds.shape[1]
    seg_row = ids.index(tok.seg) - 1 + (n - 1)  # token before [SEG], after the slot grew to N rows
    assert seg_row == len(seg_chat.prompt_a) - 1 + n + 2 - 1  # expanded prompt + two answer tokens - 1
    torch.testing.assert_close(out.seg_hidden[0][0], hidden[seg_row], atol=1e-5, rtol=0)


def test_chat_returns_seg_masks_matching_teacher_forced(seg_chat: SegChat) -> None:
    image = seg_chat.enc.image
    result = seg_chat.pipe.chat(image, user_message("dog", False), max_new_tokens=MAX_NEW)
    assert result.text.split()[-2:] == ["[SEG]", "</s>"]
    assert result.masks.shape == (1, 40, 56) and result.masks.dtype == bool
    tok = seg_chat.bundle.token_ids
    ids = seg_chat.prompt_a + [*seg_chat.natural[:2], tok.seg, tok.eos]
    forced = teacher_forced(seg_chat.bundle.model, seg_chat.pipe.runner, [ids], seg_chat.enc.image_embeds,
                            tok.seg, tok.pad)
    torch.testing.assert_close(result.seg_embeddings, forced.seg_embeddings[0], atol=1e-5, rtol=0)


def test_batch_of_two_lengths_matches_single_runs_and_teacher_forcing(seg_chat: SegChat) -> None:
    tok = seg_chat.bundle.token_ids
    prompts = [seg_chat.prompt_a, seg_chat.prompt_b]
    assert len(prompts[1]) == len(prompts[0]) + 2
    batch = seg_chat.run(prompts)
    # b is a two tokens ahead on the same path: it says [SEG] at once and stops two steps earlier
    assert batch.generated[0] == [*seg_chat.natural[:2], tok.seg, tok.eos]
    assert batch.generated[1] == [tok.seg, tok.eos]
    for i, prompt in enumerate(prompts):
        single = seg_chat.run([prompt])
        assert single.generated[0] == batch.generated[i]
        torch.testing.assert_close(batch.seg_hidden[i], single.seg_hidden[0], atol=1e-5, rtol=0)
    # same token sequence before [SEG] (one generated with the cache, one prefilled): same state
    torch.testing.assert_close(batch.seg_hidden[0], batch.seg_hidden[1], atol=1e-5, rtol=0)
    forced = teacher_forced(seg_chat.bundle.model, seg_chat.pipe.runner,
                            [p + g for p, g in zip(prompts, batch.generated, strict=True)],
                            seg_chat.enc.image_embeds.expand(2, -1, -1), tok.seg, tok.pad)
    for i in range(2):
        torch.testing.assert_close(batch.seg_hidden[i], forced.seg_hidden[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.seg_embeddings[i], forced.seg_embeddings[i], atol=1e-5, rtol=0)


def test_generation_without_seg_or_eos_runs_to_max_new_tokens(tiny_bundle: LisaBundle) -> None:
    pipe = SegmentationPipeline(tiny_bundle)
    result = pipe.chat(random_pil_image(24, 30, seed=4), "What is the cat?", max_new_tokens=5)
    assert len(tiny_bundle.tokenizer(result.text, add_special_tokens=False).input_ids) == 5
    assert "[SEG]" not in result.text
    assert result.masks.shape == (0, 24, 30)
    assert result.seg_embeddings.shape == (0, tiny_bundle.model.extras.out_dim)


def test_teacher_forced_needs_seg(tiny_bundle: LisaBundle) -> None:
    pipe = SegmentationPipeline(tiny_bundle)
    enc = pipe.encode_image(random_pil_image(20, 20, seed=5))
    tok = tiny_bundle.token_ids
    with_seg = tokenize_with_image(build_prompt("dog", False), tiny_bundle.tokenizer)
    without = tokenize_with_image(build_prompt("dog", False, answer="It is a dog."), tiny_bundle.tokenizer)
    with pytest.raises(ValueError, match=r"prompt 1 has no \[SEG\]"):
        teacher_forced(tiny_bundle.model, pipe.runner, [with_seg, without], enc.image_embeds.expand(2, -1, -1),
                       tok.seg, tok.pad)


# -- training -------------------------------------------------------------------------------------
def box_mask(size: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(size, dtype=np.float32)
    mask[top:bottom, left:right] = 1
    return mask


def make_samples() -> list[TrainingSample]:
    return [
        TrainingSample(random_pil_image(32, 40, seed=10), "dog", False, "Sure, it is [SEG].",
                       box_mask((32, 40), 4, 6, 20, 30)[None], "s0"),
        TrainingSample(random_pil_image(36, 28, seed=11), "the man and the cup", True, "[SEG] and [SEG].",
                       np.stack([box_mask((36, 28), 0, 0, 18, 14), box_mask((36, 28), 20, 10, 36, 28)]), "s1"),
    ]


@pytest.fixture(scope="module")
def samples() -> list[TrainingSample]:
    return make_samples()


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_set_trainable_selects_prefixes() -> None:
    model = build_tiny_lisa(seed=1).model
    names = set_trainable(model, TRAINABLE)
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith(tuple(TRAINABLE)), name
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    for prefix in TRAINABLE:
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize(
    "prefixes", [["model.no_such_module"], ["model.text_hidden_fcs", "model.visual_model.mask_dec0der"]]
)
def test_set_trainable_prefix_matching_nothing(prefixes: list[str]) -> None:
    model = build_tiny_lisa(seed=1).model
    with pytest.raises(ValueError) as err:
        set_trainable(model, prefixes)
    assert prefixes[-1] in str(err.value)


def test_one_step_changes_only_trainable_parameters(samples: list[TrainingSample]) -> None:
    bundle = build_tiny_lisa(seed=2)
    pipe = SegmentationPipeline(bundle)
    set_trainable(bundle.model, TRAINABLE)
    before = params(bundle.model)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=1e-2)  # every parameter: freezing must hold
    training_loss(pipe, samples).loss.backward()
    with_grad = {n for n, p in bundle.model.named_parameters() if p.grad is not None}
    trainable = {n for n in before if n.startswith(tuple(TRAINABLE))}
    # multimask_output=False leaves SAM's IoU head out of the graph; everything else trainable gets a grad
    assert with_grad == {n for n in trainable if ".iou_prediction_head." not in n}
    optimizer.step()
    after = params(bundle.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert with_grad <= changed <= trainable, sorted(changed - trainable)[:5]


@pytest.mark.slow
def test_repeating_one_batch_lowers_the_loss(samples: list[TrainingSample]) -> None:
    bundle = build_tiny_lisa(seed=3)
    pipe = SegmentationPipeline(bundle)
    set_trainable(bundle.model, TRAINABLE)
    optimizer = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(10):
        optimizer.zero_grad()
        parts = training_loss(pipe, samples)
        parts.loss.backward()
        optimizer.step()
        history.append(parts.scalars())
    with torch.no_grad():
        history.append(training_loss(pipe, samples).scalars())
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"], history
    # only the mask terms can move (the LLM is frozen): they fall, the CE term stays put
    mask_first = first["mask_bce_loss"] + first["mask_dice_loss"]
    assert last["mask_bce_loss"] + last["mask_dice_loss"] < 0.95 * mask_first, history
    assert last["ce_loss"] == pytest.approx(first["ce_loss"], rel=1e-5)


# -- loss formulas vs numpy -----------------------------------------------------------------------
def np_sigmoid_ce(logits: np.ndarray, targets: np.ndarray, num_masks: float) -> float:
    per_pixel = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    return float(per_pixel.reshape(len(logits), -1).mean(1).sum() / (num_masks + 1e-8))


def np_dice(logits: np.ndarray, targets: np.ndarray, num_masks: float, scale: float = 1000.0,
            eps: float = 1e-6) -> float:
    p = (1 / (1 + np.exp(-logits))).reshape(len(logits), -1)
    t = targets.reshape(len(targets), -1)
    num = 2 * (p / scale * t).sum(1)
    den = (p / scale).sum(1) + (t / scale).sum(1)
    return float((1 - (num + eps) / (den + eps)).sum() / (num_masks + 1e-8))


@pytest.mark.parametrize("num_masks", [3, 1.5])
def test_mask_losses_vs_numpy(num_masks: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 5, 7))
    targets = (rng.random((3, 5, 7)) > 0.6).astype(np.float64)
    targets[2] = 0  # an empty mask
    lt, tt = torch.tensor(logits, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)
    expected_bce = np_sigmoid_ce(logits, targets, num_masks)
    assert sigmoid_ce_loss(lt, tt, num_masks).item() == pytest.approx(expected_bce, rel=1e-5)
    assert dice_loss(lt, tt, num_masks).item() == pytest.approx(np_dice(logits, targets, num_masks), rel=1e-5)


def test_mask_losses_known_values() -> None:
    # logit 0 -> p = 1/2: BCE = log 2 everywhere; Dice with all-ones target = 1 - 2*(n/2)/(n/2 + n) = 1/3
    logits, targets = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    assert sigmoid_ce_loss(logits, targets, 1).item() == pytest.approx(np.log(2), rel=1e-6)
    assert dice_loss(logits, targets, 1).item() == pytest.approx(1 / 3, rel=1e-4)


def independent_loss(pipe: SegmentationPipeline, samples: list[TrainingSample],
                     weights: LossWeights) -> dict[str, float]:
    """LISA's loss from a plain HF forward: CE over answer tokens (incl. </s>), BCE / Dice per mask."""
    model, tok = pipe.model, pipe.bundle.token_ids
    vocab = pipe.bundle.tokenizer.get_vocab()
    ce_sum, ce_count, bce, dice, num_masks = 0.0, 0, 0.0, 0.0, 0
    for s in samples:
        prompt = tokenize_with_image(build_prompt(s.text, s.is_sentence, answer=None), pipe.bundle.tokenizer)
        full = tokenize_with_image(build_prompt(s.text, s.is_sentence, answer=s.answer), pipe.bundle.tokenizer)
        answer = [vocab[w] for w in s.answer.replace(",", " ,").replace(".", " .").split()] + [tok.eos]
        assert full == prompt + answer
        enc = pipe.encode_image(s.image)
        n = enc.image_embeds.shape[1]
        at = full.index(IMAGE_PLACEHOLDER_ID)
        with torch.no_grad():
            embeds = torch.cat([model.model.embed_tokens(torch.tensor(full[:at])), enc.image_embeds[0],
                                model.model.embed_tokens(torch.tensor(full[at + 1:]))])
            hidden = model.model(inputs_embeds=embeds[None]).last_hidden_state[0]
            expanded = full[:at] + [-1] * n + full[at + 1:]
            first = len(prompt) - 1 + n  # expanded index of the first answer token
            logits = model.lm_head(hidden).double().numpy()
            for row in range(first, len(expanded)):
                z = logits[row - 1]
                ce_sum += np.log(np.exp(z - z.max()).sum()) + z.max() - z[expanded[row]]
                ce_count += 1
            seg_rows = [i - 1 for i, t in enumerate(expanded) if t == tok.seg]
            low = decode_masks(model.sam, enc.sam_embedding, model.seg_head(hidden[seg_rows]))
            pred = sam_postprocess(low, enc.resized_size, enc.original_size).double().numpy()
        k = len(s.gt_masks)
        bce += np_sigmoid_ce(pred, s.gt_masks, k) * k
        dice += np_dice(pred, s.gt_masks, k) * k
        num_masks += k
    ce = ce_sum / ce_count
    bce, dice = weights.bce * bce / num_masks, weights.dice * dice / num_masks
    return {"loss": weights.ce * ce + bce + dice, "ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice}


@pytest.mark.parametrize("weights", [LossWeights(), LossWeights(ce=0.3, bce=1.0, dice=4.0)])
def test_training_loss_parts_vs_independent_computation(tiny_bundle: LisaBundle, samples: list[TrainingSample],
                                                        weights: LossWeights) -> None:
    assert (LossWeights().ce, LossWeights().bce, LossWeights().dice) == (1.0, 2.0, 0.5)  # LISA's weights
    pipe = SegmentationPipeline(tiny_bundle)
    with torch.no_grad():
        got = training_loss(pipe, samples, weights).scalars()
    expected = independent_loss(pipe, samples, weights)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_seg_count_must_match_masks(tiny_bundle: LisaBundle) -> None:
    sample = make_samples()[1]
    sample.gt_masks = sample.gt_masks[:1]  # two [SEG] in the answer, one mask
    with torch.no_grad(), pytest.raises(ValueError, match="2 \\[SEG\\] tokens but 1 masks"):
        training_loss(SegmentationPipeline(tiny_bundle), [sample])
