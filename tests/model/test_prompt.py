"""LISA's prompt text (llava_v1), its tokenization with an image slot, and the [SEG]-row rule."""

from __future__ import annotations

import re

import pytest
import torch

from model.inference import expand_image_slots
from model.prompt import IMAGE_PLACEHOLDER_ID, build_prompt, seg_query_rows, tokenize_with_image
from model.tokenizer import build_tiny_tokenizer

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
SEG = 96  # an arbitrary id for hand-written sequences


# -- prompt text ----------------------------------------------------------------------------------
def test_sentence_prompt_exact() -> None:
    expected = (SYSTEM + " USER: <im_start><image><im_end>\n the man holding a red cup Please output "
                "segmentation mask. ASSISTANT: [SEG].</s>")
    assert build_prompt("the man holding a red cup", True) == expected


def test_phrase_prompt_exact() -> None:
    expected = (SYSTEM + " USER: <im_start><image><im_end>\n What is left dog in this image? Please output "
                "segmentation mask. ASSISTANT: [SEG].</s>")
    assert build_prompt("left dog", False) == expected


def test_prompt_without_answer_ends_at_assistant() -> None:
    assert build_prompt("cat", False, answer=None) == (
        SYSTEM + " USER: <im_start><image><im_end>\n What is cat in this image? Please output segmentation mask."
        " ASSISTANT:")
    assert build_prompt("the cat", True, answer=None) == (
        SYSTEM + " USER: <im_start><image><im_end>\n the cat Please output segmentation mask. ASSISTANT:")


def test_prompt_with_training_answer() -> None:
    assert build_prompt("cat", False, answer="Sure, it is [SEG].") == (
        SYSTEM + " USER: <im_start><image><im_end>\n What is cat in this image? Please output segmentation mask. "
        "ASSISTANT: Sure, it is [SEG].</s>")


# -- tokenization ---------------------------------------------------------------------------------
ATOMIC = ("<im_start>", "<im_end>", "[SEG]", "</s>")


def hand_tokenize(text: str, vocab: dict[str, int]) -> list[int]:
    """Word-level ids for ``text``: LISA's added tokens whole, else words and punctuation."""
    pattern = "|".join(re.escape(t) for t in ATOMIC) + r"|\w+|[^\w\s]"
    return [vocab.get(piece, vocab["<unk>"]) for piece in re.findall(pattern, text)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("is_sentence", [True, False])
@pytest.mark.parametrize("answer", ["[SEG].", "Sure, it is [SEG].", None])
def test_tokenize_with_image_by_hand(tokenizer, is_sentence: bool, answer: str | None) -> None:
    vocab = tokenizer.get_vocab()
    prompt = build_prompt("the dog on the left", is_sentence, answer=answer)
    before, after = prompt.split("<image>")
    expected = [vocab["<s>"], *hand_tokenize(before, vocab), IMAGE_PLACEHOLDER_ID, *hand_tokenize(after, vocab)]
    ids = tokenize_with_image(prompt, tokenizer)
    assert ids == expected
    assert ids.count(IMAGE_PLACEHOLDER_ID) == 1
    assert ids.count(vocab["<s>"]) == 1 and ids[0] == vocab["<s>"]
    at = ids.index(IMAGE_PLACEHOLDER_ID)
    assert ids[at - 1] == vocab["<im_start>"] and ids[at + 1] == vocab["<im_end>"]
    if answer is None:
        assert ids[-2:] == [vocab["ASSISTANT"], vocab[":"]]
    else:
        assert ids[-3:] == [vocab["[SEG]"], vocab["."], tokenizer.eos_token_id]
        assert ids.count(vocab["[SEG]"]) == 1


@pytest.mark.parametrize("prompt", ["no image here [SEG].", "<image> and <image>"])
def test_tokenize_needs_exactly_one_image(tokenizer, prompt: str) -> None:
    with pytest.raises(ValueError, match="<image>"):
        tokenize_with_image(prompt, tokenizer)


# -- [SEG] rows -----------------------------------------------------------------------------------
def test_seg_query_rows_hand_written() -> None:
    assert seg_query_rows(torch.tensor([1, 5, 7, SEG, 3, 2]), SEG).tolist() == [2]
    assert seg_query_rows(torch.tensor([1, 5, SEG, 9, 9, SEG, 4, SEG]), SEG).tolist() == [1, 4, 6]
    assert seg_query_rows(torch.tensor([1, SEG, SEG]), SEG).tolist() == [0, 1]
    assert seg_query_rows(torch.tensor([1, 5, 7]), SEG).tolist() == []


def test_seg_at_position_zero_is_an_error() -> None:
    with pytest.raises(ValueError, match="position 0"):
        seg_query_rows(torch.tensor([SEG, 4, 5]), SEG)


def test_seg_rows_in_expanded_batch() -> None:
    n, pad = 5, 0
    prefix_a, suffix_a = [1, 11, 12], [13, 14, SEG, 15, 2]  # [SEG] at suffix offset 2
    prefix_b, suffix_b = [1, 11], [13, SEG, 16, 17, SEG, 15, 2]  # offsets 1 and 4
    batch = expand_image_slots([prefix_a + [IMAGE_PLACEHOLDER_ID] + suffix_a,
                                prefix_b + [IMAGE_PLACEHOLDER_ID] + suffix_b], n, pad)
    len_a, len_b = len(prefix_a) + n + len(suffix_a), len(prefix_b) + n + len(suffix_b)
    assert batch.lengths.tolist() == [len_a, len_b]
    assert batch.ids.shape == (2, max(len_a, len_b))
    # layout: prefix | N image rows (pad id) | suffix | right padding
    assert batch.ids[0, :len_a].tolist() == prefix_a + [pad] * n + suffix_a
    assert batch.ids[1, :len_b].tolist() == prefix_b + [pad] * n + suffix_b
    assert batch.is_image[0].tolist() == [False] * 3 + [True] * n + [False] * (batch.ids.shape[1] - 3 - n)
    assert batch.is_image[1].tolist() == [False] * 2 + [True] * n + [False] * (batch.ids.shape[1] - 2 - n)
    assert batch.valid.sum(1).tolist() == [len_a, len_b]
    assert not batch.valid[0, len_a:].any() and (batch.ids[0, len_a:] == pad).all()
    # row = len(prefix) + N + offset - 1
    rows_a = seg_query_rows(batch.ids[0, :len_a], SEG).tolist()
    rows_b = seg_query_rows(batch.ids[1, :len_b], SEG).tolist()
    assert rows_a == [len(prefix_a) + n + 2 - 1]
    assert rows_b == [len(prefix_b) + n + 1 - 1, len(prefix_b) + n + 4 - 1]


def test_seg_right_after_image_points_at_last_image_row() -> None:
    n = 4
    batch = expand_image_slots([[1, 7, IMAGE_PLACEHOLDER_ID, SEG, 2]], n, 0)
    row = seg_query_rows(batch.ids[0], SEG).tolist()
    assert row == [2 + n - 1] and bool(batch.is_image[0, row[0]])


@pytest.mark.parametrize("ids", [[1, 2, 3], [1, IMAGE_PLACEHOLDER_ID, 3, IMAGE_PLACEHOLDER_ID]])
def test_expand_needs_exactly_one_slot(ids: list[int]) -> None:
    with pytest.raises(ValueError, match="exactly one image slot"):
        expand_image_slots([ids], 4, 0)
