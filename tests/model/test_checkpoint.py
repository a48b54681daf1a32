"""LISA checkpoints: save / load round trips, fresh LLaVA + SAM builds, and bad input.

Expected values come from what was written to disk (the tensors saved, the tokenizer's own
vocabulary), never from the loader's output.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

from model.builder import tiny_llama_config
from model.bundle import LisaBundle
from model.checkpoint import load_lisa_checkpoint, save_lisa_checkpoint
from model.lisa import LISAForCausalLM
from model.pipeline import Query, QueryResult, SegmentationPipeline
from model.prompt import SpecialTokenIds
from model.sam import build_tiny_sam, load_sam_checkpoint
from model.tokenizer import build_tiny_tokenizer
from model.vision import CLIPVisionTower, clip_processor_for, tiny_clip_config
from runs.models import build_from_config
from tests.conftest import TINY_SHARD_BYTES, SavedCheckpoint, random_pil_image, save_clip_dir

QUERIES = [Query("dog", False, "phrase"), Query("the man on the left with a cup", True, "sentence")]
LISA_ADDED = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")


# -- helpers --------------------------------------------------------------------------------------
def lisa_cfg(ckpt: Path, clip: Path) -> dict[str, Any]:
    return {"kind": "lisa", "checkpoint": str(ckpt), "vision_tower": str(clip), "dtype": "float32", "device": "cpu"}


def run_queries(bundle: LisaBundle, image: Image.Image | None = None) -> list[QueryResult]:
    image = image if image is not None else random_pil_image(48, 64, seed=1)
    return SegmentationPipeline(bundle).segment(image, QUERIES)


def assert_same_results(a: list[QueryResult], b: list[QueryResult]) -> None:
    assert len(a) == len(b) == len(QUERIES)
    for x, y in zip(a, b, strict=True):
        assert x.sample_id == y.sample_id
        assert np.array_equal(x.masks, y.masks)
        assert torch.equal(x.seg_embeddings, y.seg_embeddings)


def assert_same_weights(a: LisaBundle, b: LisaBundle) -> None:
    sa, sb = a.model.checkpoint_state_dict(), b.model.checkpoint_state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(ckpt: Path, key: str, index: str = "model.safetensors.index.json") -> Path:
    return ckpt / json.loads((ckpt / index).read_text())["weight_map"][key]


def word_tokenizer(words: str, pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer like model/tokenizer.py's, but with no LISA tokens added."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words.split():
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    extra = {"pad_token": "<unk>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra)


LLAVA_WORDS = "A chat between USER ASSISTANT : . , ? What is in this image Please output segmentation mask dog man"


def tiny_tower() -> CLIPVisionTower:
    return CLIPVisionTower(model=CLIPVisionModel(tiny_clip_config()), processor=clip_processor_for(224))


def bundle_with_tokenizer(tokenizer: PreTrainedTokenizerFast, seed: int) -> LisaBundle:
    """A tiny LISA whose vocabulary is ``tokenizer``'s (as build_tiny_lisa does for its own)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), num_layers=2)
    model = LISAForCausalLM(config, visual_model=build_tiny_sam(config.out_dim), vision_tower=tiny_tower())
    return LisaBundle(model.eval(), tokenizer, SpecialTokenIds.from_tokenizer(tokenizer))


def _touch(path: str) -> None:
    Path(path).write_text("executed")


