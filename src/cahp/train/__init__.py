"""Fine-tuning and post-pruning recovery."""

from cahp.train.finetune import FinetuneConfig, TaskOptions, finetune, is_finished_run, subsample
from cahp.train.loop import TrainingConfig, set_seed, train_model

__all__ = [
    "FinetuneConfig",
    "TaskOptions",
    "TrainingConfig",
    "finetune",
    "is_finished_run",
    "set_seed",
    "subsample",
    "train_model",
]
