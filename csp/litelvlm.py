"""LiteLVLM's selection (sejong-rcv/LiteLVLM, ICML 2026), shared by the ``litelvlm`` method and the
``litelvlm`` clustering strategy.

Read at ``model/llava/model/multimodal_encoder/clip_encoder.py`` (``register_attn_hooks`` L61-76,
``ctx_aware_pruning`` L78-96, ``sim_aware_pruning`` L98-113, ``CLIPVisionTower.forward`` L115-177) and
``eval/referring_seg/infer_and_evaluate.py`` (L401: ``num_retain_tokens``; L127, L174: the questions of
the image). Training-free, before the LLM, CLIP only:

- similarity tokens: the query through CLIP's text tower with projection (``text_embeds``, L148-151); the
  patch features of the selected layer (-2, CLS dropped, L137, L154) through CLIP's ``post_layernorm``
  and ``visual_projection`` (L100-102); an unnormalised dot product (L105-107); per query the
  ``K // n_queries`` tokens with the LOWEST similarity (``largest=False``, L109-111), unioned and
  sorted ascending (``torch.unique``, L112);
- context tokens: the last CLIP layer's q/k/v projections at full width (hooks on ``q_proj``, ``k_proj``,
  ``v_proj`` of ``layers[-1]``, L71-75), ``softmax(cos(q_cls, k_i) / sqrt(D))`` over the image tokens
  (L79-90), score ``||a_i v_i||`` (L92-93), sorted descending (L95);
- the kept tokens: the best context tokens not among the similarity ones, as many as the budget leaves
  (L159-166), then the similarity tokens: order [context (by score), similarity (ascending)] (L164-172).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn


def context_order(layer: nn.Module, hidden_in: torch.Tensor) -> torch.Tensor:
    """``B x N`` image-token indices by descending context score ``||a_i v_i||`` (L78-96): ``layer`` is CLIP's
    last encoder layer, ``hidden_in`` (``B x (1 + N) x C``) its input; q/k/v are its projections of
    ``layer_norm1(hidden_in)`` (what the hooked ``q_proj``/``k_proj``/``v_proj`` see), full width."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_in)
    q = attn.q_proj(x[:, :1])
    k = attn.k_proj(x[:, 1:])
    v = attn.v_proj(x[:, 1:])
    dim = q.shape[-1]
    qn = nn.functional.normalize(q, dim=-1)
    kn = nn.functional.normalize(k, dim=-1)
    weights = ((qn @ kn.transpose(-2, -1)) / dim**0.5).softmax(dim=-1)  # B x 1 x N
    scores = (weights.transpose(1, 2) * v).norm(dim=-1)  # B x N
    return torch.sort(scores, dim=1, descending=True).indices


def similarity_tokens(projected: torch.Tensor, text_embeds: torch.Tensor, keep: int) -> list[torch.Tensor]:
    """Per sample, the union (ascending) of each query's ``keep // Q`` lowest-similarity tokens (L104-113).

    ``projected``: ``B x N x D`` image features after post_layernorm and visual_projection;
    ``text_embeds``: ``B x Q x D`` (Q queries per sample)."""
    out = []
    for b in range(projected.shape[0]):
        sim = (projected[b: b + 1] @ text_embeds[b].unsqueeze(-1)).squeeze(-1)  # Q x N
        per_query = keep // text_embeds.shape[1]
        low = torch.topk(sim, per_query, dim=-1, largest=False, sorted=True).indices
        out.append(torch.unique(low.reshape(-1)))
    return out


def retained(context: torch.Tensor, low: list[torch.Tensor], keep: int) -> torch.Tensor:
    """``B x keep`` retained indices in its order [context, similarity] (L158-168)."""
    rows = []
    for b, sim in enumerate(low):
        ctx = context[b][~torch.isin(context[b], sim)]
        rows.append(torch.cat([ctx[: keep - sim.numel()], sim]))
    return torch.stack(rows).long()


