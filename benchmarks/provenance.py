"""The line every results file starts with: the commit and date that produced it."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stamp() -> str:
    """``"commit abc1234, 2026-11-30"`` (``"+ uncommitted changes"`` when the tree is dirty).
    Where the checkout has no git history (a copy sent to a GPU machine), the commit is read
    from the environment variable ``HPVADE_COMMIT``."""
    if "HPVADE_COMMIT" in os.environ:
        return f"commit {os.environ['HPVADE_COMMIT']}, {datetime.date.today().isoformat()}"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=HERE, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "../hpvade") else ""
    return f"commit {commit}{dirty}, {datetime.date.today().isoformat()}"
