"""Architecture mappings (declarative, one per family)."""

from .base import (
    ArchMapping,
    CheckpointLayout,
    ModelPreparation,
    SmoothPair,
    get_mapping,
    prepare_model,
    register,
    register_family,
    supported,
)

__all__ = ["ArchMapping", "CheckpointLayout", "ModelPreparation", "SmoothPair", "get_mapping", "prepare_model",
           "register", "register_family", "supported"]
