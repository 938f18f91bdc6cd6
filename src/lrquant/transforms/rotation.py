"""Rotation pre-step (QuaRot-style ``--rotate hadamard``): an orthogonal change of basis of the residual
stream, fused into the weights, plus online Hadamard rotations where no fold is possible.

Conventions (row vectors, as ``nn.Linear`` computes ``y = x W^T + b``; ``W: [out, in]``):

* **Residual rotation** ``Q: [H, H]`` (randomized Hadamard, orthonormal). Every residual-stream vector
  ``r`` becomes ``r Q``. Embeddings ``E <- E Q`` (rows); linears *reading* the residual through a norm
  (q, k, v, MLP inputs, the head) ``W <- W Q``; linears *writing* it (o, MLP output)
  ``W <- Q^T W``, ``b <- Q^T b``. This is exact because an RMSNorm without gain commutes with ``Q``:
  ``rms(r Q) = rms(r)``. So the norms are first made *pure* normalizations (:func:`fuse_norms`: gain
  folded into the following linears, the gain set to 1, or 0 for Gemma's ``(1 + w)`` norms).
* **Online Hadamard on the down-projection input** ``H_I: [I, I]``: ``x -> x H_I`` runs at inference
  (:class:`OnlineHadamard`, kept as ``down_proj.input_transform``) and ``W_down <- W_down H_I``, so
  ``(x H_I)(W_down H_I)^T = x W_down^T``. It spreads the activation outliers of the MLP's inner
  channels before the input quantizer sees them (``act(gate) * up`` is not linear: no fold exists).
* **Optional value path** (``online_value=True``): a per-head Hadamard ``H_d`` fused into the rows of
  v (``W_v <- (I_kv (x) H_d)^T W_v``; exact under GQA: every query head of a group reads the same
  rotated v head), an online ``H_nh (x) I_d`` across heads on o_proj's input, and
  ``W_o <- W_o (H_nh (x) H_d)``. o_proj's input is then fully Hadamard-rotated, as in QuaRot.

Supported: RMSNorm families without sandwich norms (Llama / Mistral / SmolLM2, Qwen2, Qwen3 — QK-norm
acts inside the heads after q/k and is unaffected). Refused with :class:`UnsupportedArchitectureError`:

* LayerNorm models (OPT, the ViT family): LayerNorm subtracts the per-token mean, which commutes with
  ``Q`` only if ``Q`` maps the all-ones direction to itself. SliceGPT/QuaRot handle it by centring
  every residual writer and replacing LayerNorm by RMSNorm; that changes the module types the mapping
  and the export describe, so it is not done here.
* sandwich norms (Gemma3's post-attention / post-feedforward norms): they normalize a branch output and
  multiply by a per-channel gain *after* which the branch is added to the residual, with no linear left
  to absorb ``Q``; ``norm(z Q) g != norm(z) g Q`` unless ``g`` is constant.

After rotation, the smooth pairs whose consumer has an online input transform (up -> down, and v -> o
with ``online_value``) are no longer diagonal folds: :func:`pairs_without_online_inputs` drops them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.base import ArchMapping, SmoothPair, set_submodule
from ..errors import ConfigError, UnsupportedArchitectureError
from ..quant.quantizers import QuantLinear

MAX_FACTOR = 128
"""Largest Sylvester Kronecker factor applied as one GEMM by :func:`kron_apply`."""

FALLBACK_SEED = 0
"""Seed of the random orthogonal factor used where no Hadamard matrix of the needed order is known, so
that the same size always gives the same matrix (an exporter can rebuild it from the size alone)."""


# ---------------------------------------------------------------------------------------------- matrices
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``[q, q]`` float64 Jacobsthal matrix ``J[i, j] = chi(j - i)`` (quadratic character mod prime q)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(order: int) -> torch.Tensor | None:
    """A ``[order, order]`` ±1 Hadamard matrix by Paley's constructions over a prime field, or None.

    Paley I: ``order = q + 1``, q prime, q = 3 mod 4. Paley II: ``order = 2 (q + 1)``, q prime,
    q = 1 mod 4. (Covers 12, 20, 24, 28, 36, 44, 48, 60, 72, 76, ...: e.g. 576 = 36 x 16, 1536 = 12 x 128.)
    """
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + s
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """``[m, m]`` float64 Haar-random orthogonal matrix: QR of a seeded Gaussian, signs fixed by diag(R)."""
    g = torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def sylvester(p: int) -> torch.Tensor:
    """``[p, p]`` float64 orthonormal Sylvester Hadamard matrix (``p`` a power of two), symmetric."""
    if p < 1 or p & (p - 1):
        raise ConfigError(f"Sylvester Hadamard needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(base, h)
    return h / math.sqrt(p)


def hadamard_factors(n: int) -> tuple[torch.Tensor, int, str]:
    """Factor the order-``n`` rotation as ``A (x) S_p``: ``(A [m, m] float64 orthonormal, p, description)``
    with ``n = m p``, ``S_p`` the orthonormal Sylvester matrix of power-of-two order ``p``.

    ``A`` is the smallest Paley Hadamard matrix ``m = (odd part of n) * 2^t`` admits (``m = 1``: pure
    Sylvester). When no Hadamard matrix of any such order is known here (e.g. odd ``n`` > 1 such as 9
    heads, or 2 x odd: no Hadamard matrix of those orders exists), ``A`` is a random orthogonal matrix of
    the odd part (QR of a Gaussian seeded with :data:`FALLBACK_SEED`): still an exact rotation, but its
    entries are not all ``±1/sqrt(n)``.
    """
    if n < 1:
        raise ConfigError(f"rotation size must be positive, got {n}")
    a, p, desc = _factors(n)
    return a.clone(), p, desc


@functools.lru_cache(maxsize=64)
def _factors(n: int) -> tuple[torch.Tensor, int, str]:
    p = n & -n
    odd = n // p
    if odd == 1:
        return torch.ones(1, 1, dtype=torch.float64), n, f"sylvester({n})"
    m = odd
    while m <= n:
        h = _paley(m)
        if h is not None:
            return h / math.sqrt(m), n // m, f"paley({m}) x sylvester({n // m})"
        m *= 2
    return _random_orthogonal(odd, FALLBACK_SEED), p, f"random-orthogonal({odd}) x sylvester({p})"


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``[n]`` float64 of ±1 drawn from a generator seeded with ``seed``."""
    bits = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))
    return bits.to(torch.float64) * 2 - 1


