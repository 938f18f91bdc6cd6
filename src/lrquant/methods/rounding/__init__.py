"""Rounding stages: how a block's weights meet their grid once its transforms and clipping are learned
and folded. Registered by ``rounding.kind`` (one module per stage beyond the trivial ones, imported at
the bottom); every method calls the stage through :meth:`lrquant.methods.base.Method.round_weights` and
then freezes the weights.

* ``rtn`` — nothing to do: freezing rounds to nearest.
* ``learned`` — SignRound-style offsets, created by :func:`prepare_learned` before training and trained
  with the block (lr group ``round``); freezing folds them into the integer codes.
* ``gptq`` — :mod:`lrquant.methods.rounding.gptq`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from ...config import RoundingArgs
from ...errors import ConfigError
from ...quant.quantizers import quant_linears

if TYPE_CHECKING:
    from ...engine import BlockContext

RoundingStage = Callable[["BlockContext", RoundingArgs], None]
ROUNDINGS: dict[str, RoundingStage] = {}
MOVES_CODES: set[str] = set()


def register_rounding(kind: str, moves_codes: bool = False) -> Callable[[RoundingStage], RoundingStage]:
    """Decorator: make ``fn(ctx, args)`` the stage for ``rounding.kind == kind``. ``moves_codes``: the
    stage picks codes other than the ones the training forward fake-quantized to (GPTQ), so the block's
    loss after rounding differs from its training loss."""

    def deco(fn: RoundingStage) -> RoundingStage:
        ROUNDINGS[kind] = fn
        if moves_codes:
            MOVES_CODES.add(kind)
        return fn

    return deco


def moves_codes(kind: str) -> bool:
    """True if rounding stage ``kind`` changes codes after training (see :func:`register_rounding`)."""
    return kind in MOVES_CODES


def get_rounding(kind: str) -> RoundingStage:
    if kind not in ROUNDINGS:
        raise ConfigError(f"unknown rounding.kind {kind!r}; available: {', '.join(sorted(ROUNDINGS))}")
    return ROUNDINGS[kind]


@register_rounding("rtn")
def round_to_nearest(ctx: BlockContext, args: RoundingArgs) -> None:
    """Freezing rounds to nearest; nothing to do here."""


@register_rounding("learned")
def round_learned(ctx: BlockContext, args: RoundingArgs) -> None:
    """The offsets were trained with the block; freezing folds them into the codes."""


def prepare_learned(block: nn.Module) -> None:
    """Give every unfrozen weight quantizer of ``block`` zero rounding offsets (trained as group ``round``)."""
    for lin in quant_linears(block).values():
        q = lin.weight_quantizer
        if q is not None and not lin.weight_frozen and q.rounding_offset is None:
            q.enable_learned_rounding(q.rows(lin.weight.detach()))


from . import gptq  # noqa: E402,F401  (registers the stage)
