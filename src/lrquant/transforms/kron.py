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

At the q/k pair (scores ``q k^T`` after RoPE, what a quantized KV cache stores) nothing folds: RoPE sits
between k_proj and the cache. There the transform is per kv head and entirely online (:class:`OnlineQK`,
:class:`QKKron`): ``k -> k P_g``, ``q -> q P_g^-T`` for the query heads of group ``g``, ``P_g = P1_g (x) P2_g``
over ``head_dim`` (64 = 8 x 8), before the Q/K fake quantizers; ``(q P^-T)(k P)^T = q k^T``.

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
    docstring), or ``heads`` independent ones ``[heads, d, d]`` (``heads > 0``: one per kv head).
    ``log_diag``: the initial ``s`` (``[d]``, or ``[heads, d]``; ``None``: zeros, the identity)."""

    def __init__(self, d: int, log_diag: torch.Tensor | None = None, heads: int = 0) -> None:
        super().__init__()
        batch = (heads,) if heads else ()
        self.u = nn.Parameter(torch.zeros(*batch, d, d))
        self.v = nn.Parameter(torch.zeros(*batch, d, d))
        self.s = nn.Parameter(torch.zeros(*batch, d) if log_diag is None else log_diag.detach().float().clone())

    def _parts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, V, s)`` computed in float64 for a float64 ``dtype``, else in float32 with autocast off
        (a bf16 matrix exponential's backward overflows), then cast to ``dtype``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.autocast(self.u.device.type, enabled=False):
            u, v = (torch.linalg.matrix_exp(a.to(work) - a.to(work).mT) for a in (self.u, self.v))
            return u, v, self.s.to(work)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """``F [d, d]`` (``[heads, d, d]``) in ``dtype``."""
        u, v, s = self._parts(dtype)
        with torch.autocast(self.u.device.type, enabled=False):
            return ((u * s.exp()[..., None, :]) @ v.mT).to(dtype)

    def inverse(self, dtype: torch.dtype) -> torch.Tensor:
        """``F^-1 [d, d] = V diag(exp(-s)) U^T`` (``[heads, d, d]``) in ``dtype`` (exact, no solve)."""
        u, v, s = self._parts(dtype)
        with torch.autocast(self.u.device.type, enabled=False):
            return ((v * (-s).exp()[..., None, :]) @ u.mT).to(dtype)


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


def head_kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x [B, KV, M, d0 * d1] -> x (F0_g (x) F1_g)`` per head ``g`` (``F_j [KV, d_j, d_j]``): two small
    batched GEMMs, ``d0 + d1`` multiply-adds per element. Computed in ``x.dtype``."""
    f0, f1 = (f.to(device=x.device, dtype=x.dtype) for f in factors)
    y = x.reshape(*x.shape[:-1], f0.shape[-1], f1.shape[-1])
    y = torch.einsum("bkmij,kia->bkmaj", y, f0)
    return torch.einsum("bkmaj,kjc->bkmac", y, f1).reshape(x.shape)


