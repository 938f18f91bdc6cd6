"""Equivalent transforms: learnable, applied temporarily while a block trains, folded exactly after."""

from .affine import HeadAffine
from .base import Transform, fold_block
from .scale_shift import ScaleShift

__all__ = ["HeadAffine", "ScaleShift", "Transform", "fold_block"]
