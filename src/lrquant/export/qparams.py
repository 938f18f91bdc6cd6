"""Quantization parameters beside a fake-quant checkpoint, and the export of a finished run folder.

A run folder's ``model/`` holds the quantized (fake-quant) weights that plain transformers loads; the
frozen scales and zero points that a real low-bit export needs live beside it in ``qparams.safetensors``
(:func:`quant_state`). :func:`export_run` puts both back together (:func:`restore_quant_state`) and writes a
compressed-tensors checkpoint, never over anything lrquant did not write (:func:`check_export_target`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Recipe
from ..errors import ConfigError, LrquantError
from .compressed import SIDECAR_NAME


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen quantization parameters (``<linear>.weight_scale / .weight_zero_point`` ``[rows, 1]`` or
    ``[rows, groups]``, static ``<linear>.input_scale / .input_zero_point``) that export needs beside the
    fake-quant weights, and what the inference graph keeps beside the weights: the learned online ops'
    factors (``<linear>.input_transform.factor<j>`` ``[d_j, d_j]``, :class:`~lrquant.transforms.OnlineKron`;
    ``<attention>.attn_quantizer.input_transform.{k,q}factor<j>`` ``[KV, d_j, d_j]``, the per-head q/k op
    :class:`~lrquant.transforms.kron.OnlineQK`) and learned activation clip logits (``<linear>.input_clip``
    ``[1, 1]``)."""
    from ..quant.quantizers import quant_linears
    from ..transforms.kron import OnlineKron, OnlineQK

    out = {}
    for name, m in quant_linears(model).items():
        for kind, q in (("weight", m.weight_quantizer), ("input", m.input_quantizer)):
            if q is not None and q.scale is not None:
                out[f"{name}.{kind}_scale"] = q.scale
                out[f"{name}.{kind}_zero_point"] = q.zero_point
        if isinstance(m.input_transform, OnlineKron):
            for j, f in enumerate(m.input_transform.factors(m.weight.dtype)):
                out[f"{name}.input_transform.factor{j}"] = f.detach().contiguous()
        if m.input_quantizer is not None and m.input_quantizer.act_clip is not None:
            out[f"{name}.input_clip"] = m.input_quantizer.act_clip.detach().clone()
    for name, m in model.named_modules():
        if isinstance(m, OnlineQK):
            out.update({f"{name}.{k}": v for k, v in m.tensors().items()})
    return out


