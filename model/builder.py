"""Builders for LISA models with typed arguments: the tiny and toy random models, the CLIP tower
from its directory (released checkpoints and fresh LLaVA + SAM builds: ``model.checkpoint``).

The bundle type lives in ``model.bundle``; a Hydra ``model`` node is mapped onto these builders by
the entry layer (``runs.models.build_from_config``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from model.bundle import (  # noqa: F401  (re-exported: the bundle type and dtype helpers live in model.bundle)
    DTYPES,
    LisaBundle,
    cast_model,
    keep_fp32_buffers,
    resolve_dtype,
)
from model.lisa import LISAForCausalLM
from model.prompt import SpecialTokenIds
from model.sam import build_sam_vit_h, build_tiny_sam, build_toy_conv_sam, build_toy_sam
from model.tokenizer import build_tiny_tokenizer
from model.vision import (
    CLIPVisionTower,
    clip_processor_for,
    load_clip_processor,
    sincos_position_embedding,
    tiny_clip_config,
)

#: SAM architectures by the config key ``sam_arch`` (LISA's configs have none: ViT-H).
SAM_BUILDERS: dict[str, Callable[[], Sam]] = {"vit_h": build_sam_vit_h, "tiny": build_tiny_sam, "toy": build_toy_sam,
                                              "toy_conv": build_toy_conv_sam}

def tiny_llama_config(vocab_size: int, *, num_layers: int = 6, hidden_size: int = 64, heads: int = 4,
                      kv_heads: int | None = None, projector: str = "linear", intermediate_size: int | None = None,
                      mm_hidden_size: int | None = None) -> LlamaConfig:
    """LLaMA at tiny width with LISA's extra fields (as LISA's config.json carries them)."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or hidden_size * 2 + 16,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    config.mm_hidden_size = mm_hidden_size or tiny_clip_config().hidden_size
    config.mm_projector_type = projector
    config.mm_vision_select_layer = -2
    config.mm_use_im_start_end = True
    config.out_dim = 32
    config.sam_arch = "tiny"
    config.vision_tower = "tiny-clip"
    config._attn_implementation = "sdpa"
    return config


def build_tiny_lisa(seed: int = 0, *, num_layers: int = 6, hidden_size: int = 64, heads: int = 4,
                    kv_heads: int | None = None, projector: str = "linear",
                    tokenizer: PreTrainedTokenizerBase | None = None) -> LisaBundle:
    """Real classes, tiny sizes, random weights (seeded); CLIP 224/14 so N = 256 as in the paper.

    ``tokenizer``: any tokenizer with LISA's added tokens (default: the tiny word-level one).
    """
    tokenizer = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), num_layers=num_layers, hidden_size=hidden_size,
                               heads=heads, kv_heads=kv_heads, projector=projector)
    tower = CLIPVisionTower(model=CLIPVisionModel(tiny_clip_config()), processor=clip_processor_for(224))
    model = LISAForCausalLM(config, visual_model=build_tiny_sam(config.out_dim), vision_tower=tower)
    return LisaBundle(model.eval(), tokenizer, SpecialTokenIds.from_tokenizer(tokenizer))


