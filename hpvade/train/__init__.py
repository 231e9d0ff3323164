"""Training plans (scvi-tools ``TrainingPlan`` subclasses)."""

from hpvade.train._trainingplan import (
    HPVADETrainingPlan,
    NonFiniteLossError,
    ScaleMismatchError,
)

__all__ = ["HPVADETrainingPlan", "NonFiniteLossError", "ScaleMismatchError"]
