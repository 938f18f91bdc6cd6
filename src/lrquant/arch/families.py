"""Built-in architecture mappings. Each family: one declarative :class:`ArchMapping`, registered under
the exact transformers class names it covers (head classes and bare base models).

Paths follow the transformers 5.x modeling sources. A mapping is static; where a family's layout
depends on its config (OPT's pre/post-LN switch, its activation, its optional embedding projections),
the mapping states the config it is valid for in ``config_check`` and :func:`check_config`
turns a mismatch into :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

from typing import Any

from .base import ArchMapping, MultimodalParts, check_config, register_family  # noqa: F401  (check_config re-exported)

# Llama family: Llama 2/3, SmolLM2, Mistral (GQA, RoPE, RMSNorm, gated SiLU MLP).
LLAMA = register_family(
    ArchMapping(
        family="llama",
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        head="lm_head",
        embed_tokens="model.embed_tokens",
    ),
    ("LlamaForCausalLM", "MistralForCausalLM"),
    ("LlamaModel", "MistralModel"),
)

# Qwen2 / Qwen2.5: the Llama layout; q/k/v carry biases (a Linear property, nothing to map).
QWEN2 = register_family(
    ArchMapping(
        family="qwen2",
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        head="lm_head",
        embed_tokens="model.embed_tokens",
    ),
    ("Qwen2ForCausalLM",),
    ("Qwen2Model",),
)

# Qwen3 (dense): Llama layout plus per-head RMS QK-norm on q_proj/k_proj outputs, before RoPE.
QWEN3 = register_family(
    ArchMapping(
        family="qwen3",
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        head="lm_head",
        embed_tokens="model.embed_tokens",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
    ),
    ("Qwen3ForCausalLM",),
    ("Qwen3Model",),
)

# Gemma3 text decoder: sandwich norms (pre/post around attention and MLP), per-head QK-norm, RMSNorm
# scaling by (1 + weight), gated GELU-tanh MLP. The sqrt(hidden) embedding scale lives inside
# ``embed_tokens`` (Gemma3TextScaledWordEmbedding). One ``rotary_emb`` serves local (sliding) and global
# layers: its forward takes the layer type and keeps one inv_freq buffer per type.
_GEMMA3_TEXT = dict(
    family="gemma3",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    attn_norm="input_layernorm",
    post_attn_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    norm_kind="rms_plus_one",
)

GEMMA3 = register_family(
    ArchMapping(
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        final_norm="model.norm",
        head="lm_head",
        embed_tokens="model.embed_tokens",
        **_GEMMA3_TEXT,
    ),
    ("Gemma3ForCausalLM",),
    ("Gemma3TextModel",),
)

# Gemma3 multimodal (4B and up): the same text decoder at ``model.language_model``; a SigLIP vision tower
# (mapped in :mod:`lrquant.arch.multimodal`) and an average-pool + RMSNorm + matrix projector, which run
# before the first decoder block on image inputs (so they are pre-blocks). The head/attention sizes live
# in ``config.text_config`` (pass ``config.get_text_config()`` to ``mapping.heads``).
GEMMA3_MM = register_family(
    ArchMapping(
        blocks="model.language_model.layers",
        pre_blocks=("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
                    "model.language_model.rotary_emb"),
        parts=MultimodalParts(vision_tower="model.vision_tower", projector="model.multi_modal_projector"),
        final_norm="model.language_model.norm",
        head="lm_head",
        embed_tokens="model.language_model.embed_tokens",
        **_GEMMA3_TEXT,
    ),
    ("Gemma3ForConditionalGeneration",),
    ("Gemma3Model",),
)


def _opt_config_problem(config: Any) -> str | None:
    """Why the static OPT mapping does not describe ``config`` (None when it does)."""
    if not config.do_layer_norm_before:
        return "post-LayerNorm OPT (do_layer_norm_before=False, e.g. opt-350m) is not supported"
    if config.activation_function != "relu":
        return f"OPT mapping assumes ReLU (fc1 -> fc2 fold), got activation {config.activation_function!r}"
    if config.word_embed_proj_dim != config.hidden_size:
        return "OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported"
    return None


# OPT (pre-LN: 125m, 1.3b, 2.7b, 6.7b, ...): LayerNorm with bias, MHA (no GQA), learned positions, no
# RoPE, plain fc1 -> ReLU -> fc2 MLP (ReLU is positive-homogeneous, so fc1 rows -> fc2 columns fold).
# Valid only for the config checked above; opt-350m (post-LN, project_in/out) is refused.
OPT = register_family(
    ArchMapping(
        family="opt",
        blocks="model.decoder.layers",
        pre_blocks=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        head="lm_head",
        embed_tokens="model.decoder.embed_tokens",
        o="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        gated_mlp=False,
        mlp_act_positive_homogeneous=True,
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        norm_kind="layer",
        rope=False,
        n_kv_heads_attr=None,
        head_dim_attr=None,
        config_check=_opt_config_problem,
    ),
    ("OPTForCausalLM",),
    ("OPTModel",),
)
