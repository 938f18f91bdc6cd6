"""The run layer: one :class:`RunFolder` for every job that writes a run folder, and the steps the text job
(:func:`lrquant.api.run`) and the vision job (:func:`run_vision`) share.

A run folder holds ``results.json``, ``recipe.yaml``, ``run.log``, ``model/``, ``qparams.safetensors``,
optionally ``compressed/``, and while a run is unfinished ``checkpoint/`` (the engine's blocks, plus
``run.json``: the recipe and model identity the checkpoint belongs to). Rules:

* everything that can be checked before work is checked before work (the folder is only created once
  the model and the data are loaded and checked), and a refusal changes nothing;
* one process at a time: the folder is locked (an advisory ``flock`` on the folder itself, released when
  the process ends, however it ends);
* nothing lrquant did not write is deleted or replaced: a non-empty folder that is not a run folder is
  refused unless ``--overwrite``, and even then only the names above are replaced;
* ``recipe.yaml`` and ``results.json`` are replaced together at the very end, after ``model/``; while a
  run replaces a finished one its old ``results.json`` is removed first, so the folder never shows old
  results beside a new model; ``--resume`` continues an interrupted run only (a finished one is refused
  unless ``--overwrite``) and only with the same recipe and the same model content;
* temp files and folders left by a killed save (``.model.XXXX/`` ...) are removed when the folder is next
  opened; a run whose quality is not finite says so (:class:`NonFiniteResultError`) after saving.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch.base import CheckpointLayout
from .config import Recipe, TTAStep
from .errors import ConfigError, DataError, LrquantError
from .io import atomic_dir, atomic_save_tensors, atomic_write_json, sha256_file

log = logging.getLogger("lrquant")

RESULTS, RECIPE, LOG, MODEL = "results.json", "recipe.yaml", "run.log", "model"
QPARAMS, COMPRESSED, GGUF = "qparams.safetensors", "compressed", "model.gguf"
CHECKPOINT, RUN_STATE = "checkpoint", "run.json"
OWNED = (RESULTS, RECIPE, LOG, MODEL, QPARAMS, COMPRESSED, GGUF, CHECKPOINT)
ARTIFACTS = (MODEL, QPARAMS, COMPRESSED, GGUF)
QUALITY_KEYS = ("fp_ppl", "ppl", "ppl_tta", "fp_top1", "top1", "fp_retrieval_top1", "retrieval_top1",
                "feature_cosine", "fp_caption_ppl", "caption_ppl", "image_feature_cosine")
FORMATS = ("fake", "compressed-tensors", "gguf")
EXPORT_DTYPE = torch.float16  # dense tensors and scales of the exports


class NonFiniteResultError(LrquantError):
    """The run finished and was saved, but a quality number is NaN or infinite."""

    exit_status = 3


def _intact_safetensors(path: Path) -> bool:
    """Whether ``path`` is a whole safetensors file: a readable header whose tensors end exactly at the
    file's end (catches missing, empty and truncated files; not flipped bytes inside the data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _intact_block(path: Path, sha256: str | None) -> bool:
    """A whole safetensors file (:func:`_intact_safetensors`) whose bytes match ``sha256`` when one is known."""
    if not _intact_safetensors(path):
        return False
    if sha256 is None:
        return True
    return sha256_file(path) == sha256


def _non_finite_quality(results: dict[str, Any]) -> list[str]:
    """The quality numbers (:data:`QUALITY_KEYS`, per dataset where they are dicts) that are NaN or infinite,
    e.g. ``["ppl[wikitext2]"]``."""
    bad = []
    for key in QUALITY_KEYS:
        value = results.get(key)
        for name, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            if isinstance(v, float) and not math.isfinite(v):
                bad.append(key if name is None else f"{key}[{name}]")
    return bad


def _is_temp_of_ours(name: str) -> bool:
    """A temp file or folder of an atomic write of one of :data:`OWNED` (``.<name>.XXXX[.tmp]``)."""
    return any(name.startswith(f".{owned}.") for owned in OWNED)


