"""Export frozen fake-quant models in the compressed-tensors format (loadable by transformers and vLLM).

Formats (chosen by compressed-tensors' own ``infer_module_format`` from the scheme):

* weight-only, 1-8 bits (W4A16, W8A16, W3A16, W2A16, group/channel/tensor, sym/asym): ``pack-quantized``
  (int32 words, dense bit packing, zero points packed along the output dim).
* weights + input activations (W8A8, W6A6, W4A4): ``int-quantized`` (int8 codes, one per byte) with the
  activation config (dynamic per-token, or a static per-tensor ``input_scale``).

The integer codes are recovered exactly from each frozen :class:`QuantLinear` (``weight / scale + zp``
must be integral, else the export refuses) and handed to compressed-tensors' compressors, which write
``weight_packed`` / ``weight`` (int8), ``weight_scale``, ``weight_zero_point`` and ``weight_shape``.
Our asymmetric grid ``[0, 2^b - 1]`` becomes compressed-tensors' signed grid ``[-2^(b-1), 2^(b-1) - 1]``
by subtracting ``2^(b-1)`` from codes and zero points alike, so ``q - zp`` (and the weight) is unchanged.

Asymmetric ``pack-quantized`` zero points come in two layouts (:data:`LAYOUTS`; symmetric and
``int-quantized`` exports are the same in both):

* ``"vllm"``: the format's own layout, ``weight_zero_point`` int32 ``[ceil(out * b / 32), groups]``
  (``pack_to_int32(zp, b, packed_dim=0)``), which vLLM's WNA16 scheme allocates and reads.
* ``"transformers"`` (default): the same words zero-padded to ``[out, groups]``, so that plain
  ``AutoModelForCausalLM.from_pretrained(dir)`` loads it. Why: transformers builds the model on the meta
  device and runs compressed-tensors' ``compress_model`` on it to get the compressed parameter shapes;
  ``PackedQuantizationCompressor.compress`` (compressed-tensors 0.20.1) returns early for meta weights
  *before* packing the zero point, so the model expects an unpacked ``[out, groups]`` zero point and the
  packed checkpoint tensor is refused as a size mismatch (``[192, 9]`` vs ``[1536, 9]`` on SmolLM2's MLP).
  Its ``decompress`` on the first forward then unpacks that parameter along dim 0 and reads only the first
  ``ceil(out * b / 32)`` rows, so the padded words give the right zero points; an unpacked int8 tensor would
  be refused there, and an unpacked int32 one silently misread. ``CompressedTensorsConfig(dequantize=True)``
  loads both layouts.

Online Hadamards of the rotation pre-step (``--rotate``: an :class:`~lrquant.quant.hadamard.OnlineHadamard`
``input_transform`` on each MLP down_proj, and on o_proj with ``online_value``) are written as the config's
``transform_config`` plus one stored matrix per linear (:mod:`lrquant.export.transforms`, which says how
compressed-tensors and vLLM read them). transformers 5.24's ``from_pretrained`` ignores a
``transform_config`` (the load report lists the stored matrices as unexpected keys): :func:`load_compressed`
applies it.

Not representable, hence refused or dropped with a warning:

* unfolded transforms (tensors still parametrized), any other online op (a QuantLinear ``input_transform``
  that is not an ``OnlineHadamard``, e.g. a Kronecker ``OnlineKron``; a learned activation clip ratio;
  ``online_ops`` declared by the method for no carried Hadamard): refused — fold them first;
* per-token dynamic KV-cache quantization: compressed-tensors' KV schemes reduce over the sequence, so
  the export omits it (warning) and loaders run the KV cache in full precision.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import QuantArgs, Scheme
from ..errors import ConfigError, LrquantError
from ..io import atomic_dir
from ..quant.primitives import as_rows, signed_offset
from ..quant.quantizers import QuantLinear
from .transforms import (
    LOCATION,
    apply_online_transforms,
    ct_transform_config,
    online_groups,
    online_hadamards,
    read_transform_config,
    transform_tensors,
)

# Maximum distance of ``weight / scale + zero_point`` from an integer for the codes to count as exact.
INTEGRAL_TOL = 1e-3

SIDECAR_NAME = "lrquant_export.json"

# Zero-point layouts of asymmetric pack-quantized exports (see the module docstring); the first is the default.
LAYOUTS = ("transformers", "vllm")


class ExportError(LrquantError):
    """The model cannot be exported as it is (unfolded transforms, unfrozen weights, mixed schemes...)."""


# ---- scheme conversion ---------------------------------------------------------------------------------
def ct_args(args: QuantArgs):
    """Our :class:`QuantArgs` -> compressed-tensors ``QuantizationArgs`` (integer type, same field names)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=args.num_bits, type="int", symmetric=args.symmetric, strategy=args.strategy,
        group_size=args.group_size, dynamic=args.dynamic,
    )


