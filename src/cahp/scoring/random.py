"""Random control: seeded uniform scores. The baseline every method must beat, and the spec of the contract."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedModel

from cahp.scoring.base import HeadScorer, head_grid, register_scorer

if TYPE_CHECKING:
    from cahp.calibration import Calibration


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "RandomScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"seed": 0},
}


@register_scorer("random")
class RandomScorer(HeadScorer):
    """Scores drawn uniformly from ``[0, 1)`` by ``numpy.random.default_rng(seed)``; data and weights unused.

    Args:
        seed: the same seed gives the same scores, another seed other scores.
    """

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        return np.random.default_rng(self.seed).random(head_grid(model))
