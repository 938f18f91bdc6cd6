"""Vision-transformer architecture mappings (ViT/DeiT, DINOv2, Swin).

Paths follow the transformers 5.x modeling sources. Every family here is a pre-LN encoder: LayerNorm
(with bias) -> q/k/v, LayerNorm -> fc1 -> GELU -> fc2, bidirectional attention, learned position
embeddings or (Swin) a relative position bias, no RoPE, MHA (no GQA). Block 0's input is the
patch-embedding output (CLS and, for DINOv2 with registers / DeiT, extra tokens included), so
``pre_blocks`` is just the embeddings module.

Covered
    * ``ViTModel`` / ``ViTForImageClassification`` (DeiT checkpoints without a distillation token load
      into these).
    * ``DeiTModel`` / ``DeiTForImageClassification`` / ``DeiTForImageClassificationWithTeacher`` (the same
      block layout; the distilled variant has two heads, ``cls_classifier`` and
      ``distillation_classifier``, so its mapping names no single ``head``).
    * ``Dinov2Model`` / ``Dinov2ForImageClassification``. DINOv2 multiplies the attention output and the
      MLP output by a per-channel *layer scale* (``layer_scale1/2.lambda1``) before the residual add.
      That sits after ``o`` and after ``fc2``, outside every smoothing pair (norm -> q/k/v, v -> o by
      heads, q <-> k, norm -> fc1): those pairs only touch o's *input* columns and fc1's rows, so the
      layer scale neither breaks nor joins a pair. (It could even be folded exactly into o's / fc2's
      output rows; with per-channel or grouped weight quantization that fold is neutral, so nothing
      needs it.) The SwiGLU-FFN variant (``use_swiglu_ffn=True``, DINOv2-giant) has gate/up/down MLP
      linears; the static mapping refuses it through ``config_check`` (``get_mapping`` raises).
    * ``SwinModel`` / ``SwinForImageClassification`` (transformers 5.x layout), a *staged* mapping (see
      :mod:`lrquant.arch.base`): blocks ``swin.encoder.layers[s].blocks[j]``, the patch merging
      ``downsample`` (LayerNorm + a 4C -> 2C Linear, ``[N, L, C] -> [N, L/4, 2C]``) after every stage but
      the last is the stage *transition*: the engine runs it, in full precision and unquantized, on both
      streams between stages. Each block and each transition receives the stage's ``input_dimensions``
      positionally; the engine captures those call arguments per block in one full-precision forward.
      Inside a block: ``layernorm_before`` -> ``attention.q_proj/k_proj/v_proj`` (window partition and
      cyclic shift in between are token permutations, so per-channel transforms commute with them) ->
      ``attention.o_proj``; ``layernorm_after`` -> ``mlp.fc1`` -> GELU -> ``mlp.fc2``. The relative
      position bias (and the shifted-window mask) is added to the scores, so ``q * s``, ``k / s`` folds
      exactly; transformers 5.x routes Swin's attention through the attention interface (the bias goes
      in as an additive mask), so Q/K/V quantization and RepQuant's softmax quantizer work as for any
      family. Heads differ per stage (``num_heads`` is a list): they are read from each block's attention
      module (``heads_from_attention``). Swin zero-pads the windows after ``layernorm_before`` when a
      stage's patch grid is not a multiple of the window, so that norm is in ``padded_norms``: it takes
      scales, no shift or zero-point offset (exact at every input size). Not quantized (full precision):
      the patch embedding, the patch mergings, the relative position bias tables, the final norm, the
      pooler and the classifier.

Not covered
    * ``SwinBackbone``, ``SwinForMaskedImageModeling`` and Swin V2 (``Swinv2*``: cosine attention with a
      learned logit scale and a continuous position-bias MLP, post-norm blocks) are not mapped.
    * timm ``VisionTransformer`` is mapped in :mod:`lrquant.arch.timm_vit`, not here.
"""

from __future__ import annotations

from typing import Any

from .base import ArchMapping, register_family

# Block-level layout shared by ViT and DeiT (ViTLayer / DeiTLayer).
VIT_BLOCK: dict[str, Any] = dict(
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    o="attention.o_proj",
    mlp_in=("mlp.fc1",),
    mlp_out="mlp.fc2",
    gated_mlp=False,
    attn_norm="layernorm_before",
    mlp_norm="layernorm_after",
    norm_kind="layer",
    rope=False,
    encoder=True,
    n_kv_heads_attr=None,
)

# ViT: ViTForImageClassification.vit is a ViTModel built without its pooler; ViTModel keeps an optional
# pooler (dense + tanh on the CLS token) after ``layernorm``, outside the blocks (not quantized).
VIT = register_family(
    ArchMapping(
        family="vit",
        blocks="vit.layers",
        pre_blocks=("vit.embeddings",),
        final_norm="vit.layernorm",
        head="classifier",
        **VIT_BLOCK,
    ),
    ("ViTForImageClassification",),
    ("ViTModel",),
    base_prefix="vit.",
)

DEIT = register_family(
    ArchMapping(
        family="deit",
        blocks="deit.layers",
        pre_blocks=("deit.embeddings",),
        final_norm="deit.layernorm",
        head="classifier",
        **VIT_BLOCK,
    ),
    ("DeiTForImageClassification",),
    ("DeiTModel",),
    base_prefix="deit.",
)

register_family(
    ArchMapping(
        family="deit",
        blocks="deit.layers",
        pre_blocks=("deit.embeddings",),
        final_norm="deit.layernorm",
        head=None,  # two heads: cls_classifier and distillation_classifier
        **VIT_BLOCK,
    ),
    ("DeiTForImageClassificationWithTeacher",),
)


def _dinov2_config_problem(config: Any) -> str | None:
    """Why the static DINOv2 mapping does not describe ``config`` (None when it does)."""
    if getattr(config, "use_swiglu_ffn", False):
        return "DINOv2 with a SwiGLU FFN (use_swiglu_ffn=True, e.g. dinov2-giant) is not supported"
    return None


# DINOv2: norm1 -> attention -> layer_scale1 -> + residual; norm2 -> mlp -> layer_scale2 -> + residual.
DINOV2 = register_family(
    ArchMapping(
        family="dinov2",
        blocks="dinov2.encoder.layer",
        pre_blocks=("dinov2.embeddings",),
        final_norm="dinov2.layernorm",
        head="classifier",
        **{**VIT_BLOCK, "attn_norm": "norm1", "mlp_norm": "norm2"},
        config_check=_dinov2_config_problem,
        # pretrained at 518 px; position embeddings are interpolated and the checkpoints are evaluated at 224
        eval_image_size=224,
    ),
    ("Dinov2ForImageClassification",),
    ("Dinov2Model",),
    base_prefix="dinov2.",
)


# Swin: hierarchical stages; see the module docstring. SwinForImageClassification.swin is a SwinModel (with
# its average-pooling "pooler", which has no parameters).
SWIN = register_family(
    ArchMapping(
        family="swin",
        blocks="",
        stages="swin.encoder.layers",
        stage_blocks="blocks",
        stage_transition="downsample",
        pre_blocks=("swin.embeddings",),
        final_norm="swin.layernorm",
        head="classifier",
        **{**VIT_BLOCK, "padded_norms": ("layernorm_before",)},
        heads_from_attention=("num_attention_heads", "head_dim"),
    ),
    ("SwinForImageClassification",),
    ("SwinModel",),
    base_prefix="swin.",
)
