"""A checkpoint whose tokenizer is in the released LISA layout (sentencepiece tokenizer.model +
added_tokens.json, LlamaTokenizer) loads through the user-facing loader, ids read from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from transformers import AutoTokenizer

from model.builder import build_tiny_lisa
from model.checkpoint import load_lisa_checkpoint, save_lisa_checkpoint
from model.pipeline import Query, SegmentationPipeline
from model.prompt import SYSTEM_PROMPT

ADDED = ["<im_patch>", "<im_start>", "<im_end>", "[SEG]"]


#: Sentences for the LLaMA-like vocabulary: every word of the golden prompts becomes one piece
#: ('▁What'); '"What"' and ' .' give the pieces 'What' and '▁.' that the LLaMA vocabulary also has.
LLAMA_LIKE_CORPUS = [
    SYSTEM_PROMPT,
    "USER: What is the dog on the left in this image? Please output segmentation mask. ASSISTANT: Sure, it is the cat.",
    '"What" "Sure" . . .',
]


def write_released_tokenizer(directory: Path, vocab_size: int = 96, *, legacy: bool | None = False,
                             llama_like: bool = False) -> None:
    """tokenizer.model (sentencepiece BPE) + tokenizer_config/special_tokens_map/added_tokens.

    ``legacy``: the tokenizer_config.json flag (None: absent, as in LISA-7B-v1). ``llama_like``:
    train as LLaMA's tokenizer.model is set up (byte fallback, no normalisation, whitespace kept)
    on ``LLAMA_LIKE_CORPUS`` with room for whole-word pieces.
    """
    corpus = directory / "corpus.txt"
    if llama_like:
        corpus.write_text("\n".join(LLAMA_LIKE_CORPUS * 40))
        options = dict(vocab_size=700, hard_vocab_limit=False, byte_fallback=True, normalization_rule_name="identity",
                       remove_extra_whitespaces=False, split_digits=True)
    else:
        lines = [SYSTEM_PROMPT, "What is the red car in this image? Please output segmentation mask.",
                 "USER: ASSISTANT: Sure, it is the dog on the left."]
        corpus.write_text("\n".join(lines * 40))
        options = dict(vocab_size=vocab_size)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2, **options,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    pieces = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).get_piece_size()
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 512, "padding_side": "right", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>",
    }
    if legacy is not None:
        config["legacy"] = legacy
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    # as LISA-7B-v1's: with plain strings 4.31 would strip the whitespace around </s>
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", **flags}, "eos_token": {"content": "</s>", **flags},
         "unk_token": {"content": "<unk>", **flags}, "pad_token": "<unk>"}))
    (directory / "added_tokens.json").write_text(json.dumps({t: pieces + i for i, t in enumerate(ADDED)}))


def test_checkpoint_with_sentencepiece_tokenizer_loads(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_released_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    assert tokenizer.convert_tokens_to_ids("[SEG]") == 99
    bundle = build_tiny_lisa(seed=3, tokenizer=tokenizer)
    assert bundle.token_ids.seg == 99 and bundle.token_ids.im_start == 97
    ckpt, clip = tmp_path / "LISA-tiny", tmp_path / "clip"
    save_lisa_checkpoint(bundle, ckpt, max_shard_bytes=200_000)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (ckpt / name).unlink(missing_ok=True)
    for path in tok_dir.iterdir():  # the released layout, not what save_pretrained writes
        shutil.copy(path, ckpt / path.name)
    bundle.model.vision_tower.clip.save_pretrained(clip)
    bundle.model.vision_tower.processor.save_pretrained(clip)

    loaded = load_lisa_checkpoint(ckpt, clip)
    assert loaded.token_ids == bundle.token_ids
    image = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    queries = [Query("the red car", False, "a"), Query("the dog on the left", True, "b")]
    before = SegmentationPipeline(bundle).segment(image, queries)
    after = SegmentationPipeline(loaded).segment(image, queries)
    for a, b in zip(before, after):
        assert torch.equal(a.seg_embeddings, b.seg_embeddings)
        assert np.array_equal(a.masks, b.masks)
