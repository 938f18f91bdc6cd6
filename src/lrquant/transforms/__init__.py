"""Equivalent transforms: learnable, applied temporarily while a block trains, folded exactly after."""

from .affine import HeadAffine
from .base import OnlineOp, Transform, copy_block, fold_block
from .kron import KronAffine, OnlineKron
from .scale_shift import ScaleShift

__all__ = ["HeadAffine", "KronAffine", "OnlineKron", "OnlineOp", "ScaleShift", "Transform", "copy_block", "fold_block"]