class PickledCode:
    """Unpickling this runs ``_touch(marker)``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_touch, (self.marker,))


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_bundle: LisaBundle) -> list[QueryResult]:
    return run_queries(tiny_bundle)


@pytest.fixture(scope="module")
def bin_checkpoint(tiny_bundle: LisaBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lisa_checkpoint(tiny_bundle, tmp_path_factory.mktemp("bin") / "lisa",
                                max_shard_bytes=TINY_SHARD_BYTES, safe=False)


# -- layout ---------------------------------------------------------------------------------------
def test_config_json_is_lisa_layout(saved_tiny_checkpoint: SavedCheckpoint, tiny_bundle: LisaBundle) -> None:
    config = json.loads((saved_tiny_checkpoint.checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LISAForCausalLM"]
    assert config["model_type"] == "llava"
    assert config["vocab_size"] == len(tiny_bundle.tokenizer)
    assert config["mm_hidden_size"] == tiny_bundle.model.vision_tower.config.hidden_size
    assert config["mm_vision_select_layer"] == -2
    assert config["mm_use_im_start_end"] is True


def test_index_keys_and_shards(saved_tiny_checkpoint: SavedCheckpoint, tiny_bundle: LisaBundle) -> None:
    ckpt = saved_tiny_checkpoint.checkpoint
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    keys = set(weight_map)
    assert not [k for k in keys if k.startswith(("vision_tower.", "model.vision_tower."))]
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.5.mlp.down_proj.weight", "model.norm.weight",
                "model.mm_projector.weight", "model.mm_projector.bias",
                "model.text_hidden_fcs.0.0.weight", "model.text_hidden_fcs.0.0.bias",
                "model.text_hidden_fcs.0.2.weight", "model.text_hidden_fcs.0.2.bias", "lm_head.weight"):
        assert key in keys, key
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert any(k.startswith(f"model.visual_model.{part}.") for k in keys), part
    # every saved tensor is the model's, each shard holds exactly what the index maps to it
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = {k: v for k, v in tiny_bundle.model.state_dict().items() if not k.startswith("vision_tower.")}
    assert keys == set(state)
    total = 0
    for name in shards:
        tensors = load_file(str(ckpt / name))
        assert set(tensors) == {k for k, v in weight_map.items() if v == name}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert len(tensors) == 1 or size <= TINY_SHARD_BYTES
        total += size
        for key, tensor in tensors.items():
            assert torch.equal(tensor, state[key]), key
    assert index["metadata"]["total_size"] == total
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["load_lisa_checkpoint", "build_from_config"])
def test_safetensors_round_trip(loader: str, saved_tiny_checkpoint: SavedCheckpoint, tiny_bundle: LisaBundle,
                                reference: list[QueryResult]) -> None:
    ckpt, clip = saved_tiny_checkpoint.checkpoint, saved_tiny_checkpoint.clip_dir
    if loader == "load_lisa_checkpoint":
        loaded = load_lisa_checkpoint(ckpt, clip)
    else:
        loaded = build_from_config(lisa_cfg(ckpt, clip))
    assert loaded.token_ids == tiny_bundle.token_ids
    assert_same_weights(loaded, tiny_bundle)
    assert_same_results(run_queries(loaded), reference)


def test_bin_round_trip(bin_checkpoint: Path, saved_tiny_checkpoint: SavedCheckpoint, tiny_bundle: LisaBundle,
                        reference: list[QueryResult]) -> None:
    names = sorted(p.name for p in bin_checkpoint.iterdir())
    bins = [n for n in names if n.endswith(".bin")]
    assert len(bins) > 2 and bins[0] == f"pytorch_model-00001-of-{len(bins):05d}.bin"
    assert "pytorch_model.bin.index.json" in names
    assert not [n for n in names if n.endswith(".safetensors")]
    loaded = build_from_config(lisa_cfg(bin_checkpoint, saved_tiny_checkpoint.clip_dir))
    assert_same_weights(loaded, tiny_bundle)
    assert_same_results(run_queries(loaded), reference)


def test_single_unsharded_file_loads(saved_tiny_checkpoint: SavedCheckpoint, tiny_bundle: LisaBundle,
                                     tmp_path: Path) -> None:
    ckpt = tmp_path / "single"
    ckpt.mkdir()
    shutil.copy(saved_tiny_checkpoint.checkpoint / "config.json", ckpt)
    tiny_bundle.tokenizer.save_pretrained(ckpt)
    save_file({k: v.contiguous() for k, v in tiny_bundle.model.checkpoint_state_dict().items()},
              str(ckpt / "model.safetensors"))
    assert_same_weights(load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir), tiny_bundle)


# -- token ids come from the tokenizer ------------------------------------------------------------
def test_special_token_ids_follow_the_tokenizer() -> None:
    default, extended = build_tiny_tokenizer(), build_tiny_tokenizer(extra_words="zebra giraffe")
    for tok in (default, extended):
        ids = SpecialTokenIds.from_tokenizer(tok)
        vocab = tok.get_vocab()
        assert (ids.seg, ids.im_start, ids.im_end) == (vocab["[SEG]"], vocab["<im_start>"], vocab["<im_end>"])
        assert tok("[SEG]", add_special_tokens=False).input_ids == [ids.seg]
        assert ids.eos == vocab["</s>"]
    # two new words shift every added token by two
    assert SpecialTokenIds.from_tokenizer(extended).seg == SpecialTokenIds.from_tokenizer(default).seg + 2

    # added in another order ([SEG] first, as some checkpoints have it): ids still from the vocab
    other = word_tokenizer(LLAVA_WORDS, pad=True)
    other.add_tokens(["[SEG]"])
    other.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
    ids = SpecialTokenIds.from_tokenizer(other)
    base = 3 + len(set(LLAVA_WORDS.split()))  # <unk> <s> </s>, the words, then the added tokens
    assert ids.seg == base and (ids.im_start, ids.im_end) == (base + 2, base + 3)


def test_loaded_bundle_reads_ids_from_saved_tokenizer(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(extra_words="zebra giraffe")
    bundle = bundle_with_tokenizer(tokenizer, seed=5)
    ckpt = save_lisa_checkpoint(bundle, tmp_path / "lisa", max_shard_bytes=TINY_SHARD_BYTES)
    loaded = load_lisa_checkpoint(ckpt, save_clip_dir(bundle, tmp_path / "clip"))
    assert loaded.token_ids.seg == tokenizer.get_vocab()["[SEG]"] != build_tiny_tokenizer().get_vocab()["[SEG]"]
    assert loaded.token_ids == bundle.token_ids
    assert_same_results(run_queries(loaded), run_queries(bundle))


def test_tokenizer_without_lisa_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        SpecialTokenIds.from_tokenizer(word_tokenizer(LLAVA_WORDS))


# -- fresh LISA from LLaVA + SAM ------------------------------------------------------------------
class FreshSources:
    def __init__(self, root: Path, llava_state: dict[str, torch.Tensor], sam_state: dict[str, torch.Tensor],
                 old_vocab: int, clip_dir: Path):
        self.root, self.llava_state, self.sam_state, self.old_vocab = root, llava_state, sam_state, old_vocab
        self.llava, self.sam, self.clip = root / "llava", root / "sam_tiny.pth", clip_dir

    def cfg(self, **overrides: str) -> dict[str, Any]:
        cfg = {"kind": "fresh", "llava": str(self.llava), "vision_tower": str(self.clip),
               "sam_checkpoint": str(self.sam), "dtype": "float32", "device": "cpu"}
        return {**cfg, **overrides}


@pytest.fixture(scope="module")
def fresh_sources(tmp_path_factory: pytest.TempPathFactory, saved_tiny_checkpoint: SavedCheckpoint) -> FreshSources:
    """A tiny 'LLaVA' directory (no [SEG], no image tokens, no SAM / text_hidden_fcs weights) + a SAM .pth."""
    root = tmp_path_factory.mktemp("fresh")
    llava = root / "llava"
    llava.mkdir()
    tokenizer = word_tokenizer(LLAVA_WORDS)
    tokenizer.save_pretrained(llava)
    torch.manual_seed(11)
    config = tiny_llama_config(len(tokenizer), num_layers=2, projector="mlp2x_gelu")
    donor = LISAForCausalLM(config, visual_model=build_tiny_sam(config.out_dim), vision_tower=tiny_tower())
    state = {k: v.contiguous() for k, v in donor.checkpoint_state_dict().items()
             if not k.startswith(("model.visual_model.", "model.text_hidden_fcs."))}
    # LLaVA checkpoints may carry their CLIP copy; LISA takes CLIP from its own directory
    on_disk = {**state, "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(32)}
    save_file(on_disk, str(llava / "model.safetensors"))
    raw = config.to_dict()
    for lisa_field in ("vision_tower", "out_dim"):
        raw.pop(lisa_field)
    # sam_arch selects the tiny SAM (real configs have none: ViT-H); the tiny SAM's prompt width is 32
    raw.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower="tiny-clip", out_dim=32)
    (llava / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(12)
    sam_state = {k: v.clone() for k, v in build_tiny_sam().state_dict().items()}
    torch.save(sam_state, root / "sam_tiny.pth")
    return FreshSources(root, state, sam_state, len(tokenizer), saved_tiny_checkpoint.clip_dir)


def test_fresh_lisa_from_llava_and_sam(fresh_sources: FreshSources) -> None:
    bundle = build_from_config(fresh_sources.cfg())
    model, old = bundle.model, fresh_sources.old_vocab
    # SAM weights are the .pth's
    sam_state = model.sam.state_dict()
    assert sam_state.keys() == fresh_sources.sam_state.keys()
    for key, tensor in fresh_sources.sam_state.items():
        assert torch.equal(sam_state[key], tensor), key
    # LLaMA + projector weights are LLaVA's; embeddings / lm_head grew by LISA's four tokens
    new = old + len(LISA_ADDED)
    assert len(bundle.tokenizer) == new and model.config.vocab_size == new
    state = model.checkpoint_state_dict()
    for key, tensor in fresh_sources.llava_state.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert state[key].shape == (new, tensor.shape[1])
            assert torch.equal(state[key][:old], tensor), key
            expected_rows = tensor.double().mean(0).float().expand(new - old, -1)
            assert torch.allclose(state[key][old:], expected_rows, atol=1e-6), key
        else:
            assert torch.equal(state[key], tensor), key
    assert "model.mm_projector.2.weight" in state  # LLaVA-1.5 style 2-layer projector
    assert not [k for k in state if k.startswith("model.vision_tower.")]
    # the tokenizer gained LISA's tokens; ids come from it
    vocab = bundle.tokenizer.get_vocab()
    assert set(LISA_ADDED) <= set(vocab) and all(vocab[t] >= old for t in LISA_ADDED)
    assert bundle.token_ids.seg == vocab["[SEG]"]
    assert bundle.tokenizer("[SEG]", add_special_tokens=False).input_ids == [vocab["[SEG]"]]
    assert bundle.token_ids.pad == vocab["<unk>"]
    # and it segments
    results = SegmentationPipeline(bundle).segment(random_pil_image(30, 41, seed=2), QUERIES)
    assert [r.mask.shape for r in results] == [(30, 41)] * len(QUERIES)


def test_fresh_rejects_missing_sam_before_loading(fresh_sources: FreshSources, monkeypatch: pytest.MonkeyPatch) -> None:
    import model.checkpoint as checkpoint

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loading started before the paths were checked")

    monkeypatch.setattr(checkpoint, "build_fresh_lisa", never)
    missing = fresh_sources.root / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError, match="sam_checkpoint") as err:
        build_from_config(fresh_sources.cfg(sam_checkpoint=str(missing)))
    assert str(missing) in str(err.value)


# -- bad input ------------------------------------------------------------------------------------
def test_missing_checkpoint_dir(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    missing = tmp_path / "LISA-7B-v1"
    with pytest.raises(FileNotFoundError) as err:
        load_lisa_checkpoint(missing, saved_tiny_checkpoint.clip_dir)
    assert str(missing) in str(err.value)


def test_dir_without_config_json(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint.checkpoint, tmp_path / "lisa")
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert str(ckpt / "config.json") in str(err.value)


def test_dir_without_weights(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint.checkpoint, tmp_path / "lisa")
    for path in ckpt.glob("model*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json") as err:
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert str(ckpt) in str(err.value)


def test_index_lists_missing_shard(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint.checkpoint, tmp_path / "lisa")
    shard = shard_of(ckpt, "lm_head.weight")
    shard.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert shard.name in str(err.value) and "model.safetensors.index.json" in str(err.value)


def test_missing_key_is_named(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint.checkpoint, tmp_path / "lisa")
    key = "model.text_hidden_fcs.0.2.bias"
    shard = shard_of(ckpt, key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard))
    with pytest.raises(KeyError) as err:
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert key in str(err.value) and "missing" in str(err.value)


def test_unexpected_key_is_named(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint.checkpoint, tmp_path / "lisa")
    shard = shard_of(ckpt, "lm_head.weight")
    tensors = load_file(str(shard))
    tensors["model.seg_projector.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(shard))
    with pytest.raises(KeyError) as err:
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert "model.seg_projector.weight" in str(err.value) and "unexpected" in str(err.value)


def test_shape_mismatch_is_named(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(saved_tiny_checkpoint.checkpoint, tmp_path / "lisa")
    key = "model.mm_projector.bias"
    shard = shard_of(ckpt, key)
    tensors = load_file(str(shard))
    tensors[key] = torch.zeros(7)
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)


def test_clip_hidden_size_must_match_mm_hidden_size(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    wide = CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=224, patch_size=14)
    clip = tmp_path / "clip48"
    CLIPVisionModel(wide).save_pretrained(clip)
    clip_processor_for(224).save_pretrained(clip)
    with pytest.raises(ValueError) as err:
        load_lisa_checkpoint(saved_tiny_checkpoint.checkpoint, clip)
    message = str(err.value)
    assert "48" in message and "mm_hidden_size=32" in message


def test_clip_dir_without_config(saved_tiny_checkpoint: SavedCheckpoint, tmp_path: Path) -> None:
    clip = tmp_path / "clip-vit-large-patch14"
    clip.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_lisa_checkpoint(saved_tiny_checkpoint.checkpoint, clip)
    assert str(clip) in str(err.value)


@pytest.mark.parametrize("missing", ["checkpoint", "vision_tower", "both"])
def test_build_from_config_checks_paths_before_loading(missing: str, saved_tiny_checkpoint: SavedCheckpoint,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import model.checkpoint as checkpoint

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loading started before the paths were checked")

    monkeypatch.setattr(checkpoint, "load_lisa_checkpoint", never)
    cfg = lisa_cfg(saved_tiny_checkpoint.checkpoint, saved_tiny_checkpoint.clip_dir)
    gone = {"checkpoint": str(tmp_path / "no-lisa"), "vision_tower": str(tmp_path / "no-clip")}
    for key in gone if missing == "both" else [missing]:
        cfg[key] = gone[key]
    with pytest.raises(FileNotFoundError) as err:
        build_from_config(cfg)
    for key in gone if missing == "both" else [missing]:
        assert f"model.{key}" in str(err.value) and gone[key] in str(err.value)


def test_bin_shard_with_pickled_code_is_refused(bin_checkpoint: Path, saved_tiny_checkpoint: SavedCheckpoint,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # make torch's default weights_only=False: only an explicit weights_only=True refuses the file
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = copy_checkpoint(bin_checkpoint, tmp_path / "lisa")
    shard = shard_of(ckpt, "lm_head.weight", "pytorch_model.bin.index.json")
    marker = tmp_path / "pwned"
    tensors = torch.load(shard, weights_only=True)
    torch.save({**tensors, "x": PickledCode(marker)}, shard)
    with pytest.raises(pickle.UnpicklingError):
        load_lisa_checkpoint(ckpt, saved_tiny_checkpoint.clip_dir)
    assert not marker.exists()
    # the planted object does run code when unpickled without weights_only
    torch.load(shard, weights_only=False)
    assert marker.read_text() == "executed"


def test_sam_pth_with_pickled_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "sam_vit_h_4b8939.pth"
    torch.save({**build_tiny_sam().state_dict(), "x": PickledCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_sam_checkpoint(build_tiny_sam(), path)
    assert not marker.exists()


def test_sam_pth_missing_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        load_sam_checkpoint(build_tiny_sam(), path)

