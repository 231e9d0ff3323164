"""Keyword names renamed in 0.2: the old names keep working for one release."""

from __future__ import annotations

import functools
import warnings


def renamed_keywords(**renames: str):
    """Accept ``old=`` keywords as ``new=`` with a :class:`FutureWarning` (one release).

    Parameters
    ----------
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
                    f"`{old}` was renamed `{new}` in hpvade 0.2; the old name stops working in "
                    "0.3.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate
