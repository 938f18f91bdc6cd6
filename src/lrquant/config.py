"""Serializable quantization settings: a typed, versioned recipe.

Field names of :class:`QuantArgs` and :class:`Scheme` follow compressed-tensors' ``QuantizationArgs`` and
``QuantizationScheme`` so a recipe maps one to one onto the export format. A :class:`Recipe` is the whole
run, as one typed document (version 2)::

    pre:      [rotation]                  model-level steps before the blocks (RotationStep)
    method:   preset name                 rtn, smoothquant, omniquant, affinequant, lrquant, ...
    options:  the preset's own fields     typed per method (``Method.Options``), e.g. alpha, init
    clip:     ClipArgs                    learned clipping (LWC) and its initialisation
    rounding: RoundingArgs                rtn | gptq | learned, after transforms and clipping
    loss:     LossArgs                    typed terms and weights, token masking
    train:    TrainArgs                   the schedule: epochs / iters, lr per group, decay, keep-best
    post:     [tta]                       steps after the blocks (TTAStep)

A preset fills every field the file leaves out (``None`` = "the preset decides"), and the expansion is
what :meth:`Recipe.to_dict` writes, so a run is reproducible from its ``recipe.yaml`` alone. Every
section refuses unknown keys, wrong types and out-of-range values with a message naming the field, on
construction — before any model is loaded. Version-1 files (no ``version``; rotation and loss settings in
``options``) are migrated on load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .quant.primitives import qrange

BUILTIN_RECIPES = Path(__file__).parent / "recipes"
STRATEGIES = ("tensor", "channel", "group", "token")
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass
class QuantArgs:
    """How one tensor kind is quantized (compressed-tensors ``QuantizationArgs`` names).

    ``strategy``: ``tensor`` (one scale), ``channel`` (one per output row of a weight), ``group``
    (``group_size`` consecutive input columns of a weight row), ``token`` (one per row of an activation,
    i.e. per token). ``dynamic`` activations compute their parameters on every forward; static ones are
    calibrated once. ``num_bits == 16`` means "not quantized".
    """

    num_bits: int = 8
    symmetric: bool = True
    strategy: str = "tensor"
    group_size: int | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.num_bits not in VALID_BITS:
            raise ConfigError(f"num_bits must be one of 2-8 or 16 (no quantization), got {self.num_bits}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "group":
            if self.group_size is None or self.group_size <= 0:
                raise ConfigError(f"strategy 'group' needs a positive group_size, got {self.group_size}")
        elif self.group_size is not None:
            raise ConfigError(f"group_size={self.group_size} is only valid with strategy 'group'")

    @property
    def enabled(self) -> bool:
        return self.num_bits < 16

    @property
    def qmin(self) -> int:
        return qrange(self.num_bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.num_bits, self.symmetric)[1]

    def describe(self) -> str:
        if not self.enabled:
            return "16"
        g = f"g{self.group_size}" if self.strategy == "group" else self.strategy
        return f"{self.num_bits}b-{g}-{'sym' if self.symmetric else 'asym'}{'-dyn' if self.dynamic else ''}"


@dataclass
class Scheme:
    """Which tensors are quantized: weights, linear-layer input activations and the KV cache (Q/K/V)."""

    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    kv_cache: QuantArgs | None = None

    def __post_init__(self) -> None:
        for name in ("weights", "input_activations", "kv_cache"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = QuantArgs(**value)
            if value is not None and not value.enabled:
                value = None
            setattr(self, name, value)
        if self.weights is not None and self.weights.strategy == "token":
            raise ConfigError("weights cannot use strategy 'token'")
        acts = self.input_activations
        if acts is not None and acts.strategy in ("channel", "group"):
            raise ConfigError("input activations support strategy 'tensor' or 'token'")
        if acts is not None and acts.strategy == "token" and not acts.dynamic:
            raise ConfigError("per-token activation quantization must be dynamic")

    @property
    def wbits(self) -> int:
        return self.weights.num_bits if self.weights else 16

    @property
    def abits(self) -> int:
        return self.input_activations.num_bits if self.input_activations else 16

    def name(self) -> str:
        """Short label, e.g. ``W4A16g64`` or ``W4A4``."""
        w = self.weights
        g = f"g{w.group_size}" if w is not None and w.strategy == "group" else ""
        kv = f"KV{self.kv_cache.num_bits}" if self.kv_cache is not None else ""
        return f"W{self.wbits}A{self.abits}{g}{kv}"

    @classmethod
    def from_bits(
        cls,
        wbits: int,
        abits: int = 16,
        group_size: int | None = None,
        *,
        w_symmetric: bool = False,
        a_symmetric: bool = False,
        kv_bits: int | None = None,
    ) -> Scheme:
        """The published settings: asymmetric per-channel (or grouped) weights, dynamic asymmetric
        per-token activations, and (weight-activation settings only, unless ``kv_bits`` says
        otherwise) Q/K/V quantized at the activation bit-width per head and token."""
        weights = None
        if wbits < 16:
            strategy = "group" if group_size else "channel"
            weights = QuantArgs(wbits, w_symmetric, strategy, group_size or None)
        acts = QuantArgs(abits, a_symmetric, "token", None, True) if abits < 16 else None
        if kv_bits is None:
            kv_bits = abits
        kv = QuantArgs(kv_bits, a_symmetric, "token", None, True) if kv_bits < 16 else None
        return cls(weights, acts, kv)



RECIPE_VERSION = 2


def typed(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types with a message that
    names ``where.field`` and what is allowed. Instances of ``cls`` pass through."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                          f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {where} field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        _check_type(value, hints[key], f"{where}.{key}")
    return cls(**data)


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in args:
            try:
                _check_type(value, alt, where)
                return
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: expected {_hint_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return
    if hint is Any or dataclasses.is_dataclass(hint):
        return
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        for i, v in enumerate(value):
            _check_type(v, args[0], f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        for k, v in value.items():
            _check_type(v, args[1], f"{where}.{k}")
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{where}: expected {_hint_name(hint)}, got {value!r}")


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def check_choice(value: Any, allowed: tuple, where: str) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming the field and the choices."""
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def check_range(value: float, lo: float | None, hi: float | None, where: str) -> None:
    """Refuse ``value`` outside ``[lo, hi]`` (``None``: open)."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{where} must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], "
                          f"got {value}")


@dataclass
class CalibArgs:
    """Calibration data: ``nsamples`` random windows of ``seqlen`` tokens from ``dataset``."""

    dataset: str = "default"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples <= 0 or self.seqlen <= 0:
            raise ConfigError(f"nsamples and seqlen must be positive, got {self.nsamples} and {self.seqlen}")


LR_GROUPS = ("lwc", "let", "rot", "round", "clip", "kron", "aclip")
LR_SCHEDULES = ("constant", "cosine", "linear")
TRAIN_GUARDS = ("loss", "rounded")
OPTIMIZERS = ("adamw", "sign")


@dataclass
class TrainArgs:
    """The block-training schedule shared by every learned method (ignored by RTN).

    ``iters``: optimizer steps per block (0: ``epochs`` passes over the samples, one step per batch).
    ``lr``: per parameter group (``lwc`` clip logits, ``let`` transforms, ``rot`` LRQuant+ vectors,
    ``round`` learned-rounding offsets, ``clip`` RepQuant clips, ``kron`` online Kronecker transforms,
    ``aclip`` activation clip logits); missing groups take the method's
    defaults. ``lr_schedule``: ``constant``, ``cosine`` or ``linear`` decay to 0 over the steps.
    ``keep_best``: keep the parameters at which a training batch had the lowest loss (auto-round's rule:
    no extra forward), instead of the last ones; the block is then judged on the full calibration loss
    against its initialisation as always. ``guard``: what that judgement compares. ``loss``: the
    training loss (weights fake-quantized to nearest) before and after training. ``rounded``: the block
    as it will be exported: the trained and the initial parameters are each folded and put through the
    rounding stage (e.g. GPTQ), and the one with the lower calibration loss is kept; it costs a second
    rounding pass and two loss passes per block, and makes a learned recipe never worse on a block's
    calibration loss than the same recipe without training (Gemma-3-270M W3A16g64, LET + LWC + GPTQ:
    37.58 -> 37.36, 17% more calibration time; README "Against GPTQ and auto-round"). With a rounding
    stage that keeps the codes training fake-quantized to (``rtn``, ``learned``) the rounded loss is the
    training loss, so ``rounded`` is ``loss`` there and costs nothing extra. ``optimizer``: ``adamw``, or
    ``sign`` (signed gradient descent, ``p -= lr * sign(grad)``, auto-round's SignSGD: every parameter
    moves by exactly its lr per step, so the schedule bounds how far it can travel; with the ``linear``
    schedule and a ``round`` lr of ``1 / iters`` a rounding offset can cross half its range).
    """

    epochs: int = 2
    batch_size: int = 1
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    seed: int = 0
    iters: int = 0
    lr_schedule: str = "constant"
    keep_best: bool = False
    guard: str = "loss"
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0:
            raise ConfigError(f"epochs must be >= 0 and batch_size > 0, got {self.epochs}, {self.batch_size}")
        check_range(self.iters, 0, None, "train.iters")
        check_choice(self.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
        check_choice(self.guard, TRAIN_GUARDS, "train.guard")
        check_choice(self.optimizer, OPTIMIZERS, "train.optimizer")
        for name, value in self.lr.items():
            check_choice(name, LR_GROUPS, "train.lr group")
            check_range(value, 0.0, None, f"train.lr.{name}")


CLIP_INITS = ("max", "mse")


@dataclass
class ClipArgs:
    """Weight clipping. ``learn``: learnable weight clipping (LWC, per-row factors in (0, 1)); ``None``:
    the preset decides (on for learned methods). ``init``: ``max`` (LWC starts at sigmoid(``logit``),
    non-learned weights at the full range) or ``mse`` (per row, the clipping factor on a grid in
    ``[min_factor, 1]`` that minimises the weight's quantization error, for learned and non-learned
    weights alike). ``logit``: LWC's initial logit with ``init: max`` (4.0: 0.982, OmniQuant's)."""

    learn: bool | None = None
    init: str = "max"
    logit: float = 4.0
    min_factor: float = 0.5
    grid: int = 20

    def __post_init__(self) -> None:
        check_choice(self.init, CLIP_INITS, "clip.init")
        check_range(self.min_factor, 0.05, 1.0, "clip.min_factor")
        check_range(self.grid, 1, 1000, "clip.grid")


@dataclass
class RoundingArgs:
    """How weights meet their grid, after the transforms and clipping are learned and folded.

    ``kind`` names a registered stage (:mod:`lrquant.methods.rounding`, checked on construction).
    ``rtn``: round to nearest. ``gptq``: GPTQ per linear, sequential inside the block (attention inputs,
    then o, then MLP inputs, then down, each seeing the already-quantized earlier layers), Hessian from
    the block's quantized input stream; ``damp`` (fraction of the mean diagonal), ``block_size``
    (columns per lazy update), ``act_order`` (default on; columns by decreasing Hessian diagonal, grid
    parameters fixed per group from the clipped weight before the pass: SmolLM2 W3A16g64, first 8
    windows, 49.6 without it, 35.0 with it). ``learned``: SignRound-style offsets in
    ``[-0.5, 0.5]`` per weight added before rounding, trained with the block (lr group ``round``) and
    folded into the integer codes.
    """

    kind: str = "rtn"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        check_range(self.damp, 0.0, 1.0, "rounding.damp")
        check_range(self.block_size, 1, None, "rounding.block_size")


LOSS_MASKS = ("none", "massive")


@dataclass
class LossArgs:
    """The block objective: ``mse`` and ``nlc`` (negative log cosine, LRQuant) weights, and the weight of
    the second target, the FP block on the *quantized* input (``q_target``, LRQuant+'s homologous branch).
    ``None``: the preset decides. ``mask``: ``massive`` leaves out of the loss every token whose FP
    block-output norm exceeds ``mask_ratio`` x the median token norm of its sample (attention-sink /
    massive-activation tokens, which otherwise dominate the MSE); ``none`` keeps every token."""

    mse: float | None = None
    nlc: float | None = None
    q_target: float | None = None
    mask: str = "none"
    mask_ratio: float = 20.0

    def __post_init__(self) -> None:
        check_choice(self.mask, LOSS_MASKS, "loss.mask")
        check_range(self.mask_ratio, 1.0, None, "loss.mask_ratio")
        for name in ("mse", "nlc", "q_target"):
            value = getattr(self, name)
            if value is not None:
                check_range(value, 0.0, None, f"loss.{name}")

    def terms(self) -> dict[str, float]:
        """``{"mse": w, "nlc": w}`` (resolved recipes only)."""
        return {"mse": float(self.mse or 0.0), "nlc": float(self.nlc or 0.0)}


ROTATIONS = ("hadamard", "learned")


@dataclass
class RotationStep:
    """Pre-step: rotation of the residual stream (norms fused, an online Hadamard on every down-proj input;
    ``online_value`` also rotates the v -> o path online). ``kind``: ``hadamard`` (randomized, ``seed``) or
    ``learned`` (from that Hadamard, ``steps`` Cayley SGD steps of length ``lr`` on the Stiefel manifold,
    :mod:`lrquant.transforms.learned_rotation`; ``steps``/``lr`` are read by ``learned`` only)."""

    kind: str = "hadamard"
    seed: int = 0
    online_value: bool = False
    steps: int = 100
    lr: float = 0.05

    def __post_init__(self) -> None:
        check_choice(self.kind, ROTATIONS, "pre.rotation.kind")
        check_range(self.steps, 1, None, "pre.rotation.steps")
        check_range(self.lr, 0.0, None, "pre.rotation.lr")


@dataclass
class TTAStep:
    """Post-step: test-time adaptation (LRQuant). ``steps``: passes over the adaptation windows; ``lr``:
    one learning rate for every parameter group (``None``: the calibration rates x 0.1); ``blocks``: how
    many final blocks adapt; ``windows`` of ``seqlen`` tokens are taken from the evaluation stream."""

    steps: int = 2
    lr: float | None = None
    blocks: int = 1
    windows: int = 4
    seqlen: int = 512

    def __post_init__(self) -> None:
        if min(self.steps, self.blocks, self.windows, self.seqlen) <= 0:
            raise ConfigError("TTA steps, blocks, windows and seqlen must be positive")


_SCHEME_LABEL = re.compile(r"w(\d+)a(\d+)(?:g(\d+))?", re.IGNORECASE)


def parse_scheme(label: str, where: str = "scheme") -> Scheme:
    """A published-settings scheme (:meth:`Scheme.from_bits`) from its label, e.g. ``W8A8`` or
    ``W4A16g64`` (the form :meth:`Scheme.name` prints, without a KV part)."""
    match = _SCHEME_LABEL.fullmatch(str(label))
    if match is None:
        raise ConfigError(f"{where}: expected a scheme label like W8A8 or W4A16g64, got {label!r}")
    w, a, g = (int(x) if x else None for x in match.groups())
    for bits in (w, a):
        if bits not in VALID_BITS:
            raise ConfigError(f"{where}: bit widths must be one of 2-8 or 16, got {label!r}")
    return Scheme.from_bits(w, a, g)


@dataclass
class PartsArgs:
    """What a multimodal model quantizes besides its language model (which always follows the recipe's
    ``scheme``). ``vision``: the vision tower's scheme label (``W8A8``, ``W4A16g64``, ...; null: the tower
    stays in 16 bits, as the peers keep it); ``projector``: also put the projector's linear weights on a
    round-to-nearest grid (the vision scheme's weights when the tower is quantized, else the language
    model's). Text-only models refuse anything but the defaults."""

    vision: str | None = None
    projector: bool = False

    def __post_init__(self) -> None:
        if self.vision is not None:
            parse_scheme(self.vision, "parts.vision")

    @property
    def vision_scheme(self) -> Scheme | None:
        return None if self.vision is None else parse_scheme(self.vision, "parts.vision")

    @property
    def default(self) -> bool:
        return self.vision is None and not self.projector


PRE_STEPS: dict[str, type] = {"rotation": RotationStep}
POST_STEPS: dict[str, type] = {"tta": TTAStep}
STEP_KIND = {cls: name for table in (PRE_STEPS, POST_STEPS) for name, cls in table.items()}


def _steps(items: Any, table: dict[str, type], where: str) -> list[Any]:
    """``[{kind: {fields}}]`` (or step instances) -> typed steps; each kind at most once."""
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where} must be a list of steps like {{{next(iter(table))}: {{...}}}}")
    out = []
    for i, item in enumerate(items):
        if type(item) in STEP_KIND:
            out.append(item)
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{where}[{i}] must be one mapping {{kind: {{fields}}}}; kinds: {', '.join(table)}")
        (kind, body), = item.items()
        if kind not in table:
            raise ConfigError(f"unknown {where} step {kind!r}; known: {', '.join(table)}")
        out.append(typed(table[kind], body or {}, f"{where}.{kind}"))
    kinds = [STEP_KIND[type(s)] for s in out]
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"{where} lists a step twice: {kinds}")
    return out


