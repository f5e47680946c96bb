"""Head importance of Michel et al. (2019), "Are Sixteen Heads Really Better than One?".

``I_h = E |dL/dm_h|`` for a gate ``m_h = 1`` on each head's context, with frozen weights and ``L`` the
calibration objective's loss (:func:`cahp.scoring.salience.gradient_salience`, which takes the absolute value
of each mini-batch's gradient), then, as in the paper, each layer's scores divided by their L2 norm.
CAHP's reference salience is this scorer with ``normalize_layers=False, fraction=0.25``.

Seed: the batches are shuffled with ``seed`` and ``|gradient|`` is taken per batch, so the scores depend on
which examples share a batch, hence on the seed, unless one batch holds every example used (and
``fraction=1``). ``max_examples`` below the calibration size also draws the subset with ``seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedModel

from cahp.scoring.base import HeadScorer, register_scorer
from cahp.scoring.salience import gradient_salience

if TYPE_CHECKING:
    from cahp.calibration import Calibration


def normalize_layers(scores: np.ndarray) -> np.ndarray:
    """Divide each layer's row ``[heads]`` by its L2 norm (rows of zeros stay zero)."""
    norms = np.linalg.norm(scores, axis=1, keepdims=True)
    return np.divide(scores, norms, out=np.zeros_like(scores, dtype=np.float64), where=norms > 0)


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "GradientScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"normalize_layers": True, "batch_size": 32, "max_examples": None, "fraction": 1.0, "seed": 0},
}


@register_scorer("gradient")
class GradientScorer(HeadScorer):
    """Michel et al. head importance ``|dL/dm_h|`` averaged over mini-batches.

    Args:
        normalize_layers: divide each layer's scores by their L2 norm (Michel et al.; default True).
        batch_size: examples per gradient.
        max_examples: use at most this many examples (seeded subset); ``None`` = the whole calibration set.
        fraction: share of the (seeded, shuffled) batches used, in ``(0, 1]`` (default 1: all of them).
        seed: picks the subset, the batch order and so the batch composition (see the module docs).
    """

    def __init__(
        self,
        *,
        normalize_layers: bool = True,
        batch_size: int = 32,
        max_examples: int | None = None,
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.normalize_layers = normalize_layers
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.fraction = fraction

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        salience = gradient_salience(
            model,
            calibration.subset(self.max_examples, self.seed),
            batch_size=self.batch_size,
            fraction=self.fraction,
            seed=self.seed,
            progress=False,
        )
        return normalize_layers(salience) if self.normalize_layers else salience
