"""Head importance of Michel et al. (2019), "Are Sixteen Heads Really Better than One?".

``I_h = E |dL/dm_h|`` for a gate ``m_h = 1`` on each head's context, with frozen weights
(:func:`cahp.scoring.salience.gradient_salience`, which takes the absolute value of each mini-batch's
gradient), then, as in the paper, each layer's scores divided by their L2 norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedModel

from cahp.data.batching import EncodedSplit
from cahp.scoring.base import HeadScorer, register_scorer, take_examples
from cahp.scoring.salience import gradient_salience


def normalize_layers(scores: np.ndarray) -> np.ndarray:
    """Divide each layer's row ``[heads]`` by its L2 norm (rows of zeros stay zero)."""
    norms = np.linalg.norm(scores, axis=1, keepdims=True)
    return np.divide(scores, norms, out=np.zeros_like(scores, dtype=np.float64), where=norms > 0)


@register_scorer("gradient")
class GradientScorer(HeadScorer):
    """Michel et al. head importance ``|dL/dm_h|`` averaged over mini-batches.

    Args:
        normalize_layers: divide each layer's scores by their L2 norm (Michel et al.; default True).
        batch_size: examples per gradient.
        max_examples: use at most this many examples (seeded subset); ``None`` = all the data given.
        seed: picks the subset and the batch order; with ``max_examples=None`` the scores do not depend on
            it beyond the batch composition.
    """

    deterministic = True

    def __init__(
        self,
        *,
        normalize_layers: bool = True,
        batch_size: int = 32,
        max_examples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.normalize_layers = normalize_layers
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, tokenizer: Any, data: EncodedSplit, num_labels: int) -> np.ndarray:
        examples = take_examples(data, self.max_examples, self.seed)
        salience = gradient_salience(
            model, tokenizer, examples, batch_size=self.batch_size, fraction=1.0, seed=self.seed, progress=False
        )
        return normalize_layers(salience) if self.normalize_layers else salience
