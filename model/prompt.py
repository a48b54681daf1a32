"""LISA's prompt (conversation template llava_v1) and its tokenization with an image slot."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
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


def image_slot(use_im_start_end: bool = True) -> str:
    """What stands for the image in the prompt (LISA: ``<im_start><image><im_end>`` when the
    checkpoint's ``mm_use_im_start_end`` is true, else ``<image>`` alone)."""
    return IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN if use_im_start_end else IMAGE_TOKEN


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
                 question_template: str | None = None, *, use_im_start_end: bool = True) -> str:
    """The llava_v1 conversation: ``{system} USER: <im_start><image><im_end>\\n {q} ASSISTANT: {a}</s>``.

    As LISA's ValDataset writes it (``"\\n {}"``, with a space). With ``answer=None`` the prompt
    ends at ``ASSISTANT:`` (for generation). ``question_template``: one of LISA's training
    templates for the question (see :func:`user_message`).
    """
    question = user_message(text, is_sentence, question_template)
    return _conversation(f"{image_slot(use_im_start_end)}\n {question}", answer)


def expression_span(text: str, is_sentence: bool, tokenizer: PreTrainedTokenizerBase,
                    question_template: str | None = None, *, use_im_start_end: bool = True) -> tuple[int, int]:
    """``[start, end)`` of the expression ``text`` in :func:`build_prompt`'s token ids (unexpanded: the image
    slot is one id), for methods that compare image tokens with the user's words only (Simignore).

    The prompt up to the expression and up to its end are tokenized as the prompt is (``tokenize_with_image``):
    the expression is what the second adds. The first is cut before the space that precedes the expression, so
    the space goes with the expression's first word (sentencepiece's leading "▁"), as in the whole prompt.
    """
    marker = "\x00"
    whole = build_prompt(marker, is_sentence, None, question_template, use_im_start_end=use_im_start_end)
    before = whole.split(marker)[0]
    head = before.rstrip(" ")
    start = len(tokenize_with_image(head, tokenizer))
    end = len(tokenize_with_image(head + before[len(head):] + text, tokenizer))
    return start, max(start, end)


def vqa_prompt(question: str, answer: str | None, *, use_im_start_end: bool = True) -> str:
    """A VQA turn (datasets/vqa.py) as LISA's VQADataset writes an LLaVA-Instruct item's first turn:
    ``<image>\n{question}`` with the image slot expanded, no space after the newline."""
    return _conversation(f"{image_slot(use_im_start_end)}\n{question}", answer)


def chat_prompt(text: str, *, use_im_start_end: bool = True) -> str:
    """LISA's chat.py prompt: the user's text as typed, ``<image>\\n{text}`` (no space), ending at
    ``ASSISTANT:``. ``with_mask_request`` adds the evaluation's request if wanted."""
    return _conversation(f"{image_slot(use_im_start_end)}\n{text}", None)


def with_mask_request(text: str) -> str:
    """``text`` followed by LISA's request " Please output segmentation mask." (the validation
    template for sentences); for a chat user who wants the model to answer with [SEG]."""
    return user_message(text, is_sentence=True)


def _conversation(message: str, answer: str | None) -> str:
    # conv_templates["llava_v1"].get_prompt(): "{system} USER: {message} ASSISTANT:" and, when the
    # assistant message is non-empty, " {answer}</s>" (sep2).
    prompt = f"{SYSTEM_PROMPT} USER: {message} ASSISTANT:"
    return prompt if answer is None else f"{prompt} {answer}</s>"


# -- tokenization as transformers 4.31's slow LlamaTokenizer does it ------------------------------
SPIECE_UNDERLINE = "\u2581"


