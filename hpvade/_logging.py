"""Quiet third-party output by default; everything stays reachable through logging levels.

Lightning announces the hardware, advertises a logger service and warns about data-loader
workers on every ``train``; scvi-tools logs "File ... already downloaded" on every ``load`` and
prints "Exception raised during training" before every training error.
A user reads these as trouble. Around those calls hpvade raises the third-party loggers to
WARNING and drops the known notices, unless the ``hpvade`` logger is set to DEBUG
(``logging.getLogger("hpvade").setLevel(logging.DEBUG)``), which shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterable

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


#: scvi-tools' TrainRunner prints this before re-raising any training error (hpvade's own clear
#: errors included), so a user reads two messages for one problem.
SCVI_EXCEPTION_NOTICE = "Exception raised during training."


class _DropNotice:
    """A stdout wrapper that drops one ``print`` call starting with ``notice``, passing every
    other write through (progress bars included)."""

    def __init__(self, stream, notice: str):
        self._stream, self._notice, self._dropping = stream, notice, False

    def write(self, text: str) -> int:
        if text.startswith(self._notice):
            self._dropping = True
        if self._dropping:
            self._dropping = not text.endswith("\n")
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


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
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(_DropNotice(sys.stdout, SCVI_EXCEPTION_NOTICE)),
        ):
            for pattern in NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def interactive_output() -> bool:
    """True in a terminal or a notebook: where a progress bar redraws instead of piling up."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


#: Seconds before a progress bar appears (with tqdm): a step that ends sooner shows none.
PROGRESS_DELAY = 2.0
#: Whether ``progress`` may draw: off inside ``without_progress_bars`` (a ``train`` called with
#: ``enable_progress_bar=False`` keeps its calibration quiet too).
_BARS_ALLOWED = [True]


@contextlib.contextmanager
def without_progress_bars(quiet: bool = True):
    """No :func:`progress` bar inside (when ``quiet``)."""
    _BARS_ALLOWED.append(not quiet and _BARS_ALLOWED[-1])
    try:
        yield
    finally:
        _BARS_ALLOWED.pop()


def progress(sequence: Iterable, description: str, total: int | None = None) -> Iterable:
    """``sequence`` with a progress bar (scvi-tools' ``track``) where one redraws: in a
    terminal or a notebook; as is in a log file."""
    if not (_BARS_ALLOWED[-1] and interactive_output()):
        return sequence
    from scvi import settings
    from scvi.utils import track

    # tqdm (scvi-tools' default style) shows a bar only once a step has run this long
    quick = {"delay": PROGRESS_DELAY} if settings.progress_bar_style == "tqdm" else {}
    return track(sequence, description=description, total=total, **quick)
