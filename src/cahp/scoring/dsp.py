"""Differentiable subset pruning of Li, Cotterell and Sachan (2021), "Differentiable Subset Pruning of
Transformer Heads".

Every head gets a learned logit ``w_h``. Each step draws Gumbel noise ``g``, and the soft top-K relaxation
of Xie and Ermon (2019) turns ``r = w + g`` into a mask with exactly ``K`` total mass: ``K`` successive
softmaxes at temperature ``tau``, each after down-weighting what the previous ones picked
(``r <- r + log(1 - p)``), summed. The mask gates the heads' contexts (:func:`cahp.surgery.head_mask`) of the
FROZEN model, only the logits are trained (Adam) on the calibration objective's loss (the cross-entropy for
classification), and ``tau`` is annealed geometrically from ``tau_start`` to ``tau_end`` so the mask approaches
a hard K-subset. Heads are ranked by their logits (global top-K over all heads). ``K`` is the pruning budget
(``keep``; default half of the heads). The seed draws the Gumbel noise, the batch order and
(``max_examples``) the subset. Under several processes each step's batch is split across them and the logit
gradients summed (data parallelism, as for :mod:`cahp.scoring.l0`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp import distributed
from cahp.errors import CahpError
from cahp.runtime import model_device
from cahp.scoring.base import HeadScorer, head_grid, register_scorer
from cahp.scoring.l0 import data_parallel_loss, endless_batches

if TYPE_CHECKING:
    from cahp.calibration import Calibration


def soft_top_k(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Relaxed k-hot vector of ``scores`` ``[n]``: values in ``[0, 1]`` that sum to ``k``."""
    khot = torch.zeros_like(scores)
    picked = torch.zeros_like(scores)
    logits = scores
    for _ in range(k):
        logits = logits + torch.log((1.0 - picked).clamp(min=1e-20))
        picked = torch.softmax(logits / temperature, dim=0)
        khot = khot + picked
    return khot


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "DSPScorer",
    "kind": "scorer",
    "budget_aware": True,
    "deterministic": False,
    "settings": {
        "keep": None,
        "steps": 150,
        "learning_rate": 0.1,
        "tau_start": 1.0,
        "tau_end": 0.05,
        "batch_size": 16,
        "max_examples": None,
        "seed": 0,
    },
}


@register_scorer("dsp")
class DSPScorer(HeadScorer):
    """Learned head logits of a Gumbel soft top-K mask with exactly ``keep`` heads, on the frozen model.

    Args:
        keep: ``K``, heads the mask keeps (``None``: half of them, rounded up).
        steps: optimisation steps (default 150).
        learning_rate: Adam learning rate for the logits (default 0.1).
        tau_start, tau_end: temperature annealed geometrically over the steps (default 1.0 -> 0.05).
        batch_size: examples per step.
        max_examples: train on at most this many examples (seeded subset); ``None`` = all the data given.
        seed: Gumbel noise, subset and batch order.
    """

    budget_aware = True

    def __init__(
        self,
        *,
        keep: int | None = None,
        steps: int = 150,
        learning_rate: float = 0.1,
        tau_start: float = 1.0,
        tau_end: float = 0.05,
        batch_size: int = 16,
        max_examples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.keep = keep
        self.steps = steps
        self.learning_rate = learning_rate
        self.tau_start = tau_start
        self.tau_end = tau_end
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        layers, heads = head_grid(model)
        n_heads = layers * heads
        keep = (n_heads + 1) // 2 if self.keep is None else int(self.keep)
        if not 1 <= keep <= n_heads:
            raise CahpError(f"dsp: keep must be between 1 and the model's {n_heads} heads, got {keep}")
        device = model_device(model)
        generator = torch.Generator().manual_seed(self.seed)
        logits = torch.zeros(n_heads, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=self.learning_rate)
        examples = calibration.subset(self.max_examples, self.seed)
        batches = endless_batches(examples, self.batch_size, self.seed)
        decay = (self.tau_end / self.tau_start) ** (1.0 / max(1, self.steps - 1))
        for step in range(self.steps):
            uniform = torch.rand(n_heads, generator=generator).clamp(1e-6, 1 - 1e-6).to(device)
            gumbel = -torch.log(-torch.log(uniform))
            mask = soft_top_k(logits + gumbel, keep, self.tau_start * decay**step)
            loss = data_parallel_loss(model, examples, next(batches), mask.view(layers, heads))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients([logits])  # data parallel: the gradient of the whole batch's loss
            optimizer.step()
        return logits.detach().view(layers, heads).double().cpu().numpy()
