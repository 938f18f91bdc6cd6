"""Numeric core (pure functions) and the fake-quantizer modules built on it."""
