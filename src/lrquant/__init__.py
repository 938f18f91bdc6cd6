"""lrquant: learnable post-training quantization for transformers.

Public API: :func:`quantize` (a model in memory), :func:`run` (the whole ``lrquant quantize`` job),
:func:`load_model`, and the config classes :class:`Recipe`, :class:`Scheme`, :class:`QuantArgs`.
"""

from .api import QuantizeResult, RunResult, quantize, run
from .config import CalibArgs, QuantArgs, Recipe, Scheme, TrainArgs
from .models import load_model

__version__ = "0.1.0"

__all__ = ["CalibArgs", "QuantArgs", "QuantizeResult", "Recipe", "RunResult", "Scheme", "TrainArgs",
           "load_model", "quantize", "run"]
