"""Mask Fisher information of Kwon et al. (2022), "A Fast Post-Training Pruning Framework for Transformers".

Retraining-free: with a gate ``m_h = 1`` on every head's context and frozen weights, the diagonal of the
empirical Fisher information of the mask on a calibration set,

    I_h = sum_x (dL(x) / dm_h)^2

(``L``: the calibration objective's loss, the cross-entropy on the gold labels for classification).
``batch_size=1`` (default) gives true per-example gradients; a larger value squares mini-batch gradients
instead (faster, a coarser estimate). Batches follow the calibration order (no shuffle).

Seed: it only draws the subset when the calibration set has more than ``max_examples`` examples; with
``max_examples=None`` (or a calibration set no larger) the scores do not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp import distributed
from cahp.runtime import model_device
from cahp.scoring.base import HeadScorer, head_grid, register_scorer
from cahp.surgery import head_mask

if TYPE_CHECKING:
    from cahp.calibration import Calibration


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "FisherScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"batch_size": 1, "max_examples": 256, "seed": 0},
}


@register_scorer("fisher")
class FisherScorer(HeadScorer):
    """Sum over examples of the squared gradient of the loss w.r.t. each head's mask.

    Args:
        batch_size: examples per gradient (1 = per-example, Kwon et al.'s definition).
        max_examples: at most this many calibration examples (seeded subset); default 256.
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).
    """

    def __init__(self, *, batch_size: int = 1, max_examples: int | None = 256, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        fisher = torch.zeros(head_grid(model), dtype=torch.float64)
        for gradient in mask_gradients(model, calibration, self.batch_size, self.max_examples, self.seed):
            fisher += gradient.pow(2)
        return distributed.all_reduce_sum(fisher).numpy()  # this process's batches -> every process's


def mask_gradients(
    model: PreTrainedModel, calibration: Calibration, batch_size: int, max_examples: int | None, seed: int
) -> Iterator[torch.Tensor]:
    """``dL(batch) / dm`` ``[layers, heads]`` float64 on the CPU for each of this process's batches of ``batch_size``
    examples of a seeded subset of at most ``max_examples`` calibration examples (gates ``m = 1`` on every head's
    context, weights frozen): the statistics of the mask Fisher information (diagonal: :class:`FisherScorer`; per
    layer blocks: ``kwon``)."""
    examples = calibration.subset(max_examples, seed)
    gates = torch.ones(*head_grid(model), device=model_device(model), requires_grad=True)
    with head_mask(model, gates):
        for batch in examples.batches(batch_size):
            (gradient,) = torch.autograd.grad(examples.loss(model, batch), gates)
            yield gradient.double().cpu()
