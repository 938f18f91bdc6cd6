"""Transform mechanics shared by every equivalent transform.

A transform changes the basis of the channels between ``prev`` and ``nexts`` of a
:class:`~lrquant.arch.base.SmoothPair` so the block computes the same function in full precision while
its weights and activations become easier to quantize.

* **Temporary application** (training): the transform registers ``torch.nn.utils.parametrize``
  parametrizations on the tensors it changes (norm weight/bias, linear weight rows/columns, biases). The
  block's own forward then sees transformed tensors, differentiably, and the quantizers inside
  :class:`~lrquant.quant.quantizers.QuantLinear` act on them. Several transforms may touch one tensor
  (``v_proj`` is a *next* of the attention norm and the *prev* of ``o_proj``): their parametrizations
  chain in registration order, input-side before output-side, which is the mapping's pair order.
* **Fold** (:func:`fold_block`): every parametrized tensor is recomputed from its original value in
  float64 through the same chain, the parametrizations are removed and the result is written back in the
  tensor's dtype; every learned online op (:class:`OnlineOp`, e.g. the Kronecker transforms of
  :mod:`lrquant.transforms.kron`) freezes its factors. After the fold the block is an ordinary block
  again, plus its online ops.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch.base import ArchMapping, SmoothPair


class Param(nn.Module):
    """A parametrization computing ``fn(x)``; ``fn`` casts the transform's parameters to ``x.dtype``
    so the same code serves the float32 training path and the float64 fold."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def add_param(module: nn.Module, tensor_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    parametrize.register_parametrization(module, tensor_name, Param(fn), unsafe=True)


def original(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The un-transformed tensor (the parametrization's ``original``, or the tensor itself)."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


class OnlineOp(nn.Module):
    """An op left in the inference graph on a linear's input (``QuantLinear.input_transform``) whose
    values a transform learns while the block trains; :meth:`fold_live` fixes them."""

    def fold_live(self) -> None:
        """Store the learned values (computed in float64) in the op's own tensors and stop following the
        transform's parameters."""
        raise NotImplementedError


class Transform(nn.Module):
    """Base class. Subclasses own learnable parameters and implement :meth:`attach`."""

    def __init__(self, pair: SmoothPair, mapping: ArchMapping) -> None:
        super().__init__()
        self.pair = pair
        self.mapping = mapping

    def attach(self, block: nn.Module) -> None:
        """Register the parametrizations on ``block`` (temporary, differentiable application)."""
        raise NotImplementedError

    def learnable(self) -> dict[str, list[nn.Parameter]]:
        """The parameter groups this transform trains (``let``: diagonal and per-head transforms, which
        fold completely; ``kron``: the online Kronecker transforms)."""
        return {"let": list(self.parameters())}

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Epoch hook of the training loop (e.g. AffineQuant's gradual mask); nothing by default."""


@torch.no_grad()
def fold_block(block: nn.Module) -> None:
    """Fold every parametrization of ``block`` into its tensors, computed in float64, and freeze every
    learned :class:`OnlineOp`."""
    folded: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in block.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            x = plist.original.detach().double()
            for p in plist:
                x = p(x)
            folded.append((module, name, x.to(plist.original.dtype)))
    for module, name, _ in folded:
        if parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    for module, name, value in folded:
        getattr(module, name).data.copy_(value)
    for module in block.modules():
        if isinstance(module, OnlineOp):
            module.fold_live()


def copy_block(block: nn.Module) -> nn.Module:
    """A deep copy of ``block`` with its parametrizations, which :func:`fold_block` can fold independently.

    ``copy.deepcopy`` of a parametrized module keeps the ``Parametrized*`` class torch made for the original,
    and removing a parametrization deletes its property from that class, so folding one copy would break
    the other; each parametrized module of the copy gets a class of its own, with the same attributes.
    """
    clone = copy.deepcopy(block)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, attrs)
    return clone


def ensure_bias(linear: nn.Linear) -> bool:
    """True when ``linear`` has a bias (shifts need one; we never add a bias the architecture lacks)."""
    return getattr(linear, "bias", None) is not None