def ct_scheme(scheme: Scheme, targets: list[str]):
    """compressed-tensors ``QuantizationScheme`` for ``targets`` with the format compressed-tensors infers
    (``pack-quantized`` weight-only, ``int-quantized`` with activations)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    if scheme.weights is None:
        raise ExportError(f"scheme {scheme.name()} quantizes no weights: save it with save_pretrained instead")
    ct = QuantizationScheme(
        targets=targets,
        weights=ct_args(scheme.weights),
        input_activations=ct_args(scheme.input_activations) if scheme.input_activations else None,
    )
    ct.format = infer_module_format(nn.Linear, ct)
    return ct


def ct_config(scheme: Scheme, ignore: list[str]):
    """``QuantizationConfig`` (status ``compressed``) with one group targeting every ``Linear`` not ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    group = ct_scheme(scheme, ["Linear"])
    return QuantizationConfig(
        config_groups={"group_0": group}, format=group.format,
        quantization_status=QuantizationStatus.COMPRESSED, ignore=sorted(ignore),
    )


# ---- checks --------------------------------------------------------------------------------------------
def unfolded_transforms(model: nn.Module, carried: Collection[str] = ()) -> list[str]:
    """What the checkpoint cannot express, one ``"<module> (<why>)"`` each: tensors still parametrized by a
    transform (not folded), an online ``input_transform`` on a QuantLinear (the one kind of module an
    lrquant model keeps in its inference graph; what a method leaves that no module shows, it declares in
    ``online_ops``) unless the module is in ``carried``, or a learned activation clip ratio."""
    bad = []
    for name, module in model.named_modules():
        where = name or "<root>"
        if parametrize.is_parametrized(module):
            bad.append(f"{where} (parametrized {', '.join(module.parametrizations)}: transform not folded)")
        if getattr(module, "input_transform", None) is not None and name not in carried:
            bad.append(f"{where} (online input transform {type(module.input_transform).__name__})")
        if getattr(getattr(module, "input_quantizer", None), "act_clip", None) is not None:
            bad.append(f"{where} (learned activation clip ratio: no compressed-tensors field)")
    return bad


