"""train_ds.py / training: the three modes on the tiny model (3 layers) and miniature train splits.

The training runs use miniature data with one query per image: the refcoco train split is one
image and one sentence, so every step sees the same sample (a repeated batch in decoder mode,
whose prompt is fixed).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file

from datasets import DatasetLayoutError, MiniatureSpec, UnknownSplitError, write_miniature
from datasets.splits import check_split, load_groups
from model.builder import build_tiny_lisa
from model.checkpoint import load_lisa_checkpoint
from model.finetuned import MASK_DECODER_PREFIX, load_mask_decoder
from model.inference import teacher_forced
from model.pipeline import Query, SegmentationPipeline
from model.prompt import ANSWER_LIST, SHORT_QUESTION_LIST, build_prompt, tokenize_with_image
from runs.images import open_image
from tests.training.test_export_lisa import check_round_trip
from training import checkpointing as ckpt
from training.cache import DecoderCache
from training.data import DataOrder, EmptyTrainingSetError, PromptStyle, conversations, item_rng, load_sources
from training.lora import apply_lora, merge_lora
from training.train import (
    NonFiniteLossError,
    Runner,
    build_optimizer,
    deepspeed_config,
    image_scale,
    param_groups,
    train,
    warmup_decay,
)

REPO = Path(__file__).resolve().parents[2]
#: The tiny model with 3 decoder layers (fast), and a schedule for it: cluster 1 layer, scatter 1, prune 1.
LAYERS = 3
SCHEDULE = ["schedule=llava7b_224_p70", "schedule.Lc=1", "schedule.Nc=64", "schedule.Ls=1", "schedule.Np=16"]
SCHEDULE_DICT = {"Lc": 1, "Nc": 64, "Ls": 1, "Np": 16, "clustering": "uniform", "clustering_kwargs": {}}
CSP_SPEC = {"name": "csp", **SCHEDULE_DICT}  # the method a decoder fine-tuned under SCHEDULE is tied to


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Miniature data with one query per image: every step sees the same (single) training sample."""
    spec = MiniatureSpec(images_per_split=1, refs_per_image=1, sentences_per_ref=1)
    return write_miniature(tmp_path_factory.mktemp("mini"), spec)


