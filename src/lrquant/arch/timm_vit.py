"""timm ``VisionTransformer`` (``timm.models.vision_transformer``): mapping and a reversible q/k/v split.

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
separate q/k/v paths of :class:`~lrquant.arch.base.ArchMapping`, so the mapping declares a ``prepare``
hook (``extra["prepare"]``) that :func:`~lrquant.arch.base.get_mapping` runs before returning it:

* :func:`split_qkv` replaces every block's ``attn`` by a :class:`SplitQKVAttention` holding ``q_proj``,
  ``k_proj``, ``v_proj`` (rows ``[0, A)``, ``[A, 2A)``, ``[2A, 3A)`` of ``qkv``) and ``o_proj`` (timm's
  ``proj``, the same Linear object), with a forward numerically identical to timm's ``Attention`` (fused
  SDPA and explicit paths, ``q_norm``/``k_norm``, ``scale``, ``attn_drop``, masks). Q/K (after
  ``q_norm``/``k_norm``) and V go through the same :class:`~lrquant.quant.attention.AttentionQuantizer`
  (attribute ``attn_quantizer``) the transformers path uses, and with a softmax quantizer (``probs``,
  RepQuant) the attention runs through :func:`~lrquant.quant.attention.eager_quantized_attention`.
* it attaches ``model.config``, a :class:`TimmViTConfig` (heads, head size, width, input size), because
  the engine and the transforms read heads through ``mapping.heads(model.config)``.
* QK-norm models (``qk_norm=True``) get the mapping with ``q_norm``/``k_norm`` set, which drops the
  ``qk`` smoothing pair (a per-head LayerNorm between q and the scores does not commute with a scale).

The split is exact and idempotent; :func:`fuse_qkv` is its inverse (concatenates the q/k/v rows back
into ``qkv``, exact for per-channel and per-group weight quantization, whose scales are per row) and
:func:`fused_state_dict` / :func:`fuse_tensor_names` give timm's own state-dict layout (and the matching
``qkv.weight_scale`` ...) without touching the model. :func:`save_timm` writes a quantized model as a
folder timm loads itself (``config.json`` + ``model.safetensors``, timm's ``local-dir`` layout).

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

    model = timm.create_model("vit_small_patch16_224", pretrained=True).eval()
    lrquant.quantize(model, recipe, [{"x": batch} for batch in pixels.split(1)])
    save_timm(model, "out/model")  # timm's layout; timm.create_model("local-dir:out/model", pretrained=True)

``lrquant.data.images.model_preprocessing(model)`` gives the normalisation and crop of the model's
``pretrained_cfg``; the CLI loads timm models with ``--model timm:...`` (:func:`lrquant.models.load_timm`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LrquantError, UnsupportedArchitectureError
from .base import ArchMapping, register
from .vision import VIT_BLOCK

TIMM_VIT = "timm.models.vision_transformer.VisionTransformer"
TIMM_BLOCK = "timm.models.vision_transformer.Block"
TIMM_ATTENTION = "timm.layers.attention.Attention"
TIMM_MLP = "timm.layers.mlp.Mlp"
QKV_ROLES = ("q", "k", "v")


def qualified_names(obj: object) -> set[str]:
    """``{"module.QualName", ...}`` of the class of ``obj`` and its bases."""
    return {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is (a subclass of) timm's ``VisionTransformer``, without importing timm."""
    return TIMM_VIT in qualified_names(model)


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


