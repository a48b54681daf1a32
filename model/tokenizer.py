"""A tiny word-level tokenizer with LISA's special tokens, built locally for tests and the demo."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from model.prompt import IM_END_TOKEN, IM_PATCH_TOKEN, IM_START_TOKEN, SEG_TOKEN, SYSTEM_PROMPT

_BASE_WORDS = (
    "what is in this image please output segmentation mask sure it the a an of on to and with "
    "left right front back top bottom middle person man woman child dog cat car bus chair table "
    "cup bottle bird horse red blue green white black small large big near far that can be used "
    "for something where which object thing I you What Please Sure It Yes"
)


def build_tiny_tokenizer(extra_words: str = "") -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<unk>=0, <s>=1, </s>=2``, words, then LISA's added tokens.

    Added tokens come last, as in LISA checkpoints (``<im_patch>, <im_start>, <im_end>, [SEG]``).
    """
    words = re.findall(r"\w+|[^\w\s]", f"{SYSTEM_PROMPT} USER ASSISTANT : . , ? ' {_BASE_WORDS} {extra_words}")
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.add_tokens([IM_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN], special_tokens=True)
    tokenizer.add_tokens([SEG_TOKEN])
    return tokenizer