def hadamard_matrix(n: int, seed: int | None = None) -> torch.Tensor:
    """``[n, n]`` float64 orthonormal rotation ``D (A (x) S_p)`` (see :func:`hadamard_factors`).

    ``seed=None``: plain (``D = I``); else randomized Hadamard: ``D = diag(random_signs(n, seed))``.
    A true Hadamard matrix scaled by ``1/sqrt(n)`` whenever ``hadamard_factors`` finds one.
    """
    a, p, _ = hadamard_factors(n)
    h = torch.kron(a, sylvester(p))
    if seed is not None:
        h = random_signs(n, seed)[:, None] * h
    return h


def kron_factors(n: int) -> list[torch.Tensor]:
    """The order-``n`` plain rotation ``A (x) S_p`` as a list of float64 Kronecker factors, each of order
    at most :data:`MAX_FACTOR` for the Sylvester part (``S_p = S_q1 (x) S_q2 (x) ...``); empty for n=1."""
    a, p, _ = hadamard_factors(n)
    factors = [a] if a.shape[0] > 1 else []
    while p > 1:
        q = min(p, MAX_FACTOR)
        factors.append(sylvester(q))
        p //= q
    return factors


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor], block: int = 1) -> torch.Tensor:
    """``x [..., d_0 * ... * d_k * block] -> x (F_0 (x) ... (x) F_k (x) I_block)`` for square factors
    ``F_j [d_j, d_j]``: one small GEMM per factor along its axis, ``sum_j d_j`` multiply-adds per element
    instead of ``prod_j d_j`` for the dense matrix (e.g. 36 + 16 instead of 576). Computed in
    ``x.dtype`` (a fast Walsh-Hadamard transform would need ``log2 p`` memory-bound passes; on CPU a few
    GEMMs are faster)."""
    if not factors:
        return x
    y = x.reshape(-1, *(f.shape[0] for f in factors), block)
    for j, f in enumerate(factors):
        y = (y.movedim(j + 1, -1) @ f.to(device=y.device, dtype=y.dtype)).movedim(-1, j + 1)
    return y.reshape(x.shape)