def export_entry(export_format: str, path: Path) -> dict[str, Any]:
    """The ``results.json`` entry of the export at ``path`` (a file, or a folder of safetensors)."""
    from .export.compressed import dir_size_bytes

    size = dir_size_bytes(path) if path.is_dir() else path.stat().st_size
    return {"format": export_format, "path": str(path), "size_mb": round(size / 2**20, 1)}


class RunFolder:
    """One job's output folder: checks, lock, log, recipe, results, model and qparams, cleanup (see the
    module docstring for the rules)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        self._written: set[str] = set()
        self._was_run = False

    # ---- state -----------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return (self.path / RESULTS).is_file()

    @property
    def interrupted(self) -> bool:
        return (self.path / CHECKPOINT).is_dir()

    def completed_blocks(self) -> int:
        """How many blocks the checkpoint holds (what a resume restores)."""
        try:
            return int(json.loads((self.path / CHECKPOINT / "state.json").read_text())["completed"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    # ---- checks (no side effects) ----------------------------------------------------------------------
    def check(self) -> None:
        """The overwrite and resume rules and writability; raises :class:`ConfigError` with one line."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--output {p} is a file, not a folder")
        existing = next(a for a in (p, *p.absolute().parents) if a.exists())
        if not existing.is_dir():
            raise ConfigError(f"--output {p}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--output {p}: {existing} is not writable")
        if not p.exists():
            return
        if self.resume and self.finished and not self.overwrite:
            raise ConfigError(f"{p} holds a finished run; --resume continues an interrupted run only "
                              "(pass --overwrite to redo it)")
        if self.finished and not self.overwrite:
            raise ConfigError(f"{p} already holds a finished run; pass --overwrite or choose another --output")
        if self.interrupted and not (self.resume or self.overwrite):
            raise ConfigError(f"{p} holds an interrupted run; pass --resume to continue it or --overwrite")
        self._was_run = self.finished or self.interrupted or (p / RECIPE).is_file()
        foreign = sorted(e.name for e in p.iterdir() if e.name not in OWNED and not _is_temp_of_ours(e.name))
        if foreign and not self._was_run and not self.overwrite:
            raise ConfigError(f"--output {p} holds files lrquant did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose a new folder or pass --overwrite")

    def check_resume(self, recipe: Recipe, model_id: str) -> None:
        """Refuse, before any work, to resume a checkpoint made with another recipe or another model."""
        state = self.path / CHECKPOINT / RUN_STATE
        if not (self.resume and state.is_file()):
            return
        try:
            saved = json.loads(state.read_text())
        except (OSError, ValueError) as exc:
            raise LrquantError(f"{state} is unreadable ({type(exc).__name__}); pass --overwrite to start over") from exc
        if saved.get("model") != model_id:
            raise ConfigError(f"the checkpoint in {self.path} was made with another model (by content); "
                              "use another --output or --overwrite")
        if saved.get("recipe") != recipe.to_dict():
            old = saved.get("recipe") or {}
            keys = sorted(k for k in {*old, *recipe.to_dict()} if old.get(k) != recipe.to_dict().get(k))
            raise ConfigError(f"the checkpoint in {self.path} was made with another recipe (differs in: "
                              f"{', '.join(keys)}); use the same flags, another --output, or --overwrite")

    # ---- open: create, lock, re-check, clean, log ------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's advisory lock (refuse if another process holds it)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LrquantError(f"another lrquant process is using {self.path}; wait for it or choose "
                                   "another folder") from None
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def open(self) -> Iterator[RunFolder]:
        """Create and lock the folder, re-check the rules under the lock (another process may have finished
        a run there meanwhile), remove temp leftovers of killed writes and log to ``run.log`` until the block
        ends. Jobs call :meth:`check` before any work, so a refusal here only happens in such a race."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LrquantError(f"cannot create --output {self.path}: {exc.strerror}") from exc
        with self.locked():
            self.check()
            self._remove_temps()
            with self._logging():
                yield self

    def _remove_temps(self) -> None:
        for entry in self.path.iterdir():
            if _is_temp_of_ours(entry.name):
                log.info("removing %s left by an interrupted write", entry)
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        ckpt = self.path / CHECKPOINT
        for entry in ckpt.glob(".*.tmp") if ckpt.is_dir() else ():
            entry.unlink()

    @contextlib.contextmanager
    def _logging(self) -> Iterator[None]:
        handler = logging.FileHandler(self.path / LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        log.addHandler(handler)
        old_level = log.level
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        try:
            yield
        finally:
            log.removeHandler(handler)
            log.setLevel(old_level)
            handler.close()

    # ---- writing -----------------------------------------------------------------------------------------
    def repair_checkpoint(self) -> None:
        """Before a resume: keep the blocks the checkpoint can really restore. An unreadable ``state.json``
        restarts the block loop; a missing, empty or truncated block file, one whose sha256 differs from the
        state's ``block_sha256`` list (where the engine records it), or a state ahead of the files makes
        the loop continue after the last intact block, which it then recomputes. Warns either way."""
        ckpt = self.path / CHECKPOINT
        state_path = ckpt / "state.json"
        if not state_path.exists():
            return
        try:
            state = json.loads(state_path.read_text())
            completed, reports = int(state["completed"]), list(state["reports"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; the block loop starts again from block 0", state_path)
            state_path.unlink()
            return
        digests = state.get("block_sha256") or []
        intact = -1
        while intact < completed and _intact_block(ckpt / f"block_{intact + 1:04d}.safetensors",
                                                   digests[intact + 1] if intact + 1 < len(digests) else None):
            intact += 1
        if intact < completed:
            log.warning("checkpoint block %d is missing or damaged; blocks from %d on are recomputed",
                        intact + 1, intact + 1)
            atomic_write_json(state_path, {**state, "completed": intact, "reports": reports[: intact + 1]})

    def begin(self, recipe: Recipe, model_id: str) -> int:
        """Start (or continue, after :meth:`repair_checkpoint`) the block loop's checkpoint; returns how many
        finished blocks it holds."""
        ckpt = self.path / CHECKPOINT
        if self.resume:
            self.repair_checkpoint()
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
        if not (ckpt / RUN_STATE).is_file():
            atomic_write_json(ckpt / RUN_STATE, {"recipe": recipe.to_dict(), "model": model_id})
        return self.completed_blocks() if self.resume else 0

    def replacing(self) -> None:
        """About to write artifacts: an old finished result no longer describes this folder."""
        (self.path / RESULTS).unlink(missing_ok=True)

    def save_model(self, model: nn.Module, processor: Any, layout: CheckpointLayout | None = None) -> None:
        """``model/``: in a family's own checkpoint ``layout``, or a fake-quant transformers checkpoint that
        plain transformers loads (with ``processor``'s files), written atomically."""
        target = self.path / MODEL
        if layout is not None:
            layout.save_model(model, target)
        else:
            config = getattr(model, "config", None)
            impl = getattr(config, "_attn_implementation", None)
            with atomic_dir(target) as tmp:
                if impl == "lrquant":  # our attention hook is an in-memory detail: save the standard SDPA
                    config._attn_implementation = "sdpa"
                try:
                    model.save_pretrained(tmp)
                finally:
                    if impl == "lrquant":
                        config._attn_implementation = impl
                if processor is not None and hasattr(processor, "save_pretrained"):
                    processor.save_pretrained(tmp)
        self._written.add(MODEL)

    @contextlib.contextmanager
    def streamed(self, name: str = MODEL) -> Iterator[Path]:
        """A temporary folder that replaces the artifact ``name`` (``model/``, ``compressed/``) when the block
        ends without error: a checkpoint written shard by shard while the model is quantized
        (:mod:`lrquant.streaming`)."""
        with atomic_dir(self.path / name) as tmp:
            yield tmp
            self.replacing()  # the old results must not sit beside the new model
        self._written.add(name)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.write_file(name, lambda path: atomic_save_tensors(path, tensors))

    def write_file(self, name: str, write: Callable[[Path], None]) -> None:
        """``write(path)`` writes the artifact ``name`` (atomically); it counts as this run's."""
        write(self.path / name)
        self._written.add(name)

    def export(self, export_format: str, model: nn.Module, recipe: Recipe, processor: Any,
               online_ops: list[str]) -> dict[str, Any]:
        """``compressed/`` (compressed-tensors) or ``model.gguf``, dense tensors in :data:`EXPORT_DTYPE`;
        returns the ``results.json`` entry."""
        if export_format == "gguf":
            from .export.gguf import export_gguf

            path = export_gguf(model, recipe.scheme, self.path / GGUF, processor, dtype=EXPORT_DTYPE,
                               online_ops=online_ops)
        else:
            from .export import export_compressed

            path = export_compressed(model, recipe.scheme, self.path / COMPRESSED, processor, dtype=EXPORT_DTYPE,
                                     online_ops=online_ops)
        self._written.add(path.name)
        return export_entry(export_format, path)

    def finish(self, results: dict[str, Any], recipe: Recipe) -> None:
        """Drop stale artifacts of an earlier run that this run did not write, then ``recipe.yaml`` and
        ``results.json`` (strict JSON), then the checkpoint. Raises :class:`NonFiniteResultError` after
        saving when a quality number is not finite."""
        for name in ARTIFACTS:
            stale = self.path / name
            if self._was_run and name not in self._written and stale.exists():
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        bad = _non_finite_quality(results)
        if bad:
            results["non_finite"] = bad
        recipe.save(self.path / RECIPE)
        atomic_write_json(self.path / RESULTS, results)
        shutil.rmtree(self.path / CHECKPOINT, ignore_errors=True)
        if bad:
            raise NonFiniteResultError(f"the quantized model's quality is not finite ({', '.join(bad)}); the run "
                                       f"was saved in {self.path} (results.json records null)")


# ---- checks shared by every job ------------------------------------------------------------------------
@contextlib.contextmanager
def model_errors(model_name: str) -> Iterator[None]:
    """A model that cannot be read (a corrupt GGUF, truncated safetensors, a config with wrong types, a
    folder holding another kind of model) as one line instead of a library's traceback."""
    try:
        yield
    except (LrquantError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (any failure of the loaders on this file is the file's)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrquantError(f"cannot load model {model_name!r}: {detail}") from exc


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """A corpus or text file that is not UTF-8 as one line (the decoder's message names no file)."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise DataError(f"a calibration or evaluation text is not UTF-8 (byte {exc.start}: {exc.reason}); "
                        "convert it to UTF-8") from exc


def load_checked(model_name: str, kind: str = "causal-lm") -> tuple[nn.Module, Any, str]:
    """:func:`lrquant.models.load_model` under :func:`model_errors`."""
    from .models import load_model

    with model_errors(model_name):
        return load_model(model_name, kind=kind)


def check_device(device: str) -> None:
    """Refuse an unknown device string or a device this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise ConfigError(f"--device {device}: no {dev.type} device is available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def check_format(recipe: Recipe, export_format: str | None) -> None:
    """Refuse, before any work, an export the recipe cannot produce."""
    if export_format in (None, "fake"):
        return
    if export_format not in FORMATS:
        raise ConfigError(f"unknown --format {export_format!r}; use {' or '.join(FORMATS)}")
    if recipe.scheme.weights is None:
        raise ConfigError(f"scheme {recipe.scheme.name()} quantizes no weights: {export_format} has no "
                          "activation-only format")
    if recipe.rotation is not None and export_format == "gguf":  # compressed-tensors: a transform_config
        raise ConfigError(f"--format {export_format} cannot carry the online Hadamard rotation of --rotate; "
                          "drop one of them")
    from .methods import get_method

    problem = get_method(recipe.method).export_problem(recipe)
    if problem is not None:
        raise ConfigError(f"--format {export_format}: {problem}")
    if export_format == "gguf":  # a grid GGUF has no type for
        from .export.gguf import gguf_quant_type

        gguf_quant_type(recipe.scheme)


def prepare_job(model_name: str, recipe: Recipe, output_dir: str | Path, *, device: str, resume: bool,
                overwrite: bool, export_format: str | None = None) -> tuple[RunFolder, str]:
    """Every check a quantize job can make before loading anything; returns the (not yet opened) run
    folder and the model's content identity."""
    from .identity import model_identity
    from .methods import get_method

    get_method(recipe.method)(recipe)  # the recipe was validated on construction (TTA support included)
    check_device(device)
    check_format(recipe, export_format)
    folder = RunFolder(output_dir, overwrite=overwrite, resume=resume)
    folder.check()
    with model_errors(model_name):
        model_id = model_identity(model_name)
    folder.check_resume(recipe, model_id)
    return folder, model_id


def results_header(job: str, display: str, model_id: str, recipe: Recipe) -> dict[str, Any]:
    return {"job": job, "model": display, "model_id": model_id, "method": recipe.method,
            "scheme": asdict(recipe.scheme), "scheme_name": recipe.scheme.name(), "recipe": recipe.to_dict()}


def quantize_into(folder: RunFolder, model: nn.Module, recipe: Recipe, calib: Any, results: dict[str, Any],
                  model_id: str, device: str, progress: bool,
                  before_blocks: Callable[[Path], dict[str, Any]] | None = None, *, stream_dtype: str = "float32",
                  stream_budget_gb: float | None = None, source: Any = None) -> Any:
    """Quantize with the folder's checkpoint (resumable: the fingerprint is the recipe, the model's content
    and the calibration tensors' digest) and record blocks, errors, online ops, rotation and the
    calibration time (restored blocks counted with their recorded seconds; ``calib_cpu_s``: the process's
    CPU seconds of this invocation only). ``before_blocks(checkpoint folder)``: parts quantized before the
    model's blocks, inside the same checkpoint (a multimodal model's vision tower and projector, see
    :mod:`lrquant.multimodal`); what it returns goes into ``results``. ``stream_dtype``,
    ``stream_budget_gb``: the calibration streams' dtype and RAM budget (beyond it they are memory-mapped
    files under ``checkpoint/``, deleted at the end); ``source``: materialises the blocks of a skeleton
    model (:mod:`lrquant.streaming`). Under torchrun rank 0 alone prepares the checkpoint; the other ranks
    read it. Returns the QuantizeResult."""
    from . import distributed as ddp
    from .api import quantize
    from .engine import layer_errors
    from .identity import tensor_digest

    restored = folder.begin(recipe, model_id) if ddp.is_main() else 0
    ddp.barrier()  # the other ranks read the checkpoint rank 0 has just repaired
    if not ddp.is_main() and folder.resume:
        restored = folder.completed_blocks()
    log.info("model %s, method %s, scheme %s%s", results["model"], recipe.method, recipe.scheme.name(),
             f", resuming after {restored} blocks" if restored else "")
    t0, c0 = time.time(), time.process_time()
    if before_blocks is not None:
        results.update(before_blocks(folder.path / CHECKPOINT))
    store = stream_store(folder, stream_dtype, stream_budget_gb)
    streams = "" if stream_dtype == "float32" else f"|streams:{stream_dtype}"  # a narrower stream changes results
    try:
        qr = quantize(model, recipe, calib, device=device, checkpoint_dir=folder.path / CHECKPOINT,
                      resume=folder.resume, progress=progress, store=store, source=source,
                      model_name=f"{model_id}|calib:{tensor_digest(calib)}{streams}")
    finally:
        store.close()
    results["streams"] = {"dtype": stream_dtype, "budget_gb": stream_budget_gb, "mapped_files": store.files_made,
                          "peak_in_ram_gb": round(store.peak_in_ram / 1024**3, 3), "world_size": ddp.world()}
    results["blocks"] = [asdict(r) for r in qr.reports]
    results["calib_time_s"] = round(time.time() - t0 + sum(b["seconds"] for b in results["blocks"][:restored]), 2)
    # CPU seconds of this process (all its threads): less sensitive than wall time to a loaded machine
    results["calib_cpu_s"] = round(time.process_time() - c0, 2)
    if restored:
        results["resumed_blocks"] = restored
    results["layer_errors"] = layer_errors(model)
    results["online_ops"] = qr.online_ops
    rot = recipe.rotation
    if rot is not None:
        from .transforms.rotation import online_specs

        results["rotation"] = {"method": rot.kind, "seed": rot.seed, "online_value": rot.online_value,
                               "online": online_specs(model)}
    return qr


def stream_store(folder: RunFolder, dtype: str, budget_gb: float | None) -> Any:
    """The :class:`lrquant.streams.StreamStore` of a job: ``dtype`` streams, at most ``budget_gb`` of them in
    RAM, the rest in ``checkpoint/streams`` (one folder per rank under data parallel)."""
    from . import distributed as ddp
    from .streams import STREAM_DTYPES, StreamStore

    name = f"streams-rank{ddp.rank()}" if ddp.active() else "streams"
    budget = None if budget_gb is None else int(budget_gb * 1024**3)
    return StreamStore(STREAM_DTYPES[dtype], budget, folder.path / CHECKPOINT / name)


def peak_rss_gb() -> float:
    """This process's peak resident set size in GB (GiB), from ``VmHWM`` in ``/proc/self/status``. Not
    ``getrusage``'s ``ru_maxrss`` where /proc exists: Linux carries the launching process's high-water mark
    across ``exec`` into it, so a run started by a large Python process (a bench, a notebook) would report
    its parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return round(kb / 1024**2, 3)


def finish_job(folder: RunFolder, model: nn.Module, processor: Any, results: dict[str, Any], recipe: Recipe, *,
               save_model: bool, export_format: str | None, online_ops: list[str],
               layout: CheckpointLayout | None = None, streamed_qparams: Callable[[Path], None] | None = None,
               streamed_export: dict[str, Any] | None = None) -> None:
    """Resources, then (in this order) the model and qparams (in the family's checkpoint ``layout`` if it
    declares one), the export, recipe and results. ``streamed_qparams``: the model was written shard by
    shard (:meth:`RunFolder.streamed`); this writes the qparams file it spooled to the given path;
    ``streamed_export``: the ``results.json`` entry of an export written the same way (none is made here)."""
    from .export.qparams import quant_state

    results["peak_rss_gb"] = peak_rss_gb()
    if torch.cuda.is_available():
        results["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    folder.replacing()
    if streamed_qparams is not None:
        folder.write_file(QPARAMS, streamed_qparams)
    elif save_model:
        folder.save_model(model, processor, layout)
        qparams = quant_state(model)
        folder.save_tensors(QPARAMS, layout.rename_qparams(qparams) if layout else qparams)
    if streamed_export is not None:
        results["export"] = streamed_export
    elif export_format not in (None, "fake"):
        results["export"] = folder.export(export_format, model, recipe, processor, online_ops)
    folder.finish(results, recipe)


# ---- post-steps ----------------------------------------------------------------------------------------
def run_tta(q_model: nn.Module, model_name: str, method: Any, eval_sets: dict[str, torch.Tensor], step: TTAStep,
            seqlen: int, windows: int | None, device: str, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """The TTA post-step ``step`` per evaluation set (``{name: tokens [1, T]}``): adapt the last blocks on
    the tail of its (unlabeled) stream, measure PPL on the scored windows at its start (never the same
    tokens), restore the calibrated blocks. ``method`` quantized ``q_model`` with a
    recipe whose TTA step keeps at least ``step.blocks`` blocks. Returns ``({name: ppl}, {name: report})``."""
    from .arch.base import get_mapping, set_submodule
    from .eval.perplexity import evaluate_ppl
    from .tta import adapt

    fp_model, _, _ = load_checked(model_name)
    ppl, info = {}, {}
    for name, tokens in eval_sets.items():
        slots = get_mapping(q_model).block_list(q_model)
        saved = {slots[i][0]: copy.deepcopy(slots[i][1]) for i in range(len(slots) - step.blocks, len(slots))}
        report = adapt(q_model, fp_model, method, tokens, step, device,
                       held_out=scored_tokens(tokens, seqlen, windows))
        ppl[name] = evaluate_ppl(q_model, {name: tokens}, seqlen, windows, device, progress)[name]["ppl"]
        info[name] = {**asdict(report), "config": asdict(step)}
        log.info("TTA on %s: %.1fs, perplexity %.4f", name, report.seconds, ppl[name])
        for block_name, block in saved.items():
            set_submodule(q_model, block_name, block)
    return ppl, info


def scored_tokens(tokens: torch.Tensor, seqlen: int, windows: int | None) -> int:
    """How many leading tokens of ``tokens [1, T]`` the perplexity scores (whole windows of ``seqlen``)."""
    total = tokens.shape[1] // seqlen
    return seqlen * (total if windows is None else min(windows, total))


def check_tta(model: nn.Module, recipe: Recipe, eval_sets: dict[str, torch.Tensor], seqlen: int,
              windows: int | None) -> None:
    """Refuse, before calibrating, a TTA post-step that adapts more blocks than the model has, or whose
    adaptation windows would overlap the scored ones on some evaluation stream."""
    from .arch.base import get_mapping

    if recipe.tta is None:
        return
    n = len(get_mapping(model).block_list(model))
    if recipe.tta.blocks > n:
        raise ConfigError(f"--tta-blocks {recipe.tta.blocks} exceeds the model's {n} blocks")
    need = recipe.tta.windows * recipe.tta.seqlen
    for name, tokens in eval_sets.items():
        free = tokens.shape[1] - scored_tokens(tokens, seqlen, windows)
        if free < need:
            raise ConfigError(f"TTA on {name} adapts on {need} tokens that are not scored, but only {free} of its "
                              f"{tokens.shape[1]} are left after the scored windows: lower --eval-windows or "
                              "--tta-windows/--tta-seqlen")


# ---- the vision job -------------------------------------------------------------------------------------
VISION_EVALS = ("top1", "retrieval")


def run_vision(
    model_name: str,
    recipe: Recipe,
    output_dir: str | Path,
    *,
    evals: list[str],
    eval_images: str | None = None,
    eval_limit: int | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    save_model: bool = True,
    progress: bool = True,
) -> Any:
    """The vision job: calibrate on an image folder (``recipe.calib.dataset``), measure ``top1``
    (classifiers, ImageNet-layout labelled folder) and/or ``retrieval`` (two-crop retrieval top-1 with
    the backbone's ``pooler_output``) before and after quantization, plus the mean cosine between FP and
    quantized features; writes the same run folder as :func:`lrquant.api.run` (resumable; no TTA, no
    compressed-tensors export: those take causal LMs). Returns a :class:`lrquant.api.RunResult`.

    ``image_size``: side of the square model input; default: the mapping's ``eval_image_size`` (DINOv2
    is pretrained at 518 but interpolates its position embeddings and is evaluated at 224), else the
    config's ``image_size``, else 224.

    timm models (``timm:...`` names, see :func:`lrquant.models.load_timm`): normalisation and crop from
    their ``pretrained_cfg``; the quantized model is saved in timm's own layout (q/k/v re-fused into
    ``qkv``, :func:`lrquant.arch.timm_checkpoint.save_timm`), loadable again as ``timm:<run>/model``."""
    from .api import RunResult
    from .arch.base import get_mapping
    from .data.images import calibration_images, load_image_folder, model_preprocessing, preprocess, two_crop_pairs
    from .eval.vision import embed, fp_outputs_cached, input_name, logits, retrieval_top1_from_embeddings

    unknown = set(evals) - set(VISION_EVALS)
    if unknown:
        raise ConfigError(f"unknown vision evaluation {sorted(unknown)}; known: {', '.join(VISION_EVALS)}")
    if recipe.tta is not None:
        raise ConfigError("test-time adaptation runs on text evaluation streams; vision jobs take no --tta")
    folder, model_id = prepare_job(model_name, recipe, output_dir, device=device, resume=resume,
                                   overwrite=overwrite)
    model, processor, display = load_checked(model_name, kind="vision")
    if input_name(model) == "input_ids":
        raise ConfigError(f"{display} is a text model: image calibration and vision evaluations need a vision "
                          "model (text models calibrate on a corpus name or a .txt/.jsonl file)")
    mapping = get_mapping(model)
    size = image_size or mapping.eval_image_size
    size = size or getattr(getattr(model, "config", None), "image_size", 224)
    size = size if isinstance(size, int) else 224
    c = recipe.calib
    prep = model_preprocessing(model, processor)  # timm pretrained_cfg, else the image processor, else ImageNet
    calib = calibration_images(c.dataset, c.nsamples, c.seed, size=size, **prep, input_name=input_name(model))
    items = load_image_folder(eval_images or c.dataset, limit=eval_limit)
    paths = [p for p, _ in items]
    labels = [label for _, label in items]
    if "top1" in evals and any(label is None for label in labels):
        raise DataError("top1 needs a label for every image (the folder has unlabelled images)")
    pairs = two_crop_pairs(paths, size=size, mean=prep["mean"], std=prep["std"]) if "retrieval" in evals else None
    pixels = preprocess(paths, size=size, **prep) if "top1" in evals else None
    results = {**results_header("vision", display, model_id, recipe), "eval": {"images": len(items), "size": size}}
    with folder.open():

        def outputs(m: nn.Module) -> dict[str, torch.Tensor]:
            """What the metrics need from one model: crop embeddings ``[N, H]`` and/or logits ``[N, C]``."""
            out: dict[str, torch.Tensor] = {}
            if pairs is not None:
                out["first"] = embed(m, pairs[0], device=device, progress=progress)
                out["second"] = embed(m, pairs[1], device=device, progress=progress)
            if pixels is not None:
                with torch.no_grad():
                    out["logits"] = torch.cat([logits(m, x.to(device)).float().cpu() for x in pixels.split(32)])
            return out

        def measure(o: dict[str, torch.Tensor], prefix: str) -> None:
            if "first" in o:
                results[f"{prefix}retrieval_top1"] = retrieval_top1_from_embeddings(o["first"], o["second"])
            if "logits" in o:
                results[f"{prefix}top1"] = float((o["logits"].argmax(-1) == torch.as_tensor(labels)).float().mean())

        inputs = [*(pairs or ()), *((pixels,) if pixels is not None else ())]
        fp_out = fp_outputs_cached(model_id, model, inputs, outputs)  # before quantize changes the model
        measure(fp_out, "fp_")
        qr = quantize_into(folder, model, recipe, calib, results, model_id, device, progress)
        q_out = outputs(model)
        measure(q_out, "")
        # backbones: cosine of the first-crop embeddings; classifiers: cosine of the logits
        key = "first" if pairs is not None else "logits"
        results["feature_cosine"] = float(torch.nn.functional.cosine_similarity(fp_out[key], q_out[key], dim=-1).mean())
        finish_job(folder, model, processor, results, recipe, save_model=save_model, export_format=None,
                   online_ops=qr.online_ops, layout=mapping.checkpoint_layout)
        return RunResult(results, model, processor)

