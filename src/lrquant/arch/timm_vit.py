"""timm ``VisionTransformer`` (``timm.models.vision_transformer``): the mapping and its model preparation
(a reversible q/k/v split). The split attention module lives in :mod:`lrquant.arch.timm_attention`,
timm's own checkpoint layout in :mod:`lrquant.arch.timm_checkpoint`.

timm is never imported at module import time (importing timm needs an importable torchvision, which a
CPU torch build often lacks): the mapping is registered under the qualified class name
``timm.models.vision_transformer.VisionTransformer`` (see :func:`lrquant.arch.base.get_mapping`; the
bare name ``VisionTransformer`` also names torchvision's ViT, so it is not registered) and every check
below is duck-typed on the module structure and the qualified class names in the MRO.

timm's block (``timm.models.vision_transformer.Block``)::

    x = x + drop_path1(ls1(attn(norm1(x))))      attn: qkv [3*A, D] -> heads -> (q_norm, k_norm) -> SDPA -> proj
    x = x + drop_path2(ls2(mlp(norm2(x))))       mlp: fc1 -> GELU -> fc2

``ls1``/``ls2`` are LayerScale (``init_values``) or Identity; like DINOv2's layer scale they sit after
``proj`` and ``fc2``, outside every smoothing pair. The fused ``attn.qkv`` Linear does not fit the
separate q/k/v paths of :class:`~lrquant.arch.base.ArchMapping`, so the mapping declares a
:class:`~lrquant.arch.base.ModelPreparation` (:data:`TIMM_QKV_SPLIT`) that
:func:`~lrquant.arch.base.prepare_model` runs once, at model load:

* :func:`split_qkv` replaces every block's ``attn`` by a
  :class:`~lrquant.arch.timm_attention.SplitQKVAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
  a forward numerically identical to timm's ``Attention``, with Q/K/V quantization),
* and attaches ``model.config``, a :class:`TimmViTConfig` (heads, head size, width, input size), because
  the engine and the transforms read heads through ``mapping.heads(model.config)``.

:func:`~lrquant.arch.base.get_mapping` then only reads the model: it refuses an unsplit one, and gives
QK-norm models (``qk_norm=True``) the mapping with ``q_norm``/``k_norm`` set, which drops the ``qk``
smoothing pair (a per-head LayerNorm between q and the scores does not commute with a scale).

The split is exact and idempotent; :func:`fuse_qkv` is its inverse. Finished runs are saved in timm's
own layout (:data:`~lrquant.arch.timm_checkpoint.TIMM_CHECKPOINT`, the mapping's checkpoint layout).

Refused (:class:`~lrquant.errors.UnsupportedArchitectureError`): blocks other than timm's pre-norm
``Block`` (``ResPostBlock``, parallel blocks), attention other than ``timm.layers.attention.Attention``
or with ``scale_attn_norm`` (a LayerNorm between the heads and ``proj`` breaks the v -> o fold) or a
sigmoid gate, norms other than LayerNorm, MLPs other than ``timm.layers.mlp.Mlp`` (GLU / SwiGLU).
Rotation (``--rotate``) is refused as for every LayerNorm family.

Model level: the class / register tokens and position embeddings are parameters of the model itself,
so ``pre_blocks`` names the model root (``""``): capturing block 0's inputs moves the whole model to the
compute device and back once (fine for ViT sizes).

Python API: timm's forward takes the images as ``x``, so calibration inputs are ``[{"x": [B, 3, S, S]},
...]``::

    model = prepare_model(timm.create_model("vit_small_patch16_224", pretrained=True).eval())
    lrquant.quantize(model, recipe, [{"x": batch} for batch in pixels.split(1)])
    save_timm(model, "out/model")  # timm's layout; timm.create_model("local-dir:out/model", pretrained=True)

(``prepare_model`` from :mod:`lrquant.arch`, ``save_timm`` from :mod:`lrquant.arch.timm_checkpoint`.)
``lrquant.data.images.model_preprocessing(model)`` gives the normalisation and crop of the model's
``pretrained_cfg``; the CLI loads timm models with ``--model timm:...`` (:func:`lrquant.models.load_timm`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError
from .base import ArchMapping, ModelPreparation, register
from .timm_attention import SplitQKVAttention
from .timm_checkpoint import TIMM_CHECKPOINT
from .vision import VIT_BLOCK

TIMM_VIT = "timm.models.vision_transformer.VisionTransformer"
TIMM_BLOCK = "timm.models.vision_transformer.Block"
TIMM_ATTENTION = "timm.layers.attention.Attention"
TIMM_MLP = "timm.layers.mlp.Mlp"


def qualified_names(obj: object) -> set[str]:
    """``{"module.QualName", ...}`` of the class of ``obj`` and its bases."""
    return {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}


@dataclass(frozen=True)
class TimmViTConfig:
    """The config fields lrquant reads, built from a timm ViT (timm models carry no transformers config).

    ``image_size``: the side of the square input the model is built for (``patch_embed.img_size`` unless
    the model accepts any size, then ``pretrained_cfg["input_size"]``).
    """

    num_attention_heads: int
    head_dim: int
    hidden_size: int
    num_hidden_layers: int
    image_size: int
    model_type: str = "timm_vit"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- checks
def _blocks(model: nn.Module) -> nn.Sequential:
    return model.get_submodule("blocks")


def structure_problem(model: nn.Module) -> str | None:
    """Why the timm ViT mapping does not describe ``model`` (None when it does)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return "expected a non-empty nn.Sequential of blocks at model.blocks"
    for i, block in enumerate(blocks):
        if TIMM_BLOCK not in qualified_names(block):
            return f"blocks.{i} is a {type(block).__name__}; only timm's pre-norm Block is supported"
        attn = block.attn
        if not isinstance(attn, SplitQKVAttention):
            if TIMM_ATTENTION not in qualified_names(attn):
                return f"blocks.{i}.attn is a {type(attn).__name__}; only timm.layers.attention.Attention"
            if getattr(attn, "gate", None) is not None:
                return "gated attention (a sigmoid gate on the attention output) is not supported"
            if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
                return f"blocks.{i}.attn: qkv/proj are not Linear layers"
        if not isinstance(attn.norm, nn.Identity):
            return "scale_attn_norm (a norm between the attention heads and proj) breaks the v -> o fold"
        for name in ("norm1", "norm2"):
            if not isinstance(getattr(block, name), nn.LayerNorm):
                return f"blocks.{i}.{name} is a {type(getattr(block, name)).__name__}; only LayerNorm"
        if TIMM_MLP not in qualified_names(block.mlp):
            return f"blocks.{i}.mlp is a {type(block.mlp).__name__}; only timm.layers.mlp.Mlp (fc1 -> act -> fc2)"
    return None


