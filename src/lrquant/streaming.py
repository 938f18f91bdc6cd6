"""Models larger than RAM: a weightless skeleton, blocks read from safetensors shards when the engine reaches
them, and the quantized checkpoint written shard by shard as blocks finish.

* :func:`load_skeleton` builds the model from its ``config.json`` on the ``meta`` device (accelerate's
  ``init_empty_weights``: parameters without storage; buffers such as rotary frequencies are real).
* :class:`SafetensorsSource` is the engine's :class:`~lrquant.engine.BlockSource`: ``load`` reads the
  tensors of one module (a block, or the embeddings before the calibration capture) from the shards,
  through a memory map opened for that read only, so the pages it touched leave the process with it;
  ``done`` hands the finished block to a :class:`ShardWriter` and puts it back on ``meta``.
* :class:`ShardWriter` writes ``model-0000i-of-0000n.safetensors`` (one shard per block, then one for
  everything outside the blocks, copied tensor by tensor from the input shards), the
  ``model.safetensors.index.json``, the config and the tokenizer: the same tensors as ``save_pretrained``
  of the in-RAM quantized model, never assembled in memory. Each block's frozen quantization parameters
  go to a :class:`TensorSpool` (a raw file beside the run's outputs) and become ``qparams.safetensors``
  at the end, so they do not pile up in memory either (W4 g64: 3% of the fp32 weights).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import LrquantError

INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _malloc_trim() -> None:
    """Hand the heap's free pages back to the kernel (glibc; a no-op elsewhere): the temporaries of one block
    must not stay resident while the next one runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TensorSpool:
    """Tensors appended one at a time to the raw file ``path``, written out as one safetensors file by
    :meth:`write` (header, then the data copied through): never all in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0
        self._fh = open(path, "wb")  # noqa: SIM115  (kept open while blocks finish)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._fh.write(data)
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + len(data)]}
        self.size += len(data)

    def write(self, target: Path) -> None:
        """``target`` (atomically: a temp sibling renamed), then the spool file is removed."""
        self._fh.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        tmp = target.with_name(f".{target.name}.spool.tmp")
        with open(tmp, "wb") as out, open(self.path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        self.path.unlink()

    def discard(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)
SINGLE = "model.safetensors"


def weight_map(folder: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a transformers safetensors folder (sharded or single file)."""
    index = folder / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / SINGLE
    if not single.is_file():
        raise LrquantError(f"{folder} has no safetensors weights ({INDEX} or {SINGLE}); streaming blocks "
                           "reads safetensors only")
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), SINGLE)


