"""The benchmark scripts (not run by CI: they take minutes to hours) call only what hpvade has.

A rename inside hpvade would otherwise surface only when someone next runs a benchmark.
"""

import ast
import importlib
from pathlib import Path

import hpvade

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def _trees():
    return [(path.name, ast.parse(path.read_text(), filename=str(path))) for path in BENCHMARKS]


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def test_benchmarks_import_what_hpvade_has():
    assert BENCHMARKS, "no benchmark scripts found"
    for name, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpvade"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{name}: {node.module}.{alias.name}"
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                path = _dotted(node)
                if path and path.startswith("hpvade."):
                    obj = hpvade
                    for part in path.split(".")[1:]:
                        assert hasattr(obj, part), f"{name}: {path}"
                        obj = getattr(obj, part)


def test_benchmarks_use_only_attributes_a_trained_model_has(trained):
    """``model.<name>`` read in a benchmark exists on a trained model, unless the benchmark
    sets it itself."""
    for name, tree in _trees():
        read, written = set(), set()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "model"
            ):
                (read if isinstance(node.ctx, ast.Load) else written).add(node.attr)
        missing = sorted(a for a in read - written if not hasattr(trained, a))
        assert not missing, f"{name} uses model attributes hpvade lacks: {missing}"
