"""cahp: Complementary Attention Head Pruning for Hugging Face Transformers.

The main entry points:

- :func:`cahp.finetune` / :class:`cahp.FinetuneConfig`: fine-tune a classifier (the starting point).
- :func:`cahp.evaluate`: accuracy, macro-F1 and throughput of a saved model.
- :func:`cahp.load_classifier`: load an alias, folder or hub id as ``(model, tokenizer)``.
- :func:`cahp.load_task`: SST-5, SST-2, MNLI or any dataset by column mapping.
"""

from cahp.data import load_task
from cahp.errors import (
    CahpError,
    DataError,
    ModelNotFoundError,
    OutputExistsError,
    PrunedModelError,
    PruningError,
    UnsupportedArchitectureError,
)
from cahp.evaluation.evaluate import evaluate
from cahp.models import load_classifier, resolve_model
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune

__version__ = "0.1.0"

__all__ = [
    "CahpError",
    "DataError",
    "FinetuneConfig",
    "ModelNotFoundError",
    "OutputExistsError",
    "PrunedModelError",
    "PruningError",
    "TaskOptions",
    "TrainingConfig",
    "UnsupportedArchitectureError",
    "__version__",
    "evaluate",
    "finetune",
    "load_classifier",
    "load_task",
    "resolve_model",
]
