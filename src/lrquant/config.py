"""Serializable quantization settings.

Field names of :class:`QuantArgs` and :class:`Scheme` follow compressed-tensors' ``QuantizationArgs`` and
``QuantizationScheme`` so a recipe maps one to one onto the export format. A :class:`Recipe` is the whole
run: the method, the scheme, calibration and training settings; it round-trips through YAML/JSON and
validates itself on construction, so an impossible setting fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

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
        return -(2 ** (self.num_bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1 if self.symmetric else 2**self.num_bits - 1

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


@dataclass
class TrainArgs:
    """Block-wise training settings shared by every learned method (ignored by RTN)."""

    epochs: int = 2
    batch_size: int = 1
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0:
            raise ConfigError(f"epochs must be >= 0 and batch_size > 0, got {self.epochs}, {self.batch_size}")


@dataclass
class Recipe:
    """Everything a run needs besides the model: method, scheme, calibration, training, method options."""

    method: str = "rtn"
    scheme: Scheme = field(default_factory=lambda: Scheme.from_bits(4, 16, 64))
    calib: CalibArgs = field(default_factory=CalibArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.scheme, dict):
            self.scheme = Scheme(**self.scheme)
        if isinstance(self.calib, dict):
            self.calib = CalibArgs(**self.calib)
        if isinstance(self.train, dict):
            self.train = TrainArgs(**self.train)
        self.method = self.method.lower()

    # ---- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
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
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)
