"""Training on several processes (DDP over gloo, on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("_ddp_train.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two processes of a DDP ``train()`` ended with."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, str(HELPER), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_training_on_two_processes_trains_one_model(ranks):
    first, second = ranks
    assert first["world_size"] == second["world_size"] == 2
    # DDP keeps one model: the same weights, checks and calibrations on every process
    assert first["deconv_weight_sum"] == second["deconv_weight_sum"]
    for result in ranks:
        assert 0.9 < result["scale_ratio"] < 1.1
    assert first["unexplained_threshold"] == pytest.approx(second["unexplained_threshold"])
    np.testing.assert_allclose(first["proportions"], second["proportions"], atol=1e-9)
    losses = first["train_loss"]
    assert len(losses) == 20 and losses[-1] < 0.8 * losses[0]


def test_training_on_two_processes_serves_the_proportions_of_one(ranks, trained, test_bulk):
    single = trained.get_proportions(test_bulk.copy())
    np.testing.assert_allclose(ranks[0]["proportions"], single.to_numpy(), atol=1e-4)
    assert ranks[0]["r"] > 0.7
