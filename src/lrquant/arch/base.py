"""Declarative architecture mappings: one :class:`ArchMapping` per model family, keyed by class name.

A mapping says where the blocks are and, inside one block, which norm feeds which linears, which
linears are q/k/v/o and MLP in/out, which norms are sandwich/QK norms, how heads are grouped (GQA) and
whether RoPE rotates q/k. Everything downstream (engine, transforms, export) asks the mapping; no code
anywhere tests a model's name.

Blocks live either in one ModuleList (``blocks``) or, for hierarchical models (Swin), in *stages*:
``stages`` is a ModuleList whose entries hold their blocks at ``stage_blocks`` and, optionally, a
``stage_transition`` module run on the stage output (patch merging), which may change the token count
and the width. Consumers never walk these paths themselves: :meth:`ArchMapping.block_list` gives every
block with its full dotted name in execution order and :meth:`ArchMapping.transitions` says after which
block a transition runs.

Paths are dotted attribute paths: model-level paths from the top-level model object, block-level
paths relative to one block.

Looking a mapping up never changes the model. A family whose checkpoints do not have the layout its
mapping describes (timm's fused ``qkv``) declares a :class:`ModelPreparation`: :func:`prepare_model`
runs it once, at model load (:func:`lrquant.models.load_model` does), and :func:`get_mapping` refuses a
model that was not prepared. A family that writes its finished models in a layout of its own declares a
:class:`CheckpointLayout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
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


class ModelPreparation(ABC):
    """A one-time change that brings a family's models into the layout its mapping describes (timm ViTs:
    the fused ``qkv`` split into q/k/v). :func:`prepare_model` runs it; :func:`get_mapping` only asks."""

    @abstractmethod
    def prepare(self, model: nn.Module) -> nn.Module:
        """Bring ``model`` into the prepared layout, in place and idempotently; raise
        :class:`UnsupportedArchitectureError` before changing anything when it cannot."""

    @abstractmethod
    def problem(self, model: nn.Module) -> str | None:
        """Why ``model`` is not in the prepared layout (None when it is). Reads the model only."""

    def specialize(self, model: nn.Module, mapping: ArchMapping) -> ArchMapping:
        """The mapping that describes the prepared ``model`` (default: ``mapping`` itself). Reads the
        model only."""
        return mapping


class CheckpointLayout(ABC):
    """How a family's finished models are written when transformers' ``save_pretrained`` does not apply
    (timm: its own ``local-dir`` layout with q/k/v fused again)."""

    @abstractmethod
    def save_model(self, model: nn.Module, target: Path) -> Path:
        """Write ``model`` (quantized or not) to the folder ``target``, atomically; returns ``target``."""

    @abstractmethod
    def rename_qparams(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Quantization parameters keyed by the in-memory module names, renamed to this layout's names."""


@dataclass(frozen=True)
class MultimodalParts:
    """The parts of a multimodal model besides its language model (paths from the top-level model). The
    vision tower is a module whose own class has a mapping (CLIP, SigLIP, DINOv2 ... encoders) when it can
    be quantized; the projector carries its features into the language model's embedding space."""

    vision_tower: str
    projector: str

    @staticmethod
    def pattern(path: str) -> str:
        """The compressed-tensors ``ignore`` entry for the module at ``path`` kept dense, in the ``re:.*<module>.*``
        form the ecosystem's recipes use (it matches the names with or without the ``model.`` prefix that
        vLLM and transformers put in front)."""
        return f"re:.*{path.rpartition('.')[2]}.*"


