"""HIES, head importance plus attention entropy (after Choi et al. 2025, "Entropy Meets Importance").

``HIES_h = alpha * minmax(I)_h + (1 - alpha) * minmax(1 - H)_h`` where ``I`` is Michel et al.'s importance
``E |dL/dm_h|`` (no per-layer normalisation: the global min-max scaling puts both terms on ``[0, 1]`` over
all heads) and ``H`` the mean normalised attention entropy of :mod:`cahp.scoring.entropy`.

Why this combination: the two signals have unrelated units and ranges (gradients span orders of magnitude,
``H`` lies in ``[0, 1]``), so each is min-max scaled before a convex mix; ``alpha = 0.5`` weighs them equally,
``alpha = 1`` is plain HIS, ``alpha = 0`` plain focus. The entropy term enters as ``1 - H`` (focused heads
score higher; see the entropy module for that sign), so among heads of similar gradient importance the
focused ones are kept. The paper's exact normalisation was not available to us; this is our reading, and
``alpha`` / ``focused_is_important`` make it adjustable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedModel

from cahp.data.batching import EncodedSplit
from cahp.scoring.base import HeadScorer, minmax, register_scorer, take_examples
from cahp.scoring.entropy import mean_normalized_entropy
from cahp.scoring.salience import gradient_salience


@register_scorer("hies")
class HIESScorer(HeadScorer):
    """``alpha * minmax(importance) + (1 - alpha) * minmax(1 - entropy)``.

    Args:
        alpha: weight of the gradient importance, in ``[0, 1]`` (default 0.5).
        focused_is_important: entropy sign (default True: ``1 - H``).
        batch_size: examples per forward/backward.
        max_examples: at most this many examples for both terms (seeded subset); default 512.
        seed: picks the subset and the batch order.
    """

    deterministic = True

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        focused_is_important: bool = True,
        batch_size: int = 32,
        max_examples: int | None = 512,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.alpha = alpha
        self.focused_is_important = focused_is_important
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, tokenizer: Any, data: EncodedSplit, num_labels: int) -> np.ndarray:
        examples = take_examples(data, self.max_examples, self.seed)
        importance = gradient_salience(
            model, tokenizer, examples, batch_size=self.batch_size, fraction=1.0, seed=self.seed, progress=False
        )
        entropy = mean_normalized_entropy(model, tokenizer, examples, self.batch_size)
        focus = 1.0 - entropy if self.focused_is_important else entropy
        return self.alpha * minmax(importance) + (1.0 - self.alpha) * minmax(focus)