class SplitQKVAttention(nn.Module):
    """timm's ``Attention`` with the fused ``qkv`` split into ``q_proj``/``k_proj``/``v_proj`` and ``proj``
    named ``o_proj``. ``x [B, N, D] -> [B, N, D_out]``; Q/K/V are ``[B, H, N, head_dim]``.

    ``attn_quantizer`` (``None`` until a method attaches an
    :class:`~lrquant.quant.attention.AttentionQuantizer`) fake-quantizes Q, K (after ``q_norm``/``k_norm``)
    and V; with a ``probs`` quantizer the softmax is computed explicitly and quantized.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        qkv: nn.Linear = attn.qkv
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.attn_dim: int = attn.attn_dim
        self.scale: float = attn.scale
        self.fused_attn: bool = bool(attn.fused_attn)
        self.is_causal = False  # read by eager_quantized_attention when no is_causal is passed
        bias = qkv.bias is not None
        for i, role in enumerate(QKV_ROLES):
            lin = nn.Linear(qkv.in_features, self.attn_dim, bias=bias, device=qkv.weight.device,
                            dtype=qkv.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(qkv.weight[i * self.attn_dim : (i + 1) * self.attn_dim])
                if bias:
                    lin.bias.copy_(qkv.bias[i * self.attn_dim : (i + 1) * self.attn_dim])
            setattr(self, f"{role}_proj", lin)
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.o_proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.attn_quantizer: nn.Module | None = None
        # the emptied timm module, kept (unregistered: no parameters of its own) to be refilled by to_timm
        attn.qkv = None
        attn.proj = None
        object.__setattr__(self, "_timm_attention", attn)

    def _heads(self, y: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """``[B, N, H * head_dim] -> [B, H, N, head_dim]``."""
        return y.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        """``x [B, N, D]``; ``attn_mask``: boolean (True = attend) or additive, broadcasting to
        ``[B, H, N, N]``; returns ``[B, N, D_out]``."""
        from ..quant.attention import eager_quantized_attention

        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), b, n)
        k = self._heads(self.k_proj(x), b, n)
        v = self._heads(self.v_proj(x), b, n)
        q, k = self.q_norm(q), self.k_norm(k)
        quantizer = self.attn_quantizer
        if quantizer is not None:
            q, k, v = quantizer(q, k, v)
        dropout = self.attn_drop.p if self.training else 0.0
        if quantizer is not None and quantizer.probs is not None:
            out, _ = eager_quantized_attention(self, q, k, v, attn_mask, quantizer.probs, dropout=dropout,
                                               scaling=self.scale, is_causal=is_causal)
            y = out.reshape(b, n, self.attn_dim)  # out: [B, N, H, head_dim]
        else:
            if self.fused_attn:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                                   is_causal=is_causal)
            else:  # timm's explicit path, operation for operation
                scores = (q * self.scale) @ k.transpose(-2, -1)
                bias = _additive_mask(n, scores, attn_mask, is_causal)
                if bias is not None:
                    scores = scores + bias
                y = self.attn_drop(scores.softmax(dim=-1)) @ v
            y = y.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.o_proj(self.norm(y)))

    @torch.no_grad()
    def to_timm(self) -> nn.Module:
        """The timm ``Attention`` again: ``qkv`` = the q/k/v rows concatenated (plain ``nn.Linear``; the
        weights as they are now, e.g. frozen fake-quant values), ``proj`` = ``o_proj`` as a plain Linear."""
        attn = self._timm_attention
        lins = [getattr(self, f"{r}_proj") for r in QKV_ROLES]
        w = torch.cat([lin.weight.detach() for lin in lins], 0)
        qkv = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device=w.device, dtype=w.dtype)
        qkv.weight.copy_(w)
        if qkv.bias is not None:
            qkv.bias.copy_(torch.cat([lin.bias.detach() for lin in lins], 0))
        attn.qkv = qkv
        attn.proj = _plain_linear(self.o_proj)
        attn.q_norm, attn.k_norm, attn.attn_drop = self.q_norm, self.k_norm, self.attn_drop
        attn.norm, attn.proj_drop = self.norm, self.proj_drop
        attn.fused_attn = self.fused_attn
        attn.train(self.training)
        return attn


def _additive_mask(n: int, scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
                   ) -> torch.Tensor | None:
    """timm's ``resolve_self_attn_mask``: the additive bias SDPA would apply (``None``: no mask)."""
    if is_causal:
        return scores.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` holding ``linear``'s parameters (unwraps a QuantLinear)."""
    if type(linear) is nn.Linear:
        return linear
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight = nn.Parameter(linear.weight.detach(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    return out


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


# ----------------------------------------------------------------------------------------- adapter
def is_split(model: nn.Module) -> bool:
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
    their fake-quant values; see :func:`fuse_tensor_names` for the quantization parameters)."""
    for block in _blocks(model):
        if isinstance(block.attn, SplitQKVAttention):
            block.attn = block.attn.to_timm()
    if isinstance(getattr(model, "config", None), TimmViTConfig):
        del model.config
    return model


def prepare(model: nn.Module, mapping: ArchMapping) -> ArchMapping:
    """The mapping's ``prepare`` hook: :func:`split_qkv`, then the mapping that describes this model
    (QK-norm models: ``q_norm``/``k_norm`` set)."""
    split_qkv(model)
    if _has_qk_norm(model):
        return replace(mapping, q_norm="attn.q_norm", k_norm="attn.k_norm")
    return mapping


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
        # prepare: split qkv; save_model / rename_qparams: write runs back in timm's fused layout
        extra={"prepare": prepare, "save_model": lambda model, target: save_timm(model, target),
               "rename_qparams": lambda tensors: fuse_tensor_names(tensors)},
    ),
    TIMM_VIT,
)


# -------------------------------------------------------------------------------- timm's own layout
_QKV_STACKED = ("weight", "bias", "weight_scale", "weight_zero_point")  # per output row: concatenated
_QKV_SHARED = ("input_scale", "input_zero_point")  # one per input tensor: identical for q, k, v
_QUANT_STATE = ("weight_quantizer", "input_quantizer", "attn_quantizer", "channel_vector")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``"blocks.0.attn.k_proj.weight"`` -> ``("blocks.0.attn.", "k", "weight")``; None for other keys."""
    head, sep, tail = key.rpartition(".attn.")
    if not sep:
        return None
    proj, dot, rest = tail.partition(".")
    if not dot or proj not in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return None
    return head + sep, proj[0], rest


def fuse_tensor_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename split-attention tensors to timm's layout: ``attn.{q,k,v}_proj.<t>`` -> ``attn.qkv.<t>``
    (``weight [3A, D]``, ``bias [3A]``, ``weight_scale`` / ``weight_zero_point`` ``[3 * rows, 1]``: rows
    concatenated in q, k, v order; ``input_scale`` / ``input_zero_point``: must agree, kept once) and
    ``attn.o_proj.<t>`` -> ``attn.proj.<t>``. Works on a state dict and on
    :func:`lrquant.api.quant_state` output; other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parsed = _split_key(key)
        if parsed is None:
            out[key] = value
        elif parsed[1] == "o":
            out[f"{parsed[0]}proj.{parsed[2]}"] = value
        else:
            groups.setdefault((parsed[0], parsed[2]), {})[parsed[1]] = value
    for (prefix, rest), parts in groups.items():
        if set(parts) != set(QKV_ROLES):
            raise LrquantError(f"{prefix}: {rest} present for {sorted(parts)} only, cannot fuse q/k/v")
        values = [parts[r] for r in QKV_ROLES]
        if rest in _QKV_SHARED:
            if not all(torch.equal(values[0], v) for v in values[1:]):
                raise LrquantError(f"{prefix}: q/k/v {rest} differ, so one qkv input quantizer cannot hold them")
            out[f"{prefix}qkv.{rest}"] = values[0]
        elif rest in _QKV_STACKED:
            out[f"{prefix}qkv.{rest}"] = torch.cat(values, 0)
        else:
            raise LrquantError(f"{prefix}: do not know how to fuse q/k/v {rest!r}")
    return out


def fused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict in timm's own layout (loads with ``strict=True`` into the unsplit model):
    split attention re-fused (:func:`fuse_tensor_names`), quantizer state left out. The model is not
    changed."""
    state = model.state_dict()
    if any(".parametrizations." in k for k in state):
        raise LrquantError("the model still has transforms attached; fold them (transforms.fold_block) first")
    state = {k: v for k, v in state.items() if not any(p in _QUANT_STATE for p in k.split("."))}
    return {k: v.detach().contiguous() for k, v in fuse_tensor_names(state).items()}


def timm_hub_config(model: nn.Module) -> dict[str, Any]:
    """timm's ``config.json`` for ``model`` (architecture, num_classes, model_args, pretrained_cfg) with
    timm's own writer when the model came from ``timm.create_model``; a minimal one otherwise."""
    import tempfile

    if getattr(model, "pretrained_cfg", None):
        from timm.models._hub import save_config_for_hf

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.json"
            save_config_for_hf(model, str(path))
            return json.loads(path.read_text())
    return {"num_classes": int(model.num_classes), "num_features": int(model.num_features),
            "global_pool": str(model.global_pool), "pretrained_cfg": {}}


def save_timm(model: nn.Module, target: str | Path, qparams: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (split or not, quantized or not) as a timm ``local-dir`` folder, atomically:
    ``config.json`` (:func:`timm_hub_config`) and ``model.safetensors`` (:func:`fused_state_dict`; the
    weights as they are, fake-quant after quantization). ``qparams`` (e.g. ``lrquant.api.quant_state``)
    is renamed with :func:`fuse_tensor_names` and written beside as ``qparams.safetensors``. Reload with
    ``timm.create_model("local-dir:<target>", pretrained=True)`` or ``lrquant --model timm:<target>``."""
    from safetensors.torch import save_file

    from ..io import atomic_dir

    target = Path(target)
    with atomic_dir(target) as tmp:
        save_file(fused_state_dict(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(timm_hub_config(model), indent=2))
        if qparams is not None:
            fused = {k: v.detach().contiguous() for k, v in fuse_tensor_names(qparams).items()}
            save_file(fused, str(tmp / "qparams.safetensors"))
    return target


def iter_split_attention(model: nn.Module) -> Iterator[SplitQKVAttention]:
    """Every :class:`SplitQKVAttention` of ``model``."""
    return (m for m in model.modules() if isinstance(m, SplitQKVAttention))
