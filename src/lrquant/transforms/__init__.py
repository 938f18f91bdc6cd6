"""Equivalent transforms: learnable, applied temporarily while a block trains, folded exactly after."""

from .affine import HeadAffine
from .base import OnlineOp, Transform, copy_block, fold_block
from .kron import KronAffine, OnlineKron, OnlineQK, QKKron
from .scale_shift import ScaleShift

__all__ = ["HeadAffine", "KronAffine", "OnlineKron", "OnlineOp", "OnlineQK", "QKKron", "ScaleShift", "Transform",
           "copy_block", "fold_block"]
