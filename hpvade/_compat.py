"""Compatibility: keywords renamed in 0.2 (old names work one more release), and a shim for
scvi-tools on the rich that pip installs today."""

from __future__ import annotations

import functools
import warnings

# scvi-tools 1.4.2's `view_anndata_setup` calls `rich.pretty.pprint` without importing
# `rich.pretty`; with rich >= 14 nothing else imports it, so the call raised AttributeError.
# Importing the submodule once makes the attribute exist.
import rich.pretty  # noqa: F401


def renamed_keywords(_since: str = "0.2", _until: str = "0.3", **renames: str):
    """Accept ``old=`` keywords as ``new=`` with a :class:`FutureWarning` (one release).

    Parameters
    ----------
    _since
        The release that renamed them.
    _until
        The release in which the old names stop working.
    **renames
        ``old_name="new_name"`` pairs.
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{function.__qualname__}() got both `{old}` and its new name `{new}`; "
                        f"pass only `{new}`."
                    )
                warnings.warn(
                    f"`{old}` was renamed `{new}` in hpvade {_since}; the old name stops "
                    f"working in {_until}.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate
