"""The house's rules, checked: the import layers of docs/contributing.md, no import circle,
no private scvi-tools import, library text without benchmark figures, mixins that keep to
their own private methods, and docstrings short enough to read."""

from pathlib import Path

import hpvade


def test_no_private_scvi_tools_import():
    """scvi-tools' private modules (``scvi.x._y``) can move between releases: none is used."""
    package = Path(hpvade.__file__).parent
    offending = [
        f"{path.relative_to(package)}: {line.strip()}"
        for path in package.rglob("*.py")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith(("from scvi", "import scvi")) and "._" in line.split()[1]
    ]
    assert not offending, offending


#: docs/contributing.md's import rule: which hpvade modules each layer may import (prefixes).
FOUNDATION = ("_constants", "_exceptions", "_compat", "_logging", "_random")
LAYERS = {
    FOUNDATION: (),
    ("data",): (*FOUNDATION, "data"),
    ("core",): (*FOUNDATION, "data", "core"),
    ("module",): (*FOUNDATION, "core", "module"),
    ("train",): (*FOUNDATION, "module", "train"),
    ("pp", "tl", "metrics", "baselines", "datasets", "pl"): (
        *FOUNDATION,
        "data",
        "core",
        "metrics",
        "tl",
    ),
}


def _imports() -> dict[str, list[str]]:
    """Each hpvade module (dotted, without ``hpvade.``) and the hpvade modules it imports,
    at the top or inside a function."""
    import ast

    package = Path(hpvade.__file__).parent
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = [
            node.module.removeprefix("hpvade.")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpvade.")
        ]
    return out


def test_import_rule():
    """Lower layers never import higher ones; model mixins never import each other."""
    for name, imported in _imports().items():
        for layer, allowed in LAYERS.items():
            if name.split(".")[0] in layer:
                bad = [m for m in imported if not m.startswith(allowed)]
                assert not bad, f"{name} imports {bad}"
        if not name.startswith("core"):
            private = [m for m in imported if m.startswith("core._")]
            assert not private, f"{name} imports core's private files {private}: use hpvade.core"
        if name.startswith("model._") and name != "model._hpvade":
            mixins = [m for m in imported if m.startswith("model.") and m != "model._fitted_state"]
            assert not mixins, f"{name} imports other model files: {mixins}"


def test_no_module_imports_itself_through_others():
    """No import circle, lazy imports inside functions included: each module can be read
    knowing only what it imports."""
    graph = _imports()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, target, seen):
                    return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert not circles, circles


def test_library_text_quotes_no_benchmark_figure():
    """Docstrings, comments and messages say what the code does and why; figures live in
    benchmarks/results and history in the CHANGELOG."""
    import re

    patterns = [
        r"\br (?:= |of )?0\.\d",  # a correlation
        r"\bAUC \d",
        r"\b0\.\d+ ?(?:/|->|→) ?0\.\d+",  # a series or a before -> after of figures
        r"\bbefore 0\.\d",  # release history
        r"\bthe old (?:start|fit|default)\b",
        r"\b\d+(?:\.\d+)?x\b",  # a speed ratio
        r"\b\d+(?:\.\d+)? s\b",  # a time
        r"\bmeasured \d",
        r"\d %(?! interval)(?! of them)",  # a measured share (the 90 % intervals are a choice)
        r"scratch measurement|not in a results file",
        r'\bissue "',  # history lives in the CHANGELOG
    ]
    package = Path(hpvade.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(re.search(pattern, line) for pattern in patterns)
    ]
    assert not found, "\n".join(found)


def test_mixins_call_no_private_method_of_another_model_file():
    """A mixin reads on its own: it calls its own private methods, scvi-tools' and the public
    methods of the model (``estimator()``, ``simulator``, ...); no private method of another
    mixin or of ``HPVADE`` itself. No exemption."""
    import ast

    model_dir = Path(hpvade.__file__).parent / "model"
    files = sorted(p.stem for p in model_dir.glob("_*.py") if p.stem != "__init__")
    trees = {name: ast.parse((model_dir / f"{name}.py").read_text()) for name in files}
    defined = {
        name: {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef)
            and node.name.startswith("_")
            and not node.name.startswith("__")
        }
        for name, tree in trees.items()
    }
    for name, tree in trees.items():
        called = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
        }
        for other in files:
            if other != name:
                crossing = called & defined[other]
                assert not crossing, f"model/{name}.py calls {other}'s private {crossing}"


def test_names_moved_to_the_core_still_import_from_module_with_a_warning():
    import pytest

    import hpvade.core
    import hpvade.module

    with pytest.warns(FutureWarning, match="moved to `hpvade.core.sample_scores`"):
        assert hpvade.module.sample_scores is hpvade.core.sample_scores
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        hpvade.module.nothing  # noqa: B018


def test_the_default_walk_of_a_bulk_passes_through_at_most_eight_files():
    """From ``get_proportions`` to ``obsm`` (in memory, default arguments, after a first
    call has compiled and calibrated what it needs), profiled: the files of ``hpvade/`` whose
    functions run (docs/contributing.md draws the walk)."""
    import sys

    import pytest

    from tests._every_output import READABLE

    if not READABLE:
        pytest.skip("the saved model is a numpy 2 pickle")

    from tests._every_output import load_saved_model

    model, bulk = load_saved_model()
    model.get_proportions(bulk.copy())
    package = str(Path(hpvade.__file__).parent)
    files = []

    def record(frame, event, arg):
        name = frame.f_code.co_filename
        if name.startswith(package) and name not in files:
            files.append(name)

    sys.setprofile(record)
    try:
        model.get_proportions(bulk.copy())
    finally:
        sys.setprofile(None)
    walked = [str(Path(f).relative_to(package)) for f in files]
    assert len(walked) <= 8, walked
    assert walked[:2] == ["_compat.py", "model/_deconvolution.py"], walked


def test_the_models_public_docstrings_are_short():
    """A method's docstring says what it takes and gives (numpydoc); the algorithm's prose is
    on docs/model.md. The class docstring, which lists the attributes, is exempt."""
    import inspect

    long = {
        name: len(inspect.getdoc(member).splitlines())
        for name, member in _model_members().items()
        if not name.startswith("_") and callable(member) and inspect.getdoc(member)
    }
    assert max(long.values()) <= 35, sorted(long.items(), key=lambda item: -item[1])[:3]


def _model_members() -> dict:
    """What HPVADE and its mixins define (not what scvi-tools' classes do)."""
    members = {}
    for base in hpvade.HPVADE.__mro__:
        if base.__module__.startswith("hpvade.model"):
            members.update(vars(base))
    return members
