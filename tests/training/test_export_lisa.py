"""The released-layout export (training/export.py ``save_released``, train_ds.py's ``<run>/final/lisa``) loads
in LISA's own code as a released checkpoint does: its files, its config fields, and the ids LISA's
transformers 4.31 slow tokenizer gives ``[SEG]``, ``<im_start>``, ``<im_end>``, which must index the
checkpoint's own rows.

``lisa_431_token_ids`` reads an exported directory by 4.31's rules, written out here from its source (not by
the code under test): ``AutoTokenizer.from_pretrained(dir, use_fast=False)`` resolves ``tokenizer_class`` of
tokenizer_config.json; ``LlamaTokenizer`` reads the sentencepiece tokenizer.model only (tokenizer.json is
ignored), ``PreTrainedTokenizerFast`` reads tokenizer.json. ``PreTrainedTokenizerBase._from_pretrained`` then
adds added_tokens.json's tokens in id order; a slow tokenizer refuses an id that is not the next row
("Non-consecutive added token"). LISA's train_ds.py then calls ``add_tokens("[SEG]")`` and, with
``use_mm_start_end``, ``add_tokens([<im_start>, <im_end>], special_tokens=True)`` (a token already known keeps
its id; a new one gets the next row) and ``resize_token_embeddings(len(tokenizer))``; its chat.py takes
``tokenizer("[SEG]", add_special_tokens=False).input_ids[0]``. Real transformers 4.31 gave the same ids on
these exports, and the same token ids as the project's tokenizer path for every prompt of ``PROMPTS``
(docs/fidelity.md, "The released layout").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from model.builder import ToySizes, build_tiny_lisa, build_toy_lisa
from model.bundle import LisaBundle
from model.checkpoint import load_tokenizer, read_lisa_config
from model.prompt import build_prompt, chat_prompt, tokenize_with_image
from tests.model.test_released_tokenizer import write_released_tokenizer
from training.export import save_released
from training.params import Trainable

#: The files of a released LISA checkpoint (xinlai/LISA-7B-v1) besides its weight shards.
RELEASED_FILES = {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json"}
#: config.json fields LISA's code reads when it builds a released checkpoint (model/LISA.py: ``train_mask_decoder``
#: present selects the released path and builds SAM and text_hidden_fcs from ``out_dim``; ``vision_tower`` becomes
#: ``mm_vision_tower``; model/llava: the CLIP tower's ``mm_vision_select_layer`` / ``_feature``, the projector's
#: ``mm_hidden_size``, the prompt's ``mm_use_im_start_end``), with the values LISA-7B-v1 has where they are fixed.
LISA_FIELDS = {"train_mask_decoder": True, "mm_vision_select_feature": "patch", "mm_use_im_patch_token": False,
               "use_mm_proj": True, "image_aspect_ratio": "square", "architectures": ["LISAForCausalLM"],
               "model_type": "llava"}
LISA_FIELDS_PRESENT = ("out_dim", "vision_tower", "mm_vision_tower", "mm_vision_select_layer", "mm_hidden_size",
                       "mm_use_im_start_end", "torch_dtype", "vocab_size")


PROMPTS = [build_prompt("the dog on the left", is_sentence=False),
           build_prompt("what is it", is_sentence=True, answer="Sure, it is [SEG]. ok</s> next"),
           chat_prompt("What is the dog?")]


def lisa_431_token_ids(directory: Path, use_mm_start_end: bool = True) -> dict[str, int]:
    """The ids LISA's code (transformers 4.31, ``use_fast=False``) gives its tokens on ``directory``, and
    ``rows``: ``len(tokenizer)`` after its ``add_tokens``, which ``resize_token_embeddings`` makes the row count."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    kind = config.get("tokenizer_class")
    if kind == "LlamaTokenizer":
        processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
        slow = True
    elif kind == "PreTrainedTokenizerFast":
        vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)
        processor, slow = None, False
    else:
        raise AssertionError(f"4.31's AutoTokenizer cannot resolve tokenizer_class {kind!r}")
    added: list[str] = []
    added_file = directory / "added_tokens.json"
    for token, index in sorted(json.loads(added_file.read_text()).items() if added_file.is_file() else [],
                               key=lambda item: item[1]):
        if slow and index != len(vocab):
            raise AssertionError(f"4.31: Non-consecutive added token {token!r}: should have index {len(vocab)}")
        if not slow and index != len(vocab) and vocab.get(token) != index:
            raise AssertionError(f"4.31: added token {token!r} has index {index}, not in the vocabulary at it")
        vocab.setdefault(token, len(vocab))
        added.append(token)

    def chat_seg() -> int:  # tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
        if "[SEG]" in added or processor is None:
            return vocab["[SEG]"]
        return processor.encode("[SEG]")[0]

    ids = {"chat_seg": chat_seg()}
    for token in ["[SEG]"] + (["<im_start>", "<im_end>"] if use_mm_start_end else []):  # train_ds.py's add_tokens
        vocab.setdefault(token, len(vocab))
    ids.update(seg=vocab["[SEG]"], im_start=vocab["<im_start>"], im_end=vocab["<im_end>"], rows=len(vocab))
    return ids


