"""Quiet third-party output by default; everything stays reachable through logging levels.

Lightning announces the hardware, advertises a logger service and warns about data-loader
workers on every ``train``; scvi-tools logs "File ... already downloaded" on every ``load``.
A user reads these as trouble. Around those calls hpvade raises the third-party loggers to
WARNING and drops the known notices, unless the ``hpvade`` logger is set to DEBUG
(``logging.getLogger("hpvade").setLevel(logging.DEBUG)``), which shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

#: Third-party loggers whose INFO messages are dropped around train and load.
NOISY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "scvi.data._download")
#: Third-party warnings that say nothing actionable to a hpvade user.
NOISY_WARNINGS = (
    r".*LeafSpec.*is deprecated.*",
    r".*log_every_n_steps.*",
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*module\(s\) in eval mode.*",
)


@contextlib.contextmanager
def quiet_third_party():
    """Silence the known third-party notices for the duration (not when hpvade logs DEBUG)."""
    if logging.getLogger("hpvade").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            for pattern in NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def interactive_output() -> bool:
    """True in a terminal or a notebook: where a progress bar redraws instead of piling up."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules
