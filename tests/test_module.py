"""The module's fast paths agree with the plain differentiable expressions they replace."""

import numpy as np
import torch

from hpvade.core import bulk_reconstruction_error


def _problem(n_samples=300, n_genes=400, n_types=6):
    g = torch.Generator().manual_seed(0)
    signature = torch.rand(n_genes, n_types, generator=g) ** 4
    signature = signature / signature.sum(0) * 1e6
    truth = torch.distributions.Dirichlet(torch.ones(n_types)).sample((n_samples,))
    bulk = truth @ signature.T * torch.exp(0.2 * torch.randn(n_samples, n_genes, generator=g))
    return bulk, signature, truth


def test_no_grad_error_equals_differentiable_error():
    bulk, signature, truth = _problem()
    with torch.enable_grad():
        expected = bulk_reconstruction_error(bulk, truth, signature)
    with torch.no_grad():
        fast = bulk_reconstruction_error(bulk, truth, signature)
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)


def test_terms_of_weight_zero_are_logged_without_a_graph():
    """A loss term of weight 0 changes no gradient: it is computed for the log only, so the
    backward pass skips it; with a weight it is part of the graph."""
    from scvi import REGISTRY_KEYS

    from hpvade._constants import BULK_KEY, BULK_PROPORTIONS_KEY
    from hpvade.module import HPVADEModule

    bulk, signature, truth = _problem(n_samples=8, n_genes=50, n_types=3)
    cells = torch.log1p(torch.rand(16, 50) * 5)
    tensors = {
        REGISTRY_KEYS.X_KEY: cells,
        REGISTRY_KEYS.LABELS_KEY: torch.randint(0, 3, (16, 1)),
        BULK_KEY: bulk,
        BULK_PROPORTIONS_KEY: truth,
    }
    for weight, expected in ((0.0, False), (1.0, True)):
        module = HPVADEModule(50, 3, signature=signature.numpy(), prototype_weight=weight,
                              bulk_weight=weight, learn_signature=True)  # fmt: skip
        _, _, output = module(tensors)
        assert output.extra_metrics["prototype_loss"].requires_grad is expected
        assert output.extra_metrics["bulk_loss"].requires_grad is expected
        assert output.extra_metrics["proportion_loss"].requires_grad
        assert torch.isfinite(output.loss)


def test_sample_scores_by_chunks_equal_one_call(monkeypatch):
    from hpvade.core._diagnostics import sample_scores, unexplained_expression

    bulk, signature, truth = _problem(n_samples=30, n_genes=50, n_types=3)
    args = (bulk.double().numpy(), truth.double().numpy(), signature.double().numpy())
    monkeypatch.setattr("hpvade.core._diagnostics.ROW_BATCH_SIZE", 4)
    whole = sample_scores(unexplained_expression, *args)
    monkeypatch.setattr("hpvade.core._diagnostics.SCORE_CHUNK", 8)
    chunked = sample_scores(unexplained_expression, *args)
    assert chunked.shape == (30,) and chunked.dtype == np.float64 and (whole > 0).all()
    np.testing.assert_array_equal(chunked, whole)