def legacy_spacing(tokenizer: PreTrainedTokenizerBase) -> bool:
    """The ``legacy`` flag of the tokenizer's tokenizer_config.json (absent: True).

    4.31's LlamaTokenizer.__init__ defaults to legacy=True when the file has no flag, as in
    LISA-7B-v1; llama-2 tokenizers such as LISA-13B-llama2 say false. transformers 5 consumes the
    flag without keeping it in ``init_kwargs`` (and its own default is False), so the file next to
    the tokenizer is read unless ``model.checkpoint.load_tokenizer`` already pinned the value.
    """
    if "legacy" in tokenizer.init_kwargs:
        return bool(tokenizer.init_kwargs["legacy"])
    return _legacy_flag_in(str(tokenizer.name_or_path))


def _legacy_flag_in(directory: str) -> bool:
    path = Path(directory) / "tokenizer_config.json"
    if not directory or not path.is_file():
        return True
    return bool(json.loads(path.read_text()).get("legacy", True))


def _strip_flags(tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[bool, bool]]:
    """Every no-split token -> (strip the text on its left, strip the text on its right).

    transformers 4.31 ``PreTrainedTokenizer.tokenize`` (tokenization_utils.py) splits on
    ``unique_no_split_tokens`` (all added tokens and all special tokens). A token found in
    ``all_special_tokens_extended`` as an ``AddedToken`` strips by its own lstrip/rstrip flags;
    every other one "We strip left and right by default". LlamaTokenizer.__init__ wraps bos, eos,
    unk and pad in ``AddedToken(lstrip=False, rstrip=False)``, so ``<s>``, ``</s>``, ``<unk>``
    strip nothing; LISA's ``<im_patch>``, ``<im_start>``, ``<im_end>`` and ``[SEG]`` come from
    added_tokens.json as plain strings, so the whitespace on both sides of them is stripped.
    """
    decoder = {str(t): t for t in tokenizer.added_tokens_decoder.values()}
    flags = {token: (True, True) for token in tokenizer.get_added_vocab()}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = getattr(tokenizer, name, None)
        if token is None:
            continue
        added = decoder.get(str(token))
        flags[str(token)] = (bool(getattr(added, "lstrip", False)), bool(getattr(added, "rstrip", False)))
    return flags