@pytest.fixture(scope="module")
def mini_rich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default miniature data: the train image has 2 refs x 2 sentences."""
    return write_miniature(tmp_path_factory.mktemp("mini_rich"))


def fast(mini: Path, out: Path, *extra: str) -> DictConfig:
    """Small settings: one image per micro-batch, no accumulation, no validation, in-memory encodings."""
    return compose_train([
        f"dataset_dir={mini}", f"output_dir={out}", "train_data=refcoco", "train_data.val_splits=[]",
        "trainer.steps=3", "trainer.batch_size=1", "trainer.grad_accumulation=1", "trainer.samples_per_image=2",
        "trainer.warmup_steps=0", "trainer.lr=0.01", "trainer.precision=fp32", "trainer.progress_bar=false",
        "trainer.save_released=false", "trainer.encoding_cache=4", "val.every=0", f"model.num_layers={LAYERS}",
        *extra])


def tiny(seed: int = 0) -> object:
    return build_tiny_lisa(seed=seed, num_layers=LAYERS)


def initial_params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny().model.checkpoint_state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------- units (golden values by hand)

def test_warmup_then_linear_decay() -> None:
    # warmup 2 of 6 steps: 1/2, 2/2, then (6-s)/(6-2) for s = 2..5
    assert [warmup_decay(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [warmup_decay(s, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_image_ramp_factor() -> None:
    # [2, 6]: 0 before step 2, then (s - 2) / 4, 1 from step 6 on
    assert [image_scale(s, [2, 6]) for s in range(8)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [image_scale(s, [3, 3]) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert image_scale(0, None) == 1.0


def test_lr_scale_param_groups() -> None:
    model = tiny().model
    params = [p for n, p in model.named_parameters() if not n.startswith(("vision_tower.", "model.visual_model.image"))]
    t = compose_train(["trainer.lr=0.01",
                       "trainer.lr_scale=[{prefixes: [model.layers., lm_head], scale: 0.5}]"]).trainer
    groups = param_groups(model, params, t)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [0.005, 0.01]
    assert all(names[id(p)].startswith(("model.layers.", "lm_head")) for p in groups[0]["params"])
    assert not any(names[id(p)].startswith(("model.layers.", "lm_head")) for p in groups[1]["params"])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params)
    # the warmup-decay factor applies to each group's own lr (warmup 0 of 4 steps: (4 - s) / 4)
    t = compose_train(["trainer.lr=0.01", "trainer.steps=4", "trainer.warmup_steps=0",
                       "trainer.lr_scale=[{prefixes: [model.layers.], scale: 0.5}]"]).trainer
    optimizer, scheduler = build_optimizer(model, params, t)
    seen = []
    for _ in range(4):
        seen.append([round(g["lr"], 10) for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen == [[round(0.005 * f, 10), round(0.01 * f, 10)] for f in (1.0, 0.75, 0.5, 0.25)]
    bad = compose_train(["trainer.lr_scale=[{prefixes: [model.lyers.], scale: 0.5}]"]).trainer
    with pytest.raises(ValueError, match=r"model.lyers.*trainable: .*model.layers"):
        param_groups(model, params, bad)


def test_deepspeed_config_is_lisas() -> None:
    t = compose_train([]).trainer
    ds = deepspeed_config(t, world_size=8)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 10
    assert ds["train_batch_size"] == 2 * 10 * 8
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "weight_decay": 0.0, "betas": [0.9, 0.95]}
    sched = ds["scheduler"]
    assert sched["type"] == "WarmupDecayLR" and sched["params"]["warmup_num_steps"] == 100
    assert sched["params"]["warmup_type"] == "linear" and sched["params"]["total_num_steps"] == t.steps
    # on CPU only what the CPU needs changes (docs/training.md names each)
    cpu = deepspeed_config(t, world_size=8, device="cpu")
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert cpu["optimizer"]["params"].pop("torch_adam") is True and not cpu["zero_optimization"].pop("overlap_comm")
    assert ds["zero_optimization"].pop("overlap_comm") is True
    for key in ("bf16", "fp16"):
        cpu.pop(key), ds.pop(key)
    assert cpu == ds


def test_lisa_mode_config_is_lisas_recipe() -> None:
    cfg = compose_train(["mode=lisa"])
    assert dict(cfg.mode.lora) == {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    assert set(cfg.mode.trainable) == {"lm_head", "model.embed_tokens", "model.visual_model.mask_decoder",
                                       "model.text_hidden_fcs"}
    assert dict(cfg.mode.loss_weights) == {"ce": 1.0, "bce": 2.0, "dice": 0.5}


def test_state_flattening_round_trip() -> None:
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0], "foreach": None}]}
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.loads(json.dumps(ckpt.flatten_state(state, tensors)))
    assert set(tensors) == {"s.state.0.step", "s.state.0.exp_avg"}
    back = ckpt.unflatten_state(skeleton, tensors)
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["state"][0]["exp_avg"], torch.arange(4.0))
    with pytest.raises(TypeError, match="object"):
        ckpt.flatten_state({"x": object()}, {})


def test_data_order_epochs_rates_and_restore() -> None:
    order = DataOrder(seed=5, sizes=[3], rates=[1.0])
    first = [order.next()[1] for _ in range(6)]
    assert sorted(first[:3]) == [0, 1, 2] and sorted(first[3:]) == [0, 1, 2]  # two full epochs
    mixed = DataOrder(seed=1, sizes=[4, 2], rates=[3.0, 1.0])
    draws = [mixed.next() for _ in range(400)]
    share = sum(1 for s, _ in draws if s == 0) / len(draws)
    assert 0.68 < share < 0.82  # 3 : 1
    saved = mixed.state()
    rest = [mixed.next() for _ in range(10)]
    restored = DataOrder.from_state(json.loads(json.dumps(saved)), [4, 2], [3.0, 1.0])
    assert [restored.next() for _ in range(10)] == rest
    with pytest.raises(ValueError, match="sizes"):
        DataOrder.from_state(saved, [5, 2], [3.0, 1.0])


def test_split_names_any_refer_dataset() -> None:
    for name in ("toyref|unc|train", "toyref|unc|testA", "refcoco|unc|train", "refcocog|umd|train", "ReasonSeg|train"):
        check_split(name)
    for bad in ("refcoco|unc|test", "refcocog|umd|testA", "RIO|train", "toyref"):
        with pytest.raises(UnknownSplitError):
            check_split(bad)


def test_conversations_use_lisa_templates(mini_rich: Path) -> None:
    group = load_groups("refcoco|unc|train", mini_rich)[0]
    convs = conversations(group, samples_per_image=3, style=PromptStyle("lisa"), rng=item_rng(0, 0))
    assert len(convs) == 3 and len({id(c.image) for c in convs}) == 1
    for conv in convs:
        assert conv.question_template in SHORT_QUESTION_LIST and conv.answer in ANSWER_LIST
        assert conv.gt_masks.shape == (1, conv.image.height, conv.image.width)
        prompt = build_prompt(conv.text, conv.is_sentence, conv.answer, conv.question_template)
        assert conv.question_template.format(class_name=conv.text) in prompt and prompt.endswith(f"{conv.answer}</s>")
    again = conversations(group, samples_per_image=3, style=PromptStyle("lisa"), rng=item_rng(0, 0))
    assert [(c.sample_id, c.question_template, c.answer) for c in again] == \
        [(c.sample_id, c.question_template, c.answer) for c in convs]
    evals = conversations(group, samples_per_image=9, style=PromptStyle("eval"), rng=item_rng(0, 0))
    assert [c.sample_id for c in evals] == [s.sample_id for s in group.samples]
    assert all(c.question_template is None and c.answer == "[SEG]." for c in evals)


def _write_vqa(root: Path, name: str, items: list[dict]) -> str:
    """An LLaVA-Instruct file ``llava_dataset/<name>.json`` under ``root``; returns its source override."""
    (root / "llava_dataset").mkdir(exist_ok=True)
    (root / "llava_dataset" / f"{name}.json").write_text(json.dumps(items))
    return f"train_data.sources=[{{vqa: {name}, image_dir: {MINI_IMAGES}, rate: 1.0}}]"


MINI_IMAGES = "refer_seg/images/mscoco/images/train2014"


def test_vqa_prompt_and_conversations(mini: Path) -> None:
    """A VQA turn is LISA's VQADataset first turn: the image slot, a newline, the question verbatim."""
    from datasets.vqa import load_llava_instruct
    from model.prompt import SYSTEM_PROMPT, vqa_prompt

    assert vqa_prompt("Where is the cup?", "top left.") == (
        f"{SYSTEM_PROMPT} USER: <im_start><image><im_end>\nWhere is the cup? ASSISTANT: top left.</s>")
    image = sorted((mini / MINI_IMAGES).iterdir())[0].name
    items = [{"id": "a", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the left?"}, {"from": "gpt", "value": "a dog."},
        {"from": "human", "value": "Which object is red?"}, {"from": "gpt", "value": "the cup."},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "Yes."}]}]
    _write_vqa(mini, "vqa_unit", items)
    group = load_llava_instruct(mini / "llava_dataset/vqa_unit.json", mini / MINI_IMAGES, "vqa:vqa_unit")[0]
    assert group.turns == (("What is on the left?", "a dog."), ("Which object is red?", "the cup."),
                           ("Is it big?", "Yes."))
    convs = conversations(group, samples_per_image=2, style=PromptStyle("lisa"), rng=item_rng(0, 3))
    assert len(convs) == 2 and len({id(c.image) for c in convs}) == 1
    for conv in convs:
        k = int(conv.sample_id.split("#")[1])
        assert conv.sample_id == f"a#{k}" and (conv.message, conv.answer) == group.turns[k]
        assert conv.gt_masks.shape == (0, conv.image.height, conv.image.width)


