"""Integer runtime for frozen :class:`~lrquant.quant.quantizers.QuantLinear` layers (CPU, and CUDA when present).

Three modules replace a frozen QuantLinear; each holds the integer codes recovered exactly from the frozen
weight (:func:`lrquant.export.compressed.recover_codes`) and computes ``x: [..., in] -> [..., out]``:

* :class:`Int4WeightOnlyLinear` — weights of 2-4 bits, group (32/64/128/256, or a multiple of one of
  them) or channel strategy; torch's tinygemm-style packed int4 matmul
  (``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on CUDA). The kernel
  dequantizes ``w = (u - 8) * scale + zero`` per group; our codes ``q`` (zero point ``zp``) map to
  ``u = q + c``, ``zero = (8 - c - zp) * scale`` with ``c = 8`` for symmetric codes (``zero = 0``) and
  ``c = 8 - 2^(b-1)`` for asymmetric ones (centred, so ``zero`` stays small and rounds little).
* :class:`Int8WeightOnlyLinear` — weights of 5-8 bits, channel strategy; ``aten._weight_int8pack_mm``
  (int8 codes times per-row scales); an asymmetric zero point is applied as a rank-1 correction
  ``- (scale * zp) * sum(x)``.
* :class:`Int8DynamicLinear` — weights and input activations of at most 8 bits (W8A8, W6A6, W4A4),
  channel/tensor weights, per-token (or per-tensor) dynamic or static per-tensor activations; the
  activation codes are computed exactly as the fake quantizer computes them and multiplied with
  ``torch._int_mm`` (int8 x int8 -> int32); zero points enter as exact integer corrections, so the only
  difference to the fake-quant reference is float rounding. W4A4 / W6A6 run on the same int8 GEMM:
  correct, but no faster than W8A8 (no 4-/6-bit GEMM exists in torch).

Weight-only kernels compute in ``compute_dtype`` (default bfloat16): on this CPU (AVX512-BF16) torch's
int4/int8 weight-only ops are fast only for bfloat16 activations (their float32 paths are 10-100x slower
than a dense float32 matmul), and float16 is also slow. Tolerances against the float32 fake-quant
reference (see tests): bfloat16 ``max|y - ref| <= 1e-2 * max|ref|``; float32 ``<= 1e-5``.

:func:`convert_to_runtime` swaps the kernels into an in-memory model; :func:`load_runtime` does the same
for an export folder (codes, scales and zero points read from the compressed-tensors checkpoint).
Packing is device-specific: convert after moving the model to its device. The CUDA branches (int4
``_weight_int4pack_mm``, ``_int_mm`` with rows padded past 16) follow torch's documented layouts but were
not run here (no GPU); their tests skip without CUDA.

Measured on the dev CPU (bench/bench_speed.py, one 11008 x 4096 linear, 1 thread, 1 row -> 512 rows):
fp32 14.5 -> 825 ms, bf16 7.2 -> 195 ms, int4 packed 1.6 -> 493 ms, int8 weight-only 3.0 -> 675 ms,
int8 GEMM 1.6 -> 96 ms. The weight-only ops win decode (batch 1) and lose prefill to dense bf16.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import QuantArgs
from ..quant.primitives import SCALE_EPS, as_rows, signed_offset
from ..quant.quantizers import QuantLinear
from .compressed import ExportError, recover_codes

INT4_GROUPS = (256, 128, 64, 32)


def _frozen_codes(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``codes [out, in]`` int32 on our grid, ``scale, zero_point [rows, 1]`` (as_rows view) of ``m``."""
    wq = m.weight_quantizer
    codes = recover_codes(m.weight, wq.scale, wq.zero_point, wq.args)
    return codes, wq.scale.detach().float(), wq.zero_point.detach().float()


def _per_channel(t: torch.Tensor, args: QuantArgs, out: int) -> torch.Tensor:
    """Per-row qparams ``[rows, 1]`` of a channel/tensor weight -> ``[out]``."""
    return t.reshape(-1).expand(out) if args.strategy == "tensor" else t.reshape(out)


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


