"""What a user sees: a train / save / load run outside a terminal prints (almost) nothing."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # starts Python processes

SCRIPT = textwrap.dedent(
    """
    import tempfile
    import anndata as ad, numpy as np, pandas as pd
    import hpvade
    rng = np.random.default_rng(0)
    types = rng.integers(0, 3, 200)
    counts = rng.poisson(rng.gamma(0.5, 1.0, (3, 60))[types] * 20 + 0.05).astype(np.float32)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    obs = pd.DataFrame({{"cell_type": pd.Categorical([f"t{{t}}" for t in types])}},
                       index=[f"c{{i}}" for i in range(200)])
    ref = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{{j}}" for j in range(60)]))
    hpvade.HPVADE.setup_anndata(ref, labels_key="cell_type")
    model = hpvade.HPVADE(ref, n_hidden=16, n_latent=4)
    model.train(max_epochs=20, n_pseudobulk=64)
    path = tempfile.mkdtemp()
    model.save(path, overwrite=True)
    loaded = hpvade.HPVADE.load(path, adata=ref)
    bulk = hpvade.pp.simulate_pseudobulk(ref, "cell_type", n_pseudobulk=5)
    print("proportions", loaded.get_proportions(bulk).shape)
    """
)
NOISE = ("GPU available", "TPU available", "litlogger", "LeafSpec", "log_every_n_steps",
         "already downloaded", "Seed set", "num_workers")  # fmt: skip


def _run(tmp_path, prefix=""):
    script = prefix + SCRIPT.format()
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )


def test_train_save_load_are_quiet_outside_a_terminal(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert not [n for n in NOISE if n in output], output
    assert "proportions (5, 3)" in output
    assert len(output.strip().splitlines()) <= 3, output  # no progress bar piling up


def test_debug_logging_shows_the_third_party_notices(tmp_path):
    prefix = "import logging\nlogging.getLogger('hpvade').setLevel(logging.DEBUG)\n"
    result = _run(tmp_path, prefix)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GPU available" in result.stdout + result.stderr


def test_a_training_error_is_reported_once(tmp_path):
    """scvi-tools prints "Exception raised during training" before re-raising; hpvade's own
    error (here a NaN loss) is the only message."""
    broken = SCRIPT.format().replace(
        "model.train(",
        "import torch\ntorch.nn.init.constant_(model.module.signature_logits, float('nan'))\n"
        "model.train(",
    )
    result = subprocess.run(
        [sys.executable, "-c", broken], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr
    assert "Exception raised during training" not in result.stdout + result.stderr