def hadamard_rotate(x: torch.Tensor, seed: int | None = None, block: int = 1) -> torch.Tensor:
    """``x [..., n * block] -> x (hadamard_matrix(n, seed) (x) I_block)`` without forming the matrix
    (randomized: the signs ``D`` first, then :func:`kron_apply`). Computed in ``x.dtype``."""
    n = x.shape[-1] // block
    if seed is not None:
        x = x * random_signs(n, seed).to(device=x.device, dtype=x.dtype).repeat_interleave(block)
    return kron_apply(x, kron_factors(n), block)


class OnlineHadamard(nn.Module):
    """Online rotation of the last dim: ``x [..., size * block] -> x (H_size (x) I_block)``.

    ``H_size`` is the plain (unrandomized) :func:`hadamard_matrix` of ``size``, applied by
    :func:`kron_apply` from its :func:`kron_factors`, kept as non-persistent buffers ``factor0``,
    ``factor1``, ... (checkpoints are unchanged). ``block > 1`` rotates across groups of ``block``
    contiguous channels (across heads).
    """

    def __init__(self, size: int, block: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        factors = kron_factors(size)
        self.size, self.block, self.construction = size, block, hadamard_factors(size)[2]
        self.n_factors = len(factors)
        for j, f in enumerate(factors):
            self.register_buffer(f"factor{j}", f.to(dtype), persistent=False)

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{j}") for j in range(self.n_factors)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, self.factors(), self.block)

    def matrix(self) -> torch.Tensor:
        """The dense ``[size * block, size * block]`` float64 matrix this module multiplies by."""
        h = torch.eye(1, dtype=torch.float64)
        for f in self.factors():
            h = torch.kron(h, f.double().cpu())
        return torch.kron(h, torch.eye(self.block, dtype=torch.float64))

    def spec(self) -> dict[str, int | str]:
        """What an exporter / results.json needs: ``{"size", "block", "construction"}``."""
        return {"size": self.size, "block": self.block, "construction": self.construction}

    def extra_repr(self) -> str:
        return f"size={self.size}, block={self.block}, {self.construction}"


class OnlineRotatedLinear(nn.Linear):
    """``nn.Linear`` that applies ``input_transform`` to its input: ``y = F.linear(T(x), W, b)``.

    Same parameter names (``weight [out, in]``, ``bias [out]``), shared with the linear it replaces, so
    the FP model is exact before quantization; :class:`QuantLinear` picks up ``input_transform`` when it
    wraps this module and keeps applying it (before its input quantizer).
    """

    def __init__(self, linear: nn.Linear, input_transform: nn.Module) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_transform = input_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


# -------------------------------------------------------------------------------------------- checks
def rotation_problem(model: nn.Module, mapping: ArchMapping) -> str | None:
    """Why ``model`` cannot be rotated exactly (None when it can)."""
    if mapping.stages is not None:
        return ("rotation needs one residual stream width; stage transitions (patch merging) change it "
                "between stages")
    if mapping.norm_kind == "layer":
        return ("rotation needs RMSNorm; LayerNorm subtracts the mean, which a residual rotation does not "
                "preserve (SliceGPT-style conversion to RMSNorm is not implemented)")
    if mapping.post_attn_norm is not None or mapping.post_mlp_norm is not None:
        return ("sandwich norms (post-attention/post-MLP) scale the branch output per channel after "
                "normalizing it, with no linear left to absorb the rotation")
    if mapping.head is None or mapping.embed_tokens is None:
        return "rotation needs the embeddings and the LM head to absorb it (bare base model given)"
    for path in _all_linears(model, mapping):
        m = model.get_submodule(path)
        if isinstance(m, (QuantLinear, OnlineRotatedLinear)) or not isinstance(m, nn.Linear):
            return f"{path} is a {type(m).__name__}: rotate once, before quantizing"
    return None


def _all_linears(model: nn.Module, mapping: ArchMapping) -> list[str]:
    paths = [f"{name}.{lin}" for name, _ in mapping.block_list(model) for lin in mapping.linears()]
    return [*paths, mapping.head] if mapping.head is not None else paths


def _check(model: nn.Module, mapping: ArchMapping) -> None:
    problem = rotation_problem(model, mapping)
    if problem:
        raise UnsupportedArchitectureError(f"{mapping.family}: {problem}")


# ------------------------------------------------------------------------------------- weight updates
def _set(t: torch.Tensor, value: torch.Tensor) -> None:
    t.copy_(value.to(t.dtype))


Rotation = Callable[[torch.Tensor], torch.Tensor]
"""``R(x) = x M`` on the last dim for an orthogonal ``M`` (float64 in, float64 out)."""


def _mul_in(linear: nn.Linear, rot: Rotation) -> None:
    """Input side: ``W <- W M``, computed in float64."""
    _set(linear.weight, rot(linear.weight.double()))


def _mul_out(linear: nn.Linear, rot: Rotation) -> None:
    """Output side: ``W <- M^T W`` (``= (W^T M)^T``), ``b <- M^T b``, computed in float64."""
    _set(linear.weight, rot(linear.weight.double().T).T)
    if linear.bias is not None:
        _set(linear.bias, rot(linear.bias.double()))


def _norm_gain(norm: nn.Module, kind: str) -> torch.Tensor | None:
    """The per-channel gain ``[H]`` float64 the norm multiplies by (None: no weight)."""
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    return 1.0 + w.double() if kind == "rms_plus_one" else w.double()


def untie_head(model: nn.Module, mapping: ArchMapping) -> bool:
    """Give the head its own weight if it shares the embedding's (True when it did); the configs say
    ``tie_word_embeddings=False`` afterwards so nothing ties them again and both are saved."""
    head, emb = model.get_submodule(mapping.head), model.get_submodule(mapping.embed_tokens)
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
        for c in configs:
            if hasattr(c, "tie_word_embeddings"):
                c.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


@torch.no_grad()
def fuse_norms(model: nn.Module, mapping: ArchMapping) -> None:
    """Fold every pre-norm's gain into the linears it feeds (``W <- W diag(g)``, float64) and make the
    norm a pure normalization (weight 1; 0 for ``rms_plus_one``): attention norm -> q, k, v; MLP norm
    -> MLP inputs; final norm -> head (untied from the embeddings first). Exact; the logits do not change.

    Refuses LayerNorm models (:class:`UnsupportedArchitectureError`): only RMS norms are handled.
    Sandwich norms (no linear after them) are left as they are.
    """
    if mapping.norm_kind == "layer":
        raise UnsupportedArchitectureError(f"{mapping.family}: fuse_norms handles RMS norms only, not LayerNorm")
    identity = 0.0 if mapping.norm_kind == "rms_plus_one" else 1.0
    pairs: list[tuple[nn.Module, list[nn.Linear]]] = []
    for _, block in mapping.block_list(model):
        pairs.append((block.get_submodule(mapping.attn_norm),
                      [block.get_submodule(p) for p in (mapping.q, mapping.k, mapping.v)]))
        pairs.append((block.get_submodule(mapping.mlp_norm), [block.get_submodule(p) for p in mapping.mlp_in]))
    if mapping.final_norm is not None and mapping.head is not None:
        untie_head(model, mapping)
        pairs.append((model.get_submodule(mapping.final_norm), [model.get_submodule(mapping.head)]))
    for norm, linears in pairs:
        gain = _norm_gain(norm, mapping.norm_kind)
        if gain is None:
            continue
        for linear in linears:
            _set(linear.weight, linear.weight.double() * gain.to(linear.weight.device)[None, :])
        norm.weight.fill_(identity)


# ------------------------------------------------------------------------------------------- rotation
@torch.no_grad()
def rotate_model(model: nn.Module, mapping: ArchMapping, seed: int = 0, online_value: bool = False) -> list[str]:
    """Rotate ``model`` in place (module docstring): fuse the norms, rotate the residual stream by the
    randomized Hadamard ``hadamard_matrix(hidden, seed)``, add the online Hadamard on every MLP
    output-projection input (and, with ``online_value``, the value/o_proj rotation).

    Returns the module paths of the online ops it added (``...mlp.down_proj.input_transform``, ...).
    Raises :class:`UnsupportedArchitectureError` for families where the rotation is not exact and for
    models already rotated or quantized.
    """
    _check(model, mapping)
    fuse_norms(model, mapping)
    return _rotate_fused(model, mapping, seed, online_value)


@torch.no_grad()
def _rotate_fused(model: nn.Module, mapping: ArchMapping, seed: int, online_value: bool) -> list[str]:
    """The rotation proper; exact only once the norms are pure normalizations (:func:`fuse_norms`)."""

    def resid(x: torch.Tensor) -> torch.Tensor:  # x Q, Q = hadamard_matrix(hidden, seed)
        return hadamard_rotate(x, seed)

    emb = model.get_submodule(mapping.embed_tokens)
    _set(emb.weight, resid(emb.weight.double()))
    _mul_in(model.get_submodule(mapping.head), resid)
    online: list[str] = []
    for prefix, block in mapping.block_list(model):
        for path in (mapping.q, mapping.k, mapping.v, *mapping.mlp_in):
            _mul_in(block.get_submodule(path), resid)
        o, down = block.get_submodule(mapping.o), block.get_submodule(mapping.mlp_out)
        _mul_out(o, resid)
        _mul_out(down, resid)

        h_int = OnlineHadamard(down.in_features, dtype=down.weight.dtype).to(down.weight.device)
        _mul_in(down, hadamard_rotate)
        set_submodule(block, mapping.mlp_out, OnlineRotatedLinear(down, h_int))
        online.append(f"{prefix}.{mapping.mlp_out}.input_transform")

        if online_value:
            n_heads, _, head_dim = mapping.heads(model.config, block)
            _rotate_value(block, mapping, n_heads, head_dim)
            online.append(f"{prefix}.{mapping.o}.input_transform")
    return online


def _rotate_value(block: nn.Module, mapping: ArchMapping, n_heads: int, head_dim: int) -> None:
    """Per-head ``H_d`` fused into v's rows (and bias), ``H_nh (x) I_d`` online on o_proj's input,
    ``W_o <- W_o (H_nh (x) H_d)``."""
    v, o = block.get_submodule(mapping.v), block.get_submodule(mapping.o)

    def per_head(x: torch.Tensor) -> torch.Tensor:  # x (I_kv (x) H_d)
        return hadamard_rotate(x.reshape(*x.shape[:-1], -1, head_dim)).reshape(x.shape)

    def heads_then_within(x: torch.Tensor) -> torch.Tensor:  # x (H_nh (x) H_d) = x (I (x) H_d)(H_nh (x) I)
        return hadamard_rotate(per_head(x), block=head_dim)

    _mul_out(v, per_head)
    _mul_in(o, heads_then_within)
    across = OnlineHadamard(n_heads, block=head_dim, dtype=o.weight.dtype).to(o.weight.device)
    set_submodule(block, mapping.o, OnlineRotatedLinear(o, across))


def online_specs(model: nn.Module) -> dict[str, dict[str, int | str]]:
    """``{module path: OnlineHadamard.spec()}`` for every online rotation in ``model`` (for results/export)."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, OnlineHadamard)}


def attach_online(model: nn.Module, specs: dict[str, dict[str, int | str]]) -> None:
    """Re-create the online rotations :func:`online_specs` listed, e.g. on a rotated checkpoint reloaded
    with ``from_pretrained``: its weights are rotated but the ops (non-persistent) are not in it."""
    for path, spec in specs.items():
        linear_path = path.removesuffix(".input_transform")
        linear = model.get_submodule(linear_path)
        if not isinstance(linear, nn.Linear) or getattr(linear, "input_transform", None) is not None:
            raise ConfigError(f"{linear_path}: expected a plain linear without an online op to attach to")
        w = linear.weight
        op = OnlineHadamard(int(spec["size"]), int(spec["block"]), dtype=w.dtype).to(w.device)
        if op.construction != spec["construction"]:
            raise ConfigError(f"{path}: cannot rebuild {spec['construction']!r} (builds {op.construction!r})")
        set_submodule(model, linear_path, OnlineRotatedLinear(linear, op))


def pairs_without_online_inputs(pairs: Iterable[SmoothPair], block: nn.Module) -> tuple[SmoothPair, ...]:
    """The pairs a diagonal transform can still fold into after rotation: those whose consumers have no
    online ``input_transform`` (a per-channel scale does not commute with the online rotation)."""
    return tuple(p for p in pairs
                 if all(getattr(block.get_submodule(n), "input_transform", None) is None for n in p.nexts))
