"""Exceptions with one clear line for the user; the CLI prints them without a traceback."""


class LrquantError(Exception):
    """Base class of every error lrquant raises on bad input."""


class ConfigError(LrquantError, ValueError):
    """An impossible quantization or training setting (bits, group size, strategy...)."""


class UnsupportedArchitectureError(LrquantError):
    """The model's class has no architecture mapping."""


class DataError(LrquantError):
    """Missing corpus files or too little calibration/evaluation text."""