def test_vqa_source_errors_name_the_file_item_and_key(mini: Path, tmp_path: Path) -> None:
    from datasets.vqa import load_llava_instruct

    image = sorted((mini / MINI_IMAGES).iterdir())[0].name
    bad = {
        "no 'conversations' key": [{"image": image}],
        "expected \\('human', 'gpt'\\)": [{"image": image, "conversations": [{"from": "gpt", "value": "x"},
                                                                          {"from": "human", "value": "y"}]}],
        "human/gpt pairs, got 1 turns": [{"image": image, "conversations": [{"from": "human", "value": "x"}]}],
        "nothere.jpg not found": [{"image": "nothere.jpg", "conversations": [{"from": "human", "value": "x"},
                                                                             {"from": "gpt", "value": "y"}]}],
    }
    for i, (message, items) in enumerate(bad.items()):
        _write_vqa(tmp_path, f"bad{i}", items)
        with pytest.raises((ValueError, FileNotFoundError), match=f"bad{i}.json item 0: .*{message}"):
            load_llava_instruct(tmp_path / f"llava_dataset/bad{i}.json", mini / MINI_IMAGES, "vqa:x")
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        load_sources([{"vqa": "missing", "image_dir": MINI_IMAGES}], mini)
    with pytest.raises(ValueError, match="needs 'image_dir'"):
        load_sources([{"vqa": "vqa_unit"}], mini)
    with pytest.raises(ValueError, match="exactly one of 'split'"):
        load_sources([{"vqa": "vqa_unit", "split": "refcoco|unc|train", "image_dir": MINI_IMAGES}], mini)
    _write_vqa(tmp_path, "empty", [])
    with pytest.raises(EmptyTrainingSetError, match="vqa:empty"):
        load_sources([{"vqa": "empty", "image_dir": str(mini / MINI_IMAGES)}], tmp_path)
    source = _write_vqa(mini, "vqa_dec", [{"image": image, "conversations": [{"from": "human", "value": "x"},
                                                                            {"from": "gpt", "value": "y"}]}])
    with pytest.raises(ValueError, match="mode=decoder .*VQA source has no masks"):
        train(fast(mini, tmp_path / "dec", "mode=decoder", source))


