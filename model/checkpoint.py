"""LISA checkpoints in Hugging Face layout: save, load (strict), and fresh LLaVA + SAM builds.

A LISA checkpoint directory holds ``config.json`` (LLaMA config + LISA fields,
``architectures: [LISAForCausalLM]``, ``model_type: llava``), sharded weights
(``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, or
``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``, or one unsharded file) and the
tokenizer with LISA's added tokens. The CLIP tower comes from its own directory.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from model.builder import SAM_BUILDERS, load_vision_tower
from model.bundle import LisaBundle, cast_model, keep_fp32_buffers
from model.lisa import LisaExtras, LISAForCausalLM
from model.prompt import (
    IM_END_TOKEN,
    IM_PATCH_TOKEN,
    IM_START_TOKEN,
    SEG_TOKEN,
    SpecialTokenIds,
    legacy_spacing,
    sentencepiece_model_file,
)
from model.sam import load_sam_checkpoint
from model.vision import CLIPVisionTower

WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_lisa_config(ckpt_dir: Path) -> LlamaConfig:
    path = ckpt_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a LISA checkpoint directory needs config.json, tokenizer files and "
            f"weights ({' or '.join(i for i, _ in WEIGHT_LAYOUTS)} with shards, or a single "
            f"{' / '.join(f for _, f in WEIGHT_LAYOUTS)})"
        )
    raw = json.loads(path.read_text())
    raw.pop("model_type", None)
    config = LlamaConfig.from_dict(raw)
    config._attn_implementation = "sdpa"
    return config


def load_tokenizer(ckpt_dir: Path, config: LlamaConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, resolved through its LLaMA config.

    Released LISA/LLaVA configs say ``model_type: llava``; left to itself AutoTokenizer then picks
    a generic backend that splits text differently from the LlamaTokenizer the checkpoint names.
    """
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir, config=config)
    # LISA's tokenization depends on the file's "legacy" flag (model.prompt.legacy_spacing);
    # transformers 5 drops it from init_kwargs, so pin it there for save_pretrained to write back.
    config_file = ckpt_dir / "tokenizer_config.json"
    if config_file.is_file():
        tokenizer.init_kwargs["legacy"] = bool(json.loads(config_file.read_text()).get("legacy", True))
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """``save_pretrained`` plus the files of a released LISA checkpoint that transformers 5 leaves out.

    LISA runs transformers 4.31's slow LlamaTokenizer (``use_fast=False``), which ignores tokenizer.json:
    it reads the sentencepiece ``tokenizer.model``, then ``added_tokens.json`` (LISA's ``<im_patch>``,
    ``<im_start>``, ``<im_end>``, ``[SEG]`` with their ids) and ``special_tokens_map.json``. Without
    added_tokens.json its train_ds.py gives ``[SEG]`` a new id one row off the checkpoint's and its chat.py
    splits ``[SEG]`` into word pieces. ``tokenizer_config.json`` keeps the ``legacy`` flag the tokenizer was
    loaded with (transformers 5 writes its own class default) and names a class 4.31 resolves. A word-level
    tokenizer (the tiny and toy models' default) has no sentencepiece model: it gets every file but
    tokenizer.model (docs/fidelity.md, "The released layout")."""
    tokenizer.save_pretrained(out_dir)
    model_file = sentencepiece_model_file(tokenizer)
    if model_file is not None and not (out_dir / "tokenizer.model").exists():
        # transformers 5 writes only tokenizer.json; LISA's tokenization encodes with sentencepiece
        shutil.copyfile(model_file, out_dir / "tokenizer.model")
    (out_dir / "added_tokens.json").write_text(json.dumps(released_added_tokens(tokenizer), indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(released_special_tokens(tokenizer), indent=2))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["legacy"] = legacy_spacing(tokenizer)
    # 4.31's AutoTokenizer resolves the class by this name; transformers 5 writes "TokenizersBackend" for a
    # tokenizer built from a tokenizers object, which 4.31 does not know (PreTrainedTokenizerFast it does).
    config["tokenizer_class"] = "LlamaTokenizer" if model_file is not None else "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2))


def released_special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """special_tokens_map.json as LISA-7B-v1 has it (4.31's save_pretrained): ``<s>``, ``</s>``, ``<unk>`` as
    AddedToken fields with ``lstrip``/``rstrip`` false, the pad token (LISA sets ``pad_token = unk_token``) as a
    plain string. 4.31's loader sets each entry on the tokenizer, and a plain-string ``</s>`` would strip the
    whitespace on both sides of it (as an added token without flags does), which LISA's does not."""
    special: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            special[name] = {"content": str(token), "lstrip": False, "normalized": True, "rstrip": False,
                             "single_word": False}
    if getattr(tokenizer, "pad_token", None) is not None:
        special["pad_token"] = str(tokenizer.pad_token)
    return special


def base_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """The vocabulary before added tokens: the sentencepiece model's pieces (what 4.31's slow
    LlamaTokenizer starts from), else the tokenizer model's own vocabulary."""
    model_file = sentencepiece_model_file(tokenizer)
    if model_file is not None:
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    return tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)


