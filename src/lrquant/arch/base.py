"""Declarative architecture mappings: one :class:`ArchMapping` per model family, keyed by class name.

A mapping says where the blocks are and, inside one block, which norm feeds which linears, which
linears are q/k/v/o and MLP in/out, which norms are sandwich/QK norms, how heads are grouped (GQA) and
whether RoPE rotates q/k. Everything downstream (engine, transforms, export) asks the mapping; no code
anywhere tests a model's name.

Paths are dotted attribute paths: model-level paths from the top-level model object, block-level
paths relative to one block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class SmoothPair:
    """A place where a per-channel transform can be folded exactly.

    ``prev`` produces the channels (a norm or a linear), ``nexts`` consume them (linears).
    ``kind``: ``norm`` (norm -> linears), ``linear`` (linear output rows -> next linear's input columns),
    ``heads`` (v -> o: per head, shared across each GQA group), ``qk`` (q <-> k scores).
    """

    prev: str
    nexts: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class ArchMapping:
    """Where things are in one model family (see module docstring)."""

    family: str
    # ---- model level -------------------------------------------------------------------------------
    blocks: str                                  # ModuleList of transformer blocks
    pre_blocks: tuple[str, ...]                  # modules run before block 0 (embeddings, rotary...)
    final_norm: str | None = None
    head: str | None = None
    embed_tokens: str | None = None
    # ---- block level -------------------------------------------------------------------------------
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    gated_mlp: bool = True                       # mlp_in = (gate, up); down input = act(gate) * up
    mlp_act_positive_homogeneous: bool = False   # act(s*x) == s*act(x) for s > 0 (ReLU): fc1 -> fc2 folds
    attn_norm: str = "input_layernorm"           # feeds q, k, v
    mlp_norm: str = "post_attention_layernorm"   # feeds mlp_in
    q_norm: str | None = None                    # per-head norm on q (QK-norm)
    k_norm: str | None = None
    post_attn_norm: str | None = None            # sandwich norm on the attention output
    post_mlp_norm: str | None = None             # sandwich norm on the MLP output
    norm_kind: str = "rms"                       # rms | rms_plus_one (weight stored as w - 1) | layer
    rope: bool = True
    encoder: bool = False                        # bidirectional blocks (vision), no causal mask
    # ---- config attribute names --------------------------------------------------------------------
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    head_dim_attr: str | None = "head_dim"
    hidden_attr: str = "hidden_size"
    # config -> why this static mapping does not describe it (None when it does)
    config_check: Callable[[Any], str | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def attention(self) -> str:
        """Path of the attention module (the parent of ``q``)."""
        return self.q.rpartition(".")[0]

    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a block, in execution order."""
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)

    def heads(self, config: Any) -> tuple[int, int, int]:
        """``(num_heads, num_kv_heads, head_dim)`` from a transformers config (text part of multimodal)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        n = getattr(config, self.n_heads_attr)
        kv = getattr(config, self.n_kv_heads_attr, None) if self.n_kv_heads_attr else None
        kv = kv or n
        hd = getattr(config, self.head_dim_attr, None) if self.head_dim_attr else None
        hd = hd or getattr(config, self.hidden_attr) // n
        return n, kv, hd

    def smooth_pairs(self) -> tuple[SmoothPair, ...]:
        """Exactly foldable channel-transform positions, derived from the fields above."""
        pairs = [SmoothPair(self.attn_norm, (self.q, self.k, self.v), "norm"),
                 SmoothPair(self.v, (self.o,), "heads")]
        if self.q_norm is None and self.k_norm is None:
            pairs.append(SmoothPair(self.q, (self.k,), "qk"))
        pairs.append(SmoothPair(self.mlp_norm, self.mlp_in, "norm"))
        if self.gated_mlp:
            pairs.append(SmoothPair(self.mlp_in[-1], (self.mlp_out,), "linear"))
        elif self.mlp_act_positive_homogeneous:
            pairs.append(SmoothPair(self.mlp_in[0], (self.mlp_out,), "linear"))
        return tuple(pairs)

    def for_base_model(self, prefix: str = "model.") -> ArchMapping:
        """The same family seen from its bare base model (``LlamaModel``): model-level paths lose
        ``prefix`` and there is no head."""

        def strip(path: str | None) -> str | None:
            return path[len(prefix):] if path is not None and path.startswith(prefix) else path

        return replace(
            self, blocks=strip(self.blocks), pre_blocks=tuple(strip(x) for x in self.pre_blocks),
            final_norm=strip(self.final_norm), head=None, embed_tokens=strip(self.embed_tokens),
        )


_REGISTRY: dict[str, ArchMapping] = {}


def register(mapping: ArchMapping, *class_names: str) -> ArchMapping:
    """Register ``mapping`` for the given class names (exact names, not substrings): bare transformers
    class names, or qualified ``module.QualName`` names for classes whose bare name is ambiguous (timm's
    ``timm.models.vision_transformer.VisionTransformer``; torchvision has a ``VisionTransformer`` too)."""
    for name in class_names:
        _REGISTRY[name] = mapping
    return mapping


def register_family(
    mapping: ArchMapping, head_classes: tuple[str, ...], base_classes: tuple[str, ...] = (), base_prefix: str = "model."
) -> ArchMapping:
    """Register a family for its head classes and, re-rooted, for its bare base-model classes."""
    register(mapping, *head_classes)
    if base_classes:
        register(mapping.for_base_model(base_prefix), *base_classes)
    return mapping


def supported() -> list[str]:
    from . import families, timm_vit, vision  # noqa: F401  (registers the built-in families)

    return sorted(_REGISTRY)


def get_mapping(model: nn.Module) -> ArchMapping:
    """The mapping registered for ``type(model)`` or its nearest registered base class (qualified
    ``module.QualName`` first, then the bare class name).

    A mapping whose ``extra`` holds a ``prepare`` hook (``(model, mapping) -> mapping``) first brings the
    model into the layout it describes, in place and idempotently (timm ViTs: fused qkv split into
    q/k/v, see :mod:`lrquant.arch.timm_vit`), and the hook's mapping is returned."""
    from . import families, timm_vit, vision  # noqa: F401  (registers the built-in families)

    for cls in type(model).__mro__:
        mapping = _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}") or _REGISTRY.get(cls.__name__)
        if mapping is not None:
            prepare = mapping.extra.get("prepare")
            if prepare is not None:
                mapping = prepare(model, mapping)
            config = getattr(model, "config", None)
            if config is not None:
                check_config(mapping, config.get_text_config() if hasattr(config, "get_text_config") else config)
            return mapping
    raise UnsupportedArchitectureError(
        f"unsupported architecture {type(model).__name__}; supported: {', '.join(supported())}"
    )


def check_config(mapping: ArchMapping, config: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` when ``config`` breaks an assumption of ``mapping``."""
    problem = mapping.config_check(config) if mapping.config_check is not None else None
    if problem:
        raise UnsupportedArchitectureError(f"{mapping.family}: {problem}")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
