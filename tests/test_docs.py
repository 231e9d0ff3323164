"""Every public function and class has a numpydoc docstring and a place in the API reference."""

import inspect
from pathlib import Path

import pytest

import hpvade
from hpvade import baselines, datasets, metrics, pl, pp
from hpvade.module import HPVADEModule
from hpvade.train import HPVADETrainingPlan, NonFiniteLossError, ScaleMismatchError

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _public_functions():
    for module in (pp, pl, metrics, baselines, datasets):
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
    "train.ScaleMismatchError": ScaleMismatchError,
    "train.NonFiniteLossError": NonFiniteLossError,
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