@dataclass
class Recipe:
    """Everything a run needs besides the model (see the module docstring for the sections).

    Construction validates and expands the method's preset: the method's ``Options`` type checks
    ``options`` and fills its defaults, and the preset resolves every ``None`` in ``clip`` and ``loss``.
    """

    method: str = "rtn"
    scheme: Scheme = field(default_factory=lambda: Scheme.from_bits(4, 16, 64))
    calib: CalibArgs = field(default_factory=CalibArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    options: dict[str, Any] = field(default_factory=dict)
    clip: ClipArgs = field(default_factory=ClipArgs)
    rounding: RoundingArgs = field(default_factory=RoundingArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    pre: list[Any] = field(default_factory=list)
    post: list[Any] = field(default_factory=list)
    parts: PartsArgs = field(default_factory=PartsArgs)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise ConfigError(f"recipe version {self.version} is not supported here (this lrquant reads "
                              f"version {RECIPE_VERSION}; version-1 files are migrated by Recipe.from_dict)")
        if isinstance(self.scheme, dict):
            self.scheme = Scheme(**self.scheme)
        if isinstance(self.calib, dict):
            self.calib = typed(CalibArgs, self.calib, "calib")
        self.train = typed(TrainArgs, self.train, "train")
        self.clip = typed(ClipArgs, self.clip, "clip")
        self.rounding = typed(RoundingArgs, self.rounding, "rounding")
        self.loss = typed(LossArgs, self.loss, "loss")
        self.parts = typed(PartsArgs, self.parts, "parts")
        self.pre = _steps(self.pre, PRE_STEPS, "pre")
        self.post = _steps(self.post, POST_STEPS, "post")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a mapping, got {type(self.options).__name__}")
        self.method = self.method.lower()
        from .methods import get_method  # the presets live with their methods

        get_method(self.method).expand(self)

    # ---- typed access to the steps -----------------------------------------------------------------
    @property
    def rotation(self) -> RotationStep | None:
        return next((s for s in self.pre if isinstance(s, RotationStep)), None)

    @property
    def tta(self) -> TTAStep | None:
        return next((s for s in self.post if isinstance(s, TTAStep)), None)

    def with_rotation(self, kind: str, seed: int = 0) -> Recipe:
        """A validated copy with the rotation pre-step set (``kind`` ``none`` removes it)."""
        pre = [s for s in self.pre if not isinstance(s, RotationStep)]
        if kind != "none":
            pre.insert(0, typed(RotationStep, {"kind": kind, "seed": seed}, "pre.rotation"))
        return self.replace(pre=pre)

    def with_tta(self, step: TTAStep | None) -> Recipe:
        """A validated copy with the TTA post-step set (``None`` removes it)."""
        post = [s for s in self.post if not isinstance(s, TTAStep)] + ([step] if step is not None else [])
        return self.replace(post=post)

    def with_method(self, method: str) -> Recipe:
        """A validated copy running preset ``method``: the previous preset's options and the fields it
        resolved (``clip.learn``, the ``loss`` weights) are dropped so the new preset fills them."""
        if method.lower() == self.method:
            return self.replace()
        data = self.to_dict()
        data.update(method=method, options={})
        data["clip"]["learn"] = None
        data["loss"].update(mse=None, nlc=None, q_target=None)
        return Recipe.from_dict(data)

    def with_options(self, overrides: dict[str, Any]) -> Recipe:
        """A validated copy with ``overrides`` applied: dotted keys address a section's field
        (``loss.nlc``, ``rounding.kind``, ``train.iters``, ``clip.init``); plain keys are method options
        (``alpha``). Unknown names fail with a message naming the field and the allowed ones."""
        data = self.to_dict()
        data.setdefault("parts", {})
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            if not section:
                data["options"][key] = value
            elif section in ("train", "clip", "rounding", "loss", "calib", "parts") and "." not in section:
                data[section][name] = value
            else:
                raise ConfigError(f"unknown option section {section!r} in {key!r}; known: train, clip, rounding, "
                                  "loss, calib, or a plain method option")
        return Recipe.from_dict(data)

    def replace(self, **changes: Any) -> Recipe:
        """A validated copy with top-level fields replaced."""
        data = self.to_dict()
        data.update({k: v for k, v in changes.items()})
        return Recipe.from_dict(data)

    # ---- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            if f.name in ("version", "pre", "post") or (f.name == "parts" and self.parts.default):
                continue  # default parts are left out: text-only recipes keep their former expansion
            value = getattr(self, f.name)
            out[f.name] = asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
        out["pre"] = [{STEP_KIND[type(s)]: asdict(s)} for s in self.pre]
        out["post"] = [{STEP_KIND[type(s)]: asdict(s)} for s in self.post]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = migrate(dict(data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown recipe keys: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        path = Path(path)
        if path.suffix == ".json":
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2))
        else:
            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Load a YAML/JSON recipe file, or a built-in recipe by name (e.g. ``omniquant-w4a4``)."""
        path = Path(path)
        if not path.is_file():
            builtin = BUILTIN_RECIPES / f"{path.stem}.yaml"
            if path.parent != Path(".") or not builtin.is_file():
                names = ", ".join(sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml")))
                raise ConfigError(f"recipe file not found: {path} (built-in recipes: {names})")
            path = builtin
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a recipe mapping to the current version. Version 1 (no ``version`` key) kept the rotation
    (``rotate``, ``rotate_seed``, ``rotate_value``) and the loss (``loss``, ``q_target``) in ``options``."""
    version = data.get("version", 1)
    if version == 1:
        options = dict(data.get("options") or {})
        pre = list(data.get("pre") or [])
        rotate = options.pop("rotate", None)
        seed, online_value = options.pop("rotate_seed", 0), options.pop("rotate_value", False)
        if rotate not in (None, "none"):
            pre.append({"rotation": {"kind": rotate, "seed": seed, "online_value": online_value}})
        loss = dict(data.get("loss") or {})
        if "loss" in options:
            terms = options.pop("loss")
            if not isinstance(terms, dict):
                raise ConfigError(f"options.loss must map loss names to weights, got {terms!r}")
            loss.update({"mse": 0.0, "nlc": 0.0, **terms})
        if "q_target" in options:
            loss["q_target"] = options.pop("q_target")
        if "tta_blocks" in options:
            raise ConfigError("options.tta_blocks is gone: TTA is a post-step (post: [{tta: {blocks: K}}])")
        data.update(options=options, pre=pre, loss=loss, version=RECIPE_VERSION)
    return data
