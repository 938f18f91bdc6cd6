"""Models larger than RAM: a weightless skeleton, blocks read from safetensors shards when the engine reaches
them, and the quantized checkpoint written shard by shard as blocks finish.

* :func:`load_skeleton` builds the model from its ``config.json`` on the ``meta`` device (accelerate's
  ``init_empty_weights``: parameters without storage; buffers such as rotary frequencies are real).
* :class:`SafetensorsSource` is the engine's :class:`~lrquant.engine.BlockSource`: ``load`` reads the
  tensors of one module (a block, or the embeddings before the calibration capture) from the shards.
  safetensors hands out tensors backed by a private memory map of the shard, which outlives the file
  handle: a page is read when first touched and leaves the process when the tensor is dropped (``done``
  / ``drop`` put the module back on ``meta``). ``done`` hands the finished block to a
  :class:`ShardWriter` first.
* :class:`ShardWriter` writes ``model-0000i-of-0000n.safetensors`` (one shard per block, then one for
  everything outside the blocks, copied from the input shards :data:`COPY_CHUNK_BYTES` at a time), the
  ``model.safetensors.index.json``, the config and the tokenizer: the same tensors as ``save_pretrained``
  of the in-RAM quantized model, never assembled in memory. Each block's frozen quantization parameters
  go to a :class:`TensorSpool` (a raw file beside the run's outputs) and become ``qparams.safetensors``
  at the end, so they do not pile up in memory either (W4 g64: 3% of the fp32 weights). With
  ``--format compressed-tensors`` a second writer (:meth:`ShardWriter.export_to`) writes the export the same
  way, each finished block compressed by :class:`~lrquant.export.compressed.CompressedBlocks`.

Memory between blocks: a streamed run makes glibc serve every buffer of :data:`MMAP_THRESHOLD_BYTES` or more
from its own mapping (:func:`free_large_buffers_at_once`), so a block's weight-sized temporaries leave the
process when freed instead of staying in the heap, and trims the heap after the calibration capture and
after every block. Peak RSS is then one block, its largest temporaries and the process's fixed part,
whatever the depth.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import LrquantError

INDEX = "model.safetensors.index.json"
MMAP_THRESHOLD_BYTES = 1 << 20  # allocations from this size up get their own mapping (see free_large_buffers_at_once)
COPY_CHUNK_BYTES = 64 << 20  # tensors outside the blocks are copied into model/ this many bytes at a time
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _malloc_trim() -> None:
    """Hand the heap's free pages back to the kernel (glibc; a no-op elsewhere): the temporaries of one block
    must not stay resident while the next one runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_large_buffers_at_once() -> None:
    """Make glibc serve every allocation of :data:`MMAP_THRESHOLD_BYTES` or more from its own memory map, which
    it unmaps when the buffer is freed (process-wide; a no-op without glibc).

    glibc's default threshold is dynamic: each freed mapped buffer raises it to that buffer's size (up to
    32 MiB), so after the first weight-sized tensor is freed, weights and their quantization temporaries
    (``[4096, 1536]`` fp32: 25 MB) come from the heap, where freed memory stays resident until the next
    trim and is reused or not depending on the order of allocations. A block's peak RSS then varied by up
    to about two block sizes from block to block and from run to run, and the run's peak is its worst
    block. Setting the threshold disables that adjustment for the rest of the process; the trim threshold,
    which the adjustment raises along (to twice the mapping threshold), is set back to twice the fixed one.
    Measured on a 101 MB block (hidden 1536, RTN): the peak of every block within 3 MB of the others;
    the price is a fresh, zeroed mapping for every large temporary (about 0.2 s CPU a block there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def safetensors_header(entries: dict[str, dict[str, Any]]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file whose tensors ``entries`` lists
    (``{name: {"dtype", "shape", "data_offsets"}}``), padded to 8 bytes as the format asks."""
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` (on the CPU, C order), without a copy when it is already so."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def copy_tensor(file: Path, key: str, target: Path, dtype: torch.dtype | None = None,
                chunk_bytes: int = COPY_CHUNK_BYTES) -> tuple[list[int], torch.dtype]:
    """Write the tensor ``key`` of the safetensors ``file`` as the single tensor of the safetensors file
    ``target``, cast to ``dtype`` (``None``: as stored), reading about ``chunk_bytes`` of it at a time (whole
    rows of its first dimension, with ordinary reads: a memory map would keep every page it touched
    resident until closed), so an embedding or a head of any size never sits in memory whole. Returns
    ``(shape, dtype written)``; the values are those of ``get_tensor(key).to(dtype)``. A dtype this module
    cannot name (e.g. float8) is copied whole through safetensors."""
    with open(file, "rb") as src:
        length = int.from_bytes(src.read(8), "little")
        info = json.loads(src.read(length))[key]
        shape, stored = list(info["shape"]), _TORCH_DTYPES.get(info["dtype"])
        if stored is None or (dtype or stored) not in _SAFETENSORS_DTYPES:
            with safe_open(str(file), framework="pt") as fh:
                value = fh.get_tensor(key)
            value = value.to(dtype or value.dtype).contiguous()
            save_file({key: value}, str(target), metadata={"format": "pt"})
            return shape, value.dtype
        dtype = dtype or stored
        width, out_width = stored.itemsize, dtype.itemsize
        row = math.prod(shape[1:])  # elements per index of the first dimension (1 for a scalar)
        rows = shape[0] if shape else 1
        step = max(1, chunk_bytes // max(row * max(width, out_width), 1))
        size = math.prod(shape) * out_width
        entry = {key: {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [0, size]}}
        src.seek(8 + length + info["data_offsets"][0])
        with open(target, "wb") as out:
            out.write(safetensors_header(entry))
            for first in range(0, rows, step):
                n = min(step, rows - first)
                raw = torch.empty(n * row * width, dtype=torch.uint8)
                if src.readinto(memoryview(raw.numpy())) != raw.numel():
                    raise LrquantError(f"{file} ends inside tensor {key}")
                out.write(_raw(raw.view(stored).to(dtype)))
    return shape, dtype


class TensorSpool:
    """Tensors appended one at a time to the raw file ``path``, written out as one safetensors file by
    :meth:`write` (header, then the data copied through): never all in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0
        self._fh = open(path, "wb")  # noqa: SIM115  (kept open while blocks finish)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = _raw(tensor)
        self._fh.write(data)
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + data.nbytes]}
        self.size += data.nbytes

    def write(self, target: Path) -> None:
        """``target`` (atomically: a temp sibling renamed), then the spool file is removed."""
        self._fh.close()
        tmp = target.with_name(f".{target.name}.spool.tmp")
        with open(tmp, "wb") as out, open(self.path, "rb") as data:
            out.write(safetensors_header(self.entries))
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
    docstring); ``writer``: where finished blocks go (``None`` on data-parallel ranks that write nothing).
    Creating one switches the process to :func:`free_large_buffers_at_once` and trims the heap (what the
    tokenization of the calibration text left in it must not sit under the first block)."""

    def __init__(self, folder: str | Path, writer: ShardWriter | None = None) -> None:
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self.writer = writer
        free_large_buffers_at_once()
        _malloc_trim()

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
        """Put the modules under ``prefixes`` back on ``meta`` (e.g. the embeddings after the calibration
        capture) and trim the heap."""
        for prefix in prefixes:
            model.get_submodule(prefix).to("meta")
        _malloc_trim()


def _tied_source(model: nn.Module, key: str) -> str:
    """The checkpoint name of a tied parameter (``lm_head.weight`` -> the input embedding's) or ``key``."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        names = {id(m): n for n, m in model.named_modules()}
        if key == f"{names.get(id(out))}.weight":
            return f"{names.get(id(inp))}.weight"
    return key


def _block_state(name: str, block: nn.Module) -> dict[str, torch.Tensor]:
    """A finished block's state dict, keys as ``save_pretrained`` names them in the whole model."""
    return {f"{name}.{k}": v for k, v in block.state_dict().items()}


class ShardWriter:
    """Writes the quantized checkpoint into ``folder`` shard by shard (see the module docstring): one shard
    per block (``blocks`` of them), then one per tensor outside the blocks (``rest``: their names in the
    input checkpoint); the blocks' quantization parameters go to ``qparams`` (a spool). ``convert``: a
    finished block's tensors in this checkpoint, keys as in the model (default: its state dict, the
    fake-quant model); ``cast``: the dtype of the parameters outside the blocks (default: the skeleton's).
    Writers in ``also`` (:meth:`export_to`) write further checkpoints of the same blocks."""

    def __init__(self, folder: Path, blocks: int, rest: Sequence[str], qparams: TensorSpool | None,
                 convert: Callable[[str, nn.Module], dict[str, torch.Tensor]] | None = None,
                 cast: torch.dtype | None = None) -> None:
        self.folder = folder
        self.blocks = blocks
        self.rest = list(rest)
        self.total = blocks + len(self.rest)
        self.weight_map: dict[str, str] = {}
        self.size = 0
        self.qparams = qparams
        self.convert = convert or _block_state
        self.cast = cast
        self.also: list[ShardWriter] = []

    def export_to(self, folder: Path, convert: Callable[[str, nn.Module], dict[str, torch.Tensor]],
                  cast: torch.dtype | None) -> ShardWriter:
        """A writer of a second checkpoint in ``folder`` (e.g. the compressed-tensors export, ``convert`` =
        :class:`lrquant.export.compressed.CompressedBlocks`), fed and finished with this one."""
        other = ShardWriter(folder, self.blocks, self.rest, None, convert, cast)
        self.also.append(other)
        return other

    @classmethod
    def for_model(cls, folder: Path, model: nn.Module, source: SafetensorsSource, spool: Path) -> ShardWriter:
        """A writer for ``model`` (a skeleton whose blocks the mapping lists) read through ``source``;
        ``spool``: where the quantization parameters wait (outside ``folder``)."""
        from .arch.base import get_mapping

        names = [n for n, _ in get_mapping(model).block_list(model)]
        rest = [k for k in source.map if not any(k.startswith(f"{n}.") for n in names)]
        return cls(folder, len(names), rest, TensorSpool(spool))

    def _file(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.total:05d}.safetensors"

    def _write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        file = self._file(number)
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.folder / file), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = file
            self.size += v.numel() * v.element_size()

    def write_block(self, index: int, name: str, block: nn.Module) -> None:
        """Block ``index``'s tensors (its state dict as ``save_pretrained`` names it, or ``convert``'s) as shard
        ``index + 1``, and its frozen quantization parameters; then the same for the writers in ``also``."""
        from .export.qparams import quant_state

        self._write(index + 1, self.convert(name, block))
        if self.qparams is not None:
            for k, v in quant_state(block).items():
                self.qparams.add(f"{name}.{k}", v)
        for other in self.also:
            other.write_block(index, name, block)

    @torch.no_grad()
    def finish(self, model: nn.Module, source: SafetensorsSource, processor: Any = None) -> None:
        """The shards outside the blocks (each tensor copied from the input shards in the skeleton's dtype,
        one at a time and :data:`COPY_CHUNK_BYTES` at a time, see :func:`copy_tensor`), the index, the config
        (with the standard attention implementation) and ``processor``'s files; then the writers in ``also``."""
        for number, key in enumerate(self.rest, start=self.blocks + 1):
            try:
                dtype: torch.dtype | None = model.get_parameter(key).dtype
            except AttributeError:  # a buffer: as stored
                dtype = None
            else:
                dtype = self.cast or dtype
            file = self._file(number)
            shape, dtype = copy_tensor(source.folder / source.map[key], key, self.folder / file, dtype)
            self.weight_map[key] = file
            self.size += math.prod(shape) * dtype.itemsize
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
        for other in self.also:
            other.finish(model, source, processor)


def load_streamed(name_or_path: str) -> tuple[nn.Module, Any, str, Path]:
    """``(skeleton model, tokenizer, display name, weights folder)`` for ``--stream-blocks``: a local folder
    of safetensors (a ``.gguf`` is converted to one first, as :func:`lrquant.models.load_model` does).
    Switches the process to :func:`free_large_buffers_at_once` first: buffers that the heap served before
    the switch (the tokenization of the calibration text) would otherwise leave large free chunks in it,
    which glibc reuses for later large buffers ahead of a fresh mapping and keeps resident once freed."""
    free_large_buffers_at_once()
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