def split_on_added_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """4.31's split of ``text`` into (piece, is_added_token), whitespace stripped around added tokens.

    Empty pieces are dropped (4.31 skips "eventual empty (fully stripped) tokens").
    """
    flags = _strip_flags(tokenizer)
    # Longest first: the leftmost match is the longest, as 4.31's Trie.split finds it.
    pattern = "(" + "|".join(re.escape(t) for t in sorted(flags, key=len, reverse=True)) + ")"
    parts = [p for p in re.split(pattern, text) if p]
    added = [p in flags for p in parts]
    for i, part in enumerate(parts):
        if not added[i]:
            continue
        strip_left, strip_right = flags[part]
        if strip_right and i + 1 < len(parts) and not added[i + 1]:
            parts[i + 1] = parts[i + 1].lstrip()
        if strip_left and i > 0 and not added[i - 1]:
            parts[i - 1] = parts[i - 1].rstrip()
    return [(p, a) for p, a in zip(parts, added) if p]


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of ``text`` without BOS/EOS, as 4.31's slow LlamaTokenizer gives them.

    Each plain piece between added tokens is encoded on its own, which for a sentencepiece
    vocabulary means with the dummy prefix '▁' (and byte fallback), exactly as 4.31's
    ``_tokenize`` hands each piece to ``sp_model.encode``. With ``legacy: false`` 4.31's
    ``LlamaTokenizer.tokenize`` first turns '▁' in the text into spaces and prepends one '▁'; its
    ``_tokenize`` then drops that '▁' from the first piece before encoding, and from every other
    piece that does not start with a space it removes the leading '▁' of the first token (so
    ``"ASSISTANT: [SEG]."`` ends ``'[SEG]' '.'``, not ``'[SEG]' '▁.'``).
    """
    legacy = legacy_spacing(tokenizer)
    if not legacy:
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
    ids: list[int] = []
    for piece, is_added in split_on_added_tokens(text, tokenizer):
        if is_added:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
            continue
        is_first = not legacy and piece.startswith(SPIECE_UNDERLINE)
        if is_first:
            piece = piece[1:]
        piece_ids = _encode_piece(piece, tokenizer) if piece else []
        if not legacy and not is_first and not piece.startswith(" ") and piece_ids:
            first = tokenizer.convert_ids_to_tokens(piece_ids[0])
            if first.startswith(SPIECE_UNDERLINE):
                rest = [tokenizer.convert_tokens_to_ids(first[1:])] if len(first) > 1 else []
                piece_ids = rest + piece_ids[1:]
        ids.extend(piece_ids)
    return ids


def sentencepiece_model_file(tokenizer: PreTrainedTokenizerBase) -> Path | None:
    """The tokenizer.model a LLaMA tokenizer was loaded from (None for other tokenizers)."""
    candidates = [tokenizer.init_kwargs.get("vocab_file")]
    if tokenizer.name_or_path:
        candidates.append(Path(str(tokenizer.name_or_path)) / "tokenizer.model")
    for candidate in candidates:
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    return None


@functools.lru_cache(maxsize=8)
def _sentencepiece(path: str, mtime_ns: int) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=path)


def _encode_piece(piece: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """One plain piece, encoded on its own as 4.31's ``_tokenize`` does: ``sp_model.encode(piece)``.

    With the checkpoint's tokenizer.model at hand that is literally sentencepiece (dummy prefix,
    byte fallback), pieces mapped to ids through the tokenizer's vocabulary. transformers 5's fast
    tokenizer agrees except for a piece that starts with a space (after ``</s>``): its Metaspace
    adds no '▁' in front of an existing one, sentencepiece always does. Tokenizers without a
    sentencepiece model (the tiny word-level one) encode the piece themselves.
    """
    model_file = sentencepiece_model_file(tokenizer)
    if model_file is None:
        return tokenizer(piece, add_special_tokens=False).input_ids
    processor = _sentencepiece(str(model_file), model_file.stat().st_mtime_ns)
    return tokenizer.convert_tokens_to_ids(processor.encode(piece, out_type=str))


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer puts around a text: LISA's LlamaTokenizer adds BOS only
    (add_bos_token=True, add_eos_token=False)."""
    ids = tokenizer("").input_ids
    if ids not in ([], [tokenizer.bos_token_id]):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} frames a text with {tokenizer.convert_ids_to_tokens(ids)}; "
            "LISA's LlamaTokenizer adds only BOS (add_bos_token=true, add_eos_token=false)"
        )
    return ids


def tokenize_with_image(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids with ``IMAGE_PLACEHOLDER_ID`` where ``<image>`` stood (LLaVA's tokenizer_image_token).

    The prompt is split on ``<image>`` first; each chunk is tokenized on its own (``tokenize_text``)
    and only the first chunk gets BOS. The one tokenization used for every prompt the project
    builds: evaluation, chat and training answers.
    """
    chunks = prompt.split(IMAGE_TOKEN)
    if len(chunks) != 2:
        raise ValueError(f"prompt must contain exactly one {IMAGE_TOKEN}, got {len(chunks) - 1}")
    before, after = (tokenize_text(chunk, tokenizer) for chunk in chunks)
    return [*_leading_special_ids(tokenizer), *before, IMAGE_PLACEHOLDER_ID, *after]


def seg_query_rows(ids: torch.Tensor, seg_id: int) -> torch.Tensor:
    """Rows whose final hidden state LISA uses as [SEG] embeddings: the token BEFORE each [SEG].

    ``ids``: ``T`` token ids of one expanded sequence -> ``K`` row indices (K = number of [SEG]).
    """
    seg_positions = (ids == seg_id).nonzero().flatten()
    if (seg_positions == 0).any():
        raise ValueError("a [SEG] token at position 0 has no preceding query row")
    return seg_positions - 1