# ---- int4 weight-only ----------------------------------------------------------------------------------
def int4_kernel_group(args: QuantArgs, in_features: int, out_features: int) -> int | None:
    """Group size the int4 kernel can use for these weights, or ``None`` if it cannot run them.

    The kernel needs 2-4 bit codes, ``out_features % 16 == 0`` and a group in 32/64/128/256 dividing
    ``in_features``; a larger group (or a whole channel) is run with its scale repeated per kernel group.
    """
    if args.num_bits > 4 or out_features % 16 != 0:
        return None
    span = {"group": args.group_size, "channel": in_features, "tensor": in_features}[args.strategy]
    return next((g for g in INT4_GROUPS if span % g == 0 and in_features % g == 0), None)


def _per_kernel_group(t: torch.Tensor, args: QuantArgs, out: int, n_groups: int) -> torch.Tensor:
    """Per-row qparams ``[rows, 1]`` (as_rows view) -> ``[out, n_groups]``, repeating a larger group's
    (or a channel's) value over the kernel groups it spans."""
    t = t.reshape(1, 1).expand(out, 1) if args.strategy == "tensor" else t.reshape(out, -1)
    return t.repeat_interleave(n_groups // t.shape[1], dim=1)


class Int4WeightOnlyLinear(nn.Module):
    """Weight-only 2-4 bit linear on torch's packed int4 matmul. ``x: [..., in] -> [..., out]``.

    Buffers: ``packed`` (device-specific int4 layout), ``scale_zeros [in / group, out, 2]`` in
    ``compute_dtype``, ``bias [out]`` (float32) or ``None``.
    """

    def __init__(self, m: QuantLinear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        args = m.weight_quantizer.args
        self.in_features, self.out_features = m.in_features, m.out_features
        group = int4_kernel_group(args, m.in_features, m.out_features)
        if group is None:
            raise ValueError(f"int4 kernel cannot run {args.describe()} with shape {tuple(m.weight.shape)}")
        self.group_size, self.compute_dtype = group, compute_dtype
        self.cuda_layout = m.weight.device.type == "cuda"
        codes, scale, zp = _frozen_codes(m)
        scale, zp = _per_kernel_group(scale, args, m.out_features, m.in_features // group), \
            _per_kernel_group(zp, args, m.out_features, m.in_features // group)
        # centre the codes in [0, 15]: u = q + c, zero = (8 - c - zp) * scale (0 for symmetric codes)
        c = 8 - signed_offset(args.num_bits, args.symmetric)
        u, zero = codes + c, (8 - c - zp) * scale
        self.register_buffer("packed", self._pack(u))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [in/g, out, 2]
        self.register_buffer("scale_zeros", sz.to(compute_dtype))
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def _pack(self, u: torch.Tensor) -> torch.Tensor:
        """Unsigned codes ``[out, in]`` in [0, 15] -> the device's int4 packed layout."""
        if self.cuda_layout:
            u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), tiles)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)
        xc = x2.to(self.compute_dtype)
        if self.cuda_layout:
            y = torch.ops.aten._weight_int4pack_mm(xc, self.packed, self.group_size, self.scale_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, self.group_size, self.scale_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, {self.compute_dtype}"


# ---- int8 weight-only ----------------------------------------------------------------------------------
def int8_weight_ok(args: QuantArgs) -> bool:
    """Per-channel (or per-tensor) weights of at most 8 bits: codes fit int8 with one scale per row."""
    return args.num_bits <= 8 and args.strategy in ("channel", "tensor")


def _signed_int8(codes: torch.Tensor, zp: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes on our grid -> int8 codes and zero point with the same ``q - zp`` (asymmetric codes are
    shifted by ``2^(b-1)`` onto the signed grid, which keeps the zero-point correction small)."""
    shift = signed_offset(args.num_bits, args.symmetric)
    return (codes - shift).to(torch.int8), zp - shift


class Int8WeightOnlyLinear(nn.Module):
    """Weight-only int8 linear (per-channel scales) on ``aten._weight_int8pack_mm``.

    ``x: [..., in] -> [..., out]``. Buffers: ``qweight [out, in]`` int8, ``scale [out]`` (compute dtype),
    ``zp_scale [out]`` float32 (``scale * zp``, asymmetric only), ``bias`` float32 or ``None``.
    """

    def __init__(self, m: QuantLinear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        args = m.weight_quantizer.args
        if not int8_weight_ok(args):
            raise ValueError(f"int8 weight-only kernel cannot run {args.describe()}")
        self.in_features, self.out_features, self.compute_dtype = m.in_features, m.out_features, compute_dtype
        codes, scale, zp = _frozen_codes(m)
        q, zp = _signed_int8(codes, zp, args)
        scale = _per_channel(scale, args, m.out_features)
        zp = _per_channel(zp, args, m.out_features)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype).contiguous())
        self.register_buffer("zp_scale", None if args.symmetric else (zp * scale).contiguous())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(self.compute_dtype), self.qweight, self.scale).to(x.dtype)
        if self.zp_scale is not None:
            y = y - x2.sum(dim=-1, keepdim=True) * self.zp_scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.compute_dtype}"


# ---- W8A8 (int8 GEMM, dynamic activations) -------------------------------------------------------------
def int8_dynamic_ok(w: QuantArgs, a: QuantArgs) -> bool:
    """Weights and activations of at most 8 bits, one weight scale per output row, activations per
    token or per tensor."""
    return int8_weight_ok(w) and a.num_bits <= 8 and a.strategy in ("token", "tensor")


def _int_zp(zx: torch.Tensor | None) -> torch.Tensor | int:
    return 0 if zx is None else zx.to(torch.int32)


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t [K, N] int8 -> [M, N] int32``; CUDA needs ``M > 16`` (rows padded to 24)."""
    m = a.shape[0]
    if a.is_cuda and m <= 16:
        a = torch.cat([a, a.new_zeros(24 - m, a.shape[1])])
        return torch._int_mm(a, b_t)[:m]
    return torch._int_mm(a, b_t)


class Int8DynamicLinear(nn.Module):
    """Integer linear for weight + activation quantization (W8A8, W6A6, W4A4) on ``torch._int_mm``.

    ``x: [..., in] -> [..., out]``. With ``qx = x / sx + zx`` (activation codes, per token) and
    ``qw = w / sw + zw`` (weight codes, per output row), both shifted to int8:
    ``y = sx * sw * (qx @ qw^T - zx * colsum(qw) - zw * rowsum(qx) + K * zx * zw) + bias``.
    """

    def __init__(self, m: QuantLinear) -> None:
        super().__init__()
        w_args, a_args = m.weight_quantizer.args, m.input_quantizer.args
        if not int8_dynamic_ok(w_args, a_args):
            raise ValueError(f"int8 GEMM cannot run W {w_args.describe()} / A {a_args.describe()}")
        self.in_features, self.out_features = m.in_features, m.out_features
        self.a_args = a_args
        codes, scale, zp = _frozen_codes(m)
        q, zp = _signed_int8(codes, zp, w_args)
        self.register_buffer("qweight_t", q.t())  # [in, out] view of a contiguous [out, in]: column-major B
        self.register_buffer("w_scale", _per_channel(scale, w_args, m.out_features).contiguous())
        self.register_buffer("w_zp", _per_channel(zp, w_args, m.out_features).to(torch.int32).contiguous())
        self.register_buffer("w_colsum", q.to(torch.int32).sum(dim=1))
        self.a_shift = signed_offset(a_args.num_bits, a_args.symmetric)
        self.w_symmetric = w_args.symmetric
        if q.is_cuda and (m.in_features % 8 or m.out_features % 8):
            raise ValueError("CUDA int8 GEMM needs in/out features divisible by 8")
        static = not a_args.dynamic
        self.register_buffer("a_scale", m.input_quantizer.scale.detach().float().clone() if static else None)
        self.register_buffer("a_zp", m.input_quantizer.zero_point.detach().float().clone() if static else None)
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x2 [M, K]`` float32 -> int8 codes ``[M, K]``, scale ``[M or 1, 1]``, shifted zero point
        (float, ``None`` for symmetric activations).

        Same arithmetic as :func:`~lrquant.quant.primitives.qparams_from_range` and ``fake_quant`` (so the
        codes are identical), written with few in-place ops: at batch 1 the per-op overhead dominates.
        """
        a = self.a_args
        if self.a_scale is not None:
            scale, zp = self.a_scale, (None if a.symmetric else self.a_zp)
        else:
            if a.strategy == "token":
                lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)
            else:
                lo, hi = (t.reshape(1, 1) for t in torch.aminmax(x2))
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            if a.symmetric:
                scale, zp = torch.maximum(lo.neg_(), hi).div_(a.qmax).clamp_(min=SCALE_EPS), None
            else:
                scale = (hi - lo).div_(a.qmax - a.qmin).clamp_(min=SCALE_EPS)
                zp = (lo / scale).round_().neg_().add_(a.qmin).clamp_(a.qmin, a.qmax)
        q = (x2 / scale).round_()
        if zp is not None:
            q.add_(zp)
        q.clamp_(a.qmin, a.qmax)
        if self.a_shift:
            q.sub_(self.a_shift)
            zp = zp - self.a_shift
        return q.to(torch.int8), scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x.float())
        qx, sx, zx = self.quantize_input(x2)
        acc = _int_mm(qx, self.qweight_t)  # [M, N] int32, exact
        if zx is not None:
            acc = acc - zx.to(torch.int32) * self.w_colsum
        if not self.w_symmetric:
            acc = acc - (qx.sum(dim=1, keepdim=True, dtype=torch.int32) - self.in_features * _int_zp(zx)) * self.w_zp
        y = acc.float().mul_(sx).mul_(self.w_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.a_args.describe()}"


# ---- model conversion ----------------------------------------------------------------------------------
def runtime_kernel(m: QuantLinear, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module | None:
    """The fastest correct integer module for a frozen QuantLinear, or ``None`` if none applies.

    Order (measured on the dev CPU, bench/bench_speed.py): int4 packed matmul for <= 4-bit weights,
    int8 weight-only for 5-8-bit per-channel weights, int8 GEMM when activations are quantized.
    """
    if m.weight_quantizer is None or not m.weight_frozen or m.input_transform is not None:
        return None
    w = m.weight_quantizer.args
    if m.input_quantizer is not None:
        return Int8DynamicLinear(m) if int8_dynamic_ok(w, m.input_quantizer.args) else None
    if int4_kernel_group(w, m.in_features, m.out_features) is not None:
        return Int4WeightOnlyLinear(m, compute_dtype)
    if int8_weight_ok(w):
        return Int8WeightOnlyLinear(m, compute_dtype)
    return None


def convert_to_runtime(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Swap every frozen QuantLinear of ``model`` (in place) for its integer kernel.

    Returns ``{name: kernel class name}``, with ``"kept: <args>"`` for layers no kernel can run (they stay
    fake-quant QuantLinears, still correct). Call after moving the model to its device.
    """
    report: dict[str, str] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        kernel = runtime_kernel(m, compute_dtype)
        if kernel is None:
            why = (m.weight_quantizer.args.describe() if m.weight_quantizer else "no weights") + (
                ", online input transform" if m.input_transform is not None else "")
            report[name] = f"kept: {why}"
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, kernel)
        report[name] = type(kernel).__name__
    return report


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module`` (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- runtime for exports -------------------------------------------------------------------------------
def _export_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {weight_packed | weight, weight_shape, weight_scale, weight_zero_point, input_*}}`` of
    every quantized module (one with a ``weight_scale``) of an export."""
    from safetensors import safe_open

    wanted = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "input_scale",
              "input_zero_point")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                module, _, leaf = key.rpartition(".")
                if leaf in wanted:
                    found.setdefault(module, {})[leaf] = fh.get_tensor(key)
    return {name: t for name, t in found.items() if "weight_scale" in t}


def frozen_from_export(linear: nn.Linear, tensors: dict[str, torch.Tensor], weights: QuantArgs,
                       acts: QuantArgs | None) -> QuantLinear:
    """A frozen :class:`QuantLinear` rebuilt from one module's exported tensors (our grid and layout).

    The codes come straight from ``weight_packed`` (or the int8 ``weight``); the float32 weight is
    ``(q - zp) * scale`` exactly as ``freeze()`` computes it, whatever dtype the scales were saved in.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = tuple(linear.weight.shape)
    if "weight_packed" in tensors:
        codes = unpack_from_int32(tensors["weight_packed"], weights.num_bits, torch.Size(shape))
    else:
        codes = tensors["weight"]
    codes = codes.to(torch.int32) + signed_offset(weights.num_bits, weights.symmetric)
    scale = tensors["weight_scale"].float()
    rows = scale.numel()
    zp = tensors.get("weight_zero_point")
    if weights.symmetric or zp is None:
        zp = torch.zeros(rows, 1)
    else:
        if "weight_packed" in tensors:
            zp = unpack_from_int32(zp, weights.num_bits, scale.shape, packed_dim=0)
        zp = zp.float().reshape(rows, 1) + signed_offset(weights.num_bits, weights.symmetric)
    scale = scale.reshape(rows, 1)
    w = (as_rows(codes, weights.strategy, weights.group_size).float() - zp) * scale
    linear.weight.data = w.reshape(shape)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.float()
    m = QuantLinear(linear, weights, acts)
    m.weight_quantizer.scale, m.weight_quantizer.zero_point = scale, zp  # static from here: frozen
    if acts is not None and not acts.dynamic:
        m.input_quantizer.scale = tensors["input_scale"].float().reshape(1, 1)
        a_zp = tensors.get("input_zero_point")
        m.input_quantizer.zero_point = (torch.zeros(1, 1) if acts.symmetric or a_zp is None
                                        else a_zp.float().reshape(1, 1) + signed_offset(acts.num_bits, acts.symmetric))
    return m


def load_runtime(path: str | Path, compute_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype | None = None
                 ) -> tuple[nn.Module, dict[str, str]]:
    """Load a compressed-tensors export (ours, or any integer export with one config group) onto the
    integer kernels: ``(model, convert_to_runtime report)``.

    transformers / compressed-tensors load the checkpoint (decompressed, dense); each quantized linear is
    rebuilt as a frozen QuantLinear from its stored codes, scales and zero points and swapped for its
    kernel. ``dtype`` then casts the remaining dense weights (embeddings, norms, lm_head), e.g. bfloat16.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = Path(path)
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    groups = list(qcfg.get("config_groups", {}).values())
    if qcfg.get("quant_method") != "compressed-tensors" or len(groups) != 1:
        raise ExportError(f"{path}: not a single-group compressed-tensors export")

    def args_of(d: dict | None) -> QuantArgs | None:
        if not d:
            return None
        if d.get("type", "int") != "int":
            raise ExportError(f"{path}: only integer quantization has a runtime here, got {d.get('type')}")
        return QuantArgs(d["num_bits"], d["symmetric"], d["strategy"], d.get("group_size"), bool(d.get("dynamic")))

    weights, acts = args_of(groups[0].get("weights")), args_of(groups[0].get("input_activations"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype="auto", quantization_config=CompressedTensorsConfig(dequantize=True))
    model.eval()
    for name, tensors in _export_tensors(path).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, frozen_from_export(getattr(owner, child), tensors, weights, acts))
    report = convert_to_runtime(model, compute_dtype)
    if dtype is not None:
        for p in {id(p): p for p in model.parameters()}.values():
            p.data = p.data.to(dtype)
    return model, report
