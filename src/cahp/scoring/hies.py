"""HIES, head importance plus attention entropy (after Choi et al. 2025, "Entropy Meets Importance",
arXiv 2510.13832).

``HIES_h = alpha * minmax(I)_h + (1 - alpha) * minmax(F)_h`` where ``I`` is Michel et al.'s importance
``E |dL/dm_h|`` (``L``: the calibration objective's loss; no per-layer normalisation: the global min-max
scaling puts both terms on ``[0, 1]`` over all heads) and ``F`` the entropy term built from ``H``, the mean
normalised attention entropy of :mod:`cahp.scoring.entropy`.

Weighting: the two signals have unrelated units and ranges (gradients span orders of magnitude, ``H`` lies in
``[0, 1]``), so each is min-max scaled before a convex mix; ``alpha = 0.5`` weighs them equally, ``alpha = 1``
is plain HIS, ``alpha = 0`` plain entropy.

Sign of the entropy term, a setting because the paper's text available to us (its abstract) does not fix it:
it says HIS alone "overlooks the diversity of attention patterns" and that entropy gives "complementary
evidence", which reads either way. By default (``focused_is_important=True``) ``F = 1 - H``: a head with LOW
entropy (focused attention) scores higher and is kept before a diffuse one of similar gradient importance,
for the reason given in :mod:`cahp.scoring.entropy` (near-uniform heads mostly average the value vectors,
which the residual stream and other diffuse heads duplicate; focused heads carry specific token-to-token
routing). ``focused_is_important=False`` gives ``F = H`` (diverse, high-entropy heads kept), the other
reading of the paper. The default is the one every committed benchmark cell used.

Seed: the gradient term shuffles the batches with ``seed`` and takes ``|gradient|`` per batch, so the scores
depend on the seed (as :mod:`cahp.scoring.gradient`'s do); ``max_examples`` below the calibration size also
draws the subset, shared by both terms, with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedModel

from cahp.errors import CahpError
from cahp.scoring.base import HeadScorer, minmax, register_scorer
from cahp.scoring.entropy import mean_normalized_entropy
from cahp.scoring.salience import gradient_salience

if TYPE_CHECKING:
    from cahp.calibration import Calibration


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "HIESScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"alpha": 0.5, "focused_is_important": True, "batch_size": 32, "max_examples": 512, "seed": 0},
}


@register_scorer("hies")
class HIESScorer(HeadScorer):
    """``alpha * minmax(importance) + (1 - alpha) * minmax(1 - entropy)`` (or ``minmax(entropy)``).

    Args:
        alpha: weight of the gradient importance, in ``[0, 1]`` (default 0.5).
        focused_is_important: sign of the entropy term (see the module docs); default True: ``1 - H``,
            low-entropy heads kept first; False: ``H``.
        batch_size: examples per forward/backward.
        max_examples: at most this many examples for both terms (seeded subset); default 512.
        seed: picks the subset and the batch order of the gradient term (the scores depend on it).
    """

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

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        if not 0.0 <= self.alpha <= 1.0:
            raise CahpError(
                f"hies: alpha weighs the gradient term against the entropy term, in [0, 1]; got {self.alpha}"
            )
        examples = calibration.subset(self.max_examples, self.seed)
        importance = gradient_salience(
            model, examples, batch_size=self.batch_size, fraction=1.0, seed=self.seed, progress=False
        )
        entropy = mean_normalized_entropy(model, examples, self.batch_size)
        focus = 1.0 - entropy if self.focused_is_important else entropy
        return self.alpha * minmax(importance) + (1.0 - self.alpha) * minmax(focus)
