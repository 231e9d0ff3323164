"""Every public function and class has a numpydoc docstring and a place in the API reference."""

import inspect
from pathlib import Path

import pytest

import hpvade
from hpvade import baselines, datasets, metrics, pl, pp, tl
from hpvade.module import HPVADEModule
from hpvade.train import HPVADETrainingPlan

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _public_functions():
    for module in (pp, pl, tl, metrics, baselines, datasets):
        for name in getattr(module, "__all__", None) or dir(module):
            obj = getattr(module, name)
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            if obj.__module__.startswith("hpvade"):
                yield f"{module.__name__.removeprefix('hpvade.')}.{name}", obj


CLASSES = {
    "HPVADE": hpvade.HPVADE,
    "module.HPVADEModule": HPVADEModule,
    "train.HPVADETrainingPlan": HPVADETrainingPlan,
    "ScaleMismatchError": hpvade.ScaleMismatchError,
    "NonFiniteLossError": hpvade.NonFiniteLossError,
}
PUBLIC = dict(_public_functions()) | CLASSES


def _parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [
        p
        for p in signature.parameters
        if p not in ("self", "cls")
        and not p.startswith("_")
        and signature.parameters[p].kind not in (inspect.Parameter.VAR_KEYWORD,)
    ]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_documented_and_listed(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    if _parameters(obj) and not issubclass_exception(obj):
        assert "Parameters\n----------" in doc, f"{name}: no numpydoc Parameters section"
    assert f"   {name}\n" in API_PAGE.read_text(), f"{name} is missing from docs/api.md"


def issubclass_exception(obj) -> bool:
    return inspect.isclass(obj) and issubclass(obj, Exception)


def test_public_methods_of_the_model_are_documented():
    for name, member in inspect.getmembers(hpvade.HPVADE, inspect.isfunction):
        if name.startswith("_") or not member.__module__.startswith("hpvade"):
            continue
        doc = inspect.getdoc(member) or ""
        assert doc.strip(), f"HPVADE.{name} has no docstring"


def test_packaging_metadata_declares_what_the_package_uses():
    """License file, classifiers, URLs, authors; every third-party import is a dependency (or,
    imported where it is used, an optional extra)."""
    import ast
    import sys
    import tomllib

    root = Path(hpvade.__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert (root / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert project["classifiers"] and project["urls"] and project["authors"]
    declared = {dep.split(">")[0].split("=")[0].split("[")[0] for dep in project["dependencies"]}
    declared = {name.replace("scvi-tools", "scvi") for name in declared}
    imported = set()
    for path in (root / "hpvade").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            imported |= {n.split(".")[0] for n in names}
    third_party = imported - set(sys.stdlib_module_names) - {"hpvade", "__future__"}
    # optional extras are imported where they are used, never at import time
    extras = {dep.split(">")[0].split("=")[0].split("[")[0] for deps in
              project["optional-dependencies"].values() for dep in deps}  # fmt: skip
    # rich and lightning come with scvi-tools, whose own modules hpvade patches or extends
    assert third_party - declared - extras <= {"rich"}, third_party - declared - extras


def test_scripts_set_omp_wait_policy_and_tutorial_keeps_hpvade_warnings():
    """README "Performance on small or shared machines"; the tutorial hides third-party
    notices only, never hpvade's own warnings."""
    import json

    root = Path(hpvade.__file__).parents[1]
    for script in ("scripts/test", "scripts/demo", "scripts/docs", "benchmarks/run_accuracy"):
        assert (
            'export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"' in (root / script).read_text()
        )
    notebook = json.loads((root / "notebooks" / "tutorial.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    for line in code.splitlines():
        if "filterwarnings" in line and "UserWarning" in line or "category=category" in line:
            assert "module=" in line, line


def test_first_contact_texts():
    """README shows where `bulk` comes from and what train costs; train documents the progress
    bar; CHANGELOG has a section for the version and no bullets run together; the demo says in
    words why a per-type r is undefined."""
    import importlib.util
    import re

    import numpy as np
    import pandas as pd

    root = Path(hpvade.__file__).parents[1]
    readme = root.joinpath("README.md").read_text()
    quickstart = re.search(r"## Quickstart\n\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "pbmc68k_reference()" in quickstart and "simulate_pseudobulk" in quickstart
    assert "pd.read_csv" in readme and "AnnData(table)" in readme  # a user's own table
    assert "A default `train()` takes 600 minibatches" in readme
    doc = inspect.getdoc(hpvade.HPVADE.train)
    assert "enable_progress_bar" in doc and '"mps, "auto"' not in doc
    changelog = root.joinpath("CHANGELOG.md").read_text()
    assert f"## [{hpvade.__version__}]" in changelog
    assert not re.search(r"[.`)]- [`A-Za-z]", changelog)
    spec = importlib.util.spec_from_file_location("demo", root / "examples" / "pbmc_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    per_type = pd.DataFrame({"NNLS": [0.9, np.nan]}, index=["B", "naive CD4"])
    (note,) = demo.undefined_r_notes(per_type)
    assert "NNLS: r is undefined for naive CD4" in note and "same fraction" in note


def test_readme_accuracy_figures_come_from_the_results_files():
    """Every figure the README's Accuracy section quotes is in a results file the section cites
    (each names the commit that produced it)."""
    import re

    root = Path(hpvade.__file__).parents[1]
    readme = root.joinpath("README.md").read_text()
    section = readme.split("\n## Accuracy\n", 1)[1].split("\n## ", 1)[0]
    cited = set(re.findall(r"benchmarks/results/([\w.]+\.md)", section))
    results = "".join((root / "benchmarks" / "results" / name).read_text() for name in cited)
    figures = re.findall(r"(?<![\d.])0\.\d{2,3}(?!\d)", section)
    assert len(figures) >= 10, figures
    assert all(len(f) == 5 for f in figures), "quote figures as the results files do (0.xxx)"
    missing = [f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", results)]
    assert not missing, f"README figures with no source in benchmarks/results: {missing}"


def test_every_results_file_names_the_commit_that_produced_it():
    """The docs page "Benchmarks" renders each results file's age from this commit."""
    import importlib.util

    root = Path(hpvade.__file__).parents[1]
    path = root / "benchmarks" / "freshness.py"
    spec = importlib.util.spec_from_file_location("freshness", path)
    freshness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freshness)
    results = sorted((root / "benchmarks" / "results").glob("*.md"))
    assert results
    full_history = freshness._git("rev-parse", "--is-shallow-repository") == "false"
    for path in results:
        commit = freshness.produced_at(path)
        assert commit, f"{path.name} names no commit"
        if full_history and freshness.library_commits_since(commit) is None:
            raise AssertionError(f"{path.name}: commit {commit} is not in this history")
    table = freshness.table()
    assert all(f"`{path.name}`" in table for path in results)


def test_readme_figures_come_from_the_results_files_their_section_cites():
    """In every README section that cites results files, each decimal figure is in one of
    them (the files name their commit; the docs page "Benchmarks" shows how old each is); a
    section that cites none quotes no measured figure."""
    import re

    root = Path(hpvade.__file__).parents[1]
    readme = root.joinpath("README.md").read_text()
    figure = r"(?<![\w.])\d+(?:,\d{3})*\.\d+(?![\w.])"
    for section in readme.split("\n## ")[1:]:
        title = section.splitlines()[0]
        cited = set(re.findall(r"benchmarks/results/([\w.]+\.md)", section))
        prose = re.sub(r"```.*?```|`[^`\n]*`", "", section, flags=re.S)  # code is not a figure
        figures = [f for f in re.findall(figure, prose) if f not in ("3.11", "2.13.0")]
        if not cited:
            assert not figures, f"README section {title!r} quotes {figures} and cites no results"
            continue
        results = "".join((root / "benchmarks" / "results" / name).read_text() for name in cited)
        # a whole number there, not a prefix of one ("50.2" is not "50.23")
        missing = [
            f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", results)
        ]
        assert not missing, f"README section {title!r}: {missing} are in none of {cited}"


def test_docs_page_figures_come_from_the_results_files_the_page_cites():
    """Every decimal figure in the prose and tables of a docs page (not its maths or code) is,
    as written, in a results file the page cites."""
    import re

    root = Path(hpvade.__file__).parents[1]
    names = {path.name for path in (root / "benchmarks" / "results").glob("*.md")}
    figure = r"(?<![\w.])\d+(?:,\d{3})*\.\d+(?![\w.])"
    for page in sorted((root / "docs").glob("*.md")):
        text = page.read_text()
        prose = re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)
        prose = re.sub(r"\$[^$\n]*\$|`[^`]*`", "", prose)
        cited = {name for name in re.findall(r"(\w+\.md)", text) if name in names}
        results = "".join((root / "benchmarks" / "results" / name).read_text() for name in cited)
        missing = [
            f
            for f in re.findall(figure, prose)
            if not re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", results)
        ]
        assert not missing, f"{page.name}: {missing} are in none of {sorted(cited)}"


def _results_versions(root: Path, name: str, commits: set[str]) -> str:
    """A results file as it is, and as it was when produced at any of ``commits`` (from git
    history; nothing where the checkout has no history)."""
    import re
    import subprocess

    path = f"benchmarks/results/{name}"
    texts = [(root / path).read_text()]
    if not commits:
        return texts[0]
    try:
        log = subprocess.run(
            ["git", "log", "--format=%h", "--", path], cwd=root, capture_output=True, text=True
        ).stdout.split()
    except OSError:
        return texts[0]
    for revision in log:
        old = subprocess.run(
            ["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True
        ).stdout
        produced = re.search(r"at commit ([0-9a-f]{7,40})", "\n".join(old.splitlines()[:15]))
        if produced and any(produced.group(1)[:7] == c[:7] for c in commits):
            texts.append(old)
    return "".join(texts)


def test_changelog_unreleased_figures_come_from_the_results_files_each_entry_cites():
    """Every decimal figure of an entry under "Unreleased" is, as written, in a results file
    the entry cites: as it is, or as it was at a commit the entry names."""
    import re

    root = Path(hpvade.__file__).parents[1]
    text = (root / "CHANGELOG.md").read_text()
    start = text.index("## [Unreleased]")
    unreleased = text[start : text.index("\n## [", start + 1)]
    names = {path.name for path in (root / "benchmarks" / "results").glob("*.md")}
    figure = r"(?<![\w.])\d+(?:,\d{3})*\.\d+(?![\w.])"
    version = r"(?:until|in|before|since|to)\s+$"
    for entry in re.split(r"\n- ", unreleased)[1:]:
        prose = re.sub(r"`[^`]*`", "", entry)
        figures = [
            m.group(0)
            for m in re.finditer(figure, prose)
            if not re.search(version, prose[: m.start()]) or not re.fullmatch(r"0\.\d", m[0])
        ]
        if not figures:
            continue
        cited = {name for name in re.findall(r"(\w+\.md)", entry) if name in names}
        assert cited, f"CHANGELOG entry quotes {figures} and cites no results file: {entry[:80]!r}"
        commits = set(re.findall(r"\b[0-9a-f]{7}\b", entry))
        results = "".join(_results_versions(root, name, commits) for name in cited)
        found = [re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", results) for f in figures]
        missing = [f for f, hit in zip(figures, found, strict=True) if not hit]
        assert not missing, f"CHANGELOG entry {entry[:80]!r}: {missing} are in none of {cited}"


def test_pages_name_the_commit_of_every_results_file_they_cite():
    """README and docs pages write each citation of a results file with the commit the file
    was produced at ("`benchmarks/results/real.md` at ac862a7"): a re-run benchmark fails
    this until the pages that quote it are read again."""
    import re

    root = Path(hpvade.__file__).parents[1]
    results = root / "benchmarks" / "results"
    produced = {
        path.name: re.search(r"at commit ([0-9a-f]{7})", path.read_text()).group(1)
        for path in results.glob("*.md")
    }
    stale = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text()
        for name in re.findall(r"(?<![\w/])(\w+\.md)`", text):
            if name in produced:
                stale.append(f"{page.name}: `{name}` without its path and commit")
        for name, commit in re.findall(
            r"`benchmarks/results/(\w+\.md)`(?: at ([0-9a-f]{7}))?", text
        ):
            if commit != produced.get(name):
                stale.append(
                    f"{page.name}: {name} at {commit or '?'}, produced at {produced.get(name)}"
                )
    assert not stale, "\n".join(stale)
