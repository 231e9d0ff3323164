"""Preprocessing functions usable without the model (scanpy style)."""

from hpvade.data._pseudobulk import simulate_pseudobulk
from hpvade.data._signature import build_signature

__all__ = ["build_signature", "simulate_pseudobulk"]
