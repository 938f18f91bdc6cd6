"""Content identity of models and data: what the FP caches and the resume fingerprint key on.

A model is identified by what it holds, never by its folder's name (every run's ``model/`` folder has the
same basename): a local folder by its ``config.json`` and the sha256 of every weight file, a GGUF (the
default model included) by the sha256 of the file, a timm weights file likewise; only a hub id, which
cannot be read offline, is identified by its name. File digests are cached per (path, size, mtime, inode)
under the user cache, so a model is read in full once. Data is identified by the tensors a job actually
feeds the model (calibration token ids ``[N, L]`` or pixel dicts, evaluation tokens ``[1, T]``): that
covers the corpus files, ``--data-dir``, the tokenizer, the sample count and the seed at once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .models import TIMM_PREFIX, cache_dir, resolve_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".gguf")
_CHUNK = 1 << 22


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), cached per (resolved path, size, mtime_ns, inode)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()[:24]
    memo = cache_dir() / "digests" / key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    from .io import atomic_write_text

    atomic_write_text(memo, digest + "\n")
    return digest


def folder_digest(folder: str | Path) -> str:
    """sha256 over a model folder's ``config.json`` bytes and the name and digest of each weight file."""
    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        h.update(f"{f.name}:{file_digest(f)}".encode())
    return h.hexdigest()


def model_identity(name_or_path: str) -> str:
    """A content identity for a ``--model`` argument (see the module docstring), e.g. ``folder:<sha256>``.

    GGUFs (and the default model) are identified by their converted folder, which is a pure function of the
    GGUF's bytes; resolving converts them once, as loading would."""
    if name_or_path.startswith(TIMM_PREFIX):
        name, _, weights = name_or_path[len(TIMM_PREFIX):].partition("@")
        if weights:
            return f"timm:{name}@{file_digest(Path(weights).expanduser())}"
        if Path(name).expanduser().is_dir():
            return f"timm-folder:{folder_digest(Path(name).expanduser())}"
        return f"timm-hub:{name}"
    path, _ = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return f"folder:{folder_digest(path)}"
    return f"hub:{path}"


def tensor_digest(data: Any) -> str:
    """sha256 (hex, 16 chars) of tensors as fed to a model: a tensor, or lists/dicts of them (shapes, dtypes
    and bytes; dict keys in sorted order)."""
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        else:
            h.update(json.dumps(x, sort_keys=True, default=str).encode())

    visit(data)
    return h.hexdigest()[:16]

