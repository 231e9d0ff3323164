"""Which results file is older than the code it measures: for every file in
``benchmarks/results/``, the commit that produced it (its "Produced by ... at commit" line) and
how many commits changed ``hpvade/`` since.

``.venv/bin/python benchmarks/freshness.py`` prints the table; the docs build renders it on
the page "Benchmarks" (``docs/conf.py``), so a figure's age is visible where it is read.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The commit a results file names on its "Produced by" line (or "as it was at commit").
COMMIT = re.compile(r"at commit ([0-9a-f]{7,40})")


def produced_at(path: Path) -> str | None:
    """The commit that produced a results file, from its first lines."""
    match = COMMIT.search("\n".join(path.read_text().splitlines()[:15]))
    return match.group(1) if match else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def library_commits_since(commit: str) -> int | None:
    """Commits that changed ``hpvade/`` after ``commit`` (``None`` without git history)."""
    count = _git("rev-list", "--count", f"{commit}..HEAD", "--", "hpvade")
    return int(count) if count is not None and count.isdigit() else None


def table() -> str:
    """The freshness of every results file, as a markdown table."""
    rows = [
        "| results file | produced at | commits changing `hpvade/` since | status |",
        "|:--|:--|--:|:--|",
    ]
    for path in sorted(RESULTS.glob("*.md")):
        commit = produced_at(path)
        since = library_commits_since(commit) if commit else None
        if commit is None:
            status = "names no commit"
        elif since is None:
            status = "unknown (no git history here)"
        elif since == 0:
            status = "current"
        else:
            status = f"**older than the code** ({since} library commits since)"
        shown = "" if since is None else str(since)
        rows.append(f"| `{path.name}` | {commit or '—'} | {shown} | {status} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table())
