"""Sink and special-token heads first: heads that park their attention on the first token or on special tokens.

An attention sink (Gu et al. 2024) puts most of its attention on the first real token, and a special-token head
on [CLS]/[SEP]/BOS/EOS (Clark et al. 2019); such heads often act as a no-op (the value vector of the parked-on
token), and removing them tends to cost little (VTrans 2024). The score of a head is

    1 - max(sink score, special-token share)

in ``[0, 1]`` (:mod:`cahp.analysis.heads`): the more a head parks, the lower its score and the earlier it goes.

Seed: batches are sorted by length (no shuffle), so the seed only draws the subset when the calibration set has
more than ``max_examples`` examples.
"""

from __future__ import annotations

import numpy as np

from cahp.analysis.heads import AnalysisScorer, HeadAnalysis
from cahp.scoring.base import register_scorer

#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "SinkScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"batch_size": 32, "max_examples": 512, "seed": 0},
}


@register_scorer("sink")
class SinkScorer(AnalysisScorer):
    """``1 - max(sink score, special-token share)``: sink and special-token heads are removed first.

    Args:
        batch_size: examples per forward.
        max_examples: at most this many examples (seeded subset); default 512.
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).
    """

    def _from_analysis(self, analysis: HeadAnalysis) -> np.ndarray:
        return 1.0 - np.maximum(analysis.sink_score, analysis.special_token_share)
