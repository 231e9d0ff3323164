"""Training plans (scvi-tools ``TrainingPlan`` subclasses)."""

from hpvade._exceptions import NonFiniteLossError, ScaleMismatchError
from hpvade.train._trainingplan import HPVADETrainingPlan, max_epochs_heuristic

__all__ = [
    "HPVADETrainingPlan",
    "NonFiniteLossError",
    "ScaleMismatchError",
    "max_epochs_heuristic",
]
