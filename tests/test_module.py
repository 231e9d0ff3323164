"""The module's fast paths agree with the plain differentiable expressions they replace."""

import torch

from hpvade.module import bulk_reconstruction_error


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