def trained(bundle: LisaBundle) -> LisaBundle:
    """As after training: the rows of LISA's added tokens hold values no other row has."""
    with torch.no_grad():
        for token_id in (bundle.token_ids.seg, bundle.token_ids.im_start, bundle.token_ids.im_end):
            bundle.model.model.embed_tokens.weight[token_id] = 100.0 + token_id
            bundle.model.lm_head.weight[token_id] = -100.0 - token_id
    return bundle


def check_round_trip(bundle: LisaBundle, out: Path, *, sentencepiece: bool) -> None:
    ids = lisa_431_token_ids(out)
    token_ids = bundle.token_ids
    assert (ids["seg"], ids["chat_seg"], ids["im_start"], ids["im_end"]) == (
        token_ids.seg, token_ids.seg, token_ids.im_start, token_ids.im_end)
    files = {p.name for p in out.iterdir()}
    expected = RELEASED_FILES if sentencepiece else RELEASED_FILES - {"tokenizer.model"}
    assert expected <= files, expected - files
    config = json.loads((out / "config.json").read_text())
    assert {k: config.get(k) for k in LISA_FIELDS} == LISA_FIELDS
    assert all(config.get(k) is not None for k in LISA_FIELDS_PRESENT), config
    assert config["vision_tower"] == config["mm_vision_tower"]
    assert config["out_dim"] == bundle.model.sam.prompt_encoder.embed_dim

    reloaded = load_tokenizer(out, read_lisa_config(out))  # the project's own reading of the export
    for prompt in PROMPTS:
        assert tokenize_with_image(prompt, reloaded) == tokenize_with_image(prompt, bundle.tokenizer), prompt

    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    assert embed.shape[0] == head.shape[0] == ids["rows"] == config["vocab_size"]  # LISA's resize is a no-op
    model = bundle.model
    for token_id in (ids["seg"], ids["im_start"], ids["im_end"]):
        assert torch.equal(embed[token_id], model.model.embed_tokens.weight[token_id].detach())
        assert torch.equal(head[token_id], model.lm_head.weight[token_id].detach())


@pytest.mark.parametrize("legacy", [None, False], ids=["legacy_absent", "legacy_false"])
def test_tiny_sentencepiece_export_gives_lisa_its_token_rows(tmp_path: Path, legacy: bool | None) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_released_tokenizer(tok_dir, legacy=legacy)
    bundle = trained(build_tiny_lisa(seed=2, num_layers=2, tokenizer=AutoTokenizer.from_pretrained(tok_dir)))
    assert bundle.token_ids.seg == 99  # 96 sentencepiece pieces, then <im_patch> <im_start> <im_end> [SEG]
    out = Path(save_released(bundle, Trainable([]), tmp_path / "final")["checkpoint"])
    check_round_trip(bundle, out, sentencepiece=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["legacy"] is (legacy is None) and config["tokenizer_class"] == "LlamaTokenizer"
    assert json.loads((out / "added_tokens.json").read_text()) == {
        "<im_patch>": 96, "<im_start>": 97, "<im_end>": 98, "[SEG]": 99}
    # As LISA-7B-v1's: 4.31 sets these on the tokenizer, and a plain-string "</s>" would strip the spaces around it
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": {"content": "<s>", **flags}, "eos_token": {"content": "</s>", **flags},
        "unk_token": {"content": "<unk>", **flags}, "pad_token": "<unk>"}


def test_toy_word_level_export_gives_lisa_its_token_rows(tmp_path: Path) -> None:
    """The toy model's word-level tokenizer has no sentencepiece model (no tokenizer.model); 4.31 reads it from
    tokenizer.json as a PreTrainedTokenizerFast, even with use_fast=False."""
    bundle = trained(build_toy_lisa(seed=1, sizes=ToySizes(num_layers=1)))
    out = Path(save_released(bundle, Trainable([]), tmp_path / "final")["checkpoint"])
    check_round_trip(bundle, out, sentencepiece=False)
    assert not (out / "tokenizer.model").exists()


def test_added_tokens_that_4_31_would_refuse_are_refused_on_write() -> None:
    """A gap between the base vocabulary and the added tokens: 4.31's slow tokenizer refuses such an
    added_tokens.json, so the export refuses to write it, naming the tokens."""
    from model.checkpoint import released_added_tokens

    class Gapped:
        init_kwargs: dict = {}
        name_or_path = ""

        class backend_tokenizer:  # noqa: N801 (the attribute's name)
            @staticmethod
            def get_vocab_size(with_added_tokens: bool) -> int:
                return 10

        def get_added_vocab(self) -> dict[str, int]:
            return {"<s>": 1, "[SEG]": 11}

        def __len__(self) -> int:
            return 12

    with pytest.raises(ValueError, match=r"\[SEG\].*without a gap.*4\.31"):
        released_added_tokens(Gapped())
