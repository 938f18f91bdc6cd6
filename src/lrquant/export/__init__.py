"""Export of quantized models (compressed-tensors) and the integer runtime for them (CPU, CUDA)."""

from .compressed import ExportError, export_compressed, load_compressed
from .kernels import convert_to_runtime

__all__ = ["ExportError", "convert_to_runtime", "export_compressed", "load_compressed"]
