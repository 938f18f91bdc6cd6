"""Online Kronecker-factored affine transforms (FlatQuant-style): a learnable invertible matrix on the input
of a group of linears, kept as an explicit online op at inference, its inverse folded into the weights.

Conventions (row vectors, ``y = x W^T``; ``W: [out, in]``). For a group of linears reading the same
channels ``x [..., n]`` (the attention norm -> q/k/v, the MLP norm -> gate/up, the down-projection input):

* online op: ``x -> x P`` with ``P = P1 (x) P2`` (``P1 [d1, d1]``, ``P2 [d2, d2]``, ``d1 d2 = n``,
  :func:`kron_sizes`: ``d1`` the largest divisor of ``n`` not above ``sqrt(n)``; 576 = 24 x 24,
  1536 = 32 x 48), applied as two small matmuls (:func:`~lrquant.quant.hadamard.kron_apply`), before
  the linear's input quantizer;
* fold: ``W <- W P^-T = W (P1^-T (x) P2^-T)`` on every linear of the group, computed in float64.

So ``(x P)(W P^-T)^T = x W^T``. At the v -> o pair the transform is per head: ``P = P_h (x) P_d`` over
o_proj's input ``[H * D]`` with ``P_d [D, D]`` folded into v's rows (every kv head: ``W_v,h <- P_d^T W_v,h``,
``b_v,h <- b_v,h P_d``; exact under GQA and attention, which mix value vectors over tokens only) and only
``P_h [H, H]`` (across heads) online: ``x -> x (P_h (x) I_D)``; ``W_o <- W_o P^-T``.

Invertibility by construction: each factor is ``U diag(exp(s)) V^T`` with ``U = exp(A - A^T)``,
``V = exp(B - B^T)`` orthogonal (matrix exponentials of skew-symmetric matrices), so its inverse is
``V diag(exp(-s)) U^T`` exactly, never a solve; the identity at initialisation (``A = B = 0``, ``s = 0``,
or ``s`` a diagonal init). The condition number is ``exp(max s - min s)``.

The transform composes with the diagonal ones (:class:`~lrquant.transforms.scale_shift.ScaleShift`
attached first: ``x/s -> P``, ``W diag(s) P^-T``) and with an existing fixed online op (the Hadamard of
the rotation pre-step on down_proj's input: ``x -> (x H) P``, ``W H P^-T``), because its weight
parametrization is registered after theirs. The online op itself is an :class:`OnlineKron` held as the
:class:`~lrquant.quant.quantizers.QuantLinear`'s ``input_transform``: while the block trains it computes its
factors from the transform's parameters (``live``); :func:`~lrquant.transforms.base.fold_block` freezes them
into its (persistent) ``factor0``/``factor1`` buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..arch.base import ArchMapping, SmoothPair
from ..quant.hadamard import kron_apply
from .base import OnlineOp, Transform, add_param, ensure_bias

KRON_KINDS = ("norm", "linear", "heads")
"""Pair kinds a :class:`KronAffine` can take: norm -> linears, up -> down (down's input), v -> o."""


def kron_sizes(n: int) -> tuple[int, int]:
    """``(d1, d2)`` with ``d1 d2 = n`` and ``d1`` the largest divisor of ``n`` with ``d1 <= sqrt(n)``."""
    d1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return d1, n // d1


class SVDFactor(nn.Module):
    """One invertible factor ``F = U diag(exp(s)) V^T [d, d]`` (``U``, ``V`` orthogonal, see module
    docstring). ``log_diag``: the initial ``s [d]`` (zeros: the identity)."""

    def __init__(self, d: int, log_diag: torch.Tensor | None = None) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(d, d))
        self.v = nn.Parameter(torch.zeros(d, d))
        self.s = nn.Parameter(torch.zeros(d) if log_diag is None else log_diag.detach().float().clone())

    def _parts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, V, s)`` computed in float64 for a float64 ``dtype``, else in float32 with autocast off
        (a bf16 matrix exponential's backward overflows), then cast to ``dtype``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.autocast(self.u.device.type, enabled=False):
            u, v = (torch.linalg.matrix_exp(a.to(work) - a.to(work).T) for a in (self.u, self.v))
            return u, v, self.s.to(work)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """``F [d, d]`` in ``dtype``."""
        u, v, s = self._parts(dtype)
        with torch.autocast(self.u.device.type, enabled=False):
            return ((u * s.exp()[None, :]) @ v.T).to(dtype)

    def inverse(self, dtype: torch.dtype) -> torch.Tensor:
        """``F^-1 [d, d] = V diag(exp(-s)) U^T`` in ``dtype`` (exact, no solve)."""
        u, v, s = self._parts(dtype)
        with torch.autocast(self.u.device.type, enabled=False):
            return ((v * (-s).exp()[None, :]) @ u.T).to(dtype)


class OnlineKron(OnlineOp):
    """Online op ``x [..., n * block] -> inner(x) (F_0 (x) ... (x) F_k (x) I_block)``.

    ``sizes``: the factor orders ``(d_0, ..., d_k)``; the factors are persistent buffers ``factor0``, ...
    (identity until learned), so checkpoints and ``qparams`` carry them. ``inner``: a fixed online op run
    first (the rotation pre-step's Hadamard), or ``None``. ``live``: while a block trains, a function
    ``dtype -> [F_j]`` computing the factors from the transform's parameters (see :meth:`fold_live`).
    """

    def __init__(self, sizes: tuple[int, ...], block: int = 1, inner: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.sizes, self.block, self.inner = tuple(sizes), block, inner
        for j, d in enumerate(self.sizes):
            self.register_buffer(f"factor{j}", torch.eye(d, dtype=dtype))
        self.live: Callable[[torch.dtype], list[torch.Tensor]] | None = None

    @property
    def commutes_with_scales(self) -> bool:
        """A diagonal transform attached before this op's own transform still folds exactly (no fixed
        ``inner`` op between the scales and ``P``)."""
        return self.inner is None

    def factors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        if self.live is not None:
            return self.live(dtype)
        return [getattr(self, f"factor{j}").to(dtype) for j in range(len(self.sizes))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            x = self.inner(x)
        return kron_apply(x, self.factors(x.dtype), self.block)

    @torch.no_grad()
    def fold_live(self) -> None:
        if self.live is None:
            return
        for j, f in enumerate(self.live(torch.float64)):
            buf = getattr(self, f"factor{j}")
            buf.copy_(f.to(device=buf.device, dtype=buf.dtype))
        self.live = None

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, block={self.block}"


def online_shape(pair: SmoothPair, mapping: ArchMapping, config, block: nn.Module) -> tuple[tuple[int, ...], int]:
    """``(factor sizes, block)`` of the online op on the consumers of ``pair``."""
    if pair.kind == "heads":
        n, _, hd = mapping.heads(config, block)
        return (n,), hd
    return kron_sizes(block.get_submodule(pair.nexts[0]).in_features), 1


def install_online(block: nn.Module, pair: SmoothPair, mapping: ArchMapping, config) -> list[OnlineKron]:
    """Give every consumer linear of ``pair`` its :class:`OnlineKron` input op (identity; idempotent). A
    fixed op already there (a Hadamard) becomes its ``inner``. Structure only (a resumed block's tensors
    are then loaded into it). Returns the ops, one per consumer."""
    sizes, per = online_shape(pair, mapping, config, block)
    ops = []
    for name in pair.nexts:
        lin = block.get_submodule(name)
        op = getattr(lin, "input_transform", None)
        if not isinstance(op, OnlineKron):
            op = OnlineKron(sizes, per, inner=op, dtype=lin.weight.dtype).to(lin.weight.device)
            lin.input_transform = op
        ops.append(op)
    return ops


class KronAffine(Transform):
    """Learnable ``P = P1 (x) P2`` (or ``P_h (x) P_d`` at ``heads``) for one pair, see the module docstring.
    ``log_diag``: initial ``log`` diagonals per factor (``None``: the identity). ``block``: the block the
    transform is for (head counts may differ per block)."""

    def __init__(self, pair: SmoothPair, mapping: ArchMapping, config, block: nn.Module,
                 log_diag: list[torch.Tensor] | None = None) -> None:
        super().__init__(pair, mapping)
        if pair.kind not in KRON_KINDS:
            raise ValueError(f"KronAffine takes pairs of kind {KRON_KINDS}, not {pair.kind!r}")
        self.config = config
        sizes, _ = online_shape(pair, mapping, config, block)
        if pair.kind == "heads":
            _, self.n_kv, hd = mapping.heads(config, block)
            sizes = (*sizes, hd)
        inits = log_diag if log_diag is not None else [None] * len(sizes)
        self.factor_modules = nn.ModuleList(SVDFactor(d, s) for d, s in zip(sizes, inits, strict=True))

    def learnable(self) -> dict[str, list[nn.Parameter]]:
        return {"kron": list(self.parameters())}

    def matrices(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [f.matrix(dtype) for f in self.factor_modules]

    def online_factors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The factors the online op applies (``heads``: ``P_h`` only; ``P_d`` is folded into v)."""
        return self.matrices(dtype)[:1] if self.pair.kind == "heads" else self.matrices(dtype)

    def inverse_transposes(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [f.inverse(dtype).T for f in self.factor_modules]

    def attach(self, block: nn.Module) -> None:
        for op in install_online(block, self.pair, self.mapping, self.config):
            op.live = self.online_factors
        for name in self.pair.nexts:
            add_param(block.get_submodule(name), "weight",
                      lambda w: kron_apply(w, self.inverse_transposes(w.dtype)))
        if self.pair.kind != "heads":
            return
        v = block.get_submodule(self.pair.prev)
        hd = self.factor_modules[1].s.shape[0]

        def v_rows(w: torch.Tensor) -> torch.Tensor:  # [KV * D, in] -> P_d^T W per kv head
            p_d = self.factor_modules[1].matrix(w.dtype)
            return (p_d.T @ w.reshape(self.n_kv, hd, -1)).reshape(w.shape)

        add_param(v, "weight", v_rows)
        if ensure_bias(v):
            add_param(v, "bias", lambda b: (b.reshape(self.n_kv, hd) @ self.factor_modules[1].matrix(b.dtype)
                                            ).reshape(-1))

    def extra_repr(self) -> str:
        sizes = "x".join(str(f.s.shape[0]) for f in self.factor_modules)
        return f"{self.pair.kind}: {self.pair.prev} -> {', '.join(self.pair.nexts)}, P {sizes}"


__all__ = ["KRON_KINDS", "KronAffine", "OnlineKron", "SVDFactor", "install_online", "kron_sizes"]
