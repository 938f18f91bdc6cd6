"""timm's own checkpoint layout for timm ViTs held in the split layout (:mod:`lrquant.arch.timm_attention`).

:func:`fuse_tensor_names` renames split-attention tensors back to timm's names (``attn.{q,k,v}_proj.<t>``
-> ``attn.qkv.<t>``, ``attn.o_proj.<t>`` -> ``attn.proj.<t>``), :func:`fused_state_dict` gives the
model's state dict in timm's layout without touching the model, and :func:`save_timm` writes a
(quantized) model as a folder timm loads itself (``config.json`` + ``model.safetensors``, timm's
``local-dir`` layout). :data:`TIMM_CHECKPOINT` is the :class:`~lrquant.arch.base.CheckpointLayout` the
timm ViT mapping declares, so run folders save timm models this way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LrquantError
from .base import CheckpointLayout
from .timm_attention import QKV_ROLES

_QKV_STACKED = ("weight", "bias", "weight_scale", "weight_zero_point")  # per output row: concatenated
_QKV_SHARED = ("input_scale", "input_zero_point")  # one per input tensor: identical for q, k, v
_QUANT_STATE = ("weight_quantizer", "input_quantizer", "attn_quantizer")


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


class TimmCheckpointLayout(CheckpointLayout):
    """Run folders of timm ViTs: ``model/`` by :func:`save_timm`, qparams by :func:`fuse_tensor_names`."""

    def save_model(self, model: nn.Module, target: Path) -> Path:
        return save_timm(model, target)

    def rename_qparams(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fuse_tensor_names(tensors)


TIMM_CHECKPOINT = TimmCheckpointLayout()
