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

This module is the model surgery; the Hadamard maths (constructions, randomization, the online
:class:`~lrquant.quant.hadamard.OnlineHadamard`) is :mod:`lrquant.quant.hadamard`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.base import ArchMapping, SmoothPair, set_submodule
from ..errors import ConfigError, UnsupportedArchitectureError
from ..quant.hadamard import OnlineHadamard, hadamard_rotate
from ..quant.quantizers import QuantLinear


# ------------------------------------------------------------------------------------------ online op
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
def rotate_model(model: nn.Module, mapping: ArchMapping, seed: int = 0, online_value: bool = False,
                 residual: Callable[[nn.Module], torch.Tensor] | None = None) -> list[str]:
    """Rotate ``model`` in place (module docstring): fuse the norms, rotate the residual stream by the
    randomized Hadamard ``hadamard_matrix(hidden, seed)`` (or by ``residual(model)``: a float64 orthogonal
    ``[H, H]`` computed on the norm-fused model, e.g. a learned rotation,
    :mod:`lrquant.transforms.learned_rotation`), add the online Hadamard on every MLP output-projection
    input (and, with ``online_value``, the value/o_proj rotation).

    Returns the module paths of the online ops it added (``...mlp.down_proj.input_transform``, ...).
    Raises :class:`UnsupportedArchitectureError` for families where the rotation is not exact and for
    models already rotated or quantized.
    """
    _check(model, mapping)
    fuse_norms(model, mapping)
    matrix = None
    if residual is not None:
        with torch.enable_grad():
            matrix = residual(model)
    return _rotate_fused(model, mapping, seed, online_value, matrix)


@torch.no_grad()
def _rotate_fused(model: nn.Module, mapping: ArchMapping, seed: int, online_value: bool,
                  matrix: torch.Tensor | None = None) -> list[str]:
    """The rotation proper; exact only once the norms are pure normalizations (:func:`fuse_norms`)."""

    def resid(x: torch.Tensor) -> torch.Tensor:  # x Q, Q = hadamard_matrix(hidden, seed) or ``matrix``
        return hadamard_rotate(x, seed) if matrix is None else x @ matrix.to(device=x.device, dtype=x.dtype)

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
        # a fixed op wrapped by a learned online op (OnlineKron.inner) is rebuilt at the linear
        linear_path = path.removesuffix(".inner").removesuffix(".input_transform")
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
    fixed online ``input_transform`` (a per-channel scale does not commute with the online rotation; a
    learned op that declares ``commutes_with_scales`` takes the scales into its own fold)."""

    def free(name: str) -> bool:
        op = getattr(block.get_submodule(name), "input_transform", None)
        return op is None or bool(getattr(op, "commutes_with_scales", False))

    return tuple(p for p in pairs if all(free(n) for n in p.nexts))