@dataclass(frozen=True)
class ToySizes:
    """Sizes of the ``toy`` preset (configs/model/toy.yaml): trainable from scratch on a CPU.

    The CLIP grid is ``clip_image_size / clip_patch_size`` squared: 112 / 14 -> N = 64 image tokens.
    SAM is ``sam_arch: toy`` (model.sam.build_toy_sam: 1024 input, 64 x 64 embedding, out_dim 64).
    """

    num_layers: int = 8
    hidden_size: int = 128
    heads: int = 4
    intermediate_size: int = 256
    projector: str = "mlp2x_gelu"
    clip_image_size: int = 112
    clip_patch_size: int = 14
    clip_hidden_size: int = 64
    clip_layers: int = 3
    #: Std of the LLM's initial weights; None: hidden_size ** -0.5. LLaMA's 0.02 (meant for pretrained widths)
    #: leaves a from-scratch model of width 128 with near-uniform attention for hundreds of steps.
    init_std: float | None = None
    #: The CLIP tower's patch position embeddings: ``random`` (CLIP's own init, N(0, 0.02)) or ``sincos`` (2-D
    #: sine-cosine codes, unit scale). With CLIP's init the patch content (std ~0.5) drowns the positions: a
    #: linear probe recovers a token's row and column with R^2 0.14 (sincos: 0.99). The committed toy model
    #: uses ``random``; ``sincos`` did not raise its accuracy (README "Toy world").
    clip_position_embedding: str = "random"
    #: SAM's image-encoder position embedding: ``zeros`` (segment-anything's init) or ``sincos``
    #: (model.sam.build_toy_sam says why it matters to the mask decoder).
    sam_position_embedding: str = "zeros"
    #: A folder with the pretrained toy towers (training/toy_towers.py: ``clip/`` and ``sam.safetensors``), or
    #: None for random towers. With it, the CLIP sizes above come from ``clip/config.json`` and SAM is the
    #: pretrained ``toy_conv`` SAM (encoder, prompt encoder and mask decoder), as LISA starts from OpenAI's
    #: CLIP and SA-1B's SAM.
    towers: str | None = None

    @property
    def num_image_tokens(self) -> int:
        if self.towers is not None:
            clip = CLIPVisionConfig.from_pretrained(Path(self.towers) / "clip")
            return (clip.image_size // clip.patch_size) ** 2
        return (self.clip_image_size // self.clip_patch_size) ** 2


def load_toy_towers(towers: str | Path) -> tuple[CLIPVisionTower, Sam]:
    """The pretrained toy towers (training/toy_towers.py) in float32: the CLIP stand-in as a CLIP directory
    (``<towers>/clip``) and the ``toy_conv`` SAM (``<towers>/sam.safetensors``, segment-anything key names)."""
    from safetensors.torch import load_file

    towers = Path(towers)
    sam_file = towers / "sam.safetensors"
    if not (towers / "clip" / "config.json").is_file() or not sam_file.is_file():
        raise FileNotFoundError(f"model.towers={towers}: expected clip/config.json and sam.safetensors there "
                                "(python -m training.toy_towers clip|sam --out <folder>)")
    tower = load_vision_tower(towers / "clip")
    tower.clip.float()
    sam = build_toy_conv_sam()
    state = {k: v.float() for k, v in load_file(str(sam_file)).items()}
    sam.load_state_dict(state, strict=True)
    return tower, sam


def build_toy_lisa(seed: int = 0, sizes: ToySizes = ToySizes()) -> LisaBundle:
    """The toy-world LISA: real classes, seeded random weights, a word tokenizer that knows every
    word of the toy data set (datasets/toy.py) and of LISA's answer templates."""
    from datasets.toy import TOKENIZER_WORDS

    tokenizer = build_tiny_tokenizer(TOKENIZER_WORDS)
    torch.manual_seed(seed)
    if sizes.towers is not None:
        return _toy_lisa_on_towers(seed, sizes, tokenizer)
    clip_config = tiny_clip_config(sizes.clip_image_size, sizes.clip_patch_size, sizes.clip_hidden_size,
                                   sizes.clip_layers)
    config = tiny_llama_config(len(tokenizer), num_layers=sizes.num_layers, hidden_size=sizes.hidden_size,
                               heads=sizes.heads, projector=sizes.projector, intermediate_size=sizes.intermediate_size,
                               mm_hidden_size=clip_config.hidden_size)
    config.vision_tower = f"toy-clip-{sizes.clip_image_size}"
    config.initializer_range = sizes.init_std or sizes.hidden_size**-0.5
    clip = CLIPVisionModel(clip_config)
    if sizes.clip_position_embedding == "sincos":
        grid = sizes.clip_image_size // sizes.clip_patch_size
        with torch.no_grad():  # row 0 is the class token's
            clip.embeddings.position_embedding.weight[0].zero_()
            clip.embeddings.position_embedding.weight[1:] = sincos_position_embedding(grid, sizes.clip_hidden_size)
    elif sizes.clip_position_embedding != "random":
        raise ValueError(f"model.clip_position_embedding: expected 'sincos' or 'random', "
                         f"got {sizes.clip_position_embedding!r}")
    tower = CLIPVisionTower(model=clip, processor=clip_processor_for(sizes.clip_image_size))
    config.sam_arch = "toy"
    config.out_dim = build_toy_sam().prompt_encoder.embed_dim
    model = LISAForCausalLM(config, visual_model=build_toy_sam(position_embedding=sizes.sam_position_embedding),
                            vision_tower=tower)
    _init_seg_prompt(model, sizes.hidden_size)
    return LisaBundle(model.eval(), tokenizer, SpecialTokenIds.from_tokenizer(tokenizer))


def _toy_lisa_on_towers(seed: int, sizes: ToySizes, tokenizer: PreTrainedTokenizerBase) -> LisaBundle:
    """The toy LISA on the pretrained towers: LLM, projector and text_hidden_fcs random (seeded)."""
    tower, sam = load_toy_towers(sizes.towers)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), num_layers=sizes.num_layers, hidden_size=sizes.hidden_size,
                               heads=sizes.heads, projector=sizes.projector, intermediate_size=sizes.intermediate_size,
                               mm_hidden_size=tower.config.hidden_size)
    config.vision_tower = f"toy-clip-{tower.config.image_size}"
    config.initializer_range = sizes.init_std or sizes.hidden_size**-0.5
    config.sam_arch = "toy_conv"
    config.out_dim = sam.prompt_encoder.embed_dim
    model = LISAForCausalLM(config, visual_model=sam, vision_tower=tower)
    _init_seg_prompt(model, sizes.hidden_size)
    return LisaBundle(model.eval(), tokenizer, SpecialTokenIds.from_tokenizer(tokenizer))