def load_skeleton(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of the folder ``path`` with every parameter on ``meta`` (no weights read), in eval
    mode, its floating parameters typed ``dtype`` as :func:`lrquant.models.load_model` would load them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.is_meta


class SafetensorsSource:
    """Materialises a skeleton's tensors from the safetensors shards in ``folder`` (see the module
    docstring); ``writer``: where finished blocks go (``None`` on data-parallel ranks that write nothing)."""

    def __init__(self, folder: str | Path, writer: ShardWriter | None = None) -> None:
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self.writer = writer

    @torch.no_grad()
    def load(self, model: nn.Module, prefixes: Sequence[str]) -> None:
        """Read every ``meta`` parameter and buffer under ``prefixes`` from the shards, in the skeleton's
        dtype, on the CPU."""
        wanted: dict[str, list[tuple[nn.Module, str, str, bool]]] = {}  # file -> (owner, attr, key, is_param)
        for prefix in prefixes:
            module = model.get_submodule(prefix)
            slots = [(n, p, True) for n, p in module.named_parameters()]
            slots += [(n, b, False) for n, b in module.named_buffers()]
            for name, tensor, is_param in slots:
                if not _is_meta(tensor):
                    continue
                key = f"{prefix}.{name}" if prefix else name
                stored = key if key in self.map else _tied_source(model, key)
                if stored not in self.map:
                    raise LrquantError(f"{key} is not in the checkpoint of {self.folder}")
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                wanted.setdefault(self.map[stored], []).append((owner, attr, stored, is_param))
        for file, slots in wanted.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:  # the map closes with the handle
                for owner, attr, key, is_param in slots:
                    old = owner._parameters[attr] if is_param else owner._buffers[attr]
                    value = fh.get_tensor(key).to(old.dtype)
                    if is_param:
                        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
                    else:
                        owner._buffers[attr] = value

    def done(self, model: nn.Module, index: int, name: str, block: nn.Module) -> None:
        """Write the finished block (when this process writes) and give its memory back."""
        if self.writer is not None:
            self.writer.write_block(index, name, block)
        block.to("meta")
        _malloc_trim()

    def drop(self, model: nn.Module, prefixes: Sequence[str]) -> None:
        for prefix in prefixes:
            model.get_submodule(prefix).to("meta")


def _tied_source(model: nn.Module, key: str) -> str:
    """The checkpoint name of a tied parameter (``lm_head.weight`` -> the input embedding's) or ``key``."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        names = {id(m): n for n, m in model.named_modules()}
        if key == f"{names.get(id(out))}.weight":
            return f"{names.get(id(inp))}.weight"
    return key


class ShardWriter:
    """Writes the quantized checkpoint into ``folder`` shard by shard (see the module docstring): one shard
    per block (``blocks`` of them), then one per tensor outside the blocks (``rest``: their names in the
    input checkpoint); the blocks' quantization parameters go to ``qparams`` (a spool)."""

    def __init__(self, folder: Path, blocks: int, rest: Sequence[str], qparams: TensorSpool) -> None:
        self.folder = folder
        self.blocks = blocks
        self.rest = list(rest)
        self.total = blocks + len(self.rest)
        self.weight_map: dict[str, str] = {}
        self.size = 0
        self.qparams = qparams

    @classmethod
    def for_model(cls, folder: Path, model: nn.Module, source: SafetensorsSource, spool: Path) -> ShardWriter:
        """A writer for ``model`` (a skeleton whose blocks the mapping lists) read through ``source``;
        ``spool``: where the quantization parameters wait (outside ``folder``)."""
        from .arch.base import get_mapping

        names = [n for n, _ in get_mapping(model).block_list(model)]
        rest = [k for k in source.map if not any(k.startswith(f"{n}.") for n in names)]
        return cls(folder, len(names), rest, TensorSpool(spool))

    def _write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        file = f"model-{number:05d}-of-{self.total:05d}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.folder / file), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = file
            self.size += v.numel() * v.element_size()

    def write_block(self, index: int, name: str, block: nn.Module) -> None:
        """Block ``index``'s state dict (as ``save_pretrained`` names it) as shard ``index + 1``, and its
        frozen quantization parameters."""
        from .export.qparams import quant_state

        self._write(index + 1, {f"{name}.{k}": v for k, v in block.state_dict().items()})
        for k, v in quant_state(block).items():
            self.qparams.add(f"{name}.{k}", v)

    @torch.no_grad()
    def finish(self, model: nn.Module, source: SafetensorsSource, processor: Any = None) -> None:
        """The shards outside the blocks (each tensor copied from the input shards in the skeleton's dtype,
        one at a time), the index, the config (with the standard attention implementation) and
        ``processor``'s files."""
        for number, key in enumerate(self.rest, start=self.blocks + 1):
            with safe_open(str(source.folder / source.map[key]), framework="pt") as fh:
                value = fh.get_tensor(key)
            try:
                value = value.to(model.get_parameter(key).dtype)
            except AttributeError:  # a buffer: as stored
                pass
            self._write(number, {key: value})
            del value
        index = {"metadata": {"total_size": self.size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        config = model.config
        impl = getattr(config, "_attn_implementation", None)
        if impl == "lrquant":  # our attention hook is an in-memory detail: save the standard SDPA
            config._attn_implementation = "sdpa"
        try:
            config.save_pretrained(self.folder)
        finally:
            if impl == "lrquant":
                config._attn_implementation = impl
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.folder)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(self.folder)


def load_streamed(name_or_path: str) -> tuple[nn.Module, Any, str, Path]:
    """``(skeleton model, tokenizer, display name, weights folder)`` for ``--stream-blocks``: a local folder
    of safetensors (a ``.gguf`` is converted to one first, as :func:`lrquant.models.load_model` does)."""
    from transformers import AutoTokenizer

    from .arch import prepare_model
    from .models import resolve_model_path

    path, display = resolve_model_path(name_or_path)
    folder = Path(path)
    if not folder.is_dir():
        raise LrquantError(f"--stream-blocks reads a local folder of safetensors shards; {name_or_path} is a hub "
                           "id: download it to a folder first")
    weight_map(folder)
    model = prepare_model(load_skeleton(path))
    return model, AutoTokenizer.from_pretrained(path), display, folder
