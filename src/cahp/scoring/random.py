"""Random control: seeded uniform scores. The baseline every method must beat, and the spec of the contract."""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedModel

from cahp.data.batching import EncodedSplit
from cahp.scoring.base import HeadScorer, head_grid, register_scorer


@register_scorer("random")
class RandomScorer(HeadScorer):
    """Scores drawn uniformly from ``[0, 1)`` by ``numpy.random.default_rng(seed)``; data and weights unused.

    Args:
        seed: the same seed gives the same scores.
    """

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)

    def _score(self, model: PreTrainedModel, tokenizer: Any, data: EncodedSplit, num_labels: int) -> np.ndarray:
        return np.random.default_rng(self.seed).random(head_grid(model))
