"""Training plan: pairs cell minibatches with pseudobulk minibatches and guards the scales."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from scvi import REGISTRY_KEYS, settings
from scvi.train import TrainingPlan

from hpvade._constants import BULK_KEY, BULK_PROPORTIONS_KEY
from hpvade._exceptions import NonFiniteLossError, ScaleMismatchError
from hpvade.module import HPVADEModule

logger = logging.getLogger(__name__)

#: Minibatches of a default ``train()`` (see ``max_epochs_heuristic``) and its learning rate.
DEFAULT_TRAIN_STEPS = 600
DEFAULT_LR = 3e-3
#: Steps between non-finite loss checks on an accelerator (each check waits for the device).
FINITE_CHECK_EVERY = 50
#: ``scale_ratio = mean(bulk) / mean(p @ S.T)`` outside this range gets a warning ...
SCALE_WARN_RANGE = (0.5, 2.0)
#: ... and outside this one a severe warning (an error with ``strict_scale_check=True``).
SCALE_SEVERE_RANGE = (0.1, 10.0)


class HPVADETrainingPlan(TrainingPlan):
    """:class:`~scvi.train.TrainingPlan` for :class:`~hpvade.HPVADE`.

    Every minibatch of reference cells is paired with a minibatch drawn from a pool of
    pseudobulks simulated from the training cells; validation pairs held-out cells with
    pseudobulks simulated from held-out cells. On the first training batch the plan records the
    scales of the bulk, of S and of ``p @ S.T`` and warns on a mismatch; any non-finite loss term
    stops training with :class:`NonFiniteLossError` (checked every step on CPU; on an
    accelerator every ``finite_check_every`` steps, so that the host need not wait for it).

    Parameters
    ----------
    module
        The :class:`~hpvade.module.HPVADEModule`.
    pseudobulk_train
        ``(cpm, proportions)`` tensors of the training pool.
    pseudobulk_validation
        ``(cpm, proportions)`` tensors of the validation pool, or ``None``.
    strict_scale_check
        Raise :class:`ScaleMismatchError` instead of warning when the scale ratio is outside
        [0.1, 10].
    lr
        Learning rate (scvi-tools' default is 1e-3; 3e-3 reaches the same cell-type expression
        in a tenth of the steps).
    finite_check_every
        Steps between checks for non-finite losses; ``None``: every step on CPU,
        :data:`FINITE_CHECK_EVERY` on an accelerator (a check waits for the device).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan` (``weight_decay``, KL warm-up, ...).
    """

    def __init__(
        self,
        module: HPVADEModule,
        *,
        pseudobulk_train: tuple[torch.Tensor, torch.Tensor],
        pseudobulk_validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        strict_scale_check: bool = False,
        lr: float = DEFAULT_LR,
        finite_check_every: int | None = None,
        **kwargs,
    ):
        super().__init__(module, lr=lr, **kwargs)
        self.strict_scale_check = strict_scale_check
        self.register_buffer("pool_train_cpm", pseudobulk_train[0], persistent=False)
        self.register_buffer("pool_train_props", pseudobulk_train[1], persistent=False)
        if pseudobulk_validation is not None:
            self.register_buffer("pool_val_cpm", pseudobulk_validation[0], persistent=False)
            self.register_buffer("pool_val_props", pseudobulk_validation[1], persistent=False)
        self.scale_check: dict[str, float] | None = None
        self.finite_check_every = finite_check_every
        self._pending_losses: list = []

    # ------------------------------------------------------------------------------- helpers
    def _rank(self) -> tuple[int, int]:
        """This process's rank and the number of processes (``(0, 1)`` on one device)."""
        trainer = self._trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, max(trainer.world_size, 1)

    @staticmethod
    def _with_bulk(batch, cpm, props, index):
        batch = dict(batch)
        batch[BULK_KEY] = cpm[index]
        batch[BULK_PROPORTIONS_KEY] = props[index]
        return batch

    def forward(self, *args, **kwargs):
        """Passthrough to the module; keeps the step's outputs for the checks below, which
        release them (a kept graph would hold the last batch's activations after training)."""
        outputs = super().forward(*args, **kwargs)
        self._step_outputs = outputs
        return outputs

    def compute_and_log_metrics(self, loss_output, metrics, mode: str) -> None:
        """scvi-tools' metric logging under ``no_grad`` instead of ``inference_mode``: Lightning
        keeps a batch-size tensor per logged loss term, and one made in inference mode cannot
        be reduced across processes at the epoch's end (DDP fails on the extra metrics)."""
        log = TrainingPlan.compute_and_log_metrics
        with torch.no_grad():
            getattr(log, "__wrapped__", log)(self, loss_output, metrics, mode)

    def _check_finite(self, loss_output, stage: str) -> None:
        """Queue this step's loss terms; check the queue every ``finite_check_every`` steps.

        Reading a device's value on the host waits for the device: on CPU every step is
        checked at once, on an accelerator once every :data:`FINITE_CHECK_EVERY` steps and at
        each epoch's end, so the host can queue steps ahead of the device. Detached terms hold
        no graph and cost no kernel.
        """
        terms = {
            "loss": loss_output.loss,
            "reconstruction_loss": loss_output.reconstruction_loss_sum,
            "kl_local": loss_output.kl_local_sum,
            **loss_output.extra_metrics,
        }
        terms = {k: v.detach() for k, v in terms.items() if isinstance(v, torch.Tensor)}
        self._pending_losses.append((stage, self.global_step, self.current_epoch, terms))
        every = self.finite_check_every
        if every is None:
            every = 1 if loss_output.loss.device.type == "cpu" else FINITE_CHECK_EVERY
        if len(self._pending_losses) >= every:
            self._raise_if_not_finite()

    def _raise_if_not_finite(self) -> None:
        """One host synchronisation for every queued step; the term is named only on failure."""
        pending, self._pending_losses = self._pending_losses, []
        if not pending:
            return
        losses = torch.stack([terms["loss"].float() for *_, terms in pending])
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        stage, step, epoch, terms = pending[int((~finite).nonzero()[0, 0])]
        bad = (k for k, v in terms.items() if k != "loss" and not v.isfinite().all())
        name = next(bad, "loss")
        value = float(terms[name].float().mean())
        raise NonFiniteLossError(
            f"Non-finite {name} ({value}) at {stage} step {step} (epoch "
            f"{epoch}); training stopped. Likely causes: a learning rate that is "
            "too high (try plan_kwargs={'lr': 1e-4}), a bulk/signature scale mismatch (see the "
            "scale check), or NaN/Inf in the input."
        )

    def _check_scales(self, batch, inference_outputs) -> None:
        with torch.no_grad():
            bulk = batch[BULK_KEY]
            signature = self.module.signature()
            reconstruction = inference_outputs["proportions"] @ signature.T
            check = {
                "scale_bulk": float(bulk.mean()),
                "scale_signature": float(signature.mean()),
                "scale_reconstruction": float(reconstruction.mean()),
            }
            ratio = check["scale_bulk"] / max(check["scale_reconstruction"], 1e-30)
            check["scale_ratio"] = ratio
        self.scale_check = check
        for key, value in check.items():
            self.log(key, value, on_step=False, on_epoch=True, batch_size=1)
        logger.info(
            "First-batch scale check: mean bulk %.4g, mean S %.4g, mean p @ S.T %.4g, ratio %.3g",
            check["scale_bulk"],
            check["scale_signature"],
            check["scale_reconstruction"],
            ratio,
        )
        message = (
            f"Bulk and reconstructed bulk are on different scales: mean bulk "
            f"{check['scale_bulk']:.4g} vs mean p @ S.T {check['scale_reconstruction']:.4g} "
            f"(mean S {check['scale_signature']:.4g}), scale_ratio {ratio:.3g}. Both must be "
            "linear CPM (rows summing to 1e6): a log-transformed bulk, counts that were not "
            "CPM-normalised, or a signature built on another scale are the usual causes."
        )
        lo, hi = SCALE_SEVERE_RANGE
        if not lo <= ratio <= hi or not math.isfinite(ratio):
            if self.strict_scale_check:
                raise ScaleMismatchError(message)
            warnings.warn(
                "SEVERE: " + message + " Training is likely to diverge.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
        elif not SCALE_WARN_RANGE[0] <= ratio <= SCALE_WARN_RANGE[1]:
            warnings.warn(message, UserWarning, stacklevel=settings.warnings_stacklevel)

    # --------------------------------------------------------------------------- lightning
    def training_step(self, batch, batch_idx):
        """scvi-tools' training step on cells plus a random minibatch of training pseudobulks."""
        n = batch[REGISTRY_KEYS.X_KEY].shape[0]
        rank, n_ranks = self._rank()
        # every process seeds alike: each draws from its own residue class of the pool
        index = torch.randint(
            self.pool_train_cpm.shape[0] // n_ranks, (n,), device=self.pool_train_cpm.device
        )
        index = index * n_ranks + rank
        batch = self._with_bulk(batch, self.pool_train_cpm, self.pool_train_props, index)
        # terms of weight 0 are only logged: once an epoch, not every step
        self.module.log_unweighted_terms = batch_idx == 0
        try:
            loss = super().training_step(batch, batch_idx)
        finally:
            self.module.log_unweighted_terms = True
        inference_outputs, _, loss_output = self._step_outputs
        self._step_outputs = None
        if self.scale_check is None:
            self._check_scales(batch, inference_outputs)
        self._check_finite(loss_output, "training")
        return loss

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        self._raise_if_not_finite()

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        self._raise_if_not_finite()

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation step on held-out cells plus held-out pseudobulks, in order."""
        if not hasattr(self, "pool_val_cpm"):
            return
        n = batch[REGISTRY_KEYS.X_KEY].shape[0]
        n_pool = self.pool_val_cpm.shape[0]
        rank, n_ranks = self._rank()
        start = (batch_idx * n_ranks + rank) * n
        index = (torch.arange(n, device=self.pool_val_cpm.device) + start) % n_pool
        batch = self._with_bulk(batch, self.pool_val_cpm, self.pool_val_props, index)
        super().validation_step(batch, batch_idx)
        loss_output, self._step_outputs = self._step_outputs[2], None
        self._check_finite(loss_output, "validation")


def max_epochs_heuristic(n_cells: int, batch_size: int = 128) -> int:
    """Epochs of a default ``train()``: enough for ``DEFAULT_TRAIN_STEPS`` minibatches of
    ``batch_size`` training cells, and never more than scvi-tools' default (400 below 20,000
    cells, fewer above). What needs training is the VAE behind the cell-type expression; its
    figures stop improving within these steps at ``DEFAULT_LR`` (``benchmarks/expression.py``).
    """
    scvi_default = min(round((20_000 / n_cells) * 400), 400)
    steps = math.ceil(DEFAULT_TRAIN_STEPS * batch_size / n_cells)
    return int(max(1, min(scvi_default, steps)))