@pytest.mark.slow
def test_vqa_turns_train_the_llm_and_not_the_mask_path(mini: Path, tmp_path: Path) -> None:
    """Text-only turns: the CE loss falls on a repeated batch, the mask terms are exactly 0, and the mask
    decoder and text_hidden_fcs (which no VQA turn reaches) stay bit for bit unchanged."""
    image = sorted((mini / MINI_IMAGES).iterdir())[0].name
    source = _write_vqa(mini, "vqa_train", [{"id": "q", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the left?"}, {"from": "gpt", "value": "a red cup."}]}])
    before = initial_params()
    result = train(fast(mini, tmp_path / "run", "mode=full", "trainer.save_released=true", "trainer.steps=4",
                        source))
    losses = [h["ce_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] and all(h["mask_bce_loss"] == h["mask_dice_loss"] == 0.0 for h in result["history"])
    out = result["outputs"]
    after = {k: v.detach() for k, v in load_lisa_checkpoint(out["checkpoint"], out["vision_tower"])
             .model.checkpoint_state_dict().items()}
    changed = changed_keys(before, after)
    assert {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} <= changed
    assert any(k.startswith("model.mm_projector") for k in changed)  # the answer depends on the image
    assert not any(k.startswith(("model.visual_model.", "model.text_hidden_fcs.")) for k in changed)


# ---------------------------------------------------------------- bad input

def test_empty_split_and_bad_config(mini: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "refer_seg" / "emptyref").mkdir(parents=True)
    (root / "refer_seg" / "images" / "mscoco" / "images" / "train2014").mkdir(parents=True)
    with open(root / "refer_seg" / "emptyref" / "refs(unc).p", "wb") as handle:
        pickle.dump([], handle)
    (root / "refer_seg" / "emptyref" / "instances.json").write_text('{"images": [], "annotations": []}')
    shutil.copytree(mini / "refer_seg" / "refcoco", root / "refer_seg" / "refcoco")  # a non-empty training split
    with pytest.raises(EmptyTrainingSetError, match=r"emptyref\|unc\|train"):
        load_sources([{"split": "emptyref|unc|train", "rate": 1}], root)
    with pytest.raises(EmptyTrainingSetError, match="empty"):
        load_sources([], root)
    with pytest.raises(DatasetLayoutError, match="nothere"):
        load_sources([{"split": "nothere|unc|train"}], root)
    with pytest.raises(ValueError, match="rate"):
        load_sources([{"split": "refcoco|unc|train", "rate": 0}], mini)
    with pytest.raises(EmptyTrainingSetError, match=r"validation splits \['emptyref\|unc\|val'\]"):
        train(fast(root, tmp_path / "v", "train_data.val_splits=[emptyref|unc|val]",
                   "train_data.sources=[{split: refcoco|unc|train}]"))
    with pytest.raises(ValueError, match="mode.name"):
        train(fast(mini, tmp_path / "a", "mode.name=nope"))
    with pytest.raises(ValueError, match=r"trainer.steps=0"):
        train(fast(mini, tmp_path / "b", "trainer.steps=0"))
    with pytest.raises(ValueError, match=r"trainer.warmup_steps=0; DeepSpeed's WarmupDecayLR needs >= 1"):
        train(fast(mini, tmp_path / "d", "trainer.deepspeed=true"))
    with pytest.raises(ValueError, match=r"leaves \['vision_tower.'\] trainable"):
        train(fast(mini, tmp_path / "c", "mode.freeze=[model.mm_projector]"))
    with pytest.raises(ValueError, match=r"trainer.lr_scale\[0\]"):
        train(fast(mini, tmp_path / "e", "trainer.lr_scale=[{prefixes: [lm_head], scale: -1}]"))
    with pytest.raises(ValueError, match=r"trainer.image_ramp=\[5, 2\]"):
        train(fast(mini, tmp_path / "f", "trainer.image_ramp=[5,2]"))
    with pytest.raises(ValueError, match="mode=decoder"):
        train(fast(mini, tmp_path / "g", "mode=decoder", "trainer.image_ramp=[0,5]"))


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=abc", "trainer.lr='abc'; expected a number > 0"),
    ("trainer.lr=0", "trainer.lr=0; expected a number > 0"),
    ("trainer.warmup_steps=2.5", "trainer.warmup_steps=2.5; expected an integer >= 0"),
    ("trainer.grad_clip=x", "trainer.grad_clip='x'; expected a number >= 0 or null"),
    ("trainer.betas=[0.9,1.5]", r"trainer.betas\[1\]=1.5; expected a number in \[0, 1\)"),
    ("trainer.save_every=often", "trainer.save_every='often'; expected an integer >= 0"),
    ("val.every=-1", "val.every=-1; expected an integer >= 0"),
    ("+mode.loss_weights.point=heavy", "mode.loss_weights.point='heavy'; expected a number >= 0"),
])
def test_every_numeric_key_is_checked_by_name(mini: Path, tmp_path: Path, override: str, message: str) -> None:
    """A value that is not a number in range ends in one error naming the key and the value, before anything
    is loaded (not Python's bare 'could not convert string to float')."""
    from training.config import check_config

    with pytest.raises(ValueError, match=message):
        check_config(fast(mini, tmp_path, override))


def test_decoder_cache_refusal_names_a_key_that_exists(tmp_path: Path) -> None:
    """The remedy the refusal suggests (another mode.cache_dir) is a key of the decoder mode's config."""
    key = {"fingerprint": "abc", "method": json.dumps(CSP_SPEC), "model_name": "tiny", "prompts": "eval"}
    DecoderCache(tmp_path / "cache", key)
    with pytest.raises(ValueError, match="use another mode.cache_dir") as err:
        DecoderCache(tmp_path / "cache", {**key, "fingerprint": "abd"})
    cfg = compose_train(["mode=decoder", "schedule=llava7b_224_p70"])
    assert "cache_dir" in cfg.mode and "use another mode.cache_dir" in str(err.value)


def test_lora_adapts_exactly_the_llms_q_and_v_projections() -> None:
    """LISA's recipe adapts the LLM's q_proj / v_proj only; SAM's mask decoder has modules of the same
    suffix (``transformer.layers.N.self_attn.q_proj``) and gets no adapter."""
    from training.lora import adapted_modules

    model = build_tiny_lisa(seed=0).model
    apply_lora(model, {"targets": ["q_proj", "v_proj"]})
    adapted = adapted_modules(model.model)
    layers = model.config.num_hidden_layers
    assert adapted == sorted(f"layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv")
    assert not any("visual_model" in n for n, _ in model.named_parameters() if "lora_" in n)


def test_missing_lora_target_lists_module_names() -> None:
    model = build_tiny_lisa(seed=0).model
    with pytest.raises(ValueError) as err:
        apply_lora(model, {"targets": ["q_proj", "query_proj"]})
    message = str(err.value)
    assert "query_proj" in message and "k_proj" in message and "gate_proj" in message


def test_cache_of_another_model_or_schedule_is_an_error(tmp_path: Path) -> None:
    key = {"fingerprint": "abc", "method": json.dumps(CSP_SPEC), "model_name": "tiny", "prompts": "eval"}
    DecoderCache(tmp_path / "cache", key)
    DecoderCache(tmp_path / "cache", dict(key))  # same key: reused
    with pytest.raises(ValueError, match="method"):
        DecoderCache(tmp_path / "cache", {**key, "method": "null"})
    with pytest.raises(ValueError, match="fingerprint"):
        DecoderCache(tmp_path / "cache", {**key, "fingerprint": "abd"})


# ---------------------------------------------------------------- the modes

@pytest.mark.slow
def test_full_mode_trains_all_but_frozen_and_writes_released_checkpoint(mini: Path, tmp_path: Path) -> None:
    before = initial_params()
    result = train(fast(mini, tmp_path / "run", "mode=full", "trainer.save_released=true", "trainer.steps=2",
                        "train_data.val_splits=[refcoco|unc|val]", "val.every=2", "val.max_samples_per_split=1",
                        "logger=wandb", "logger.mode=offline", f"logger.dir={tmp_path / 'wandb'}",
                        "mode.freeze=[vision_tower.,model.visual_model.image_encoder.,model.mm_projector]"))
    assert [h["step"] for h in result["history"]] == [1, 2]
    assert [v["step"] for v in result["val"]] == [2] and 0.0 <= result["val"][0]["refcoco|unc|val/gIoU"] <= 1.0
    assert (tmp_path / "run" / "val" / "step_0000002" / "metrics.json").is_file()
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # the offline run was written
    out = result["outputs"]
    bundle = load_lisa_checkpoint(out["checkpoint"], out["vision_tower"])
    check_round_trip(bundle, Path(out["checkpoint"]), sentencepiece=False)  # LISA's files, fields and token ids
    after = {k: v.detach() for k, v in bundle.model.checkpoint_state_dict().items()}
    changed = changed_keys(before, after)
    frozen = ("model.visual_model.image_encoder.", "model.mm_projector")
    assert changed and not any(k.startswith(frozen) for k in changed)
    # everything in the graph moves (SAM's IoU head and prompt-encoder point embeddings get no gradient)
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                "model.norm.weight", "model.text_hidden_fcs.0.0.weight",
                "model.visual_model.mask_decoder.output_upscaling.0.weight"):
        assert key in changed, key
    saved = load_file(str(Path(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")) / "trainable.safetensors"))
    assert not any(k.startswith(("vision_tower.",) + frozen) for k in saved)
    assert torch.equal(saved["lm_head.weight"], after["lm_head.weight"])


@pytest.mark.slow
def test_trainable_sam_image_encoder_same_loss_then_it_moves(mini: Path, tmp_path: Path) -> None:
    """mode=full without the SAM image encoder in mode.freeze: the loss runs it with gradients on the image
    (the cached no-grad embedding is not used), so the first loss equals the frozen run's, and its weights
    then change while the CLIP tower stays as it was."""
    frozen = train(fast(mini, tmp_path / "frozen", "mode=full", "trainer.steps=1"))
    before = initial_params()
    result = train(fast(mini, tmp_path / "run", "mode=full", "trainer.save_released=true", "trainer.steps=2",
                        "mode.freeze=[vision_tower.]"))
    assert result["history"][0]["loss"] == pytest.approx(frozen["history"][0]["loss"], rel=1e-5)
    out = result["outputs"]
    bundle = load_lisa_checkpoint(out["checkpoint"], out["vision_tower"])
    changed = changed_keys(before, {k: v.detach() for k, v in bundle.model.checkpoint_state_dict().items()})
    assert any(k.startswith("model.visual_model.image_encoder.") for k in changed)
    tower = build_tiny_lisa(seed=0, num_layers=LAYERS).model.vision_tower.state_dict()
    assert all(torch.equal(v, bundle.model.vision_tower.state_dict()[k]) for k, v in tower.items())


@pytest.mark.slow
def test_lr_scale_zero_and_silent_images_leave_those_weights_untouched(mini: Path, tmp_path: Path) -> None:
    """lr_scale 0 on the decoder layers and an image ramp that has not started: after two steps the layers
    and the projector (whose output is multiplied by 0, so its gradient is 0) are bit for bit unchanged,
    while the rest of the model moves."""
    before = initial_params()
    result = train(fast(mini, tmp_path / "run", "mode=full", "trainer.save_released=true", "trainer.steps=2",
                        "trainer.lr_scale=[{prefixes: [model.layers.], scale: 0.0}]", "trainer.image_ramp=[5,10]"))
    out = result["outputs"]
    after = {k: v.detach() for k, v in load_lisa_checkpoint(out["checkpoint"], out["vision_tower"])
             .model.checkpoint_state_dict().items()}
    changed = changed_keys(before, after)
    assert not any(k.startswith(("model.layers.", "model.mm_projector")) for k in changed)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.text_hidden_fcs.0.0.weight"} <= changed


@pytest.mark.slow
def test_lisa_mode_lora_only_trainable_change_and_resume_equals_uninterrupted(mini: Path, tmp_path: Path) -> None:
    before = initial_params()
    args = ["mode=lisa", "trainer.steps=3", "trainer.save_every=2", "trainer.samples_per_image=1",
            "trainer.save_released=true", "trainer.lr=0.003"]
    full = train(fast(mini, tmp_path / "whole", *args))
    part = train(fast(mini, tmp_path / "split", *args, "trainer.stop_after=1"))
    assert part["step"] == 1 and not (tmp_path / "split" / "final").exists()
    rest = train(fast(mini, tmp_path / "split", *args, "trainer.resume=true"))
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in full["history"]]
    for run in ("whole", "split"):
        assert (tmp_path / run / "checkpoints" / ckpt.LATEST).is_file()
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    assert set(whole) == set(split) and any("lora_A" in k for k in whole)
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    # merged released checkpoint: q/v projections, lm_head, embeddings, decoder and heads moved; nothing else
    out = full["outputs"]
    after = {k: v.detach() for k, v in load_lisa_checkpoint(out["checkpoint"], out["vision_tower"])
             .model.checkpoint_state_dict().items()}
    changed = changed_keys(before, after)
    allowed = ("lm_head.", "model.embed_tokens.", "model.visual_model.mask_decoder.", "model.text_hidden_fcs.")
    lora = {k for k in changed if k.startswith("model.layers.")}
    assert lora == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(LAYERS) for p in "qv"}
    assert changed - lora and all(k.startswith(allowed) for k in changed - lora)
    # a checkpoint of another recipe is refused, never mixed
    with pytest.raises(ValueError, match="fingerprint"):
        train(fast(mini, tmp_path / "split", *args, "trainer.resume=true", "mode.lora.r=4"))


DECODER_ARGS = ["mode=decoder", *SCHEDULE]


@pytest.fixture(scope="module")
def decoder_runs(mini: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Decoder mode from the cache and without it (recomputing the frozen features every step)."""
    tmp_path = tmp_path_factory.mktemp("decoder")
    cached = train(fast(mini, tmp_path / "cached", *DECODER_ARGS, "trainer.save_released=true"))
    live = train(fast(mini, tmp_path / "live", *DECODER_ARGS, "mode.cache=false"))
    return tmp_path, cached, live


@pytest.mark.slow
def test_decoder_mode_cache_equals_live_loss_falls_and_eval_reloads(mini: Path, decoder_runs: tuple) -> None:
    tmp_path, cached, live = decoder_runs
    assert (tmp_path / "cached" / "decoder_cache" / "meta.json").is_file()
    assert not (tmp_path / "live" / "decoder_cache").exists()
    losses = [h["loss"] for h in cached["history"]]
    assert losses == pytest.approx([h["loss"] for h in live["history"]], rel=1e-6, abs=1e-7)
    assert losses[-1] < losses[0] and all(h["ce_loss"] == 0.0 for h in cached["history"])
    # only the mask decoder changed; it reloads into the frozen model and changes the masks
    decoder_file = Path(cached["outputs"]["mask_decoder"])
    trained = load_file(str(decoder_file))
    base = tiny()
    original = {k[len(MASK_DECODER_PREFIX):]: v.clone() for k, v in base.model.named_parameters()
                if k.startswith(MASK_DECODER_PREFIX)}
    assert any(not torch.equal(original[k], trained[k]) for k in trained)
    saved = load_file(str(ckpt.latest_checkpoint(tmp_path / "cached" / "checkpoints") / "trainable.safetensors"))
    assert saved and all(k.startswith(MASK_DECODER_PREFIX) for k in saved)
    out = cached["outputs"]
    after = {k: v.detach() for k, v in load_lisa_checkpoint(out["checkpoint"], out["vision_tower"])
             .model.checkpoint_state_dict().items()}
    changed = changed_keys(initial_params(), after)
    assert changed and all(k.startswith(MASK_DECODER_PREFIX) for k in changed)
    from csp.schedule import StageSchedule

    pipe = SegmentationPipeline(base, StageSchedule.from_mapping(SCHEDULE_DICT))
    group = load_groups("refcoco|unc|train", mini)[0]
    image = open_image(group.image_path)
    queries = [Query(s.text, s.is_sentence, s.sample_id) for s in group.samples]
    enc = pipe.encode_image(image)
    prompts = [r.seg_embeddings for r in pipe.segment(image, queries)]
    logits_before = [pipe.masks_for(enc, p) for p in prompts]
    with pytest.raises(ValueError, match="under method"):
        load_mask_decoder(base.model, decoder_file, method=None)
    with pytest.raises(ValueError, match="under method"):
        load_mask_decoder(base.model, decoder_file, method={"name": "fastv", "layer": 1, "keep": 16})
    with pytest.raises(ValueError, match="another model"):
        load_mask_decoder(tiny(seed=1).model, decoder_file, method=CSP_SPEC)
    load_mask_decoder(base.model, decoder_file, method=CSP_SPEC)
    logits_after = [pipe.masks_for(enc, p) for p in prompts]
    assert any((a != b).any() for a, b in zip(logits_before, logits_after))


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_keeps_last_checkpoint(mini: Path, tmp_path: Path, decoder_runs: tuple,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = Runner.micro_loss

    def poisoned(self: Runner, items: list) -> tuple:
        parts, ids = real(self, items)
        if self.state.step == 2:
            parts.loss = parts.loss * float("nan")
        return parts, ids

    monkeypatch.setattr(Runner, "micro_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(fast(mini, run, *DECODER_ARGS, "trainer.steps=4", "trainer.save_every=1",
                   f"mode.cache_dir={decoder_runs[0] / 'cached' / 'decoder_cache'}"))
    message = str(err.value)
    # one numbering: the poisoned step is the 3rd optimizer step, as the log and checkpoints count it
    assert "at step 3" in message and "refcoco|unc|train:ref" in message and "step_0000002" in message
    last = ckpt.latest_checkpoint(run / "checkpoints")
    assert last.name == "step_0000002"
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 2 and all(math.isfinite(h["loss"]) for h in state["history"])
    assert load_file(str(last / "trainable.safetensors"))
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_damaged_checkpoint_and_changed_settings_are_refused_by_name(mini: Path, tmp_path: Path,
                                                                      decoder_runs: tuple) -> None:
    """A truncated weights file, a torn optimizer header or a truncated state JSON names the file and the
    step, and the remedy it gives (an earlier complete checkpoint) resumes; a resume with a changed trainer
    key the checkpoint restores is refused naming the key and both values."""
    import re

    from training.checkpointing import CheckpointError

    run = tmp_path / "run"
    args = [*DECODER_ARGS, "trainer.steps=3", "trainer.save_every=1", "trainer.keep_checkpoints=null",
            f"mode.cache_dir={decoder_runs[0] / 'cached' / 'decoder_cache'}"]
    train(fast(mini, run, *args, "trainer.stop_after=2"))
    step2 = run / "checkpoints" / "step_0000002"
    pristine = {p.name: p.read_bytes() for p in step2.iterdir() if p.is_file()}
    damage = {"trainable.safetensors": lambda b: b[: len(b) // 2], "optimizer.safetensors": lambda b: b"\xff" * 8 + b[8:],
              "state.json": lambda b: b[: len(b) // 2]}
    for name, cut in damage.items():
        (step2 / name).write_bytes(cut(pristine[name]))
        with pytest.raises(CheckpointError) as err:
            train(fast(mini, run, *args, "trainer.resume=true"))
        message = str(err.value)
        assert f"{step2 / name} cannot be read" in message and "(step 2)" in message, message
        remedy = re.search(r"trainer.resume=(\S+)", message).group(1)
        assert remedy.endswith("step_0000001")
        (step2 / name).write_bytes(pristine[name])
    resumed = train(fast(mini, run, *args, f"trainer.resume={remedy}"))  # the advice works as written
    assert resumed["step"] == 3
    with pytest.raises(ValueError, match=r"trainer.lr=0.1 but checkpoint step_0000003 was trained with trainer.lr="):
        train(fast(mini, run, *args, "trainer.resume=true", "trainer.lr=0.1"))


def test_resume_after_a_crash_trims_the_dead_attempts_log(mini: Path, tmp_path: Path, decoder_runs: tuple,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that died after logging step 3 (last checkpoint: step 2) resumes at step 2: its log then counts
    1, 2, 3, 4 once each (the dead attempt's step 3 is dropped), not [1, 2, 3, 3, 4]."""
    real = Runner.micro_loss
    poison = [True]

    def poisoned(self: Runner, items: list) -> tuple:
        parts, ids = real(self, items)
        if poison[0] and self.state.step == 3:
            parts.loss = parts.loss * float("nan")
        return parts, ids

    monkeypatch.setattr(Runner, "micro_loss", poisoned)
    run = tmp_path / "run"
    args = [*DECODER_ARGS, "trainer.steps=4", "trainer.save_every=2",
            f"mode.cache_dir={decoder_runs[0] / 'cached' / 'decoder_cache'}"]
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        train(fast(mini, run, *args))
    steps = lambda: [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps() == [1, 2, 3]
    poison[0] = False
    train(fast(mini, run, *args, "trainer.resume=true"))
    assert steps() == [1, 2, 3, 4]


@pytest.mark.slow
def test_eval_labels_finetuned_decoder_rows(mini: Path, tmp_path: Path) -> None:
    from evaluation.evaluate import evaluate
    from model.finetuned import save_mask_decoder

    bundle = tiny()
    with torch.no_grad():
        for name, param in bundle.model.named_parameters():
            if name.startswith(MASK_DECODER_PREFIX):
                param.add_(0.05 * torch.randn_like(param))
    path = save_mask_decoder(bundle.model, tmp_path / "dec.safetensors", method=CSP_SPEC, model_name="tiny")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "+exp=demo_tiny", f"dataset_dir={mini}", "miniature=null", f"output_dir={tmp_path / 'eval'}",
            "data.splits=[refcoco|unc|val]", "max_samples_per_split=1", f"model.mask_decoder={path}",
            f"model.num_layers={LAYERS}", *SCHEDULE[1:]])
    results = evaluate(cfg)
    method, base = results["method"], results["baseline"]
    assert method["name"].endswith("(mIoU*)") and method["summary"]["mIoU*"]
    assert method["summary"]["mIoU*_drop"] == method["summary"]["mIoU_drop"] is not None
    assert not base["summary"]["mIoU*"] and base["summary"]["mIoU*_drop"] is None
    table = (tmp_path / "eval" / "table.txt").read_text()
    assert "(mIoU*)" in table and "mIoU*_drop" in table


# ---------------------------------------------------------------- LoRA merge

@pytest.mark.slow
def test_lora_merge_equals_unmerged_and_reloads(tmp_path: Path) -> None:
    bundle = build_tiny_lisa(seed=4, num_layers=LAYERS)
    model = bundle.model
    wrapper = apply_lora(model, {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]})
    with torch.no_grad():  # lora_B starts at 0 (a no-op adapter): make it matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.eval()
    pipe = SegmentationPipeline(bundle)
    image = open_image_from_array()
    enc = pipe.encode_image(image)
    ids = [tokenize_with_image(build_prompt("the red box", False), bundle.tokenizer)]

    def seg() -> torch.Tensor:
        with torch.no_grad():
            out = teacher_forced(model, pipe.runner, ids, enc.image_embeds, bundle.token_ids.seg, bundle.token_ids.pad)
        return out.seg_embeddings[0]

    plain_q = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    unmerged = seg()
    merge_lora(model, wrapper)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, plain_q)
    merged = seg()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    from model.checkpoint import save_lisa_checkpoint

    out = save_lisa_checkpoint(bundle, tmp_path / "lisa")
    model.vision_tower.clip.save_pretrained(tmp_path / "clip")
    model.vision_tower.processor.save_pretrained(tmp_path / "clip")
    reloaded = load_lisa_checkpoint(out, tmp_path / "clip")
    with torch.no_grad():
        again = teacher_forced(reloaded.model, SegmentationPipeline(reloaded).runner, ids, enc.image_embeds,
                               reloaded.token_ids.seg, reloaded.token_ids.pad).seg_embeddings[0]
    torch.testing.assert_close(again, merged, rtol=1e-5, atol=1e-6)


def open_image_from_array():  # noqa: ANN201 - a PIL image
    from tests.conftest import random_pil_image

    return random_pil_image(48, 64, seed=3)


# ---------------------------------------------------------------- the Table 6 protocol script

@pytest.mark.slow
def test_finetune_script_runs_one_decoder_per_column_and_its_commands_compose(tmp_path: Path) -> None:
    import os
    import shlex
    import subprocess

    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out")}
    lines = subprocess.run(["bash", str(REPO / "scripts" / "finetune_mask_decoder.sh"), "trainer.steps=7"], env=env,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    commands = [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]
    trains = [c for c in commands if c[1] == "train_ds.py"]
    evals = [c for c in commands if c[1] == "eval_ds.py"]
    columns = ["baseline", "p65", "p70", "p75", "p80", "p85", "p90"]
    assert len(trains) == 7 and len(evals) == 8  # plain LISA once, then one evaluation per column
    for column, train_cmd, eval_cmd in zip(columns, trains, evals[1:]):
        overrides = [a for a in train_cmd[2:] if not a.startswith("hydra.")]
        cfg = compose_train(overrides)
        assert cfg.mode.name == "decoder" and cfg.trainer.steps == 7 and cfg.model.name == "llava7b_224"
        expected = None if column == "baseline" else f"llava7b_224_{column}"
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            ecfg = compose(config_name="eval", overrides=[a for a in eval_cmd[2:] if not a.startswith("hydra.")])
        assert (cfg.schedule is None) == (expected is None) and (ecfg.schedule is None) == (expected is None)
        if expected is not None:
            assert dict(cfg.schedule) == dict(ecfg.schedule)  # the decoder is evaluated under its own schedule
        assert ecfg.model.mask_decoder.startswith(str(tmp_path / "out" / column / "train"))
        assert ecfg.baseline == str(tmp_path / "out" / "plain" / "metrics.json")


@pytest.mark.slow
def test_decoder_fine_tune_under_fastv_ties_the_decoder_to_fastv(mini: Path, tmp_path: Path) -> None:
    """mode=decoder takes any method (here FastV through the method group): its cache and its decoder
    file are keyed by the method with its parameters, evaluation under FastV loads the decoder, and
    evaluation under another method (CSP) or plain LISA refuses it."""
    from csp.config import method_from_config

    fastv = ["method=fastv", "method.layer=1", "method.keep=16"]
    cfg = fast(mini, tmp_path / "fastv", "mode=decoder", *fastv)
    spec = method_from_config(cfg).spec
    assert spec == {"name": "fastv", "layer": 1, "keep": 16}
    result = train(cfg)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    meta = json.loads((tmp_path / "fastv" / "decoder_cache" / "meta.json").read_text())
    assert json.loads(meta["method"]) == spec
    decoder = result["outputs"]["mask_decoder"]
    load_mask_decoder(tiny().model, decoder, method=spec)
    for other in (None, CSP_SPEC, {**spec, "keep": 8}):
        with pytest.raises(ValueError, match="under method"):
            load_mask_decoder(tiny().model, decoder, method=other)
    # the cached [SEG] embeddings are the ones evaluation computes under FastV
    from csp.methods import build_method

    pipe = SegmentationPipeline(tiny(), build_method(spec))
    group = load_groups("refcoco|unc|train", mini)[0]
    queries = [Query(s.text, s.is_sentence, s.sample_id) for s in group.samples]
    evaluated = pipe.segment(open_image(group.image_path), queries)
    cached = load_file(str(next((tmp_path / "fastv" / "decoder_cache").rglob("*.safetensors"))))
    for query, res in zip(queries, evaluated, strict=True):
        assert torch.allclose(cached[f"prompt/{query.sample_id}"], res.seg_embeddings, atol=1e-6)
