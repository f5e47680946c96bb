"""Adjacent-layer redundancy: heads whose attention a head of the previous layer already computes go first.

For every head of layer ``l > 0`` the Jensen-Shannon divergence between its attention rows and those of each
head of layer ``l - 1`` is measured over the calibration set (:mod:`cahp.analysis.heads`); the head's score is
the divergence from its best-matched head, divided by ``ln 2`` so it lies in ``[0, 1]``. A head that repeats one
of the previous layer (divergence near 0) scores low and is removed first; heads of layer 0, which have no
previous layer, score 1 (kept last). The layer-level form of this signal is ELA's (arXiv 2503.06473), which
skips layers whose attention repeats the previous one.

Seed: batches are sorted by length (no shuffle), so the seed only draws the subset when the calibration set has
more than ``max_examples`` examples.
"""

from __future__ import annotations

import math

import numpy as np

from cahp.analysis.heads import AnalysisScorer, HeadAnalysis
from cahp.scoring.base import register_scorer

#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "RedundancyScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"batch_size": 32, "max_examples": 512, "seed": 0},
}


@register_scorer("redundancy")
class RedundancyScorer(AnalysisScorer):
    """JS divergence from the best-matched head of the previous layer / ln 2: repeated attention goes first.

    Args:
        batch_size: examples per forward.
        max_examples: at most this many examples (seeded subset); default 512.
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).
    """

    def _from_analysis(self, analysis: HeadAnalysis) -> np.ndarray:
        scores = analysis.best_match_divergence("js") / math.log(2.0)
        scores[0] = 1.0
        return np.clip(np.nan_to_num(scores, nan=1.0), 0.0, 1.0)