def check_exportable(model: nn.Module, scheme: Scheme, online_ops: list[str] | tuple[str, ...] = (),
                     carry_online: bool = False) -> dict[str, QuantLinear]:
    """Frozen QuantLinears to compress, by name; raises :class:`ExportError` with one line otherwise.

    ``online_ops``: ops a method declared it leaves in the inference graph (``QuantizeResult.online_ops``);
    any makes the model unexportable, like the markers :func:`unfolded_transforms` finds, except, with
    ``carry_online``, the rotation pre-step's online Hadamards (``<linear>.input_transform`` holding an
    :class:`~lrquant.quant.hadamard.OnlineHadamard`), which the compressed-tensors export writes as a
    ``transform_config``.
    """
    carried = set(online_hadamards(model)) if carry_online else set()
    declared = [op for op in online_ops if op.removesuffix(".input_transform") not in carried]
    bad = [*unfolded_transforms(model, carried), *(f"{op} (declared online)" for op in declared)]
    if bad:
        raise ExportError(f"fold transforms before export; still online: {', '.join(bad[:5])}"
                          + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    quant: dict[str, QuantLinear] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.weight_quantizer is None:
            if m.input_quantizer is not None:
                raise ExportError(f"{name}: activation-only quantization has no compressed-tensors format")
            continue
        if not m.weight_frozen:
            raise ExportError(f"{name}: QuantLinear is not frozen; call .freeze() before export")
        if m.weight_quantizer.args != scheme.weights:
            raise ExportError(f"{name}: weights are {m.weight_quantizer.args.describe()}, scheme says "
                              f"{scheme.weights.describe() if scheme.weights else 'none'}")
        act = m.input_quantizer.args if m.input_quantizer is not None else None
        if act != scheme.input_activations:
            raise ExportError(f"{name}: activations are {act.describe() if act else 'none'}, scheme says "
                              f"{scheme.input_activations.describe() if scheme.input_activations else 'none'}")
        if act is not None and not act.dynamic and m.input_quantizer.mode != "static":
            raise ExportError(f"{name}: static activation quantizer is not calibrated/frozen")
        quant[name] = m
    if not quant:
        raise ExportError("model has no frozen QuantLinear to export")
    return quant


# ---- codes ---------------------------------------------------------------------------------------------
def recover_codes(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs,
                  name: str = "weight") -> torch.Tensor:
    """Exact integer codes of a frozen weight on *our* grid.

    ``weight: [out, in]`` (fake-quantized), ``scale, zero_point: [rows, 1]`` in the ``as_rows`` view ->
    codes ``[out, in]`` int32 in ``[qmin, qmax]``. Raises :class:`ExportError` when ``weight / scale + zp``
    is not integral within :data:`INTEGRAL_TOL` (the weight was changed after freezing, or the clipping
    was not folded into the scales).
    """
    rows = as_rows(weight.detach().float(), args.strategy, args.group_size)
    exact = (rows / scale.float()).add_(zero_point.float())  # float32: |q - zp| <= 255 leaves ~3e-5 slack
    q = exact.round()
    err = exact.sub_(q).abs_().max().item()
    if err > INTEGRAL_TOL:
        raise ExportError(f"{name}: weight/scale + zero_point is off the integer grid by {err:.3g} "
                          f"(> {INTEGRAL_TOL}); was the weight modified after freeze()?")
    lo, hi = (v.item() for v in torch.aminmax(q))
    if lo < args.qmin or hi > args.qmax:
        raise ExportError(f"{name}: codes span [{lo:.0f}, {hi:.0f}], "
                          f"outside the {args.num_bits}-bit grid [{args.qmin}, {args.qmax}]")
    return q.to(torch.int32).reshape(weight.shape)


def ct_qparams(scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs, shape: torch.Size
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our per-row ``scale, zero_point: [rows, 1]`` -> compressed-tensors layout and signed grid.

    ``channel``: ``[out, 1]``; ``group``: ``[out, in / g]``; ``tensor``: ``[1]``. The zero point is int8 on
    the signed grid (``zp - 2^(b-1)`` for asymmetric args, 0 for symmetric ones).
    """
    out = shape[0]
    if args.strategy == "channel":
        new_shape: tuple[int, ...] = (out, 1)
    elif args.strategy == "group":
        new_shape = (out, shape[-1] // args.group_size)
    elif args.strategy == "tensor":
        new_shape = (1,)
    else:
        raise ConfigError(f"weights cannot use strategy {args.strategy!r}")
    offset = signed_offset(args.num_bits, args.symmetric)
    zp = (zero_point.round() - offset).to(torch.int8)
    return scale.reshape(new_shape), zp.reshape(new_shape)


def ct_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs
              ) -> torch.Tensor:
    """Dequantized weight ``[out, in]`` from our codes, computed exactly as our ``fake_quant`` does
    (``(q - zp) * scale`` in the scale's dtype), so the compressors recover ``codes`` bit-exactly."""
    rows = as_rows(codes, args.strategy, args.group_size).to(scale.dtype)
    return ((rows - zero_point.to(scale.dtype)) * scale).reshape(codes.shape)


def pad_packed_zero_point(zp: torch.Tensor, out_features: int) -> torch.Tensor:
    """Packed zero points ``[ceil(out * b / 32), groups]`` int32 -> ``[out, groups]``, zero rows appended
    (the ``"transformers"`` layout: the shape transformers allocates, words its decompressor reads)."""
    pad = zp.new_zeros(out_features - zp.shape[0], *zp.shape[1:])
    return torch.cat([zp, pad]).contiguous()


def packs_zero_point(scheme: Scheme) -> bool:
    """Whether ``scheme`` exports ``pack-quantized`` with packed zero points (asymmetric group/channel)."""
    w = scheme.weights
    return (scheme.input_activations is None and w is not None and not w.symmetric
            and w.strategy in ("group", "channel"))


def compress_linear(m: QuantLinear, scheme: Scheme, dtype: torch.dtype | None = None, name: str = "linear",
                    layout: str = LAYOUTS[0]) -> dict[str, torch.Tensor]:
    """Compressed per-module state dict (local names) of one frozen QuantLinear, via compressed-tensors.

    Keys: ``weight_packed`` (pack-quantized) or ``weight`` (int8, int-quantized), ``weight_scale``,
    ``weight_shape`` (packed only), ``weight_zero_point`` (asymmetric; packed zero points in ``layout``),
    ``bias``, and ``input_scale`` / ``input_zero_point`` for static activations. ``dtype`` casts the scales
    (the codes are unchanged). The result is decompressed again and checked to give the same weight bit for
    bit.
    """
    from compressed_tensors.compressors import BaseCompressor

    args = scheme.weights
    wq = m.weight_quantizer
    scale = wq.scale.detach().to(dtype or wq.scale.dtype)
    codes = recover_codes(m.weight, wq.scale, wq.zero_point, args, name)
    weight = ct_weight(codes, scale, wq.zero_point, args)
    ct_scale, ct_zp = ct_qparams(scale, wq.zero_point, args, m.weight.shape)
    sd: dict[str, torch.Tensor] = {"weight": weight, "weight_scale": ct_scale, "weight_zero_point": ct_zp}
    if m.bias is not None:
        sd["bias"] = m.bias.detach().to(dtype or m.bias.dtype)
    act = scheme.input_activations
    if act is not None and not act.dynamic:
        a_scale, a_zp = ct_qparams(m.input_quantizer.scale.detach(), m.input_quantizer.zero_point, act,
                                   torch.Size([1, 1]))
        sd["input_scale"] = a_scale.reshape(1).to(dtype or a_scale.dtype)
        sd["input_zero_point"] = a_zp.reshape(1)
    ct = ct_scheme(scheme, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(ct.format)
    compressed = dict(compressor.compress(sd, ct))
    if layout == "transformers" and ct.format == "pack-quantized" and packs_zero_point(scheme):
        compressed["weight_zero_point"] = pad_packed_zero_point(compressed["weight_zero_point"], m.weight.shape[0])
    back = compressor.decompress(compressed, ct)["weight"]
    if not torch.equal(back, weight):
        raise ExportError(f"{name}: compressed-tensors round trip changed the weight "
                          f"(max diff {(back - weight).abs().max().item():.3g})")
    return compressed


# ---- export --------------------------------------------------------------------------------------------
def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def export_state_dict(model: nn.Module, scheme: Scheme, dtype: torch.dtype | None = None,
                      online_ops: list[str] | tuple[str, ...] = (), layout: str = LAYOUTS[0]
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full compressed state dict of ``model`` and the names of linears left dense (the ``ignore`` list).
    The online Hadamards' matrices are not in it (:func:`lrquant.export.transforms.transform_tensors`)."""
    quant = check_exportable(model, scheme, online_ops, carry_online=True)
    sd: dict[str, torch.Tensor] = {}
    cast: dict[int, torch.Tensor] = {}  # by data_ptr: tied tensors stay one tensor (saved once)
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] in quant:
            continue
        if dtype is not None and value.is_floating_point():
            value = cast.setdefault(value.data_ptr(), value.detach().to(dtype))
        sd[key] = value
    for name, m in quant.items():
        for key, value in compress_linear(m, scheme, dtype, name, layout).items():
            sd[f"{name}.{key}"] = value
    ignore = [n for n in _linear_names(model) if n not in quant]
    return sd, collapse_ignore(model, ignore)


def collapse_ignore(model: nn.Module, ignore: list[str]) -> list[str]:
    """``ignore`` with each wholly dense part of a multimodal model (vision tower, projector: see
    :class:`lrquant.arch.base.MultimodalParts`) written as the ``re:.*<module>.*`` entry the ecosystem's
    recipes use, in place of one name per linear; other models' lists are returned unchanged (and so is any
    list where such an entry would also match a quantized linear)."""
    import re

    from ..arch.base import get_mapping
    from ..errors import UnsupportedArchitectureError

    try:
        parts = get_mapping(model).parts
    except UnsupportedArchitectureError:
        return ignore
    if parts is None:
        return ignore
    names = _linear_names(model)
    patterns = []
    for path in (parts.vision_tower, parts.projector):
        inside = [n for n in names if n.startswith(f"{path}.")]
        if inside and all(n in ignore for n in inside):
            patterns.append(parts.pattern(path))

    def covered(name: str) -> bool:
        return any(re.match(p.removeprefix("re:"), name) for p in patterns)

    if any(covered(n) for n in names if n not in ignore):
        return ignore
    return patterns + [n for n in ignore if not covered(n)]


def check_layout(layout: str) -> None:
    """Refuse a zero-point layout that is not one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown export layout {layout!r}; use one of {', '.join(LAYOUTS)}")


def warn_kv_cache(scheme: Scheme) -> None:
    """Warn that the export omits ``scheme``'s KV-cache quantization (see the module docstring)."""
    if scheme.kv_cache is not None:
        warnings.warn(f"scheme {scheme.name()}: per-token KV-cache quantization has no compressed-tensors "
                      "equivalent; the export omits it (loaders keep the KV cache in full precision)",
                      stacklevel=3)


def write_export_metadata(folder: Path, scheme: Scheme, ignore: list[str], dtype: torch.dtype | None,
                          tokenizer: Any, layout: str, quantized: int, groups: list | tuple = ()) -> None:
    """Make the checkpoint in ``folder`` (tensors and ``config.json`` written) a compressed-tensors export:
    the config's ``quantization_config`` (``ignore``: the dense linears) and ``transform_config`` (online
    Hadamard ``groups``), its ``dtype``, ``tokenizer``'s files and the ``lrquant_export.json`` sidecar
    (``quantized``: how many linears were compressed)."""
    from compressed_tensors.compressors import ModelCompressor

    config = ct_config(scheme, ignore)
    ModelCompressor(quantization_config=config,
                    transform_config=ct_transform_config(groups) if groups else None).update_config(str(folder))
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    sidecar = {
        "scheme": scheme.name(),
        "scheme_args": {k: (vars(v) if v is not None else None) for k, v in vars(scheme).items()},
        "format": str(config.format),
        "zero_point_layout": layout if packs_zero_point(scheme) else None,
        "quantized_linears": quantized,
        "dense_linears": sorted(ignore),
        "kv_cache_omitted": scheme.kv_cache is not None,
        "online_transforms": [{"group": g.name, "type": g.kind, "location": LOCATION, **g.spec,
                               "linears": len(g.targets)} for g in groups],
    }
    (folder / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")


class CompressedBlocks:
    """The compressed-tensors export of a model quantized block by block (``--stream-blocks --format
    compressed-tensors``, :class:`lrquant.streaming.ShardWriter`): each block's compressed state dict as it
    is finished (:meth:`__call__`), then the metadata (:meth:`finish`), so the export is never assembled in
    memory. Same tensors and config as :func:`export_compressed` on the whole model (tested)."""

    def __init__(self, scheme: Scheme, dtype: torch.dtype | None = None, layout: str = LAYOUTS[0]) -> None:
        check_layout(layout)
        self.scheme, self.dtype, self.layout = scheme, dtype, layout
        self.dense: list[str] = []  # linears inside blocks left dense
        self.blocks: list[str] = []
        self.quantized = 0

    def __call__(self, name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block ``name``'s compressed state dict, keys as in the model (``<name>.<key>``)."""
        sd, ignore = export_state_dict(block, self.scheme, self.dtype, (), self.layout)
        self.blocks.append(name)
        self.dense += [f"{name}.{n}" for n in ignore]
        self.quantized += sum(1 for k in sd if k.endswith(".weight_scale"))
        return {f"{name}.{k}": v for k, v in sd.items()}

    def finish(self, folder: Path, model: nn.Module) -> None:
        """The metadata of the export in ``folder`` (tensors, config and tokenizer written); ``model``: the
        skeleton, whose linears outside the blocks are dense."""
        warn_kv_cache(self.scheme)
        outside = [n for n in _linear_names(model) if not any(n.startswith(f"{b}.") for b in self.blocks)]
        write_export_metadata(folder, self.scheme, collapse_ignore(model, self.dense + outside), self.dtype,
                              None, self.layout, self.quantized)


def export_compressed(model: nn.Module, scheme: Scheme, out_dir: str | Path, tokenizer=None,
                      dtype: torch.dtype | None = None, online_ops: list[str] | tuple[str, ...] = (),
                      layout: str = LAYOUTS[0]) -> Path:
    """Write ``model`` (frozen QuantLinears) as a compressed-tensors checkpoint in ``out_dir``.

    ``model`` is a transformers ``PreTrainedModel`` whose quantized linears are frozen
    :class:`QuantLinear`\\ s following ``scheme``; other linears (e.g. ``lm_head``) stay dense and go in
    the config's ``ignore`` list. ``dtype=None`` keeps the model's dtype (the reloaded weights are bit-
    identical to the in-memory ones); ``torch.float16`` / ``bfloat16`` casts dense tensors and scales.
    The folder (``model.safetensors``, ``config.json`` with ``quantization_config``, generation config,
    tokenizer files, and ``lrquant_export.json``) is written to a temporary sibling and renamed into place.
    The rotation pre-step's online Hadamards go in ``quantization_config.transform_config`` with their
    matrices (:mod:`lrquant.export.transforms`); any other online op or unfolded transform, or an entry of
    ``online_ops`` that is not one of those Hadamards, is refused (:class:`ExportError`).
    ``layout``: where asymmetric pack-quantized zero points go (:data:`LAYOUTS`): ``"transformers"`` (plain
    ``from_pretrained`` loads it) or ``"vllm"`` (the compact layout vLLM reads). Returns ``out_dir``.
    """
    check_layout(layout)
    out = Path(out_dir).absolute()
    warn_kv_cache(scheme)
    sd, ignore = export_state_dict(model, scheme, dtype, online_ops, layout)
    groups = online_groups(online_hadamards(model))
    if groups:
        sd.update(transform_tensors(groups, dtype or _float_dtype(model)))
    if out.is_file():
        raise ExportError(f"export target {out} is a file")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=sd)
        write_export_metadata(tmp, scheme, ignore, dtype, tokenizer, layout,
                              quantized=sum(1 for k in sd if k.endswith(".weight_scale")), groups=groups)
    return out


def load_compressed(path: str | Path, **kwargs):
    """Load an export with ``transformers.AutoModelForCausalLM.from_pretrained`` (``kwargs`` pass through).

    This is the plain path a user takes (plus ``dtype="auto"`` unless given): compressed-tensors
    decompresses the weights on the first forward and applies any activation quantization in each linear's
    forward. Only asymmetric exports written with ``layout="vllm"`` (see the module docstring) go through
    ``CompressedTensorsConfig(dequantize=True)``, which transformers needs for that layout. A
    ``transform_config`` (online Hadamards), which ``from_pretrained`` ignores, is then applied with its
    stored matrices (:func:`lrquant.export.transforms.apply_online_transforms`).
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs.setdefault("dtype", "auto")
    sidecar = Path(path) / SIDECAR_NAME
    if sidecar.is_file() and json.loads(sidecar.read_text()).get("zero_point_layout") == "vllm":
        kwargs.setdefault("quantization_config", CompressedTensorsConfig(dequantize=True))
    transform_config = read_transform_config(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
        if not transform_config:
            return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        # transformers' load report would list the transform matrices as unexpected keys (it does not
        # know them; apply_online_transforms loads them): report only what else it found
        with _transformers_verbosity_error():
            model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    names = list(transform_config.get("config_groups", {}))
    unexpected = [k for k in info.get("unexpected_keys", ())
                  if not any(f".{n}_" in k for n in names)]
    missing = list(info.get("missing_keys", ()))
    if unexpected or missing:
        warnings.warn(f"{path}: loading found missing keys {sorted(missing)[:5]} and unexpected keys "
                      f"{sorted(unexpected)[:5]}", stacklevel=2)
    apply_online_transforms(model, path, transform_config)
    return model


@contextlib.contextmanager
def _transformers_verbosity_error() -> Iterator[None]:
    """transformers' logging at error level meanwhile (its load report is a warning)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def dir_size_bytes(path: str | Path, suffix: str = ".safetensors") -> int:
    """Total size of the files ending in ``suffix`` under ``path`` (the weights on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob(f"*{suffix}"))
