"""LISA's prompt (conversation template llava_v1) and its tokenization with an image slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IM_PATCH_TOKEN = "<im_patch>"
SEG_TOKEN = "[SEG]"
#: Placeholder id for the image slot in token sequences (LLaVA's IMAGE_TOKEN_INDEX).
IMAGE_PLACEHOLDER_ID = -200
DEFAULT_ANSWER = "[SEG]."

# LISA's training templates (utils/utils.py of dvlab-research/LISA), without their leading
# "<image>\n", which build_prompt places. Short phrases fill {class_name}, sentences {sent}.
SHORT_QUESTION_LIST = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTION_LIST = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
ANSWER_LIST = ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].",
               "[SEG].")


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of LISA's added tokens, always read from the tokenizer (they differ across models)."""

    seg: int
    im_start: int
    im_end: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
        vocab = tokenizer.get_vocab()
        missing = [t for t in (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks LISA's added tokens {missing}; a LISA tokenizer has "
                f"{SEG_TOKEN}, {IM_START_TOKEN}, {IM_END_TOKEN} among its added tokens"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        return cls(
            seg=vocab[SEG_TOKEN], im_start=vocab[IM_START_TOKEN], im_end=vocab[IM_END_TOKEN],
            eos=tokenizer.eos_token_id, pad=pad if pad is not None else tokenizer.eos_token_id,
        )


def user_message(text: str, is_sentence: bool, template: str | None = None) -> str:
    """LISA's validation query: sentences verbatim, short phrases in the 'What is' template.

    ``template``: one of LISA's training templates instead (``{class_name}`` / ``{sent}`` filled).
    """
    if template is not None:
        return template.format(class_name=text, sent=text)
    if is_sentence:
        return f"{text} Please output segmentation mask."
    return f"What is {text} in this image? Please output segmentation mask."


def build_prompt(text: str, is_sentence: bool, answer: str | None = DEFAULT_ANSWER,
                 question_template: str | None = None) -> str:
    """The llava_v1 conversation: ``{system} USER: <im_start><image><im_end>\\n {q} ASSISTANT: {a}</s>``.

    With ``answer=None`` the prompt ends at ``ASSISTANT:`` (for generation). ``question_template``:
    a training template for the question (see :func:`user_message`).
    """
    image = IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN
    prompt = f"{SYSTEM_PROMPT} USER: {image}\n {user_message(text, is_sentence, question_template)} ASSISTANT:"
    if answer is None:
        return prompt
    return f"{prompt} {answer}</s>"


def tokenize_with_image(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids with ``IMAGE_PLACEHOLDER_ID`` where ``<image>`` stood (LLaVA's tokenizer_image_token).

    Each chunk is tokenized on its own; the BOS of every chunk after the first is dropped.
    """
    chunks = prompt.split(IMAGE_TOKEN)
    if len(chunks) != 2:
        raise ValueError(f"prompt must contain exactly one {IMAGE_TOKEN}, got {len(chunks) - 1}")
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        chunk_ids = tokenizer(chunk).input_ids
        if i > 0 and chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
            chunk_ids = chunk_ids[1:]
        if i > 0:
            ids.append(IMAGE_PLACEHOLDER_ID)
        ids.extend(chunk_ids)
    return ids


def seg_query_rows(ids: torch.Tensor, seg_id: int) -> torch.Tensor:
    """Rows whose final hidden state LISA uses as [SEG] embeddings: the token BEFORE each [SEG].

    ``ids``: ``T`` token ids of one expanded sequence -> ``K`` row indices (K = number of [SEG]).
    """
    seg_positions = (ids == seg_id).nonzero().flatten()
    if (seg_positions == 0).any():
        raise ValueError("a [SEG] token at position 0 has no preceding query row")
    return seg_positions - 1
