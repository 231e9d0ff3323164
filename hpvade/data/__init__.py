"""Data handling behind ``hpvade.pp`` and the model: signatures, pseudobulks, chunked access.

Internal: the public functions are in :mod:`hpvade.pp`.
"""
