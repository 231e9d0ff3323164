"""Errors hpvade raises on purpose (re-exported at the top level)."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training was stopped."""


class ScaleMismatchError(ValueError):
    """The bulk and the reconstructed bulk are on different scales (strict checking)."""
