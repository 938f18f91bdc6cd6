"""The multimodal job: quantize an image-text model (LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM,
Gemma3) part by part, in the order the model runs them.

What gets quantized is the recipe's ``parts`` section (:class:`lrquant.config.PartsArgs`): the language
model always (the recipe's ``scheme``); the vision tower with a scheme of its own when ``parts.vision`` is
set; the projector's linears (round-to-nearest, weights only) when ``parts.projector``. The order:

1. the vision tower's blocks, by the same engine, on the tower's own inputs: every image-text calibration
   sample is run through the full model up to the tower and the tower's call is recorded (pixels, patch
   masks), so the tower calibrates on exactly what it receives (checkpointed under ``checkpoint/vision``);
2. the projector (no data needed);
3. the language model's blocks, on streams captured at its first block from the full model: with
   image-text calibration they hold the image tokens that the (already quantized, when chosen) tower and
   projector produce, so the language model calibrates on what it will see at inference.

Calibration is text (a corpus name or a ``.txt``/``.jsonl`` text file, as for LLMs) or image-text pairs
(:mod:`lrquant.data.multimodal`: a JSONL of ``{image, text}`` or a captioned image folder). Evaluation:
text perplexity of the language model, the caption perplexity given the image on held-out pairs, and the
FP-vs-quantized cosine of the image features the language model receives (the projector's output).
Export: compressed-tensors, the parts kept in 16 bits in ``ignore`` as ``re:.*<module>.*`` entries.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch.base import ArchMapping, MultimodalParts, get_mapping, set_submodule
from .config import Recipe
from .errors import ConfigError, DataError, UnsupportedArchitectureError

log = logging.getLogger("lrquant")

DEFAULT_EVAL_PAIRS = 16


def is_multimodal(model_name: str) -> bool:
    """Whether ``model_name`` is a local transformers folder of an image-text model (its ``config.json``
    has a ``vision_config``)."""
    config = Path(model_name) / "config.json"
    if not config.is_file():
        return False
    try:
        return "vision_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_multimodal(model_name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, Any, str]:
    """``(model, processor or None, tokenizer, display name)`` of a local image-text model folder, in eval
    mode on CPU (``AutoModelForImageTextToText``). The processor is None when it cannot be built here (e.g.
    Qwen2-VL's needs torchvision for its video part): text calibration still works, image-text does not."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from .models import resolve_model_path

    path, display = resolve_model_path(model_name)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError, AttributeError, TypeError) as exc:
        log.warning("no processor for %s (%s): image-text calibration is not available",
                    display, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        processor = None
    tokenizer = getattr(processor, "tokenizer", None) or AutoTokenizer.from_pretrained(path)
    return model, processor, tokenizer, display


def mapping_parts(model: nn.Module) -> tuple[ArchMapping, MultimodalParts]:
    """The language-model mapping of an image-text model and its parts; refuses text-only models."""
    mapping = get_mapping(model)
    if mapping.parts is None:
        raise ConfigError(f"{type(model).__name__} is not an image-text model: recipe parts (vision tower, "
                          "projector) and image-text calibration need one")
    return mapping, mapping.parts


def check_parts(model: nn.Module, recipe: Recipe, has_images: bool) -> None:
    """Refuse, before any work, what this model and data cannot do with ``recipe.parts``."""
    _, parts = mapping_parts(model)
    if recipe.parts.vision is not None:
        tower = model.get_submodule(parts.vision_tower)
        try:
            get_mapping(tower)
        except UnsupportedArchitectureError:
            raise ConfigError(f"the vision tower {type(tower).__name__} has no mapping here: keep it in 16 bits "
                              "(drop parts.vision)") from None
        if not has_images:
            raise ConfigError("parts.vision quantizes the vision tower, which calibrates on images: give image-text "
                              "pairs to --calib (a JSONL of {image, text} or an image folder)")
    projector = model.get_submodule(parts.projector)
    if recipe.parts.projector and not any(isinstance(m, nn.Linear) for m in projector.modules()):
        raise ConfigError(f"the projector {parts.projector} holds no linear layer to quantize: drop parts.projector")
    if recipe.rotation is not None:
        raise ConfigError("--rotate rotates the language model's residual stream, which the image tokens enter "
                          "unrotated: not available for image-text models")


@torch.no_grad()
def module_inputs(model: nn.Module, path: str, items: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """How the module at ``path`` is called on each model input of ``items``: one full-model forward per item,
    stopped at the module, its arguments bound to their names (``None`` ones dropped), on CPU."""
    from .engine import to_device

    module = model.get_submodule(path)
    signature = inspect.signature(module.forward)
    calls: list[dict[str, Any]] = []

    class _Stop(Exception):
        pass

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, p in signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        calls.append(to_device({k: v for k, v in bound.items() if v is not None}, torch.device("cpu")))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for item in items:
            try:
                model(**item)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != len(items):
        raise DataError(f"{path} did not run on every calibration sample (no image in a sample?)")
    return calls


def quantize_projector(model: nn.Module, path: str, recipe: Recipe) -> list[str]:
    """Every linear of the projector at ``path`` becomes a frozen :class:`QuantLinear` (round-to-nearest
    min-max weights of the vision scheme when the tower is quantized, else of the language model's scheme;
    no activation quantization). Returns the linears' names."""
    from .quant.quantizers import QuantLinear

    scheme = recipe.parts.vision_scheme or recipe.scheme
    if scheme.weights is None:
        raise ConfigError(f"parts.projector: scheme {scheme.name()} quantizes no weights")
    projector = model.get_submodule(path)
    names = [n for n, m in projector.named_modules() if type(m) is nn.Linear]
    for name in names:
        ql = QuantLinear(projector.get_submodule(name), scheme.weights, None)
        ql.freeze()
        set_submodule(projector, name, ql)
    return [f"{path}.{n}" for n in names]


def quantize_parts(model: nn.Module, recipe: Recipe, calib: list[dict[str, torch.Tensor]] | None, *,
                   checkpoint_dir: Path | None, resume: bool, model_id: str, device: str,
                   progress: bool) -> dict[str, Any]:
    """Steps 1 and 2 of the module docstring, in place: the vision tower (when ``recipe.parts.vision``; its
    blocks checkpointed under ``checkpoint_dir/vision``) and the projector (``recipe.parts.projector``).
    ``calib``: the image-text model inputs. Returns the ``results.json`` entries (``vision``,
    ``projector``)."""
    from dataclasses import asdict

    from .api import quantize
    from .identity import tensor_digest

    _, parts = mapping_parts(model)
    out: dict[str, Any] = {}
    scheme = recipe.parts.vision_scheme
    if scheme is not None:
        if calib is None:
            raise ConfigError("parts.vision needs image-text calibration")
        tower = model.get_submodule(parts.vision_tower)
        tower_calib = module_inputs(model, parts.vision_tower, calib)
        vision_recipe = recipe.replace(scheme=scheme, pre=[], post=[], parts={})
        log.info("vision tower %s: %s on %d images", type(tower).__name__, scheme.name(), len(tower_calib))
        qr = quantize(tower, vision_recipe, tower_calib, device=device,
                      checkpoint_dir=checkpoint_dir / "vision" if checkpoint_dir else None, resume=resume,
                      progress=progress, model_name=f"{model_id}|vision|calib:{tensor_digest(tower_calib)}")
        out["vision"] = {"scheme": scheme.name(), "blocks": [asdict(r) for r in qr.reports],
                         "calib_time_s": round(qr.calib_time_s, 2)}
    if recipe.parts.projector:
        out["projector"] = {"linears": quantize_projector(model, parts.projector, recipe)}
    return out


def run_multimodal(
    model_name: str,
    recipe: Recipe,
    output_dir: str | Path,
    *,
    eval_datasets: list[str] | None = None,
    eval_pairs: str | None = None,
    eval_limit: int | None = None,
    eval_seqlen: int = 2048,
    eval_windows: int | None = None,
    image_size: int | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    save_model: bool = True,
    progress: bool = True,
    export_format: str | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    processor: Any = None,
) -> Any:
    """The multimodal job end to end in the run folder ``output_dir`` (the rules of :mod:`lrquant.runs`).

    ``recipe.calib.dataset``: text (corpus name or text file) or image-text pairs. ``eval_pairs``: where the
    held-out pairs for the caption perplexity and the image-feature agreement come from (default: the
    calibration pairs' source, disjoint from the ``nsamples`` drawn for calibration; none with text
    calibration and no ``eval_pairs``); ``eval_limit``: how many (default 16). ``image_size``: the square
    side images are resized to (default :func:`lrquant.data.multimodal.default_image_size`). ``tasks`` /
    ``limit``: lm-eval zero-shot tasks on text (:func:`lrquant.eval.zeroshot.run_zeroshot`; the image-text
    model takes text-only inputs), before and after quantization.
    ``processor``: use this processor instead of loading the folder's (tests). Returns a
    :class:`lrquant.api.RunResult`.
    """
    from . import runs
    from .api import RunResult, calibration_data, validate_scheme
    from .data.multimodal import default_image_size, is_pair_source, load_pairs, pair_inputs, split_pairs
    from .eval.multimodal import caption_ppl, feature_agreement, image_features
    from .eval.perplexity import evaluate_ppl, fp_ppl_cached, load_eval_sets
    from .eval.vision import fp_outputs_cached

    eval_datasets = eval_datasets or []
    if recipe.tta is not None:
        raise ConfigError("test-time adaptation is not available for image-text models")
    if tasks:
        from .eval.zeroshot import resolve_tasks, run_zeroshot

        resolve_tasks(tasks)
    parts_quantized = recipe.parts.vision is not None or recipe.parts.projector
    if export_format not in (None, "fake") and parts_quantized:
        raise ConfigError(f"--format {export_format} writes one scheme for the language model; a quantized vision "
                          "tower or projector is saved in model/ (fake-quant) only")
    c = recipe.calib
    pairs_calib = is_pair_source(c.dataset)
    folder, model_id = runs.prepare_job(model_name, recipe, output_dir, device=device, resume=resume,
                                        overwrite=overwrite, export_format=export_format)
    with runs.model_errors(model_name):
        model, loaded_processor, tokenizer, display = load_multimodal(model_name)
    processor = processor or loaded_processor
    _, parts = mapping_parts(model)
    validate_scheme(model, recipe)
    check_parts(model, recipe, pairs_calib)
    size = image_size or default_image_size(model.config)
    n_eval = eval_limit or DEFAULT_EVAL_PAIRS
    with runs.data_errors():
        held_out: list = []
        if pairs_calib or eval_pairs:
            if processor is None:
                raise ConfigError(f"{display}: its processor could not be loaded here, so image-text pairs cannot "
                                  "be processed; calibrate on text")
        if pairs_calib:
            pairs = load_pairs(c.dataset)
            same = eval_pairs is None or Path(eval_pairs) == Path(c.dataset)
            chosen, held_out = split_pairs(pairs, c.nsamples, n_eval if same else 0, c.seed)
            calib_samples = pair_inputs(processor, chosen, size)
            calib: Any = [s.inputs for s in calib_samples]
        else:
            calib = calibration_data(recipe, tokenizer, data_dir)
        if eval_pairs is not None and not (pairs_calib and Path(eval_pairs) == Path(c.dataset)):
            held_out = load_pairs(eval_pairs)[:n_eval]
        eval_samples = pair_inputs(processor, held_out, size) if held_out else []
        eval_sets = load_eval_sets(tokenizer, eval_datasets, data_dir)
    results = {**runs.results_header("multimodal", display, model_id, recipe),
               "eval": {"seqlen": eval_seqlen, "windows": eval_windows, "pairs": len(eval_samples),
                        "image_size": size},
               "calib_kind": "image-text" if pairs_calib else "text",
               "parts_quantized": ["language_model"] + (["vision_tower"] if recipe.parts.vision else [])
               + (["projector"] if recipe.parts.projector else [])}
    with folder.open():
        if eval_sets:
            fp_text = fp_ppl_cached(model_id, model, eval_sets, eval_seqlen, eval_windows, device, progress)
            results["fp_ppl"] = {k: v["ppl"] for k, v in fp_text.items()}
        if tasks:
            results["fp_zeroshot"] = run_zeroshot(model, tokenizer, tasks, limit=limit, device=device)
        if eval_samples:

            def fp_outputs(m: nn.Module) -> dict[str, torch.Tensor]:
                m.to(device)
                feats = image_features(m, parts.projector, eval_samples, device)
                out = {"caption_ppl": torch.tensor(caption_ppl(m, eval_samples, device), dtype=torch.float64)}
                m.to("cpu")
                return {**out, **{f"features.{i}": f for i, f in enumerate(feats)}}

            # cached per model content and held-out inputs: a table of runs pays for the FP pass once
            keyed = [t for s in eval_samples for t in (*s.inputs.values(), torch.tensor([s.start, s.end]))]
            fp = fp_outputs_cached(model_id, model, keyed, fp_outputs)
            results["fp_caption_ppl"] = float(fp["caption_ppl"])
            fp_feats = [fp[f"features.{i}"] for i in range(len(eval_samples))]
            log.info("FP caption perplexity %.4f", results["fp_caption_ppl"])

        def before_blocks(checkpoint: Path) -> dict[str, Any]:
            return quantize_parts(model, recipe, calib if pairs_calib else None, checkpoint_dir=checkpoint,
                                  resume=folder.resume, model_id=model_id, device=device, progress=progress)

        qr = runs.quantize_into(folder, model, recipe, calib, results, model_id, device, progress,
                                before_blocks=before_blocks)
        if eval_sets:
            q = evaluate_ppl(model, eval_sets, eval_seqlen, eval_windows, device, progress)
            results["ppl"] = {k: v["ppl"] for k, v in q.items()}
            results["eval"]["detail"] = q
        if tasks:
            results["zeroshot"] = run_zeroshot(model, tokenizer, tasks, limit=limit, device=device)
            results["zeroshot_limit"] = limit
        if eval_samples:
            model.to(device)
            results["caption_ppl"] = caption_ppl(model, eval_samples, device)
            results["image_feature_cosine"] = feature_agreement(fp_feats, image_features(model, parts.projector,
                                                                                         eval_samples, device))
            model.to("cpu")
            log.info("quantized caption perplexity %.4f, image-feature cosine %.5f", results["caption_ppl"],
                     results["image_feature_cosine"])
        runs.finish_job(folder, model, processor or tokenizer, results, recipe, save_model=save_model,
                        export_format=export_format, online_ops=qr.online_ops)
        return RunResult(results, model, processor or tokenizer)
