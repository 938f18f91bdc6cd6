"""Multimodal (image-text) models and the vision encoders they are built on.

Paths follow the transformers 5.x modeling sources. A multimodal model is mapped by its *language model*:
``blocks`` are the decoder blocks, and the vision tower and projector are ``pre_blocks`` (on an image-text
input they run before the first decoder block, so capturing block 0's inputs runs them and the streams hold
the image tokens as the language model sees them at inference). ``parts`` says where the tower and the
projector are; the tower is quantized, when a recipe asks for it, as a model of its own through its own
class's mapping (below, or :mod:`lrquant.arch.vision` for DINOv2 towers).

Covered
    * ``LlavaForConditionalGeneration`` / ``LlavaModel``: any vision tower (CLIP, SigLIP, DINOv2 ...), a
      two-linear GELU projector (``multi_modal_projector.linear_1/linear_2``), a Llama / Mistral / Qwen2
      language model at ``model.language_model`` (one block layout: Qwen2's q/k/v biases are a Linear
      property). Other language models are refused through ``config_check``.
    * ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``: the Qwen2 block
      layout at ``model.language_model``; multimodal RoPE: the model computes 3-row (temporal, height,
      width) position ids from the image grid and its rotary module turns them into ``position_embeddings``,
      which block 0 receives as a keyword argument, so the engine's captured keyword arguments carry them
      (identical for every calibration sample: the samples share one layout, see
      :mod:`lrquant.data.multimodal`). The vision tower (``model.visual``: fused ``qkv``, packed unbatched
      sequences with ``cu_seqlens``) has no mapping: it stays in 16 bits, with its patch merger (the
      projector, ``model.visual.merger``).
    * ``Idefics3ForConditionalGeneration`` (SmolVLM): a SigLIP-style tower (``Idefics3VisionTransformer``,
      mapped below), the pixel-shuffle connector (``model.connector``: a space-to-depth reshape, then one
      linear), a Llama language model at ``model.text_model``.
    * ``Gemma3ForConditionalGeneration``: in :mod:`lrquant.arch.families` (its projector holds a plain
      weight matrix, no ``Linear``: it is not quantized).
    * Vision encoders: ``CLIPVisionModel``, ``SiglipVisionModel`` and ``Idefics3VisionTransformer`` (pre-LN
      ``layer_norm1`` -> q/k/v, ``out_proj``, ``layer_norm2`` -> ``fc1`` -> GELU -> ``fc2``; bidirectional,
      no RoPE, MHA), mapped like ViT so every method runs on them, as towers or on their own.

Not covered
    * the Qwen2-VL / Qwen2.5-VL vision tower (see above); SigLIP's attention-pooling head and CLIP's
      projection heads (outside the blocks, kept in full precision).
"""

from __future__ import annotations

from typing import Any

from .base import ArchMapping, MultimodalParts, register_family

# CLIP / SigLIP / Idefics3 encoder layers (CLIPEncoderLayer, SiglipEncoderLayer, Idefics3EncoderLayer).
CLIP_BLOCK: dict[str, Any] = dict(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    mlp_in=("mlp.fc1",),
    mlp_out="mlp.fc2",
    gated_mlp=False,
    attn_norm="layer_norm1",
    mlp_norm="layer_norm2",
    norm_kind="layer",
    rope=False,
    encoder=True,
    n_kv_heads_attr=None,
)

CLIP_VISION = register_family(
    ArchMapping(family="clip_vision", blocks="encoder.layers", pre_blocks=("embeddings", "pre_layrnorm"),
                final_norm="post_layernorm", **CLIP_BLOCK),
    ("CLIPVisionModel",),
)

SIGLIP_VISION = register_family(
    ArchMapping(family="siglip_vision", blocks="encoder.layers", pre_blocks=("embeddings",),
                final_norm="post_layernorm", **CLIP_BLOCK),
    ("SiglipVisionModel", "Siglip2VisionModel", "Idefics3VisionTransformer"),
)


def _text_model_problem(allowed: tuple[str, ...]):
    """A ``config_check``: refuse language models whose block layout is not the Llama one."""

    def problem(config: Any) -> str | None:
        kind = getattr(config, "model_type", None)
        if kind not in allowed:
            return f"language model {kind!r} is not supported here (supported: {', '.join(allowed)})"
        return None

    return problem


LLAVA = register_family(
    ArchMapping(
        family="llava",
        blocks="model.language_model.layers",
        pre_blocks=("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
                    "model.language_model.rotary_emb"),
        final_norm="model.language_model.norm",
        embed_tokens="model.language_model.embed_tokens",
        parts=MultimodalParts(vision_tower="model.vision_tower", projector="model.multi_modal_projector"),
        config_check=_text_model_problem(("llama", "mistral", "qwen2")),
        head="lm_head",
    ),
    ("LlavaForConditionalGeneration",),
    ("LlavaModel",),
)

QWEN2_VL = register_family(
    ArchMapping(
        family="qwen2_vl",
        blocks="model.language_model.layers",
        pre_blocks=("model.visual", "model.language_model.embed_tokens", "model.language_model.rotary_emb"),
        final_norm="model.language_model.norm",
        embed_tokens="model.language_model.embed_tokens",
        parts=MultimodalParts(vision_tower="model.visual", projector="model.visual.merger"),
        head="lm_head",
    ),
    ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    ("Qwen2VLModel", "Qwen2_5_VLModel"),
)

IDEFICS3 = register_family(
    ArchMapping(
        family="idefics3",
        blocks="model.text_model.layers",
        pre_blocks=("model.vision_model", "model.connector", "model.text_model.embed_tokens",
                    "model.text_model.rotary_emb"),
        final_norm="model.text_model.norm",
        embed_tokens="model.text_model.embed_tokens",
        parts=MultimodalParts(vision_tower="model.vision_model", projector="model.connector"),
        config_check=_text_model_problem(("llama",)),
        head="lm_head",
    ),
    ("Idefics3ForConditionalGeneration",),
    ("Idefics3Model",),
)
