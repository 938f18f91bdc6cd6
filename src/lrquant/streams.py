"""Where the calibration streams live: in memory up to a budget, beyond it in memory-mapped files.

The block loop holds up to four ``[N, L, H]`` streams at once (FP input, quantized input, FP target,
quantized output). A :class:`StreamStore` allocates each one in a chosen dtype (``float32`` default;
``bfloat16``/``float16`` halve the memory at the cost of rounding the streams), in RAM while the streams
held in RAM stay within ``budget_bytes``, else as a file-backed shared mapping under ``folder``
(``torch.from_file``), which the kernel pages in and out. File-backed streams are ordinary tensors to the
methods; :meth:`StreamStore.release` drops their resident pages (``madvise(MADV_DONTNEED)``: the data
stays in the file and the page cache) after every batch, so they do not accumulate in the process's
resident set. Files are deleted when their stream is freed and by :meth:`StreamStore.close`.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

STREAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MADV_DONTNEED = 4
_PREFIX = "stream-"


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class StreamStore:
    """Allocates the streams (see the module docstring). ``budget_bytes``: ``None`` keeps every stream in
    RAM; otherwise a stream goes to a file under ``folder`` when it would bring the RAM-resident streams
    above the budget (0: every stream in a file)."""

    def __init__(self, dtype: torch.dtype = torch.float32, budget_bytes: int | None = None,
                 folder: Path | None = None) -> None:
        if budget_bytes is not None and folder is None:
            raise ValueError("a stream budget needs a folder for the memory-mapped streams")
        self.dtype = dtype
        self.budget = budget_bytes
        self.folder = folder
        self.in_ram = 0  # bytes of the live RAM streams
        self.peak_in_ram = 0
        self.files_made = 0
        self._live: dict[int, tuple[int, Path | None]] = {}  # data_ptr -> (bytes, file)
        self._count = 0
        if folder is not None:  # leftovers of a killed run (only our own files)
            for old in folder.glob(f"{_PREFIX}*.bin") if folder.is_dir() else ():
                old.unlink()

    def empty(self, shape: tuple[int, ...], like: torch.Tensor | None = None) -> torch.Tensor:
        """A new stream of ``shape`` in the store's dtype (``like``: for a same-device twin when the stream
        must stay on an accelerator, which the budget does not cover)."""
        if like is not None and like.device.type != "cpu":
            return torch.empty(shape, dtype=self.dtype, device=like.device)
        numel = 1
        for s in shape:
            numel *= s
        size = numel * torch.empty((), dtype=self.dtype).element_size()
        path = None
        if self.budget is not None and self.in_ram + size > self.budget:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._count += 1
            path = self.folder / f"{_PREFIX}{self._count:05d}.bin"
            path.unlink(missing_ok=True)
            t = torch.from_file(str(path), shared=True, size=numel, dtype=self.dtype).view(shape)
            self.files_made += 1
        else:
            t = torch.empty(shape, dtype=self.dtype)
            self.in_ram += size
            self.peak_in_ram = max(self.peak_in_ram, self.in_ram)
        self._live[t.data_ptr()] = (size, path)
        return t

    def like(self, src: torch.Tensor) -> torch.Tensor:
        """A copy of ``src`` as a stream of this store."""
        out = self.empty(tuple(src.shape), like=src)
        out.copy_(src)
        return out

    def release(self, *streams: torch.Tensor | None) -> None:
        """Drop the resident pages of the file-backed ``streams`` (no-op for RAM streams)."""
        if _LIBC is None:
            return
        for t in streams:
            entry = self._live.get(t.data_ptr()) if t is not None else None
            if entry is None or entry[1] is None:
                continue
            start = t.data_ptr() - t.data_ptr() % mmap.PAGESIZE
            length = t.data_ptr() + entry[0] - start
            _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)

    def free(self, t: torch.Tensor | None) -> None:
        """``t`` is no longer used by the caller: forget it and delete its file (the mapping goes when the
        last reference to the tensor does)."""
        entry = self._live.pop(t.data_ptr(), None) if t is not None else None
        if entry is None:
            return
        size, path = entry
        if path is None:
            self.in_ram -= size
        else:
            path.unlink(missing_ok=True)

    def is_file_backed(self, t: torch.Tensor | None) -> bool:
        entry = self._live.get(t.data_ptr()) if t is not None else None
        return entry is not None and entry[1] is not None

    def close(self) -> None:
        """Delete every stream file still present (the tensors stay valid until dropped)."""
        for _, path in self._live.values():
            if path is not None:
                path.unlink(missing_ok=True)
        self._live.clear()
        self.in_ram = 0
        if self.folder is not None:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:  # not empty, or already gone with the checkpoint
                pass
