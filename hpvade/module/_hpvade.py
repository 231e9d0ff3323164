"""The HP-VADE torch module: VAE, deconvolution network and the learnable signature S."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import DecoderSCVI, Encoder, FCLayers
from torch import nn
from torch.distributions import Normal, kl_divergence

from hpvade._constants import BULK_KEY, BULK_PROPORTIONS_KEY, COUNTS_KEY, CPM_SCALE
from hpvade.core import anscombe, bulk_reconstruction_error


def _graph_if(needed: bool) -> torch.autograd.grad_mode.set_grad_enabled:
    """Autograd on as it is, or off where the term's gradient would be multiplied by 0."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and needed)


class HPVADEModule(BaseModuleClass):
    """Hierarchical Prototype VAE for deconvolution.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of cell types.
    signature
        Initial signature (genes × types, CPM). ``None`` gives a flat start, only for modules
        whose weights are loaded afterwards.
    n_hidden, n_latent, n_layers, dropout_rate
        Sizes of the VAE (scvi-tools names).
    n_layers_deconv
        Hidden layers of the deconvolution network.
    signature_pseudocount
        CPM added to S before taking logs, so genes unseen in a small type can still grow.
    prototype_weight, bulk_weight, proportion_weight
        Weights of the prototype, bulk-reconstruction and proportion loss terms. The first two
        are 0 by default: with S kept at the reference signature they changed no proportion
        and no cell-type expression (docs page "The model and its losses"); both terms are
        still computed and logged.
    use_counts
        Reconstruct the registered raw-count layer instead of ``expm1(X)``.
    use_vae
        Train the single-cell path (reconstruction, KL, prototype). ``False`` is an ablation.
    learn_signature
        Let training move S. ``False`` (default) keeps the reference signature: a learned S
        changed no proportion on real bulk (docs page "The model and its losses").
    vae_genes
        Indices of the genes the networks model (``None``: all): the VAE encodes and
        reconstructs them, the deconvolution network reads them. S keeps all ``n_input`` genes.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        signature: np.ndarray | None = None,
        n_hidden: int = 128,
        n_latent: int = 32,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        n_layers_deconv: int = 2,
        signature_pseudocount: float = 0.5,
        prototype_weight: float = 0.0,
        bulk_weight: float = 0.0,
        proportion_weight: float = 100.0,
        use_counts: bool = False,
        use_vae: bool = True,
        learn_signature: bool = False,
        vae_genes: np.ndarray | None = None,
    ):
        super().__init__()
        self.n_input = n_input
        if vae_genes is None:
            self.vae_gene_index = None
        else:
            # not saved with the weights: the model passes the genes again when it is loaded
            index = torch.as_tensor(np.asarray(vae_genes, dtype=np.int64))
            self.register_buffer("vae_gene_index", index, persistent=False)
        self.n_vae_genes = n_input if vae_genes is None else len(vae_genes)
        self.n_labels = n_labels
        self.n_latent = n_latent
        self.prototype_weight = prototype_weight
        self.bulk_weight = bulk_weight
        #: Whether ``loss`` computes the terms of weight 0, which are only logged; the training
        #: plan turns it off for all but the first training step of an epoch.
        self.log_unweighted_terms = True
        self.proportion_weight = proportion_weight
        self.use_counts = use_counts
        self.signature_pseudocount = signature_pseudocount

        self.encoder = Encoder(
            self.n_vae_genes,
            n_latent,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            return_dist=True,
        )
        self.decoder = DecoderSCVI(
            n_latent, self.n_vae_genes, n_layers=n_layers, n_hidden=n_hidden
        )
        # the module's NB has one dispersion per gene and no zero inflation: DecoderSCVI's
        # per-cell dispersion and dropout heads never reach the loss. Frozen, so that no
        # optimiser keeps state for them and DDP does not wait for their gradients.
        self.decoder.px_r_decoder.requires_grad_(False)
        self.decoder.px_dropout_decoder.requires_grad_(False)
        self.px_r = nn.Parameter(torch.randn(self.n_vae_genes))

        self.deconv_net = FCLayers(
            n_in=self.n_vae_genes,
            n_out=n_hidden,
            n_layers=n_layers_deconv,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
        )
        self.deconv_out = nn.Linear(n_hidden, n_labels)
        # Standardisation of the network's log1p(CPM) input, fitted on the training pseudobulks.
        self.register_buffer("bulk_center", torch.zeros(self.n_vae_genes))
        self.register_buffer("bulk_scale", torch.ones(self.n_vae_genes))

        if signature is None:
            signature = np.full((n_input, n_labels), CPM_SCALE / n_input)
        # S = 1e6 * softmax(logits over genes): non-negative, every column sums to 1e6.
        logits = self._signature_to_logits(signature)
        self.signature_logits = nn.Parameter(logits, requires_grad=learn_signature)
        self.use_vae = use_vae

    # ----------------------------------------------------------------------------- signature
    def signature(self) -> torch.Tensor:
        """The current signature S (genes × types, CPM)."""
        return CPM_SCALE * torch.softmax(self.signature_logits, dim=0)

    @torch.no_grad()
    def signature_array(self) -> np.ndarray:
        """S as a float64 numpy array (genes × types) on the CPU."""
        return self.signature().double().cpu().numpy()

    def _signature_to_logits(self, signature: np.ndarray) -> torch.Tensor:
        values = np.asarray(signature, dtype=np.float64) + self.signature_pseudocount
        return torch.as_tensor(np.log(values), dtype=torch.float32)

    @torch.no_grad()
    def set_signature(self, signature: np.ndarray) -> None:
        """Set S (genes × types, linear); columns are rescaled to 1e6 by the parametrisation."""
        self.signature_logits.copy_(self._signature_to_logits(signature))

    def bulk_path_state(self) -> dict[str, np.ndarray]:
        """A copy of what ``adapt`` changes: S and the deconvolution network (numpy arrays)."""
        return {
            name: value.detach().cpu().numpy().copy()
            for name, value in self.state_dict().items()
            if name == "signature_logits" or name.startswith(("deconv_", "bulk_"))
        }

    @torch.no_grad()
    def load_bulk_path_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`bulk_path_state` snapshot."""
        current = self.state_dict()
        for name, value in state.items():
            current[name].copy_(torch.as_tensor(value))

    def set_bulk_standardization(self, cpm: torch.Tensor) -> None:
        """Fit the network's input standardisation on (pseudo)bulk CPM."""
        logged = torch.log1p(self._vae_columns(cpm.to(self.bulk_center.device, torch.float32)))
        self.bulk_center.copy_(logged.mean(0))
        self.bulk_scale.copy_(logged.std(0).clamp_min(1e-2))

    @auto_move_data
    def deconvolve(self, bulk_cpm: torch.Tensor) -> torch.Tensor:
        """Proportions (samples × types, rows sum to 1) for bulk profiles in CPM (over all
        genes; the network reads the genes the networks model)."""
        h = (torch.log1p(self._vae_columns(bulk_cpm)) - self.bulk_center) / self.bulk_scale
        return torch.softmax(self.deconv_out(self.deconv_net(h)), dim=-1)

    @torch.no_grad()
    def predict_proportions(self, bulk_cpm: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The network's proportions for bulk CPM (samples × types, float64), in batches."""
        self.eval()
        parts = [
            self.deconvolve(
                torch.as_tensor(bulk_cpm[start : start + batch_size], dtype=torch.float32)
            )
            .double()
            .cpu()
            .numpy()
            for start in range(0, bulk_cpm.shape[0], batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_labels))

    # ----------------------------------------------------------------------------- scvi API
    def _get_inference_input(self, tensors, **kwargs):
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "bulk": tensors.get(BULK_KEY),
            "counts": tensors.get(COUNTS_KEY) if self.use_counts else None,
        }

    def _get_generative_input(self, tensors, inference_outputs, **kwargs):
        return {"z": inference_outputs["z"], "library": inference_outputs["library"]}

    def _vae_columns(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """The columns of the genes the VAE models (all when it models every gene)."""
        if values is None or self.vae_gene_index is None:
            return values
        return values.index_select(-1, self.vae_gene_index)

    def _target(self, tensors) -> torch.Tensor:
        """Linear-scale expression that the VAE reconstructs (its genes)."""
        if self.use_counts:
            return self._vae_columns(tensors[COUNTS_KEY])
        return torch.expm1(self._vae_columns(tensors[REGISTRY_KEYS.X_KEY]))

    @auto_move_data
    def inference(self, x, bulk=None, counts=None, n_samples: int = 1):
        """Encode cells (log1p values, all genes: the VAE takes its own) and, if given,
        deconvolve bulk CPM."""
        x, counts = self._vae_columns(x), self._vae_columns(counts)
        qz, z = self.encoder(x)
        if n_samples > 1:
            z = qz.sample((n_samples,))
        linear = torch.expm1(x) if counts is None else counts
        library = torch.log(linear.sum(-1, keepdim=True).clamp_min(1.0))
        outputs = {"qz": qz, "z": z, "library": library}
        if bulk is not None:
            outputs["proportions"] = self.deconvolve(bulk)
        return outputs

    @auto_move_data
    def generative(self, z, library):
        """Decode a normalised profile (softmax over the VAE's genes) and its NB likelihood."""
        px_scale, _, px_rate, _ = self.decoder("gene", z, library)
        theta = torch.exp(self.px_r)
        return {"px": NegativeBinomial(mu=px_rate, theta=theta), "px_scale": px_scale}

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        """All loss terms; each is also returned as a 0-d extra metric for logging."""
        reconstruction = -generative_outputs["px"].log_prob(self._target(tensors)).sum(-1)
        qz = inference_outputs["qz"]
        kl_local = kl_divergence(qz, Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale)))
        kl_local = kl_local.sum(-1)

        signature = self.signature()
        vae_signature = self._vae_columns(signature.T).T
        if self.vae_gene_index is not None:  # the VAE's genes, rescaled to CPM
            vae_signature = vae_signature / vae_signature.sum(0, keepdim=True) * CPM_SCALE
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().view(-1)
        cell_cpm = generative_outputs["px_scale"] * CPM_SCALE
        # each cell's prototype as a one-hot product: its gradient is a matrix product, where
        # indexing S.T[labels] scatters back through a slow index_put
        one_hot = F.one_hot(labels, self.n_labels).to(signature.dtype)
        # reconstruction_loss and kl_local are logged by scvi-tools' ELBO metric already.
        metrics = {}
        if self.use_vae:
            total = torch.mean(reconstruction + kl_weight * kl_local)
        else:
            total = torch.zeros((), device=reconstruction.device)
        # a term of weight 0 is only logged: no graph for it, and only when asked
        if self.prototype_weight != 0 or self.log_unweighted_terms:
            with _graph_if(self.use_vae and self.prototype_weight != 0):
                prototype = F.mse_loss(anscombe(cell_cpm), one_hot @ anscombe(vae_signature).T)
            metrics["prototype_loss"] = prototype
            if self.use_vae:
                total = total + self.prototype_weight * prototype

        if BULK_KEY in tensors and "proportions" in inference_outputs:
            bulk = tensors[BULK_KEY]
            proportions = inference_outputs["proportions"]
            if self.bulk_weight != 0 or self.log_unweighted_terms:
                with _graph_if(self.bulk_weight != 0):
                    bulk_loss = bulk_reconstruction_error(bulk, proportions, signature).mean()
                metrics["bulk_loss"] = bulk_loss
                total = total + self.bulk_weight * bulk_loss
            proportion_loss = F.mse_loss(proportions, tensors[BULK_PROPORTIONS_KEY])
            metrics["proportion_loss"] = proportion_loss
            total = total + self.proportion_weight * proportion_loss

        return LossOutput(
            loss=total,
            reconstruction_loss=reconstruction,
            kl_local=kl_local,
            extra_metrics=metrics,
        )
