"""Attention entropy: how focused each head's attention is, padding-aware.

For every real query row of an example, the Shannon entropy of the head's attention over the keys, divided by
``log(n)`` where ``n`` is the example's number of real tokens (so rows of short and long examples are
comparable: 0 = all mass on one key, 1 = uniform over the real keys; padded keys carry zero probability).
Rows of padded queries are skipped, and so are examples of fewer than 2 tokens. A head's mean normalised
entropy ``H`` is the mean over examples of the mean over its real rows.

Sign: the score is ``1 - H`` by default, so FOCUSED (low-entropy) heads are kept. A near-uniform head
computes little more than a mean of the value vectors, which the residual stream and other uniform heads
largely duplicate, whereas focused heads implement specific token-to-token routing (positional, syntactic,
rare-token heads: Voita et al. 2019, Clark et al. 2019). The known failure mode is a head that attends
almost only to ``[CLS]``/``[SEP]`` (low entropy, near no-op); ``focused_is_important=False`` flips the sign.

Seed: batches are sorted by length (no shuffle), so the seed only draws the subset when the calibration set
has more than ``max_examples`` examples; with ``max_examples=None`` (or a calibration set no larger) the
scores do not depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp import distributed
from cahp.runtime import model_device
from cahp.scoring.base import HeadScorer, captured_attention, head_grid, register_scorer

if TYPE_CHECKING:
    from cahp.calibration import Calibration


def mean_normalized_entropy(
    model: PreTrainedModel, calibration: Calibration, batch_size: int | None = None
) -> np.ndarray:
    """``[layers, heads]`` mean over examples of the mean normalised attention entropy of the real rows.

    Every example of ``calibration`` is used, in batches of ``batch_size`` (``None``: the calibration's)
    sorted by length; under several processes each takes its share of the batches and the sums and counts are
    reduced before the division.
    """
    layers, heads = head_grid(model)
    device = model_device(model)
    total = torch.zeros(layers, heads, dtype=torch.float64)
    examples = 0
    with captured_attention(model) as (probabilities, extra), torch.inference_mode():
        for batch in calibration.batches(batch_size, sort_by_length=True):
            calibration.forward(model, batch, **extra)
            mask = batch["attention_mask"].to(device, torch.float64)  # [b, s]
            real = mask.sum(-1)  # [b]
            usable = real >= 2
            norm = torch.log(real.clamp(min=2.0))  # [b]
            for layer, probs in enumerate(probabilities):
                p = probs.double()  # type: ignore[union-attr]  # [b, h, q, k]
                rows = -torch.special.xlogy(p, p).sum(-1) / norm[:, None, None]  # [b, h, q]
                rows = torch.where(mask[:, None, :] > 0, rows, 0.0)  # padded query rows may even be NaN
                per_example = rows.sum(-1) / real.clamp(min=1.0)[:, None]  # [b, h]
                total[layer] += (per_example * usable[:, None]).sum(0).cpu()
            examples += int(usable.sum())
    total, count = distributed.all_reduce_sums(total, torch.tensor(float(examples), dtype=torch.float64))
    return (total / max(1.0, float(count))).numpy()


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "EntropyScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"focused_is_important": True, "batch_size": 32, "max_examples": 512, "seed": 0},
}


@register_scorer("entropy")
class EntropyScorer(HeadScorer):
    """``1 - H`` (focused heads kept) or ``H`` with ``focused_is_important=False``; ``H`` in ``[0, 1]``.

    Args:
        focused_is_important: the sign (see the module docs); default True.
        batch_size: examples per forward.
        max_examples: at most this many examples (seeded subset); default 512.
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).
    """

    def __init__(
        self,
        *,
        focused_is_important: bool = True,
        batch_size: int = 32,
        max_examples: int | None = 512,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.focused_is_important = focused_is_important
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        entropy = mean_normalized_entropy(model, calibration.subset(self.max_examples, self.seed), self.batch_size)
        return 1.0 - entropy if self.focused_is_important else entropy