class OnlineQK(OnlineOp):
    """Online op on the attention scores' operands after RoPE, per kv head ``g``:
    ``key [B, KV, L, D] -> key P_g`` and ``query [B, H, L, D] -> query P_g^-T`` (each query head with the
    kv head of its GQA group), ``P_g = F0_g (x) F1_g`` with ``D = d0 d1`` (:func:`kron_sizes`), so
    ``q k^T`` is unchanged. Held as the :class:`~lrquant.quant.attention.AttentionQuantizer`'s
    ``input_transform`` (run before the Q/K fake quantizers). Persistent buffers ``kfactor0``,
    ``kfactor1`` (``[KV, d_j, d_j]``: ``P``'s factors, applied to keys) and ``qfactor0``, ``qfactor1``
    (``P^-T``'s factors, applied to queries), identity until learned; ``live``: while a block trains, a
    function ``dtype -> (key factors, query factors)`` computing them from :class:`QKKron`'s parameters."""

    NAMES = ("kfactor0", "kfactor1", "qfactor0", "qfactor1")

    def __init__(self, heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, d in zip(self.NAMES, kron_sizes(head_dim) * 2, strict=True):
            self.register_buffer(name, torch.eye(d, dtype=dtype).repeat(heads, 1, 1))
        self.live: Callable[[torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def factors(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([F0 [KV, d0, d0], F1], [F0^-T, F1^-T])`` in ``dtype``."""
        if self.live is not None:
            return self.live(dtype)
        k0, k1, q0, q1 = (getattr(self, n).to(dtype) for n in self.NAMES)
        return [k0, k1], [q0, q1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors by buffer name (``[KV, d_j, d_j]``, the buffers' dtype; computed while ``live``)."""
        kf, qf = self.factors(self.kfactor0.dtype)
        return {n: f.detach().contiguous() for n, f in zip(self.NAMES, [*kf, *qf], strict=True)}

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query [B, H, L, D], key [B, KV, L, D]) -> (query P^-T, key P)``, same shapes."""
        kf, qf = self.factors(query.dtype)
        b, kv = key.shape[:2]
        q = head_kron_apply(query.reshape(b, kv, -1, query.shape[-1]), qf)  # a group's heads are adjacent
        return q.reshape(query.shape), head_kron_apply(key, kf)

    @torch.no_grad()
    def fold_live(self) -> None:
        if self.live is None:
            return
        kf, qf = self.live(torch.float64)
        for name, f in zip(self.NAMES, [*kf, *qf], strict=True):
            buf = getattr(self, name)
            buf.copy_(f.to(device=buf.device, dtype=buf.dtype))
        self.live = None

    def extra_repr(self) -> str:
        heads, d0, _ = self.kfactor0.shape
        return f"heads={heads}, sizes=({d0}, {self.kfactor1.shape[-1]})"


def install_online_qk(block: nn.Module, mapping: ArchMapping, config) -> OnlineQK:
    """Give ``block``'s attention quantizer (set up for a quantized KV cache) its :class:`OnlineQK`
    (identity; idempotent). Structure only (a resumed block's tensors are then loaded into it)."""
    quantizer = getattr(block.get_submodule(mapping.attention), "attn_quantizer", None)
    if quantizer is None:
        raise ValueError("the q/k online op needs the attention quantizer of a quantized KV cache")
    if not isinstance(quantizer.input_transform, OnlineQK):
        _, kv, hd = mapping.heads(config, block)
        weight = block.get_submodule(mapping.q).weight
        quantizer.input_transform = OnlineQK(kv, hd, dtype=weight.dtype).to(weight.device)
    return quantizer.input_transform


def restore_online_qk(quantizer: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put back the :class:`OnlineQK` whose buffers ``tensors`` hold as ``<name>.input_transform.<buffer>``
    (``name``: the attention quantizer's path); nothing when they are absent."""
    keys = [f"{name}.input_transform.{n}" for n in OnlineQK.NAMES]
    if keys[0] not in tensors:
        return
    k0, k1 = tensors[keys[0]], tensors[keys[1]]
    op = OnlineQK(k0.shape[0], k0.shape[-1] * k1.shape[-1], dtype=k0.dtype)
    with torch.no_grad():
        for n, key in zip(OnlineQK.NAMES, keys, strict=True):
            getattr(op, n).copy_(tensors[key])
    quantizer.input_transform = op


class QKKron(Transform):
    """Learnable ``P_g = P1_g (x) P2_g`` per kv head on the queries and keys after RoPE (see
    :class:`OnlineQK`): nothing folds (RoPE sits between k_proj and ``P``), the whole transform is the
    online op. ``log_diag``: initial ``log`` diagonals ``([KV, d1], [KV, d2])`` (``None``: the identity)."""

    def __init__(self, mapping: ArchMapping, config, block: nn.Module,
                 log_diag: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(SmoothPair(mapping.q, (mapping.k,), "qk"), mapping)
        self.config = config
        _, kv, hd = mapping.heads(config, block)
        inits = log_diag if log_diag is not None else (None, None)
        self.factor_modules = nn.ModuleList(SVDFactor(d, s, heads=kv)
                                            for d, s in zip(kron_sizes(hd), inits, strict=True))

    def learnable(self) -> dict[str, list[nn.Parameter]]:
        return {"kron": list(self.parameters())}

    def factors(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([P1, P2], [P1^-T, P2^-T])``, each ``[KV, d_j, d_j]`` in ``dtype``."""
        return ([f.matrix(dtype) for f in self.factor_modules],
                [f.inverse(dtype).mT for f in self.factor_modules])

    def attach(self, block: nn.Module) -> None:
        install_online_qk(block, self.mapping, self.config).live = self.factors

    def extra_repr(self) -> str:
        heads, d1 = self.factor_modules[0].s.shape
        return f"qk after RoPE: {heads} kv heads, P {d1}x{self.factor_modules[1].s.shape[-1]}"


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


__all__ = ["KRON_KINDS", "KronAffine", "OnlineKron", "OnlineQK", "QKKron", "SVDFactor", "head_kron_apply",
           "install_online", "install_online_qk", "kron_sizes", "restore_online_qk"]