@dataclass(frozen=True)
class ArchMapping:
    """Where things are in one model family (see module docstring)."""

    family: str
    # ---- model level -------------------------------------------------------------------------------
    blocks: str                                  # ModuleList of transformer blocks ("" when ``stages`` is set)
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
    # norms whose output the block may zero-pad before the next linears (Swin pads its windows after
    # the attention norm when the patch grid is not a multiple of the window): a padded token is 0 in
    # any basis, so scales fold there but a shift / zero-point offset would not
    padded_norms: tuple[str, ...] = ()
    rope: bool = True
    encoder: bool = False                        # bidirectional blocks (vision), no causal mask
    # ---- config attribute names --------------------------------------------------------------------
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    head_dim_attr: str | None = "head_dim"
    hidden_attr: str = "hidden_size"
    # (num heads, head dim) attribute names on each block's attention module, when head counts differ per
    # block (Swin: per-stage ``num_heads``); None: from the config (the ``*_attr`` names above)
    heads_from_attention: tuple[str, str] | None = None
    # ---- nested stages (hierarchical models) -------------------------------------------------------
    stages: str | None = None                    # ModuleList of stages (then ``blocks`` is "")
    stage_blocks: str = "blocks"                 # the block ModuleList inside one stage
    stage_transition: str | None = None          # module run on a stage's output (may be None on a stage)
    # config -> why this static mapping does not describe it (None when it does)
    config_check: Callable[[Any], str | None] | None = None
    # ---- loading, evaluation, saving ---------------------------------------------------------------
    preparation: ModelPreparation | None = None  # run once at model load (:func:`prepare_model`)
    checkpoint_layout: CheckpointLayout | None = None  # None: transformers' save_pretrained
    eval_image_size: int | None = None           # vision: input side to evaluate at (None: the config's)
    # multimodal models: the language model is what ``blocks`` describes; the other parts are here
    parts: MultimodalParts | None = None

    def __post_init__(self) -> None:
        if bool(self.blocks) == (self.stages is not None):
            raise ValueError(f"{self.family}: give exactly one of blocks (a block list) and stages")

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def attention(self) -> str:
        """Path of the attention module (the parent of ``q``)."""
        return self.q.rpartition(".")[0]

    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a block, in execution order."""
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)

    def block_list(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block of ``model`` as ``(full dotted name, module)``, in execution order: ``blocks.i``, or
        ``stages.s.stage_blocks.j`` stage after stage."""
        if self.stages is None:
            return [(f"{self.blocks}.{i}", b) for i, b in enumerate(model.get_submodule(self.blocks))]
        out: list[tuple[str, nn.Module]] = []
        for s, stage in enumerate(model.get_submodule(self.stages)):
            prefix = f"{self.stages}.{s}.{self.stage_blocks}"
            out.extend((f"{prefix}.{j}", b) for j, b in enumerate(stage.get_submodule(self.stage_blocks)))
        return out

    def transitions(self, model: nn.Module) -> dict[int, str]:
        """``{index in block_list of a stage's last block: full dotted name of the transition run on its
        output}`` for every stage that has one (empty for single-list mappings). Transitions take the
        stream ``[N, L, C]`` to ``[N, L', C']`` (patch merging: ``L' = L / 4, C' = 2 C``)."""
        if self.stages is None or self.stage_transition is None:
            return {}
        out: dict[int, str] = {}
        count = 0
        for s, stage in enumerate(model.get_submodule(self.stages)):
            n_blocks = len(stage.get_submodule(self.stage_blocks))
            count += n_blocks
            parent, _, attr = self.stage_transition.rpartition(".")
            holder = stage.get_submodule(parent) if parent else stage
            if getattr(holder, attr, None) is None:
                continue
            if n_blocks == 0:
                raise UnsupportedArchitectureError(f"{self.family}: stage {s} has a transition but no blocks")
            out[count - 1] = f"{self.stages}.{s}.{self.stage_transition}"
        return out

    def heads(self, config: Any, block: nn.Module | None = None) -> tuple[int, int, int]:
        """``(num_heads, num_kv_heads, head_dim)`` from a transformers config (text part of multimodal), or,
        for mappings with ``heads_from_attention``, from ``block``'s attention module (then ``block`` is
        required: head counts differ per block)."""
        if self.heads_from_attention is not None:
            if block is None:
                raise ValueError(f"{self.family}: head counts differ per block; pass the block to heads()")
            attn = block.get_submodule(self.attention)
            n, hd = (int(getattr(attn, a)) for a in self.heads_from_attention)
            return n, n, hd
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
            stages=strip(self.stages),
            parts=None if self.parts is None else MultimodalParts(strip(self.parts.vision_tower),
                                                                  strip(self.parts.projector)),
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
    from . import families, multimodal, timm_vit, vision  # noqa: F401  (registers the built-in families)

    return sorted(_REGISTRY)


def _registered(model: nn.Module) -> ArchMapping | None:
    """The mapping registered for ``type(model)`` or its nearest registered base class (qualified
    ``module.QualName`` first, then the bare class name); None when there is none."""
    from . import families, multimodal, timm_vit, vision  # noqa: F401  (registers the built-in families)

    for cls in type(model).__mro__:
        mapping = _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}") or _REGISTRY.get(cls.__name__)
        if mapping is not None:
            return mapping
    return None


def prepare_model(model: nn.Module) -> nn.Module:
    """Run the :class:`ModelPreparation` of ``model``'s family, in place (idempotent; models of families
    without one and of unregistered classes are returned as they are). Call it once after loading a
    model; :func:`lrquant.models.load_model` does."""
    mapping = _registered(model)
    if mapping is not None and mapping.preparation is not None:
        mapping.preparation.prepare(model)
    return model


def get_mapping(model: nn.Module) -> ArchMapping:
    """The mapping that describes ``model`` (see :func:`_registered` for the lookup); the model is not
    changed. Raises :class:`UnsupportedArchitectureError` for unregistered classes, configs the mapping
    does not describe and models whose family needs a preparation that was not run (:func:`prepare_model`)."""
    mapping = _registered(model)
    if mapping is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {type(model).__name__}; supported: {', '.join(supported())}"
        )
    if mapping.preparation is not None:
        problem = mapping.preparation.problem(model)
        if problem:
            raise UnsupportedArchitectureError(f"{mapping.family}: {problem}")
        mapping = mapping.preparation.specialize(model, mapping)
    config = getattr(model, "config", None)
    if config is not None:
        check_config(mapping, config.get_text_config() if hasattr(config, "get_text_config") else config)
    return mapping


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
