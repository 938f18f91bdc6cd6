"""Architecture mappings (declarative, one per family)."""

from .base import ArchMapping, SmoothPair, get_mapping, register, register_family, supported

__all__ = ["ArchMapping", "SmoothPair", "get_mapping", "register", "register_family", "supported"]