def _has_qk_norm(model: nn.Module) -> bool:
    return any(not isinstance(b.attn.q_norm, nn.Identity) or not isinstance(b.attn.k_norm, nn.Identity)
               for b in _blocks(model))


def image_size(model: nn.Module) -> int:
    """Side of the square input: the patch embedding's fixed size, else ``pretrained_cfg["input_size"]``."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or not getattr(pe, "strict_img_size", True) or getattr(model, "dynamic_img_size", False):
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    if size[0] != size[1]:
        raise UnsupportedArchitectureError(f"timm ViT with a non-square input {size} is not supported")
    return int(size[0])


def timm_config(model: nn.Module) -> TimmViTConfig:
    """:class:`TimmViTConfig` of a timm ViT (split or not)."""
    attn = _blocks(model)[0].attn
    return TimmViTConfig(num_attention_heads=attn.num_heads, head_dim=attn.head_dim,
                         hidden_size=int(model.embed_dim), num_hidden_layers=len(_blocks(model)),
                         image_size=image_size(model))


# ----------------------------------------------------------------------------------------- preparation
def is_split(model: nn.Module) -> bool:
    """Whether every block's attention is a :class:`SplitQKVAttention` (``model`` passed
    :func:`structure_problem`)."""
    return all(isinstance(b.attn, SplitQKVAttention) for b in _blocks(model))


def split_qkv(model: nn.Module) -> nn.Module:
    """Replace every block's timm ``Attention`` by a :class:`SplitQKVAttention` (in place, idempotent) and
    attach ``model.config`` (:class:`TimmViTConfig`). Raises :class:`UnsupportedArchitectureError` (before
    changing anything) when the model does not have the layout this module describes."""
    problem = structure_problem(model)
    if problem:
        raise UnsupportedArchitectureError(f"timm_vit: {problem}")
    config = getattr(model, "config", None)
    if config is not None and not isinstance(config, TimmViTConfig):
        raise UnsupportedArchitectureError(f"timm_vit: model.config is already set ({type(config).__name__})")
    for block in _blocks(model):
        if not isinstance(block.attn, SplitQKVAttention):
            block.attn = SplitQKVAttention(block.attn).train(block.attn.training)
    model.config = timm_config(model)
    return model


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Inverse of :func:`split_qkv` (in place): timm ``Attention`` modules with ``qkv``/``proj`` rebuilt
    from the current q/k/v/o weights, ``model.config`` removed. Quantizers are dropped (the weights keep
    their fake-quant values; see :func:`~lrquant.arch.timm_checkpoint.fuse_tensor_names` for the
    quantization parameters)."""
    for block in _blocks(model):
        if isinstance(block.attn, SplitQKVAttention):
            block.attn = block.attn.to_timm()
    if isinstance(getattr(model, "config", None), TimmViTConfig):
        del model.config
    return model


class TimmQKVSplit(ModelPreparation):
    """The timm ViT preparation: :func:`split_qkv`; QK-norm models get ``q_norm``/``k_norm`` mapped."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return split_qkv(model)

    def problem(self, model: nn.Module) -> str | None:
        problem = structure_problem(model)
        if problem:
            return problem
        if not is_split(model) or not isinstance(getattr(model, "config", None), TimmViTConfig):
            return ("the fused qkv is not split yet: call lrquant.arch.prepare_model(model) once after "
                    "loading it (lrquant.load_model does)")
        return None

    def specialize(self, model: nn.Module, mapping: ArchMapping) -> ArchMapping:
        if _has_qk_norm(model):
            return replace(mapping, q_norm="attn.q_norm", k_norm="attn.k_norm")
        return mapping


TIMM_QKV_SPLIT = TimmQKVSplit()

TIMM_VIT_MAPPING = register(
    ArchMapping(
        family="timm_vit",
        blocks="blocks",
        pre_blocks=("",),  # patch_embed plus cls/reg tokens and pos_embed, parameters of the root
        final_norm="norm",
        head="head",
        # the ViT block layout (pre-LN, LayerNorm -> q/k/v, fc1 -> GELU -> fc2, no RoPE, MHA) at timm's paths
        **{**VIT_BLOCK, "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "attn_norm": "norm1", "mlp_norm": "norm2"},
        preparation=TIMM_QKV_SPLIT,  # split qkv at load
        checkpoint_layout=TIMM_CHECKPOINT,  # runs are written back in timm's fused layout
    ),
    TIMM_VIT,
)
