"""Integer runtime kernels against the fake-quant reference.

Tolerances (``max|y - ref| / max|ref|``, reference = the frozen QuantLinear in float32):
weight-only kernels computing in bfloat16: 1e-2 (bf16 activations and scales; measured 2e-3 - 5e-3);
in float32: 1e-5; the int8 GEMM (exact integer products, float32 epilogue): 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from lrquant.config import QuantArgs, Scheme
from lrquant.export.kernels import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    convert_to_runtime,
    int4_kernel_group,
    load_runtime,
    weight_bytes,
)
from lrquant.methods.rtn import quantize_weights_rtn
from lrquant.quant.quantizers import QuantLinear

BF16_TOL, FP32_TOL, INT_GEMM_TOL = 1e-2, 1e-5, 1e-5
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def frozen(w: QuantArgs, a: QuantArgs | None = None, k: int = 256, n: int = 96, bias: bool = True,
           device: str = "cpu") -> QuantLinear:
    torch.manual_seed(0)
    m = QuantLinear(nn.Linear(k, n, bias=bias).to(device), w, a)
    m.freeze()
    return m


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


X = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))

INT4_ARGS = [
    QuantArgs(4, False, "group", 64), QuantArgs(4, True, "group", 32), QuantArgs(4, False, "channel"),
    QuantArgs(4, True, "channel"), QuantArgs(3, False, "group", 128), QuantArgs(2, True, "group", 32),
    QuantArgs(4, False, "group", 256), QuantArgs(4, True, "tensor"),
]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_TOL), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("args", INT4_ARGS, ids=lambda a: a.describe())
def test_int4_weight_only_matches_fake_quant(args, dtype, tol):
    m = frozen(args)
    k = Int4WeightOnlyLinear(m, dtype)
    y = k(X)
    assert y.shape == (3, 5, 96) and y.dtype == X.dtype
    assert max_rel(y, m(X)) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_TOL), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("args", [QuantArgs(8, False, "channel"), QuantArgs(8, True, "channel"),
                                  QuantArgs(6, False, "channel"), QuantArgs(8, True, "tensor")],
                         ids=lambda a: a.describe())
def test_int8_weight_only_matches_fake_quant(args, dtype, tol):
    m = frozen(args)
    assert max_rel(Int8WeightOnlyLinear(m, dtype)(X), m(X)) <= tol


W8A8_CASES = [
    (QuantArgs(8, True, "channel"), QuantArgs(8, False, "token", None, True)),
    (QuantArgs(8, False, "channel"), QuantArgs(8, False, "token", None, True)),
    (QuantArgs(8, False, "channel"), QuantArgs(8, True, "token", None, True)),
    (QuantArgs(6, False, "channel"), QuantArgs(6, False, "token", None, True)),
    (QuantArgs(4, True, "channel"), QuantArgs(4, False, "token", None, True)),
    (QuantArgs(8, True, "tensor"), QuantArgs(8, False, "tensor", None, True)),
]


@pytest.mark.parametrize("w,a", W8A8_CASES, ids=lambda a: a.describe())
def test_int8_gemm_matches_fake_quant(w, a):
    m = frozen(w, a)
    assert max_rel(Int8DynamicLinear(m)(X), m(X)) <= INT_GEMM_TOL


def test_int8_gemm_static_activations():
    m = frozen(QuantArgs(8, True, "channel"), QuantArgs(8, False, "tensor"))
    m(X)  # observe
    m.input_quantizer.freeze()
    assert max_rel(Int8DynamicLinear(m)(X), m(X)) <= INT_GEMM_TOL


def test_int4_kernel_group_rules():
    assert int4_kernel_group(QuantArgs(4, False, "group", 512), 1024, 64) == 256  # repeated scales
    assert int4_kernel_group(QuantArgs(4, False, "channel"), 576, 64) == 64
    assert int4_kernel_group(QuantArgs(4, False, "group", 16), 256, 64) is None
    assert int4_kernel_group(QuantArgs(4, False, "group", 64), 256, 72) is None  # out % 16
    assert int4_kernel_group(QuantArgs(8, False, "channel"), 256, 64) is None


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
# whole tiny model, logits: weight-only kernels in bf16 (errors add up over 14 linears), int8 GEMM exact
MODEL_CASES = [
    (Scheme.from_bits(4, 16, 32), "Int4WeightOnlyLinear", 3e-2),
    (Scheme.from_bits(3, 16, 32, w_symmetric=True), "Int4WeightOnlyLinear", 3e-2),
    (Scheme.from_bits(8, 16), "Int8WeightOnlyLinear", 3e-2),
    (Scheme.from_bits(8, 8, kv_bits=16), "Int8DynamicLinear", 1e-4),
]


def quantized_tiny_llama(scheme: Scheme) -> nn.Module:
    return quantize_weights_rtn(tiny_llama(hidden=64), scheme)


def test_convert_to_runtime_tiny_llama():
    """Whole model: every decoder linear swapped, logits close to the fake-quant model, less memory."""
    for scheme, kernel, tol in MODEL_CASES:
        model = quantized_tiny_llama(scheme)
        ids = IDS
        with torch.no_grad():
            ref = model(ids).logits
        before = weight_bytes(model.model.layers)
        report = convert_to_runtime(model)
        assert len(report) == 14 and set(report.values()) == {kernel}, report
        with torch.no_grad():
            y = model(ids).logits
        assert max_rel(y, ref) <= tol, (kernel, max_rel(y, ref))
        assert weight_bytes(model.model.layers) < 0.4 * before


@pytest.mark.parametrize("scheme,kernel,tol", MODEL_CASES, ids=lambda v: v.name() if isinstance(v, Scheme) else None)
def test_load_runtime_from_export(tmp_path, scheme, kernel, tol):
    """Export -> load_runtime: the integer kernels run the checkpoint like the in-memory fake-quant model."""
    from lrquant.export.compressed import export_compressed

    model = quantized_tiny_llama(scheme)
    with torch.no_grad():
        ref = model(IDS).logits
    runtime, report = load_runtime(export_compressed(model, scheme, tmp_path / "export"))
    assert len(report) == 14 and set(report.values()) == {kernel}, report
    with torch.no_grad():
        assert max_rel(runtime(IDS).logits, ref) <= tol


def test_load_runtime_half_precision_export(tmp_path):
    """Scales saved in float16: the codes still come back exactly (read from the packed words)."""
    from lrquant.export.compressed import export_compressed

    scheme = Scheme.from_bits(4, 16, 32)
    model = quantized_tiny_llama(scheme)
    with torch.no_grad():
        ref = model(IDS).logits
    out = export_compressed(model, scheme, tmp_path / "export", dtype=torch.float16)
    runtime, report = load_runtime(out, dtype=torch.bfloat16)
    assert set(report.values()) == {"Int4WeightOnlyLinear"}
    with torch.no_grad():
        assert max_rel(runtime(IDS).logits, ref) <= 3e-2


def test_unsupported_layout_is_kept():
    model = nn.Sequential(frozen(QuantArgs(8, False, "group", 32)))  # int8 op is per-channel only
    report = convert_to_runtime(model)
    assert report == {"0": "kept: 8b-g32-asym"} and isinstance(model[0], QuantLinear)


# ---- CUDA ----------------------------------------------------------------------------------------------
@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("args", [QuantArgs(4, False, "group", 128), QuantArgs(4, True, "channel")],
                         ids=lambda a: a.describe())
def test_cuda_int4_weight_only(args):
    m = frozen(args, k=1024, n=256, device="cuda")
    x = X.new_empty(7, 1024).normal_().cuda()
    k = Int4WeightOnlyLinear(m)
    assert k.cuda_layout
    assert max_rel(k(x), m(x)) <= BF16_TOL


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 40])
def test_cuda_int8_gemm(rows):
    m = frozen(QuantArgs(8, True, "channel"), QuantArgs(8, False, "token", None, True), k=1024, n=256,
               device="cuda")
    x = torch.randn(rows, 1024, device="cuda")
    assert max_rel(Int8DynamicLinear(m)(x), m(x)) <= INT_GEMM_TOL
