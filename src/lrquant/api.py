"""Python API.

* :func:`quantize` — quantize a model already in memory with a :class:`~lrquant.config.Recipe`.
* :func:`run` — the whole text job behind ``lrquant quantize``: load, FP baseline, quantize, evaluate,
  the recipe's post-steps, and a run folder (:class:`lrquant.runs.RunFolder`: fake-quant checkpoint,
  qparams, recipe as run, log and ``results.json``, all written atomically).
* :func:`load_model` — the default model, a local folder, a ``.gguf`` file or a hub id.

The vision job is :func:`lrquant.runs.run_vision`; qparam persistence and run-folder export live in
:mod:`lrquant.export`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Recipe
from .engine import BlockReport, BlockSource, EngineResult, quantize_blocks
from .errors import ConfigError, LrquantError
from .methods import get_method
from .models import load_model
from .streams import StreamStore

log = logging.getLogger("lrquant")

__all__ = ["QuantizeResult", "RunResult", "calibration_data", "load_model", "quantize", "run", "validate_scheme"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: the (same, now quantized) model and per-block reports."""

    model: nn.Module
    reports: list[BlockReport]
    calib_time_s: float
    online_ops: list[str]
    method: Any = None


def calibration_data(recipe: Recipe, tokenizer: Any, data_dir: str | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids for ``recipe.calib``."""
    from .data.text import calibration_batches

    c = recipe.calib
    return calibration_batches(tokenizer, c.dataset, c.nsamples, c.seqlen, seed=c.seed, data_dir=data_dir)


def validate_scheme(model: nn.Module, recipe: Recipe) -> None:
    """Fail before any work when the scheme cannot apply to this model (e.g. a group size that does not
    divide a linear's input dimension)."""
    from .arch.base import get_mapping

    mapping = get_mapping(model)
    w = recipe.scheme.weights
    if w is None or w.strategy != "group":
        return
    for _, block in mapping.block_list(model):  # widths may differ per block (stages)
        for path in mapping.linears():
            dim = block.get_submodule(path).in_features
            if dim % w.group_size:
                raise ConfigError(f"group_size {w.group_size} does not divide the input dimension {dim} of {path}")


def rotate(model: nn.Module, recipe: Recipe, calib: Any = None) -> list[str]:
    """The rotation pre-step (``recipe.rotation``), exact in full precision, before any block is quantized
    (``learned``: trained on ``calib`` first). Returns the online ops it added. Deterministic, so a resumed
    run rotates the same way before its blocks are restored."""
    step = recipe.rotation
    if step is None:
        return []
    from .arch.base import get_mapping
    from .transforms.rotation import rotate_model

    mapping = get_mapping(model)
    residual = None
    if step.kind == "learned":
        from .transforms.learned_rotation import learn_rotation

        def residual(m: nn.Module) -> torch.Tensor:
            return learn_rotation(m, mapping, calib, recipe.scheme, seed=step.seed, steps=step.steps, lr=step.lr)

    return rotate_model(model, mapping, seed=step.seed, online_value=step.online_value, residual=residual)


def quantize(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor | list[dict[str, torch.Tensor]] | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    data_dir: str | None = None,
    model_name: str = "",
    store: StreamStore | None = None,
    source: BlockSource | None = None,
) -> QuantizeResult:
    """Quantize ``model`` in place.

    ``calib``: ``[N, L]`` token ids, a list of model-input dicts, or ``None`` to draw ``recipe.calib``
    from its corpus with ``tokenizer``. ``model_name``: what identifies the model (and data) in the
    checkpoint fingerprint; the run layer passes content digests. ``store``: where the calibration
    streams live (:class:`lrquant.streams.StreamStore`: dtype, RAM budget, memory-mapped files; default
    fp32 in RAM). ``source``: for a model loaded as a skeleton, what materialises each block
    (:class:`lrquant.streaming.SafetensorsSource`). Under an initialised ``torch.distributed`` process
    group the blocks train data-parallel (:mod:`lrquant.distributed`).
    """
    method = get_method(recipe.method)(recipe)
    validate_scheme(model, recipe)
    if calib is None:
        if tokenizer is None:
            raise LrquantError("quantize() needs calibration data or a tokenizer to draw it")
        calib = calibration_data(recipe, tokenizer, data_dir)
    rotation_ops = rotate(model, recipe, calib)
    result: EngineResult = quantize_blocks(
        model, method, recipe, calib, device=device,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, resume=resume,
        model_name=model_name, progress=progress, store=store, source=source,
    )
    online = rotation_ops + list(getattr(method, "online_ops", []))
    return QuantizeResult(model, result.reports, result.seconds, online, method)


@dataclass
class RunResult:
    """What :func:`run` returns: the results dict written to ``results.json`` and the quantized model."""

    results: dict[str, Any]
    model: nn.Module
    tokenizer: Any


def run(
    model_name: str,
    recipe: Recipe,
    output_dir: str | Path,
    *,
    eval_datasets: list[str] | None = None,
    eval_seqlen: int = 2048,
    eval_windows: int | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    save_model: bool = True,
    progress: bool = True,
    tasks: list[str] | None = None,
    limit: int | None = None,
    export_format: str | None = None,
    stream_dtype: str = "float32",
    stream_budget_gb: float | None = None,
    stream_blocks: bool = False,
) -> RunResult:
    """Run one quantization job end to end in the run folder ``output_dir`` (see :mod:`lrquant.runs` for
    its rules); writes ``results.json`` (also returned) and the model. Every check that needs no model runs
    before anything is loaded; the TTA post-step (``recipe.tta``) adapts on each evaluation corpus.

    ``stream_dtype`` / ``stream_budget_gb``: the calibration streams' dtype and how many GB of them stay in
    RAM (the rest are memory-mapped files in the run folder). ``stream_blocks``: load the model as a
    skeleton and read each block from its safetensors shards only when it is quantized, writing ``model/``
    shard by shard, and ``compressed/`` the same way for ``export_format="compressed-tensors"`` (models
    larger than RAM; no evaluation, GGUF export or rotation in this mode). Under an
    initialised process group (torchrun) the blocks train data-parallel; rank 0 alone evaluates and writes,
    the other ranks return after the block loop."""
    from . import distributed as ddp
    from . import runs
    from .eval.perplexity import evaluate_ppl, fp_ppl_cached, load_eval_sets

    eval_datasets = eval_datasets or []
    check_large_model_options(recipe, eval_datasets, tasks, export_format, save_model, stream_dtype,
                              stream_budget_gb, stream_blocks)
    if recipe.tta is not None and not eval_datasets:
        raise ConfigError("test-time adaptation adapts on the evaluation streams: --tta needs --eval corpora")
    if tasks:
        from .eval.zeroshot import resolve_tasks, run_zeroshot

        resolve_tasks(tasks)
    folder, model_id = runs.prepare_job(model_name, recipe, output_dir, device=device, resume=resume,
                                        overwrite=overwrite, export_format=export_format)
    if stream_blocks:
        from .streaming import load_streamed

        with runs.model_errors(model_name):
            model, tokenizer, display, weights = load_streamed(model_name)
    else:
        model, tokenizer, display = runs.load_checked(model_name)
    validate_scheme(model, recipe)
    with runs.data_errors():
        calib = calibration_data(recipe, tokenizer, data_dir)
        eval_sets = load_eval_sets(tokenizer, eval_datasets, data_dir)
    runs.check_tta(model, recipe, eval_sets, eval_seqlen, eval_windows)
    main = ddp.is_main()
    with folder.open() if main else contextlib.nullcontext(), contextlib.ExitStack() as stack:
        results = {**runs.results_header("text", display, model_id, recipe),
                   "eval": {"seqlen": eval_seqlen, "windows": eval_windows}}
        if eval_sets and main:
            fp = fp_ppl_cached(model_id, model, eval_sets, eval_seqlen, eval_windows, device, progress)
            results["fp_ppl"] = {k: v["ppl"] for k, v in fp.items()}
            log.info("FP perplexity %s", results["fp_ppl"])
        if tasks and main:
            results["fp_zeroshot"] = run_zeroshot(model, tokenizer, tasks, limit=limit)
        source = writer = export = None
        if stream_blocks:
            from .streaming import SafetensorsSource, ShardWriter

            source = SafetensorsSource(weights)
            if main:
                spool = folder.path / ".qparams.safetensors.spool"  # a temp name: a killed run's is cleaned up
                writer = source.writer = ShardWriter.for_model(stack.enter_context(folder.streamed()),
                                                               model, source, spool)
                if export_format == "compressed-tensors":
                    from .export.compressed import CompressedBlocks

                    export = CompressedBlocks(recipe.scheme, runs.EXPORT_DTYPE)
                    compressed = writer.export_to(stack.enter_context(folder.streamed(runs.COMPRESSED)), export,
                                                  runs.EXPORT_DTYPE)
        qr = runs.quantize_into(folder, model, recipe, calib, results, model_id, device, progress,
                                stream_dtype=stream_dtype, stream_budget_gb=stream_budget_gb, source=source)
        if not main:
            return RunResult(results, model, tokenizer)
        streamed_export = None
        if writer is not None:
            writer.finish(model, source, tokenizer)
            if export is not None:
                export.finish(compressed.folder, model)
            stack.close()  # model/ (and compressed/) in place
            if export is not None:
                streamed_export = runs.export_entry(export_format, folder.path / runs.COMPRESSED)
        if eval_sets:
            q = evaluate_ppl(model, eval_sets, eval_seqlen, eval_windows, device, progress)
            results["ppl"] = {k: v["ppl"] for k, v in q.items()}
            results["eval"]["detail"] = q
            log.info("quantized perplexity %s", results["ppl"])
        if tasks:
            results["zeroshot"] = run_zeroshot(model, tokenizer, tasks, limit=limit)
            results["zeroshot_limit"] = limit
        if recipe.tta is not None:
            results["ppl_tta"], results["tta"] = runs.run_tta(model, model_name, qr.method, eval_sets, recipe.tta,
                                                              eval_seqlen, eval_windows, device, progress)
        runs.finish_job(folder, model, tokenizer, results, recipe, save_model=save_model,
                        export_format=export_format, online_ops=qr.online_ops,
                        streamed_qparams=writer.qparams.write if writer is not None else None,
                        streamed_export=streamed_export)
        return RunResult(results, model, tokenizer)


def check_large_model_options(recipe: Recipe, eval_datasets: list[str], tasks: list[str] | None,
                              export_format: str | None, save_model: bool, stream_dtype: str,
                              stream_budget_gb: float | None, stream_blocks: bool) -> None:
    """Refuse, before any work, stream and data-parallel settings that cannot work together."""
    import math

    from . import distributed as ddp
    from .streams import STREAM_DTYPES

    if stream_dtype not in STREAM_DTYPES:
        raise ConfigError(f"unknown stream dtype {stream_dtype!r}; use {', '.join(STREAM_DTYPES)}")
    if stream_budget_gb is not None and not (math.isfinite(stream_budget_gb) and stream_budget_gb >= 0):
        raise ConfigError(f"--stream-budget-gb must be a number >= 0, got {stream_budget_gb}")
    if (ddp.active() or ddp.launched()) and recipe.tta is not None:
        raise ConfigError("test-time adaptation runs in one process: drop --tta or run without torchrun")
    if not stream_blocks:
        return
    refused = [name for name, given in (("--eval", eval_datasets), ("--tasks", tasks),
                                        (f"--format {export_format}", export_format == "gguf"),
                                        ("--no-save", not save_model), ("--rotate", recipe.rotation is not None),
                                        ("--tta", recipe.tta is not None)) if given]
    if refused:
        raise ConfigError(f"--stream-blocks quantizes and writes the model block by block; it cannot combine "
                          f"with {', '.join(refused)}")