def check_text_side_dir(path: str | Path) -> None:
    """Raise (FileNotFoundError / ValueError naming the path) unless ``path`` holds a full CLIP (text tower
    included) or a toy text side; reads only its config.json (nothing is loaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"litelvlm: no CLIP checkpoint (config.json) in {path}")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "clip" and not (path / "toy_text.json").is_file():
        raise ValueError(f"litelvlm: {path} holds neither a full CLIP (model_type 'clip', text tower included) "
                         f"nor a toy text side (toy_text.json); got model_type {model_type!r}: a vision tower alone "
                         "has no text tower. LISA's CLIP directory (clip-vit-large-patch14) is a full CLIP; the toy "
                         "CLIP stand-in's text side is assets/toy_towers/text (docs/peers.md, 'Toy world').")


def text_side_width(path: str | Path) -> int | None:
    """The CLIP width (layer -2 features) the text side at ``path`` projects: a full CLIP's vision width, a
    toy text side's ``toy_text.json`` ``clip.width``; None when the directory does not say."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") == "clip":
            return int(config["vision_config"]["hidden_size"])
        return int(json.loads((path / "toy_text.json").read_text())["clip"]["width"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def check_text_side_pairs(path: str | Path, vision_tower: str | Path | None) -> None:
    """Raise ValueError when the text side at ``path`` projects CLIP features of another width than the
    vision tower directory ``vision_tower`` has (reads the two config files only; silent when either is
    absent or does not say)."""
    if vision_tower is None or not (Path(vision_tower) / "config.json").is_file():
        return
    config = json.loads((Path(vision_tower) / "config.json").read_text())
    tower = config.get("vision_config", config).get("hidden_size")
    side = text_side_width(path)
    if side is not None and tower is not None and side != tower:
        raise ValueError(f"litelvlm: the text side at {path} pairs with a CLIP of width {side}; the model's vision "
                         f"tower {vision_tower} has width {tower} (the toy text side, assets/toy_towers/text, pairs "
                         "with assets/toy_towers/clip: toy LISAs trained on the pretrained towers)")


class ClipTextSide(nn.Module):
    """What LiteLVLM needs of CLIP beyond LISA's vision tower: the text tower with projection and a
    tokenizer (``text_embeds``), and the image side's ``post_layernorm`` and ``visual_projection``.

    ``from_dir``: a full CLIP checkpoint (``CLIPModel``: LISA's ``clip-vit-large-patch14`` directory) or
    this project's toy text side (``toy_text.json`` in the directory, built by
    ``python -m training.toy_text_tower``).
    """

    def __init__(self, text_model: nn.Module, post_layernorm: nn.Module, visual_projection: nn.Module,
                 tokenizer: Callable[..., dict]):
        super().__init__()
        self.text_model = text_model  # CLIPTextModelWithProjection
        self.post_layernorm = post_layernorm
        self.visual_projection = visual_projection
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> ClipTextSide:
        from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection

        path = Path(path)
        check_text_side_dir(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") == "clip":
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            full = CLIPModel.from_pretrained(str(path))
            text = CLIPTextModelWithProjection(full.config.text_config)
            text.text_model.load_state_dict(full.text_model.state_dict())
            text.text_projection.load_state_dict(full.text_projection.state_dict())
            return cls(text, full.vision_model.post_layernorm, full.visual_projection, tokenizer).eval()
        if (path / "toy_text.json").is_file():
            from safetensors.torch import load_file

            tokenizer = AutoTokenizer.from_pretrained(str(path))
            # the toy side is stored in bf16 and is tiny: it runs in float32
            text = CLIPTextModelWithProjection.from_pretrained(str(path), dtype=torch.float32)
            image = {k: v.float() for k, v in load_file(str(path / "image_side.safetensors")).items()}
            ln = nn.LayerNorm(image["post_layernorm.weight"].shape[0], eps=config.get("layer_norm_eps", 1e-5))
            proj = nn.Linear(*image["visual_projection.weight"].shape[::-1], bias=False)
            ln.load_state_dict({"weight": image["post_layernorm.weight"], "bias": image["post_layernorm.bias"]})
            proj.load_state_dict({"weight": image["visual_projection.weight"]})
            return cls(text, ln, proj, tokenizer).eval()
        raise ValueError(f"litelvlm: {path} holds neither a full CLIP (model_type 'clip', text tower "
                         f"included) nor a toy text side (toy_text.json); got model_type {config.get('model_type')!r}. "
                         "LISA's vision tower directory alone (CLIPVisionModel) has no text tower.")

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """``len(texts) x D`` projected text embeddings (truncated, padded: L148-151)."""
        param = next(self.text_model.parameters())
        ids = self.tokenizer(text=list(texts), return_tensors="pt", truncation=True, padding=True)
        ids = {k: v.to(param.device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}
        return self.text_model(**ids).text_embeds

    @torch.no_grad()
    def project_image(self, patches: torch.Tensor) -> torch.Tensor:
        """``B x N x C`` patch features -> ``B x N x D`` (post_layernorm, visual_projection; L99-102)."""
        ln = self.post_layernorm
        if patches.shape[-1] != ln.weight.shape[0]:
            raise ValueError(f"litelvlm: the text side's image projection takes CLIP features of width "
                             f"{ln.weight.shape[0]}, this model's vision tower gives {patches.shape[-1]}: method.clip "
                             "must be the CLIP the "
                             "vision tower is (or, for the toy world, the text side trained against it: "
                             "assets/toy_towers/text pairs with assets/toy_towers/clip)")
        return self.visual_projection(ln(patches.to(ln.weight.dtype)))


def litelvlm_select(text_side: ClipTextSide, layers: nn.ModuleList, hidden_states: Sequence[torch.Tensor],
                    select_layer: int, texts: Sequence[Sequence[str]], keep: int) -> torch.Tensor:
    """``B x keep`` retained grid indices in LiteLVLM's order, for B samples of ONE image.

    ``hidden_states``: CLIP's output_hidden_states (``1 x (1 + N) x C`` or ``B x ...``); ``texts``: per
    sample its queries (one or more); ``select_layer``: LLaVA's feature layer (-2)."""
    last = len(layers) - 1
    hidden_in = hidden_states[last]  # the input of the last layer
    context = context_order(layers[last], hidden_in)
    patches = hidden_states[select_layer][:, 1:]
    projected = text_side.project_image(patches)
    batch = len(texts)
    counts = {len(t) for t in texts}
    if len(counts) != 1:
        raise ValueError("litelvlm: every sample must have the same number of queries")
    embeds = text_side.text_embeds([t for group in texts for t in group]).view(batch, counts.pop(), -1)
    context = context.expand(batch, -1) if context.shape[0] == 1 else context
    projected = projected.expand(batch, -1, -1) if projected.shape[0] == 1 else projected
    low = similarity_tokens(projected.to(embeds.dtype), embeds, keep)
    return retained(context.to(embeds.device), low, keep)