def restore_online(ql: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put back the :class:`~lrquant.transforms.OnlineKron` and the activation clip logit :func:`quant_state`
    stored for the QuantLinear ``ql`` named ``name`` (a fixed op already there becomes the Kronecker op's
    ``inner``)."""
    from ..transforms.kron import OnlineKron

    factors = []
    while f"{name}.input_transform.factor{len(factors)}" in tensors:
        factors.append(tensors[f"{name}.input_transform.factor{len(factors)}"])
    if factors:
        sizes = tuple(int(f.shape[0]) for f in factors)
        op = OnlineKron(sizes, ql.in_features // math.prod(sizes), inner=ql.input_transform, dtype=ql.weight.dtype)
        with torch.no_grad():
            for j, f in enumerate(factors):
                getattr(op, f"factor{j}").copy_(f)
        ql.input_transform = op.to(ql.weight.device)
    clip = tensors.get(f"{name}.input_clip")
    if clip is not None and ql.input_quantizer is not None:
        ql.input_quantizer.act_clip = nn.Parameter(clip.clone().to(ql.weight.device), requires_grad=False)


def restore_quant_state(model: nn.Module, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> None:
    r"""Wrap ``model``'s mapped linears in frozen :class:`QuantLinear`\ s from :func:`quant_state` output
    (a run folder's fake-quant ``model/`` plus its ``qparams.safetensors``); with a quantized KV cache, give
    every attention its fake quantizers (dynamic: nothing stored) and the q/k online op when one was saved."""
    from ..arch.base import get_mapping, set_submodule
    from ..quant.attention import AttentionQuantizer, enable_attention_quantization
    from ..quant.quantizers import QuantLinear
    from ..transforms.kron import restore_online_qk

    mapping = get_mapping(model)
    kv = recipe.scheme.kv_cache
    if kv is not None:
        enable_attention_quantization(model)
    for block_name, block in mapping.block_list(model):
        if kv is not None:
            attn = block.get_submodule(mapping.attention)
            attn.attn_quantizer = AttentionQuantizer(kv)
            restore_online_qk(attn.attn_quantizer, f"{block_name}.{mapping.attention}.attn_quantizer", tensors)
        for path in mapping.linears():
            name = f"{block_name}.{path}"
            ql = QuantLinear(block.get_submodule(path), recipe.scheme.weights, recipe.scheme.input_activations)
            for kind, q in (("weight", ql.weight_quantizer), ("input", ql.input_quantizer)):
                if q is not None and f"{name}.{kind}_scale" in tensors:
                    q.scale = tensors[f"{name}.{kind}_scale"]
                    q.zero_point = tensors[f"{name}.{kind}_zero_point"]
            restore_online(ql, name, tensors)
            set_submodule(block, path, ql)


def restore_run_state(model: nn.Module, results: dict, recipe: Recipe, qparams: dict[str, torch.Tensor]) -> None:
    """Put a run folder's inference graph back on its saved ``model/``: the rotation pre-step's online
    Hadamards (``results.json``), then the quantizers and learned online ops (:func:`restore_quant_state`)."""
    if results.get("rotation"):
        from ..transforms.rotation import attach_online

        attach_online(model, results["rotation"]["online"])
    restore_quant_state(model, recipe, qparams)


def load_run_model(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict]:
    """A finished text run folder as the model it evaluated: ``model/`` through transformers, the rotation
    pre-step's online Hadamards (``results.json``), then every quantizer, learned online op and activation
    clip from ``qparams.safetensors`` (:func:`restore_quant_state`). Returns ``(model, tokenizer, results)``.
    Our runtime for what no export format can hold (see docs/online-transforms.md)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=dtype).eval()
    restore_run_state(model, results, Recipe.from_dict(results["recipe"]),
                      load_file(str(run_dir / "qparams.safetensors")))
    return model, AutoTokenizer.from_pretrained(run_dir / "model"), results


def check_export_target(target: Path, run_dir: Path | None = None, overwrite: bool = False,
                        export_format: str = "compressed-tensors") -> None:
    """Refuse (one line) an export target that would destroy something: the run folder itself or a folder
    above it; for compressed-tensors (a folder) a file, or a non-empty folder that is not a previous lrquant
    export; for GGUF (a file) a folder, or an existing file (the last two unless ``overwrite``)."""
    target = Path(target).absolute()
    if export_format == "gguf":
        if target.is_dir():
            raise ConfigError(f"GGUF export target {target} is a folder; name a .gguf file")
        if target.exists() and not overwrite:
            raise ConfigError(f"GGUF export target {target} exists; pass --overwrite to replace it")
        return
    if target.exists() and not target.is_dir():
        raise ConfigError(f"export target {target} is a file")
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if target.resolve() == run or target.resolve() in run.parents:
            raise ConfigError(f"export target {target} would replace the run folder {run_dir}; choose another --output")
    if target.is_dir() and any(target.iterdir()) and not (target / SIDECAR_NAME).is_file() and not overwrite:
        raise ConfigError(f"export target {target} holds files that are not an lrquant export; choose an empty "
                          "folder or pass --overwrite to replace it")


def export_run(run_dir: str | Path, output: str | Path | None = None, dtype: torch.dtype | None = None,
               export_format: str = "compressed-tensors", overwrite: bool = False) -> Path:
    """Export a finished text run folder (``model/`` + ``qparams.safetensors``) as compressed-tensors
    (default ``<run_dir>/compressed``) or GGUF (``export_format="gguf"``, default ``<run_dir>/model.gguf``),
    holding the run folder's lock meanwhile; the default targets belong to the run and are replaced."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..runs import RunFolder
    from .compressed import export_compressed

    run_dir = Path(run_dir)
    default = run_dir / ("model.gguf" if export_format == "gguf" else "compressed")
    target = Path(output) if output is not None else default
    results_path = run_dir / "results.json"
    for needed in (results_path, run_dir / "model" / "config.json", run_dir / "qparams.safetensors"):
        if not needed.is_file():
            raise LrquantError(f"{run_dir} is not a finished run folder with a saved model: missing {needed.name}")
    check_export_target(target, run_dir, overwrite or output is None, export_format)
    with RunFolder(run_dir).locked():
        try:
            results = json.loads(results_path.read_text())
            recipe = Recipe.from_dict(results["recipe"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise LrquantError(f"{results_path} is not a valid lrquant results file ({type(exc).__name__})") from exc
        if results.get("job", "text") != "text":
            raise ConfigError(f"{run_dir} is a {results['job']} run; compressed-tensors export takes causal-LM runs")
        try:
            model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
            qparams = load_file(str(run_dir / "qparams.safetensors"))
            tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
        except (OSError, ValueError, SafetensorError) as exc:
            raise LrquantError(f"cannot read the saved model in {run_dir}: {str(exc).splitlines()[0]}") from exc
        restore_run_state(model, results, recipe, qparams)  # online Hadamards: exported, or refused by GGUF
        if export_format == "gguf":
            from .gguf import export_gguf

            return export_gguf(model, recipe.scheme, target, tokenizer, dtype=dtype,
                               online_ops=results.get("online_ops", []))
        return export_compressed(model, recipe.scheme, target, tokenizer, dtype=dtype,
                                 online_ops=results.get("online_ops", []))
