"""Calibration and evaluation text: named corpora (wikitext2, ptb, c4, default) and local files."""

from .text import (
    CORPORA,
    EVAL_MAX_WINDOWS,
    calibration_batches,
    encode,
    eval_tokens,
    load_documents,
    load_text,
    resolve_data_dir,
)

__all__ = [
    "CORPORA",
    "EVAL_MAX_WINDOWS",
    "calibration_batches",
    "encode",
    "eval_tokens",
    "load_documents",
    "load_text",
    "resolve_data_dir",
]
