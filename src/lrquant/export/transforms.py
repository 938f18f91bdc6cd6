"""Online Hadamards of the rotation pre-step as a compressed-tensors ``transform_config``.

The rotation pre-step (:mod:`lrquant.transforms.rotation`) folds the residual rotation into the weights
but leaves an online rotation ``x -> x H`` on some linears' inputs (each MLP down_proj; with
``online_value`` also o_proj, ``H_nh (x) I_d``): an :class:`~lrquant.quant.hadamard.OnlineHadamard` kept
as the QuantLinear's ``input_transform``. compressed-tensors (0.20.1) describes such an op as a
``TransformScheme`` applied at location ``input`` of the targeted linears; both of its consumers compute
``x -> x M`` there (compressed-tensors: ``apply_transform_weight`` -> ``_multihead_matmul(value, M)``;
vLLM: ``HadamardTransform.forward`` in ``compressed_tensors/transform/module.py``, a linear with
``M.T``), with ``M`` the transform's stored ``weight`` scaled by ``1/sqrt(size)``:

* compressed-tensors' ``HadamardTransform.forward`` (types ``hadamard`` and ``random-hadamard``) divides
  by ``sqrt(weight.size(0))`` on every call; its ``random-matrix`` type does not divide;
* vLLM's ``HadamardTransform.process_weights_after_loading`` divides every stored matrix by
  ``sqrt(size)`` once, whatever the type, and for type ``hadamard`` runs its hadacore kernel (the
  orthonormal Sylvester transform) instead of the stored matrix.

So what is written is ``weight = sqrt(n) H`` (``n = in_features``; entries exactly ±1 whenever ``H`` is a
true Hadamard matrix) under a Hadamard type, which both divide back to ``H``:

* type ``hadamard`` when ``sqrt(n) H`` *is* compressed-tensors' ``deterministic_hadamard_matrix(n)``
  (Sylvester, ``n`` a power of two, ``block == 1``; checked element for element at export). A loader can
  rebuild it from the size alone and vLLM uses hadacore.
* type ``random-hadamard`` otherwise (Paley x Sylvester sizes such as 96 or 1536 = 12 x 128, the
  cross-head op of ``online_value``, the random-orthogonal fallback): compressed-tensors' factory would
  *generate* a different matrix (a seeded random Hadamard), so the stored ``weight`` is the only source;
  vLLM reads it (dense GEMM).

Every targeted linear gets its own copy of the matrix, ``<linear>.<group>_input.weight`` (the name both
compressed-tensors' ``TransformFactory._apply_to_module`` and vLLM's
``CompressedTensorsLinearTransformMethod.create_weights`` register), in the export dtype when its entries are
±1 (exact in any float type), else in float32 at least.

transformers 5.24 does not apply a ``transform_config`` on load (``CompressedTensorsHfQuantizer`` only calls
``apply_quantization_config``; ``CompressedTensorsConfig`` drops the field): :func:`apply_online_transforms`
does, after ``from_pretrained``, with compressed-tensors' own ``apply_transform_config`` plus the stored
weights (:func:`lrquant.export.compressed.load_compressed` calls it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LrquantError
from ..quant.hadamard import OnlineHadamard

LOCATION = "input"
"""The only location written: the op runs on the linear's input, before its input quantizer."""

PM_ONE_TOL = 1e-9
"""Largest distance of ``sqrt(n) H``'s entries from ±1 for the matrix to count as a ±1 Hadamard matrix."""


@dataclass
class OnlineGroup:
    """One ``transform_config`` group: the same matrix on the inputs of ``targets``.

    ``matrix``: ``[n, n]`` float64, the stored ``weight`` (``sqrt(n) H``); ``kind``: the compressed-tensors
    type (``"hadamard"`` or ``"random-hadamard"``); ``spec``: the :meth:`OnlineHadamard.spec` it came from.
    """

    name: str
    kind: str
    matrix: torch.Tensor
    targets: list[str]
    spec: dict[str, int | str]

    @property
    def pm_one(self) -> bool:
        """Whether every entry is ±1 (exact in any float dtype)."""
        return bool(((self.matrix.abs() - 1).abs().max() <= PM_ONE_TOL).item())

    def key(self, target: str) -> str:
        """Checkpoint key of this group's weight on ``target`` (a linear's module path)."""
        return f"{target}.{self.name}_{LOCATION}.weight"


def online_hadamards(model: nn.Module) -> dict[str, OnlineHadamard]:
    """``{linear path: op}`` for every module whose ``input_transform`` is an :class:`OnlineHadamard` (the
    rotation pre-step's ops; a learned op wrapping one, ``OnlineKron``, is not one of them)."""
    return {name: m.input_transform for name, m in model.named_modules()
            if isinstance(getattr(m, "input_transform", None), OnlineHadamard)}


def stored_matrix(op: OnlineHadamard) -> tuple[torch.Tensor, str]:
    """``(sqrt(n) H [n, n] float64, compressed-tensors type)`` for ``op`` (``n = size * block``).

    ``H`` is rebuilt in float64 from the op's spec (its own factors are in the model's dtype) and checked
    against the op's matrix; entries within :data:`PM_ONE_TOL` of ±1 are snapped to exactly ±1. Type
    ``hadamard`` when the result is compressed-tensors' ``deterministic_hadamard_matrix(n)`` exactly,
    else ``random-hadamard``. Raises :class:`LrquantError` if the op's factors are not its construction's.
    """
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix, is_pow2

    exact = OnlineHadamard(op.size, op.block, dtype=torch.float64)
    h = exact.matrix()
    n = h.shape[0]
    own = op.matrix()
    tol = 4 * torch.finfo(op.factor0.dtype if op.n_factors else torch.float64).eps
    if exact.construction != op.construction or (own - h).abs().max().item() > tol:
        raise LrquantError(f"online Hadamard {op.construction} of size {op.size} x {op.block} does not hold "
                           "its construction's matrix; it cannot be written as a transform")
    m = h * math.sqrt(n)
    if ((m.abs() - 1).abs().max() <= PM_ONE_TOL).item():
        m = m.sign()
    if is_pow2(n) and torch.equal(m, deterministic_hadamard_matrix(n, torch.float64)):
        return m, "hadamard"
    return m, "random-hadamard"


