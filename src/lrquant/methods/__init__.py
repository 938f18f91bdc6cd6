"""Quantization methods, registered by name. A method composes quantizers, transforms, a loss and a
schedule; the engine calls its hooks and knows no method by name."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make ``cls`` available as ``--method name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    from . import kronquant, lrquant, repquant, rtn, transformed  # noqa: F401  (registers the built-in methods)

    key = name.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[key]


__all__ = ["METHODS", "Method", "get_method", "register_method"]
