"""slsam_hf: sparse-layer, zero-order Sharpness-Aware Minimization for transformers.Trainer."""

from .arms import Arm, group_arms
from .ascent import first_order_direction, perturb, restore, zero_order_direction
from .callbacks import SharpnessCallback
from .selection import LayerBandit, UniformSelector, project_to_budget
from .sharpness import measure_sharpness
from .trainer import SAMTrainer, SAMTrainerMixin
from .training_args import SAMTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "Arm",
    "LayerBandit",
    "SAMTrainer",
    "SAMTrainerMixin",
    "SAMTrainingArguments",
    "SharpnessCallback",
    "UniformSelector",
    "first_order_direction",
    "group_arms",
    "measure_sharpness",
    "perturb",
    "project_to_budget",
    "restore",
    "zero_order_direction",
]