def _init_seg_prompt(model: LISAForCausalLM, hidden_size: int) -> None:
    """The [SEG] prompt enters SAM's decoder beside its learned tokens (N(0, 1) entries); with PyTorch's
    default init the prompt is ~5x smaller and the decoder learns to ignore it. Unit-variance entries at
    init: the input of the last layer has second moment 1/6 per entry (ReLU of a default-init Linear of
    RMS-normalised states), so weights of std sqrt(6 / hidden_size)."""
    last = model.model.text_hidden_fcs[0][2]
    torch.nn.init.normal_(last.weight, std=(6.0 / hidden_size) ** 0.5)
    torch.nn.init.zeros_(last.bias)


def load_vision_tower(clip_dir: str | Path, select_layer: int = -2) -> CLIPVisionTower:
    """CLIP from its own directory (LISA checkpoints carry no vision-tower weights)."""
    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP vision tower directory {clip_dir} has no config.json; expected a Hugging Face CLIP "
            "directory (config.json, preprocessor_config.json, model weights), e.g. clip-vit-large-patch14"
        )
    model = CLIPVisionModel.from_pretrained(clip_dir, attn_implementation="sdpa")
    processor = load_clip_processor(clip_dir)
    return CLIPVisionTower(model=model, processor=processor, select_layer=select_layer)


def build_random_lisa(config: LlamaConfig, clip_config: CLIPVisionConfig, sam: Callable[[], Sam], *,
                      token_ids: SpecialTokenIds, dtype: torch.dtype, device: torch.device | str,
                      tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0,
                      clip_image_size: int = 224) -> LisaBundle:
    """LISA at any size with seeded random weights, built directly in ``dtype`` on ``device`` (a 7B model
    is never materialised in float32 on the host): the benchmarks' model.

    ``config``: the LLM's config with LISA's fields (``mm_hidden_size``, ``mm_projector_type``,
    ``mm_vision_select_layer``, ``out_dim``); ``sam``: a SAM builder (``model.sam.build_sam_vit_h``, ...);
    ``token_ids``: the special-token ids prompts use (``tokenizer`` may be None when prompts are built as ids).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            tower = CLIPVisionTower(model=CLIPVisionModel(clip_config), processor=clip_processor_for(clip_image_size))
            model = LISAForCausalLM(config, visual_model=sam(), vision_tower=tower)
    finally:
        torch.set_default_dtype(previous)
    keep_fp32_buffers(model)
    tower.clip.config._attn_implementation = "sdpa"
    return LisaBundle(model.eval(), tokenizer=tokenizer, token_ids=token_ids)