def released_added_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """added_tokens.json as 4.31 writes and reads it: every token past the base vocabulary with its id.

    4.31's slow tokenizer adds them in id order and refuses an id that is not the next free row ("Non-consecutive
    added token"), so the ids must run on from the base vocabulary without a gap; a tokenizer whose added tokens
    do not cannot be written in this layout, and is refused here rather than when LISA loads it."""
    base = base_vocab_size(tokenizer)
    added = dict(sorted(((t, i) for t, i in tokenizer.get_added_vocab().items() if i >= base), key=lambda x: x[1]))
    expected = list(range(base, base + len(added)))
    if list(added.values()) != expected or len(tokenizer) != base + len(added):
        raise ValueError(
            f"the tokenizer's added tokens {added} do not follow its base vocabulary of {base} without a gap "
            f"(ids {expected} expected, {len(tokenizer)} tokens in all): LISA's slow tokenizer (transformers 4.31) "
            "would refuse its added_tokens.json"
        )
    return added


def weight_files(ckpt_dir: Path) -> list[Path]:
    """Shard paths from the index (every shard must exist) or the single weights file."""
    for index_name, single in WEIGHT_LAYOUTS:
        index = ckpt_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (ckpt_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards missing from {ckpt_dir}: {missing}")
            return [ckpt_dir / n for n in names]
        if (ckpt_dir / single).is_file():
            return [ckpt_dir / single]
    raise FileNotFoundError(
        f"no weights in {ckpt_dir}: expected one of {[i for i, _ in WEIGHT_LAYOUTS]} with its shards, "
        f"or {[f for _, f in WEIGHT_LAYOUTS]}"
    )


def iter_state_dicts(files: list[Path]) -> Iterator[dict[str, torch.Tensor]]:
    """Load shards one at a time; ``.bin`` files with ``weights_only=True`` (no pickled code)."""
    for path in files:
        if path.suffix == ".safetensors":
            yield load_file(str(path))
        else:
            yield torch.load(path, map_location="cpu", weights_only=True)


#: Buffers that checkpoints saved by older transformers carry and that are recomputed, not loaded.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights_strict(model: torch.nn.Module, files: list[Path], expected: set[str],
                        ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy every tensor into ``model``; any missing or unexpected key is an error listing them."""
    params = dict(model.state_dict())
    seen, unexpected = set(), []
    for shard in iter_state_dicts(files):
        for key, tensor in shard.items():
            if key.startswith(ignore_prefixes) or key.endswith(RECOMPUTED_SUFFIXES):
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            target = params[key]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
            seen.add(key)
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint keys do not match the model: {len(missing)} missing {missing[:20]}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:20]}"
        )


def _construct(
    config: LlamaConfig, tower: CLIPVisionTower, dtype: torch.dtype, device: torch.device
) -> LISAForCausalLM:
    """Build the architecture directly in ``dtype`` on ``device`` (weights are filled afterwards)."""
    arch = getattr(config, "sam_arch", "vit_h")
    if arch not in SAM_BUILDERS:
        raise ValueError(f"unknown sam_arch {arch!r}; expected one of {sorted(SAM_BUILDERS)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        # Every weight is overwritten from the checkpoint (strictly), so skip random init: minutes
        # of CPU time for 13B. The library's own scoped context manager does this.
        with torch.device(device), no_init_weights():
            model = LISAForCausalLM(config, visual_model=SAM_BUILDERS[arch](), vision_tower=tower)
    finally:
        torch.set_default_dtype(previous)
    keep_fp32_buffers(model)
    return model


def checkpoint_dtype(config: LlamaConfig) -> torch.dtype:
    """The dtype the checkpoint was saved in (``torch_dtype``/``dtype`` in config.json), else float32."""
    value = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value).replace("torch.", ""), None) if value else None
    return resolved if isinstance(resolved, torch.dtype) else torch.float32


def check_tower_resolution(config: LlamaConfig, tower: CLIPVisionTower, clip_dir: str | Path) -> None:
    """A tower named ``...-336`` in the config must be a 336-pixel CLIP (N = 576), not 224."""
    name = str(getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None) or "")
    match = re.search(r"-(\d{3})$", name)
    if match and int(match.group(1)) != tower.config.image_size:
        raise ValueError(
            f"the checkpoint was trained with vision tower {name!r} ({match.group(1)} px) but {clip_dir} "
            f"is a {tower.config.image_size} px CLIP"
        )


def load_lisa_checkpoint(ckpt_dir: str | Path, clip_dir: str | Path, *, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu") -> LisaBundle:
    """A released LISA checkpoint (e.g. LISA-7B-v1) + its CLIP directory -> bundle.

    ``dtype`` None: the checkpoint's own (bf16 for the released ones).
    """
    ckpt_dir, device = Path(ckpt_dir), torch.device(device)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"LISA checkpoint directory not found: {ckpt_dir}")
    config = read_lisa_config(ckpt_dir)
    dtype = dtype or checkpoint_dtype(config)
    files = weight_files(ckpt_dir)
    tower = load_vision_tower(clip_dir, getattr(config, "mm_vision_select_layer", -2))
    check_tower_resolution(config, tower, clip_dir)
    tokenizer = load_tokenizer(ckpt_dir, config)
    model = _construct(config, tower, dtype, device)
    load_weights_strict(model, files, set(model.checkpoint_state_dict()))
    cast_model(model, dtype=dtype, device=device)
    return LisaBundle(model.eval(), tokenizer, SpecialTokenIds.from_tokenizer(tokenizer))


def save_clip_dir(bundle: LisaBundle, clip_dir: str | Path) -> Path:
    """The bundle's CLIP tower and image processor as a Hugging Face CLIP directory (what
    ``model.vision_tower`` / ``load_lisa_checkpoint``'s CLIP argument expect); e.g. for the tiny LISA."""
    clip_dir = Path(clip_dir)
    tower = bundle.model.vision_tower
    tower.clip.save_pretrained(clip_dir)
    tower.processor.save_pretrained(clip_dir)
    return clip_dir


#: config.json fields of a released LISA checkpoint (LISA-7B-v1) that LISA's code reads or sets when it builds
#: the model, with the values its training script leaves there. ``train_mask_decoder`` present is how
#: model/LISA.py (``LisaMetaModel``, ``LISAForCausalLM``) tells a LISA checkpoint from a LLaVA base: without it
#: chat.py fails on ``kwargs["train_mask_decoder"]``; with it, SAM and text_hidden_fcs are built from ``out_dim``
#: and the CLIP tower from ``vision_tower`` (copied to ``mm_vision_tower``; chat.py's ``--vision-tower``
#: overrides it). LLaVA's ``llava_arch.py`` / ``clip_encoder.py`` read ``mm_vision_tower``,
#: ``mm_vision_select_layer``, ``mm_vision_select_feature``, ``mm_hidden_size``, ``mm_use_im_start_end``;
#: the rest are what ``LisaModel.__init__`` and ``initialize_vision_modules`` write.
LISA_CONFIG_DEFAULTS: dict[str, Any] = {
    "train_mask_decoder": True, "mm_vision_select_feature": "patch", "mm_use_im_patch_token": False,
    "use_mm_proj": True, "image_aspect_ratio": "square", "image_grid_pinpoints": None, "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": True, "pretrain_mm_mlp_adapter": None,
}


def lisa_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (the model's, as a dict) with every field a released LISA config.json has: the ones the model
    was built with (``LisaExtras``: ``out_dim``, ``mm_hidden_size``, ``mm_vision_select_layer``,
    ``mm_use_im_start_end``, the tower under both its names ``vision_tower`` and ``mm_vision_tower``; a LLaVA base
    config has only the second) and ``LISA_CONFIG_DEFAULTS`` where the config has no value."""
    extras = LisaExtras.from_config(LlamaConfig.from_dict({k: v for k, v in config.items() if k != "model_type"}))
    config = dict(config)
    config.update(out_dim=extras.out_dim, mm_hidden_size=extras.mm_hidden_size,
                  mm_vision_select_layer=extras.mm_vision_select_layer, mm_use_im_start_end=extras.mm_use_im_start_end,
                  vision_tower=config.get("vision_tower") or extras.vision_tower,
                  mm_vision_tower=config.get("mm_vision_tower") or extras.vision_tower)
    for key, value in LISA_CONFIG_DEFAULTS.items():
        config.setdefault(key, value)
    return config


def save_lisa_checkpoint(bundle: LisaBundle, out_dir: str | Path, *, max_shard_bytes: int = 2 * 1024**3,
                         safe: bool = True) -> Path:
    """Write ``bundle`` in LISA's Hugging Face layout: every file of a released LISA checkpoint (LISA-7B-v1):
    config.json with LISA's fields, generation_config.json, sharded weights + index, tokenizer files
    (``save_tokenizer``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    config = lisa_config_fields(model.config.to_dict())
    config.update(architectures=["LISAForCausalLM"], model_type="llava", torch_dtype=str(bundle.dtype).split(".")[-1])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    state = {k: v.detach().contiguous().cpu() for k, v in model.checkpoint_state_dict().items()}
    shards = _split_shards(state, max_shard_bytes)
    index_name, single = WEIGHT_LAYOUTS[0] if safe else WEIGHT_LAYOUTS[1]
    stem, ext = single.rsplit(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        if safe:
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(shard, out_dir / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / index_name).write_text(json.dumps(index, indent=2))
    save_tokenizer(bundle.tokenizer, out_dir)
    tokenizer = bundle.tokenizer
    generation = {"_from_model_config": True, "bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.clone() if _shares_storage(tensor, shards[-1]) else tensor
        size += nbytes
    return shards


def _shares_storage(tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == ptr for t in shard.values())


def add_lisa_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """LISA's added tokens (as its training script adds them) when a LLaVA tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_tokens = [t for t in (IM_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if t not in vocab]
    tokenizer.add_tokens(image_tokens, special_tokens=True)
    if SEG_TOKEN not in vocab:
        tokenizer.add_tokens([SEG_TOKEN])


def build_fresh_lisa(llava_dir: str | Path, clip_dir: str | Path, sam_path: str | Path, *,
                     dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> LisaBundle:
    """LISA before training: LLaVA weights + SAM ``.pth`` + new text_hidden_fcs and token rows.

    New embedding / lm_head rows (for added tokens) start at the mean of the existing rows.
    """
    llava_dir, device = Path(llava_dir), torch.device(device)
    config = read_lisa_config(llava_dir)
    config.sam_arch = getattr(config, "sam_arch", "vit_h")
    config.out_dim = getattr(config, "out_dim", 256)
    dtype = dtype or checkpoint_dtype(config)
    tokenizer = load_tokenizer(llava_dir, config)
    add_lisa_tokens(tokenizer)
    old_vocab = config.vocab_size
    files = weight_files(llava_dir)
    tower = load_vision_tower(clip_dir, getattr(config, "mm_vision_select_layer", -2))
    check_tower_resolution(config, tower, clip_dir)
    model = _construct(config, tower, dtype, device)
    new_parts = ("model.visual_model.", "model.text_hidden_fcs.")  # SAM from its .pth; heads start fresh
    expected = {k for k in model.checkpoint_state_dict() if not k.startswith(new_parts)}
    load_weights_strict(model, files, expected, ignore_prefixes=("model.vision_tower.",))
    load_sam_checkpoint(model.sam, sam_path)
    for module in model.model.text_hidden_fcs.modules():  # new head: built without init above
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    _resize_token_rows(model, old_vocab, len(tokenizer))
    cast_model(model, dtype=dtype, device=device)
    return LisaBundle(model.eval(), tokenizer, SpecialTokenIds.from_tokenizer(tokenizer))


def _resize_token_rows(model: LISAForCausalLM, old: int, new: int) -> None:
    if new == old:
        return
    for module_name in ("embed_tokens", "lm_head"):
        module = model.model.embed_tokens if module_name == "embed_tokens" else model.lm_head
        weight = module.weight.data
        grown = torch.cat([weight[:old], weight[:old].mean(0, keepdim=True).expand(new - old, -1)])
        module.weight = torch.nn.Parameter(grown)
        if module_name == "embed_tokens":
            module.num_embeddings = new
        else:
            module.out_features = new
    model.config.vocab_size = new
