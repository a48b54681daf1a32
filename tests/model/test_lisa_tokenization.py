"""Golden tests: prompts tokenized as LISA's transformers 4.31 slow LlamaTokenizer does it.

Expected token strings are written out by hand from the rules (docs/design.md, "Tokenization as LISA
runs it"), not produced by the code under test:
- the prompt is split on ``<image>`` first; only the first chunk gets ``<s>``;
- added tokens without strip flags (``<im_start>``, ``<im_end>``, ``[SEG]``) eat the whitespace on
  both sides; the special tokens ``<s>``, ``</s>``, ``<unk>`` (AddedToken lstrip=rstrip=False) eat none;
- every plain piece is encoded on its own: with sentencepiece that is with the dummy prefix '▁'
  and byte fallback ('狗' = UTF-8 E7 8B 97, 'ü' = C3 BC, '\\n' = 0A);
- ``legacy: false``: pieces after the first that do not start with a space lose the leading '▁'
  of their first token ('What', '.').

The sentencepiece vocabulary (tests/model/test_released_tokenizer.py, ``llama_like``) holds every word
of these prompts as one piece with '▁' ('▁What'), punctuation as its own piece (sentencepiece
splits by Unicode script: "human's" -> '▁human' "'" 's'), plus 'What' and '▁.'.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from model.bundle import LisaBundle
from model.checkpoint import load_tokenizer, save_tokenizer
from model.lisa import LisaExtras
from model.pipeline import Query, SegmentationPipeline
from model.prompt import (
    IMAGE_PLACEHOLDER_ID,
    build_prompt,
    chat_prompt,
    legacy_spacing,
    sentencepiece_model_file,
    split_on_added_tokens,
    tokenize_text,
    tokenize_with_image,
    with_mask_request,
)
from model.tokenizer import build_tiny_tokenizer
from tests.conftest import random_pil_image
from tests.model.test_released_tokenizer import write_released_tokenizer

IMG = "<IMAGE>"
SYSTEM = (
    "▁A ▁chat ▁between ▁a ▁curious ▁human ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The "
    "▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁human ' s ▁questions ."
).split()
QUESTION = "▁is ▁the ▁dog ▁on ▁the ▁left ▁in ▁this ▁image ? ▁Please ▁output ▁segmentation ▁mask .".split()
REQUEST = "▁Please ▁output ▁segmentation ▁mask .".split()


def as_strings(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    return [IMG if i == IMAGE_PLACEHOLDER_ID else tokenizer.convert_ids_to_tokens(i) for i in ids]


def load_paths(directory: Path, saved: Path, fast_only: Path) -> dict[str, PreTrainedTokenizerBase]:
    """The ways a tokenizer reaches the project: the checkpoint loader on the released layout
    (tokenizer.model + added_tokens.json, converted by transformers 5), AutoTokenizer directly on
    it, what the project's checkpoint writer saves (tokenizer.json + tokenizer.model), and a
    tokenizer.json alone (no sentencepiece model: the fast tokenizer encodes every piece)."""
    loaded = load_tokenizer(directory, LlamaConfig(vocab_size=700))
    save_tokenizer(loaded, saved)
    for path in saved.iterdir():
        if path.name != "tokenizer.model":
            shutil.copy(path, fast_only / path.name)
    return {"checkpoint": loaded, "auto": AutoTokenizer.from_pretrained(directory),
            "tokenizer_json": AutoTokenizer.from_pretrained(saved),
            "fast_only": AutoTokenizer.from_pretrained(fast_only)}


@pytest.fixture(scope="module", params=[None, False], ids=["legacy_absent", "legacy_false"])
def sp_tokenizers(request, tmp_path_factory) -> tuple[bool, dict[str, PreTrainedTokenizerBase]]:
    directory = tmp_path_factory.mktemp("tok")
    write_released_tokenizer(directory, legacy=request.param, llama_like=True)
    assert (directory / "tokenizer.model").is_file() and not (directory / "tokenizer.json").exists()
    legacy = request.param is None
    tokenizers = load_paths(directory, tmp_path_factory.mktemp("saved"), tmp_path_factory.mktemp("fast"))
    saved = tokenizers["tokenizer_json"]
    assert sentencepiece_model_file(saved) == Path(saved.name_or_path) / "tokenizer.model"
    assert sentencepiece_model_file(tokenizers["fast_only"]) is None
    return legacy, tokenizers


def check_all(sp_tokenizers, prompt: str, expected_legacy: list[str], expected_new: list[str]) -> None:
    legacy, tokenizers = sp_tokenizers
    expected = expected_legacy if legacy else expected_new
    for path, tokenizer in tokenizers.items():
        assert legacy_spacing(tokenizer) is legacy, path
        assert as_strings(tokenizer, tokenize_with_image(prompt, tokenizer)) == expected, path


def test_validation_prompt_phrase(sp_tokenizers) -> None:
    prompt = build_prompt("the dog on the left", is_sentence=False)
    head = ["<s>", *SYSTEM, "▁USER", ":", "<im_start>", IMG, "<im_end>"]
    legacy = [*head, "▁What", *QUESTION, "▁ASSISTANT", ":", "[SEG]", "▁.", "</s>"]
    new = [*head, "What", *QUESTION, "▁ASSISTANT", ":", "[SEG]", ".", "</s>"]
    check_all(sp_tokenizers, prompt, legacy, new)


def test_non_ascii_sentence_uses_byte_fallback(sp_tokenizers) -> None:
    prompt = build_prompt("the dog 狗 ü on the left", is_sentence=True)
    head = ["<s>", *SYSTEM, "▁USER", ":", "<im_start>", IMG, "<im_end>"]
    middle = ["▁dog", "▁", "<0xE7>", "<0x8B>", "<0x97>", "▁", "<0xC3>", "<0xBC>", "▁on", "▁the", "▁left",
              *REQUEST, "▁ASSISTANT", ":", "[SEG]"]
    check_all(sp_tokenizers, prompt, [*head, "▁the", *middle, "▁.", "</s>"], [*head, "the", *middle, ".", "</s>"])


def test_training_answer(sp_tokenizers) -> None:
    prompt = build_prompt("the dog on the left", is_sentence=False, answer="Sure, it is [SEG].")
    head = ["<s>", *SYSTEM, "▁USER", ":", "<im_start>", IMG, "<im_end>"]
    tail = [*QUESTION, "▁ASSISTANT", ":", "▁Sure", ",", "▁it", "▁is", "[SEG]"]
    check_all(sp_tokenizers, prompt, [*head, "▁What", *tail, "▁.", "</s>"], [*head, "What", *tail, ".", "</s>"])


def test_generation_prompt_ends_at_assistant(sp_tokenizers) -> None:
    prompt = build_prompt("the dog on the left", is_sentence=False, answer=None)
    head = ["<s>", *SYSTEM, "▁USER", ":", "<im_start>", IMG, "<im_end>"]
    tail = [*QUESTION, "▁ASSISTANT", ":"]
    check_all(sp_tokenizers, prompt, [*head, "▁What", *tail], [*head, "What", *tail])


def test_without_im_start_end(sp_tokenizers) -> None:
    """``mm_use_im_start_end: false``: ``USER: <image>\\n What``: nothing strips the space before the
    slot nor the newline after it; the second chunk is encoded on its own (dummy prefix, '\\n' as a
    byte), the same with both legacy settings (its first piece is the text's first piece)."""
    prompt = build_prompt("the dog on the left", is_sentence=False, use_im_start_end=False)
    expected = ["<s>", *SYSTEM, "▁USER", ":", "▁", IMG, "▁", "<0x0A>", "▁What", *QUESTION,
                "▁ASSISTANT", ":", "[SEG]"]
    check_all(sp_tokenizers, prompt, [*expected, "▁.", "</s>"], [*expected, ".", "</s>"])


def test_chat_prompt_as_typed(sp_tokenizers) -> None:
    prompt = chat_prompt("What is the dog?")
    head = ["<s>", *SYSTEM, "▁USER", ":", "<im_start>", IMG, "<im_end>"]
    tail = ["▁is", "▁the", "▁dog", "?", "▁ASSISTANT", ":"]
    check_all(sp_tokenizers, prompt, [*head, "▁What", *tail], [*head, "What", *tail])


def test_eos_keeps_its_neighbours_spaces(sp_tokenizers) -> None:
    """``</s>`` is special with lstrip=rstrip=False: " dog " keeps its spaces (trailing '▁'; the
    leading space of " on" plus the dummy prefix give '▁' '▁on'); [SEG] strips them.

    Without tokenizer.model the fast tokenizer's Metaspace adds no '▁' before an existing one, so
    ``fast_only`` gives '▁on' alone here; the loaders keep the sentencepiece model for this reason.
    """
    legacy, tokenizers = sp_tokenizers
    for path, tokenizer in tokenizers.items():
        if path == "fast_only":
            continue
        got = tokenizer.convert_ids_to_tokens(tokenize_text("the dog </s> on [SEG] left", tokenizer))
        left = "▁left" if legacy else "left"  # legacy false: the first piece alone keeps its '▁'
        assert got == ["▁the", "▁dog", "▁", "</s>", "▁", "▁on", "[SEG]", left], path


# -- the tiny word-level tokenizer: same splitting and stripping ----------------------------------
def test_tiny_tokenizer_pieces_by_hand() -> None:
    tokenizer = build_tiny_tokenizer()
    assert legacy_spacing(tokenizer) is True
    text = "<im_end>\n What is it? ASSISTANT:  [SEG] . </s> x"
    assert split_on_added_tokens(text, tokenizer) == [
        ("<im_end>", True), ("What is it? ASSISTANT:", False), ("[SEG]", True), (". ", False),
        ("</s>", True), (" x", False),
    ]
    assert split_on_added_tokens("USER: <im_start>", tokenizer) == [("USER:", False), ("<im_start>", True)]
    vocab = tokenizer.get_vocab()
    ids = tokenize_with_image(build_prompt("dog", is_sentence=False), tokenizer)
    assert ids[0] == vocab["<s>"] and ids.count(vocab["<s>"]) == 1
    assert ids[-5:] == [vocab["ASSISTANT"], vocab[":"], vocab["[SEG]"], vocab["."], vocab["</s>"]]


# -- mm_use_im_start_end from the checkpoint config reaches the prompt ----------------------------
@pytest.mark.slow
def test_pipeline_honours_mm_use_im_start_end(tiny_bundle: LisaBundle) -> None:
    model, vocab = tiny_bundle.model, tiny_bundle.tokenizer.get_vocab()
    pipe = SegmentationPipeline(tiny_bundle)
    with_markers = pipe.prompt_ids("dog", False)
    config = LlamaConfig.from_dict(model.config.to_dict() | {"mm_use_im_start_end": False})
    original = model.extras
    try:
        model.extras = LisaExtras.from_config(config)  # what loading such a checkpoint gives
        assert pipe.use_im_start_end is False
        ids, chat_ids = pipe.prompt_ids("dog", False), pipe.chat_ids("What is the dog?")
        result = pipe.segment(random_pil_image(20, 24, seed=2), [Query("dog", False, "q")])[0]
    finally:
        model.extras = original
    for seq in (ids, chat_ids):
        assert vocab["<im_start>"] not in seq and vocab["<im_end>"] not in seq
        at = seq.index(IMAGE_PLACEHOLDER_ID)
        assert seq[at - 2:at] == [vocab["USER"], vocab[":"]] and seq[at + 1] == vocab["What"]
    marked = with_markers.index(IMAGE_PLACEHOLDER_ID)
    assert with_markers[marked - 1] == vocab["<im_start>"] and with_markers[marked + 1] == vocab["<im_end>"]
    assert len(with_markers) == len(ids) + 2
    # the whole prompt reached the decoder: slot + text rows, two fewer than with the markers
    assert result.total_tokens[0] == len(ids) - 1 + pipe.num_image_tokens


def test_chat_sends_the_text_as_typed(tiny_bundle: LisaBundle) -> None:
    pipe = SegmentationPipeline(tiny_bundle)
    typed = "What is the dog? Please output segmentation mask."
    assert chat_prompt(typed) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>\n"
        "What is the dog? Please output segmentation mask. ASSISTANT:"
    )
    vocab = tiny_bundle.tokenizer.get_vocab()
    assert pipe.chat_ids(typed).count(vocab["segmentation"]) == 1
    assert pipe.chat_ids("What is the dog?").count(vocab["segmentation"]) == 0
    assert with_mask_request("What is the dog?") == typed


@pytest.mark.parametrize("text, is_sentence", [("the dog on the left", False), ("what can hold hot soup", True)])
def test_expression_span_covers_exactly_the_users_words(sp_tokenizers, text: str, is_sentence: bool) -> None:
    """The span Simignore compares with: its pieces spell the expression, and the ids around it are the
    prompt's own (the span is cut out of the very ids evaluation uses)."""
    from model.prompt import expression_span

    _, tokenizers = sp_tokenizers
    for path, tokenizer in tokenizers.items():
        ids = tokenize_with_image(build_prompt(text, is_sentence=is_sentence), tokenizer)
        start, end = expression_span(text, is_sentence, tokenizer)
        pieces = as_strings(tokenizer, ids[start:end])
        assert "".join(pieces).replace("▁", " ").strip() == text, (path, pieces)
        assert IMG in as_strings(tokenizer, ids[:start]) and "ASSISTANT" in "".join(as_strings(tokenizer, ids[end:]))
