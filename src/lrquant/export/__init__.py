"""Export of quantized models (compressed-tensors) and CPU/CUDA runtime kernels for the exports."""

from .compressed import ExportError, export_compressed, load_compressed

__all__ = ["ExportError", "export_compressed", "load_compressed"]
