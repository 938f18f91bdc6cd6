"""Python API.

* :func:`quantize` — quantize a model already in memory with a :class:`~lrquant.config.Recipe`.
* :func:`run` — the whole job behind ``lrquant quantize``: load, FP baseline, quantize, evaluate, save a
  fake-quant checkpoint, the recipe as run, a log and ``results.json`` (all written atomically).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Recipe
from .engine import BlockReport, EngineResult, layer_errors, quantize_blocks
from .errors import DataError, LrquantError
from .io import atomic_dir, atomic_save_tensors, atomic_write_json
from .methods import get_method
from .models import cache_dir, load_model
from .tta import TTAConfig

log = logging.getLogger("lrquant")


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
    from .errors import ConfigError

    mapping = get_mapping(model)
    w = recipe.scheme.weights
    if w is None or w.strategy != "group":
        return
    for _, block in mapping.block_list(model):  # widths may differ per block (stages)
        for path in mapping.linears():
            dim = block.get_submodule(path).in_features
            if dim % w.group_size:
                raise ConfigError(
                    f"group_size {w.group_size} does not divide the input dimension {dim} of {path}")


ROTATIONS = ("hadamard",)


def rotate(model: nn.Module, recipe: Recipe) -> list[str]:
    """The rotation pre-step (``options.rotate``: ``hadamard``; ``rotate_seed``, ``rotate_value``), exact in
    full precision, before any block is quantized. Returns the online ops it added. Deterministic, so a
    resumed run rotates the same way before its blocks are restored."""
    kind = recipe.options.get("rotate")
    if kind in (None, "none"):
        return []
    if kind not in ROTATIONS:
        from .errors import ConfigError

        raise ConfigError(f"unknown rotation {kind!r}; known: {', '.join(ROTATIONS)}")
    from .arch.base import get_mapping
    from .transforms.rotation import rotate_model

    return rotate_model(model, get_mapping(model), seed=int(recipe.options.get("rotate_seed", 0)),
                        online_value=bool(recipe.options.get("rotate_value", False)))


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
) -> QuantizeResult:
    """Quantize ``model`` in place.

    ``calib``: ``[N, L]`` token ids, a list of model-input dicts, or ``None`` to draw ``recipe.calib``
    from its corpus with ``tokenizer``.
    """
    method = get_method(recipe.method)(recipe)
    validate_scheme(model, recipe)
    if calib is None:
        if tokenizer is None:
            raise LrquantError("quantize() needs calibration data or a tokenizer to draw it")
        calib = calibration_data(recipe, tokenizer, data_dir)
    rotation_ops = rotate(model, recipe)
    result: EngineResult = quantize_blocks(
        model, method, recipe, calib, device=device,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, resume=resume,
        model_name=model_name, progress=progress,
    )
    online = rotation_ops + list(getattr(method, "online_ops", []))
    return QuantizeResult(model, result.reports, result.seconds, online, method)


# ---- the full job -------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What :func:`run` returns: the results dict written to ``results.json`` and the quantized model."""

    results: dict[str, Any]
    model: nn.Module
    tokenizer: Any


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def evaluate_ppl(
    model: nn.Module, tokenizer: Any, datasets: list[str], seqlen: int, windows: int | None,
    data_dir: str | None, device: str | torch.device, progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{dataset: {"ppl", "windows", "total_windows", "seconds"}}``."""
    from .data.text import eval_tokens
    from .eval.perplexity import perplexity

    out = {}
    for name in datasets:
        tokens = eval_tokens(tokenizer, name, data_dir=data_dir)
        r = perplexity(model, tokens, seqlen=seqlen, max_windows=windows, device=device, progress=progress)
        out[name] = {"ppl": r.ppl, "windows": r.windows, "total_windows": r.total_windows,
                     "seconds": round(r.seconds, 2)}
    return out


def _fp_ppl_cached(model_key: str, model: nn.Module, tokenizer: Any, datasets: list[str], seqlen: int,
                   windows: int | None, data_dir: str | None, device: Any, progress: bool) -> dict[str, Any]:
    """FP perplexity, cached per (model, dataset, data source, seqlen, windows) in the user cache."""
    out: dict[str, Any] = {}
    for name in datasets:
        key = json.dumps([model_key, name, str(data_dir or os.environ.get("LRQUANT_DATA_DIR", "")),
                          seqlen, windows], sort_keys=True)
        path = cache_dir() / "fp_ppl" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
        if path.is_file():
            out[name] = json.loads(path.read_text())
            continue
        out[name] = evaluate_ppl(model, tokenizer, [name], seqlen, windows, data_dir, device, progress)[name]
        atomic_write_json(path, out[name])
    return out


def _fp_vision_cached(model_key: str, model: nn.Module, pairs: tuple[torch.Tensor, torch.Tensor] | None,
                      pixels: torch.Tensor | None, outputs: Any) -> dict[str, torch.Tensor]:
    """``outputs(model)`` of the FP model, cached in the user cache per (model name, weights, exact input
    pixels): every method x scheme run on the same images then pays for the FP pass once."""
    h = hashlib.sha256(model_key.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for t in (*(pairs or ()), *((pixels,) if pixels is not None else ())):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    path = cache_dir() / "fp_vision" / (h.hexdigest()[:16] + ".safetensors")
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    out = outputs(model)
    atomic_save_tensors(path, out)
    return out


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen quantization parameters (``<linear>.weight_scale / .weight_zero_point`` ``[rows, 1]``,
    static ``<linear>.input_scale / .input_zero_point``) that export needs beside the fake-quant weights."""
    from .quant.quantizers import quant_linears

    out = {}
    for name, m in quant_linears(model).items():
        for kind, q in (("weight", m.weight_quantizer), ("input", m.input_quantizer)):
            if q is not None and q.scale is not None:
                out[f"{name}.{kind}_scale"] = q.scale
                out[f"{name}.{kind}_zero_point"] = q.zero_point
    return out


def restore_quant_state(model: nn.Module, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> None:
    r"""Wrap ``model``'s mapped linears in frozen :class:`QuantLinear`\ s from :func:`quant_state` output
    (a run folder's fake-quant ``model/`` plus its ``qparams.safetensors``)."""
    from .arch.base import get_mapping, set_submodule
    from .quant.quantizers import QuantLinear

    mapping = get_mapping(model)
    for block_name, block in mapping.block_list(model):
        for path in mapping.linears():
            name = f"{block_name}.{path}"
            ql = QuantLinear(block.get_submodule(path), recipe.scheme.weights, recipe.scheme.input_activations)
            for kind, q in (("weight", ql.weight_quantizer), ("input", ql.input_quantizer)):
                if q is not None and f"{name}.{kind}_scale" in tensors:
                    q.scale = tensors[f"{name}.{kind}_scale"]
                    q.zero_point = tensors[f"{name}.{kind}_zero_point"]
            set_submodule(block, path, ql)


def export_run(run_dir: str | Path, output: str | Path | None = None, dtype: torch.dtype | None = None,
               export_format: str = "compressed-tensors") -> Path:
    """Export a finished run folder (``model/`` + ``qparams.safetensors``) as compressed-tensors (default
    ``<run_dir>/compressed``) or GGUF (``export_format="gguf"``, default ``<run_dir>/model.gguf``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import export_compressed

    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    for needed in (results_path, run_dir / "model" / "config.json", run_dir / "qparams.safetensors"):
        if not needed.is_file():
            raise LrquantError(f"{run_dir} is not a finished run folder with a saved model: missing {needed.name}")
    results = json.loads(results_path.read_text())
    recipe = Recipe.from_dict(results["recipe"])
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    restore_quant_state(model, recipe, load_file(str(run_dir / "qparams.safetensors")))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    if export_format == "gguf":
        from .export.gguf import export_gguf

        return export_gguf(model, recipe.scheme, output or run_dir / "model.gguf", tokenizer, dtype=dtype,
                           online_ops=results.get("online_ops", []))
    return export_compressed(model, recipe.scheme, output or run_dir / "compressed", tokenizer, dtype=dtype,
                             online_ops=results.get("online_ops", []))


def _run_tta(q_model: nn.Module, model_name: str, method: Any, tokenizer: Any, datasets: list[str],
             cfg: TTAConfig, seqlen: int, windows: int | None, data_dir: str | None, device: Any,
             progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Per dataset: adapt the last blocks on its (unlabeled) evaluation stream, measure PPL, restore."""
    from .arch.base import get_mapping, set_submodule
    from .data.text import eval_tokens
    from .tta import adapt

    fp_model, _, _ = load_model(model_name)
    ppl, info = {}, {}
    for name in datasets:
        slots = get_mapping(q_model).block_list(q_model)
        saved = {slots[i][0]: copy.deepcopy(slots[i][1]) for i in range(len(slots) - cfg.blocks, len(slots))}
        report = adapt(q_model, fp_model, method, eval_tokens(tokenizer, name, data_dir=data_dir), cfg, device)
        ppl[name] = evaluate_ppl(q_model, tokenizer, [name], seqlen, windows, data_dir, device, progress)[name]["ppl"]
        info[name] = {**asdict(report), "config": asdict(cfg)}
        log.info("TTA on %s: %.1fs, perplexity %.4f", name, report.seconds, ppl[name])
        for block_name, block in saved.items():
            set_submodule(q_model, block_name, block)
    return ppl, info


def _save_model(model: nn.Module, tokenizer: Any, target: Path) -> None:
    """Save a fake-quant checkpoint plain transformers loads, atomically (temp folder, then rename)."""
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
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)


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
    tta: TTAConfig | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    export_format: str | None = None,
) -> RunResult:
    """Run one quantization job end to end; writes ``results.json`` (also returned) and the model."""
    out = Path(output_dir)
    get_method(recipe.method)  # unknown method: fail before touching the output folder
    if export_format == "gguf":  # a grid GGUF cannot hold: refuse before calibrating
        from .export.gguf import gguf_quant_type

        gguf_quant_type(recipe.scheme)
    if (out / "results.json").exists() and not (overwrite or resume):
        raise LrquantError(f"{out} already holds a finished run; pass --overwrite or choose another --output")
    if (out / "checkpoint").exists() and not resume and not overwrite:
        raise LrquantError(f"{out} holds an interrupted run; pass --resume to continue it or --overwrite")
    if overwrite and not resume:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    old_level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        recipe.save(out / "recipe.yaml")
        model, tokenizer, display = load_model(model_name)
        log.info("model %s, method %s, scheme %s", display, recipe.method, recipe.scheme.name())
        eval_datasets = eval_datasets or []
        results: dict[str, Any] = {
            "model": display, "method": recipe.method, "scheme": asdict(recipe.scheme),
            "scheme_name": recipe.scheme.name(), "recipe": recipe.to_dict(),
            "eval": {"seqlen": eval_seqlen, "windows": eval_windows},
        }
        if eval_datasets:
            fp = _fp_ppl_cached(display, model, tokenizer, eval_datasets, eval_seqlen, eval_windows, data_dir,
                                device, progress)
            results["fp_ppl"] = {k: v["ppl"] for k, v in fp.items()}
            for k, v in fp.items():
                log.info("FP %s perplexity %.4f (%d of %d windows)", k, v["ppl"], v["windows"], v["total_windows"])
        if tasks:
            from .eval.zeroshot import run_zeroshot

            results["fp_zeroshot"] = run_zeroshot(model, tokenizer, tasks, limit=limit)
        if tta is not None:
            recipe.options["tta_blocks"] = tta.blocks
        t0 = time.time()
        qr = quantize(model, recipe, tokenizer=tokenizer, device=device, checkpoint_dir=out / "checkpoint",
                      resume=resume, progress=progress, data_dir=data_dir, model_name=display)
        results["calib_time_s"] = round(time.time() - t0, 2)
        results["blocks"] = [asdict(r) for r in qr.reports]
        results["layer_errors"] = layer_errors(model)
        results["online_ops"] = qr.online_ops
        if recipe.options.get("rotate") not in (None, "none"):
            from .transforms.rotation import online_specs

            results["rotation"] = {"method": recipe.options["rotate"], "seed": recipe.options.get("rotate_seed", 0),
                                   "online_value": bool(recipe.options.get("rotate_value", False)),
                                   "online": online_specs(model)}
        if eval_datasets:
            q = evaluate_ppl(model, tokenizer, eval_datasets, eval_seqlen, eval_windows, data_dir, device, progress)
            results["ppl"] = {k: v["ppl"] for k, v in q.items()}
            results["eval"]["detail"] = q
            for k, v in q.items():
                log.info("quantized %s perplexity %.4f (FP %.4f)", k, v["ppl"], results["fp_ppl"][k])
        if tasks:
            results["zeroshot"] = run_zeroshot(model, tokenizer, tasks, limit=limit)
            results["zeroshot_limit"] = limit
        if tta is not None and eval_datasets:
            results["ppl_tta"], results["tta"] = _run_tta(model, model_name, qr.method, tokenizer, eval_datasets,
                                                         tta, eval_seqlen, eval_windows, data_dir, device, progress)
        results["peak_rss_gb"] = round(peak_rss_gb(), 3)
        if torch.cuda.is_available():
            results["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        if save_model:
            _save_model(model, tokenizer, out / "model")
            atomic_save_tensors(out / "qparams.safetensors", quant_state(model))
        if export_format == "compressed-tensors":
            from .export import export_compressed
            from .export.compressed import dir_size_bytes

            path = export_compressed(model, recipe.scheme, out / "compressed", tokenizer, dtype=torch.float16,
                                     online_ops=qr.online_ops)
            results["export"] = {"format": export_format, "path": str(path),
                                 "size_mb": round(dir_size_bytes(path) / 2**20, 1)}
        elif export_format == "gguf":
            from .export.gguf import export_gguf

            path = export_gguf(model, recipe.scheme, out / "model.gguf", tokenizer, dtype=torch.float16,
                               online_ops=qr.online_ops)
            results["export"] = {"format": export_format, "path": str(path),
                                 "size_mb": round(path.stat().st_size / 2**20, 1)}
        elif export_format not in (None, "fake"):
            raise LrquantError(f"unknown --format {export_format!r}; use fake, compressed-tensors or gguf")
        atomic_write_json(out / "results.json", results)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        return RunResult(results, model, tokenizer)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()


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
    overwrite: bool = False,
    save_model: bool = True,
    progress: bool = True,
) -> RunResult:
    """The vision job: calibrate on an image folder (``recipe.calib.dataset``), measure ``top1``
    (classifiers, ImageNet-layout labelled folder) and/or ``retrieval`` (two-crop retrieval top-1 with
    the backbone's ``pooler_output``) before and after quantization, plus the mean cosine between FP and
    quantized features; writes the same run folder as :func:`run`.

    ``image_size``: side of the square model input; default: the mapping's ``eval_image_size`` (DINOv2
    is pretrained at 518 but interpolates its position embeddings and is evaluated at 224), else the
    config's ``image_size``, else 224.

    timm models (``timm:...`` names, see :func:`lrquant.models.load_timm`): normalisation and crop from
    their ``pretrained_cfg``; the quantized model is saved in timm's own layout (q/k/v re-fused into
    ``qkv``, :func:`lrquant.arch.timm_checkpoint.save_timm`), loadable again as ``timm:<run>/model``."""
    from .arch.base import get_mapping
    from .data.images import calibration_images, load_image_folder, model_preprocessing, preprocess, two_crop_pairs
    from .eval.vision import embed, input_name, logits, retrieval_top1_from_embeddings

    out = Path(output_dir)
    if (out / "results.json").exists() and not overwrite:
        raise LrquantError(f"{out} already holds a finished run; pass --overwrite or choose another --output")
    unknown = set(evals) - set(VISION_EVALS)
    if unknown:
        raise LrquantError(f"unknown vision evaluation {sorted(unknown)}; known: {', '.join(VISION_EVALS)}")
    get_method(recipe.method)
    out.mkdir(parents=True, exist_ok=True)
    recipe.save(out / "recipe.yaml")
    model, processor, display = load_model(model_name, kind="vision")
    size = image_size or get_mapping(model).eval_image_size
    size = size or getattr(getattr(model, "config", None), "image_size", 224)
    size = size if isinstance(size, int) else 224
    c = recipe.calib
    prep = model_preprocessing(model, processor)  # timm pretrained_cfg, else the image processor, else ImageNet
    calib = calibration_images(c.dataset, c.nsamples, c.seed, size=size, **prep, input_name=input_name(model))
    items = load_image_folder(eval_images or c.dataset, limit=eval_limit)
    paths = [p for p, _ in items]
    results: dict[str, Any] = {"model": display, "method": recipe.method, "scheme": asdict(recipe.scheme),
                               "scheme_name": recipe.scheme.name(), "recipe": recipe.to_dict(),
                               "eval": {"images": len(items), "size": size}}
    pairs = two_crop_pairs(paths, size=size, mean=prep["mean"], std=prep["std"]) if "retrieval" in evals else None
    pixels = preprocess(paths, size=size, **prep) if "top1" in evals else None
    labels = [label for _, label in items]
    if pixels is not None and any(label is None for label in labels):
        raise DataError("top1 needs a label for every image (the folder has unlabelled images)")

    def outputs(m: nn.Module) -> dict[str, torch.Tensor]:
        """Everything the metrics need from one model: crop embeddings ``[N, H]`` and/or logits ``[N, C]``."""
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

    fp_out = _fp_vision_cached(display, model, pairs, pixels, outputs)  # before quantize changes model
    measure(fp_out, "fp_")
    t0 = time.time()
    qr = quantize(model, recipe, calib, device=device, checkpoint_dir=out / "checkpoint", progress=progress,
                  model_name=display)
    results["calib_time_s"] = round(time.time() - t0, 2)
    results["blocks"] = [asdict(r) for r in qr.reports]
    results["layer_errors"] = layer_errors(model)
    results["online_ops"] = qr.online_ops
    q_out = outputs(model)
    measure(q_out, "")
    # backbones: cosine of the first-crop embeddings; classifiers: cosine of the logits
    key = "first" if pairs is not None else "logits"
    results["feature_cosine"] = float(torch.nn.functional.cosine_similarity(fp_out[key], q_out[key], dim=-1).mean())
    results["peak_rss_gb"] = round(peak_rss_gb(), 3)
    if save_model:  # a family may declare its own checkpoint layout (timm: config.json + model.safetensors)
        layout = get_mapping(model).checkpoint_layout
        if layout is not None:
            layout.save_model(model, out / "model")
        else:
            _save_model(model, processor, out / "model")
        qparams = quant_state(model)
        atomic_save_tensors(out / "qparams.safetensors", layout.rename_qparams(qparams) if layout else qparams)
    atomic_write_json(out / "results.json", results)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return RunResult(results, model, processor)