def online_groups(ops: dict[str, OnlineHadamard]) -> list[OnlineGroup]:
    """The ops grouped by matrix (same size, block and construction), one group each, named
    ``<linear leaf>_hadamard`` after its first target (``down_proj_hadamard``, ``o_proj_hadamard``; a
    numeric suffix on a clash)."""
    by_spec: dict[tuple, OnlineGroup] = {}
    names: set[str] = set()
    for path, op in ops.items():
        spec = op.spec()
        key = (spec["size"], spec["block"], spec["construction"])
        if key not in by_spec:
            matrix, kind = stored_matrix(op)
            base = f"{path.rsplit('.', 1)[-1]}_hadamard"
            name, i = base, 2
            while name in names:
                name, i = f"{base}_{i}", i + 1
            names.add(name)
            by_spec[key] = OnlineGroup(name, kind, matrix, [], spec)
        by_spec[key].targets.append(path)
    return list(by_spec.values())


def ct_transform_config(groups: list[OnlineGroup]):
    """compressed-tensors ``TransformConfig``: one ``TransformScheme`` per group (no randomization, no
    ``head_dim``: the matrix spans the whole input), applied at ``input`` of exactly its targets."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    return TransformConfig(config_groups={
        g.name: TransformScheme(type=g.kind, apply=[TransformArgs(targets=list(g.targets), location=LOCATION)],
                                randomize=False, requires_grad=False, precision=torch.float32)
        for g in groups})


def transform_tensors(groups: list[OnlineGroup], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``groups``: ``{<target>.<group>_input.weight: [n, n]}``, one contiguous copy
    per target (safetensors stores no shared tensors), in ``dtype`` when the entries are ±1, else in float32
    if ``dtype`` is narrower."""
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        store = dtype if g.pm_one or dtype.itemsize >= 4 else torch.float32
        value = g.matrix.to(store)
        for target in g.targets:
            out[g.key(target)] = value.clone()
    return out


# ---- loading -------------------------------------------------------------------------------------------
def read_transform_config(path: str | Path) -> dict | None:
    """The ``quantization_config.transform_config`` of the checkpoint at ``path`` (None when empty/absent)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("transform_config") or None


def _checkpoint_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` that the safetensors files of ``path`` hold (single file or index)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for k in keys:
            if k in where:
                files.setdefault(where[k], []).append(k)
    else:
        files = {"model.safetensors": keys}
    out: dict[str, torch.Tensor] = {}
    for file, wanted in files.items():
        with safe_open(str(path / file), framework="pt") as f:
            present = set(f.keys())
            out.update({k: f.get_tensor(k) for k in wanted if k in present})
    return out


@torch.no_grad()
def apply_online_transforms(model: nn.Module, path: str | Path, config: dict | None = None) -> int:
    """Apply the checkpoint's ``transform_config`` to ``model`` (loaded from ``path`` by ``from_pretrained``,
    which ignores it) and load the transform weights it stores; returns the number of transform modules.

    compressed-tensors' ``apply_transform_config`` attaches each transform as a submodule
    (``<linear>.<group>_<location>``) and, for ``input``, a forward pre-hook that runs before the linear's
    own forward (hence before its input quantization), exactly where lrquant's ``input_transform`` ran.
    Its factories *generate* the matrices; every stored ``weight`` / ``perm`` then replaces the generated
    one (modules that shared a generated parameter keep sharing it while the stored values agree). A
    transform without a stored weight is refused unless its type is ``hadamard`` (rebuilt exactly from the
    size). Raises :class:`LrquantError` on a missing or misshapen tensor.
    """
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase

    path = Path(path)
    config = config if config is not None else read_transform_config(path)
    if not config:
        return 0
    tconfig = TransformConfig.model_validate(config)
    apply_transform_config(model, tconfig)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, TransformBase)}
    wanted = [f"{n}.{attr}" for n, m in modules.items() for attr in ("weight", "perm")
              if getattr(m, attr, None) is not None]
    stored = _checkpoint_tensors(path, wanted)
    loaded: dict[int, torch.Tensor] = {}  # id of a generated parameter -> the stored value copied into it
    for name, m in modules.items():
        for attr in ("weight", "perm"):
            param = getattr(m, attr, None)
            key = f"{name}.{attr}"
            if param is None:
                continue
            if key not in stored:
                if attr == "weight" and m.scheme.type != "hadamard":
                    raise LrquantError(f"{path}: transform {key} ({m.scheme.type}) is not in the checkpoint; "
                                       "only type 'hadamard' can be rebuilt from its size")
                continue
            value = stored[key]
            if value.shape != param.shape:
                raise LrquantError(f"{path}: transform {key} has shape {list(value.shape)}, the model "
                                   f"expects {list(param.shape)}")
            value = value.to(device=param.device, dtype=param.dtype)
            first = loaded.get(id(param))
            if first is None:
                param.data.copy_(value)
                loaded[id(param)] = value
            elif not torch.equal(first, value):  # shared when generated, different in the checkpoint
                setattr(m, attr, nn.Parameter(value, requires_grad=False))
    return len(modules)
