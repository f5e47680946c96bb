"""Mask Fisher information of Kwon et al. (2022), "A Fast Post-Training Pruning Framework for Transformers".

Retraining-free: with a gate ``m_h = 1`` on every head's context and frozen weights, the diagonal of the
empirical Fisher information of the mask on a calibration set,

    I_h = sum_x (dL(x, y_x) / dm_h)^2

(gold labels, cross-entropy). ``batch_size=1`` (default) gives true per-example gradients; a larger value
squares mini-batch gradients instead (faster, a coarser estimate).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp.data.batching import EncodedSplit, iter_batches
from cahp.evaluation.metrics import model_device
from cahp.scoring.base import HeadScorer, head_grid, register_scorer, take_examples, to_device
from cahp.surgery import head_mask


@register_scorer("fisher")
class FisherScorer(HeadScorer):
    """Sum over examples of the squared gradient of the loss w.r.t. each head's mask.

    Args:
        batch_size: examples per gradient (1 = per-example, Kwon et al.'s definition).
        max_examples: at most this many calibration examples (seeded subset); default 256.
        seed: picks the subset.
    """

    deterministic = True

    def __init__(self, *, batch_size: int = 1, max_examples: int | None = 256, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, tokenizer: Any, data: EncodedSplit, num_labels: int) -> np.ndarray:
        device = model_device(model)
        examples = take_examples(data, self.max_examples, self.seed)
        gates = torch.ones(*head_grid(model), device=device, requires_grad=True)
        fisher = torch.zeros(gates.shape, dtype=torch.float64)
        with head_mask(model, gates):
            for _, batch in iter_batches(tokenizer, examples, self.batch_size):
                loss = model(**to_device(batch, device)).loss
                (gradient,) = torch.autograd.grad(loss, gates)
                fisher += gradient.double().pow(2).cpu()
        return fisher.numpy()
