"""Importing timm in the tests without a working torchvision.

timm (1.0.x) imports torchvision at import time (``torchvision.ops.misc.FrozenBatchNorm2d``,
``torchvision.transforms``, ``torchvision.datasets`` ...), but PyPI's torchvision wheels are built against
a specific torch and cannot be imported beside our CPU torch (``operator torchvision::nms does not
exist``). Nothing lrquant uses from timm (``VisionTransformer``, ``create_model``, ``save_for_hf``) needs
torchvision, so :func:`import_timm` imports timm against a minimal stand-in when the real torchvision
cannot be imported: every ``torchvision`` (sub)module is an empty module whose unknown attributes are
dummy classes (instantiating one raises). The stand-in is installed only while ``import timm`` runs; the
finder and the ``torchvision*`` entries of ``sys.modules`` are removed right after, so no other code
(transformers checks for torchvision too) ever sees it. The library itself (``src/``) never imports timm
at module import time and never installs the stand-in.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

STUB = "torchvision"


def _dummy(module: str, name: str) -> type:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{module}.{name} is a test stand-in for torchvision (not installed)")

    return type(name, (), {"__init__": __init__, "__module__": module})


class InterpolationMode(enum.Enum):
    """``torchvision.transforms.InterpolationMode`` (timm builds lookup tables from its members)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


# attributes timm uses at import time as more than a name
_SPECIAL: dict[str, Any] = {"InterpolationMode": InterpolationMode}


class _StubModule(types.ModuleType):
    """A package whose every unknown public attribute is a dummy class (private ones raise)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _SPECIAL.get(name) or _dummy(self.__name__, name)
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []  # a package: submodules resolve through the finder too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__version__ = "0.0.0+lrquant.test.stub"


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == STUB or fullname.startswith(STUB + "."):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def _drop_torchvision_modules() -> None:
    for name in [n for n in sys.modules if n == STUB or n.startswith(STUB + ".")]:
        del sys.modules[name]


def real_torchvision_importable() -> bool:
    """Whether ``import torchvision`` works here (a failed import's partial modules are removed)."""
    if importlib.util.find_spec(STUB) is None:
        return False
    try:
        importlib.import_module(STUB)
    except Exception:  # noqa: BLE001  (e.g. RuntimeError: operator torchvision::nms does not exist)
        _drop_torchvision_modules()
        return False
    return True


@contextlib.contextmanager
def torchvision_stand_in() -> Iterator[None]:
    """Resolve ``torchvision*`` imports to the stand-in inside the block, then forget it."""
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision_modules()


def import_timm() -> types.ModuleType:
    """``import timm`` (with the stand-in when needed), or skip the calling test module when timm is not
    installed (``make setup`` installs it ``--no-deps``)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (make setup installs it --no-deps)", allow_module_level=True)
    if real_torchvision_importable():
        return importlib.import_module("timm")
    with torchvision_stand_in():
        return importlib.import_module("timm")
