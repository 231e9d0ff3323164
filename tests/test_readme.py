"""The README's Python blocks run as written, in order, in one namespace (on data scanpy
ships: no download)."""

import re
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import scvi

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_blocks_run_as_written():
    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the Quickstart and the adapt example"
    namespace: dict = {}
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    bulk, props = namespace["bulk"], namespace["props"]
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
    for key in ("hpvade_fit_score", "hpvade_unexplained_score", "hpvade_unknown_lower_bound"):
        assert key in bulk.obs, key
    assert {"hpvade_gene_report", "hpvade_estimator"} <= set(bulk.uns)
    assert "hpvade_proportions" in bulk.obsm
