"""Export of quantized models (compressed-tensors, GGUF), the qparams a run folder keeps beside its fake-quant
checkpoint, and the integer runtime for exports (CPU, CUDA)."""

from .compressed import ExportError, export_compressed, load_compressed
from .gguf import export_gguf
from .kernels import convert_to_runtime
from .qparams import check_export_target, export_run, load_run_model, quant_state, restore_quant_state

__all__ = ["ExportError", "check_export_target", "convert_to_runtime", "export_compressed", "export_gguf",
           "export_run", "load_compressed", "load_run_model", "quant_state", "restore_quant_state"]
