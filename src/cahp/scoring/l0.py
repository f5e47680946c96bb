"""L0 head gates of Voita et al. (2019), "Analyzing Multi-Head Self-Attention: Specialized Heads Do the
Heavy Lifting, the Rest Can Be Pruned".

Every head gets a stochastic Hard Concrete gate (Louizos et al. 2018) with a learned ``log_alpha``: draw
``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, gate
``z = clamp(s (zeta - gamma) + gamma, 0, 1)`` with ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``. The gates
multiply the heads' contexts (:func:`cahp.surgery.head_mask`) of the FROZEN model, and only ``log_alpha`` is
trained (Adam) on

    L + penalty * sum_h P(z_h != 0),  P(z_h != 0) = sigmoid(log_alpha_h - beta log(-gamma / zeta))

(``L``: the calibration objective's loss, the cross-entropy for classification; the expected L0 norm,
summed over heads as in the paper). Heads are ranked by that open probability. Voita et al. also update the
weights; here the model stays frozen so every method scores the same network. The seed draws the gate noise,
the batch order and (``max_examples``) the subset.

Under several processes this is data parallelism: every process draws the same gates and the same global batch,
computes the loss of its share of the batch's rows, and the gate gradients are summed over processes before
each step, so the gates follow the one-process trajectory (up to float summation order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp import distributed
from cahp.calibration import local_share
from cahp.runtime import model_device
from cahp.scoring.base import HeadScorer, head_grid, register_scorer
from cahp.surgery import head_mask

if TYPE_CHECKING:
    from cahp.calibration import Calibration

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def endless_batches(calibration: Calibration, batch_size: int | None, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Seeded shuffled batches of ``calibration``, epoch after epoch (each epoch its own permutation): the
    GLOBAL batches, the same in every process (each step splits its batch's rows with :func:`gate_step_loss`)."""
    epoch = 0
    whole = calibration.whole()
    while True:
        yield from whole.batches(batch_size, shuffle=True, seed=seed, epoch=epoch)
        epoch += 1


def data_parallel_loss(
    model: PreTrainedModel, calibration: Calibration, batch: dict[str, torch.Tensor], gates: torch.Tensor
) -> torch.Tensor:
    """The calibration loss of one global ``batch`` under ``gates`` ``[layers, heads]``, as this process's part.

    Under several processes each computes the mean loss of its rows of the batch
    (:func:`cahp.calibration.local_share`) weighted by their share, so that gradients SUMMED over processes
    (:func:`cahp.distributed.all_reduce_gradients`) are the gradient of the one-process mean loss; a process
    without rows returns a zero that still depends on ``gates``. In a single process: the plain loss.
    """
    rows, share = local_share(batch)
    if rows is None:
        return gates.sum() * 0.0
    with head_mask(model, gates):
        loss = calibration.loss(model, rows)
    return loss * share if share != 1.0 else loss


def hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample of the Hard Concrete gates, same shape as ``log_alpha``, values in ``[0, 1]``."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(log_alpha.device)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(gate != 0)``, the expected L0 norm of each gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "L0GateScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {
        "penalty": 0.01,
        "steps": 150,
        "learning_rate": 0.1,
        "init_log_alpha": 3.0,
        "batch_size": 16,
        "max_examples": None,
        "seed": 0,
    },
}


@register_scorer("l0")
class L0GateScorer(HeadScorer):
    """Open probability of Hard Concrete head gates trained with an L0 penalty on the frozen model.

    Args:
        penalty: ``lambda``, weight of the expected number of open gates (default 0.01 per head).
        steps: optimisation steps (default 150).
        learning_rate: Adam learning rate for ``log_alpha`` (default 0.1).
        init_log_alpha: initial ``log_alpha`` (default 3.0: every gate open with probability ~0.99).
        batch_size: examples per step.
        max_examples: train on at most this many examples (seeded subset); ``None`` = all the data given.
        seed: gate noise, subset and batch order.
    """

    def __init__(
        self,
        *,
        penalty: float = 0.01,
        steps: int = 150,
        learning_rate: float = 0.1,
        init_log_alpha: float = 3.0,
        batch_size: int = 16,
        max_examples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.penalty = penalty
        self.steps = steps
        self.learning_rate = learning_rate
        self.init_log_alpha = init_log_alpha
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        device = model_device(model)
        generator = torch.Generator().manual_seed(self.seed)
        log_alpha = torch.full(head_grid(model), float(self.init_log_alpha), device=device, requires_grad=True)
        optimizer = torch.optim.Adam([log_alpha], lr=self.learning_rate)
        examples = calibration.subset(self.max_examples, self.seed)
        batches = endless_batches(examples, self.batch_size, self.seed)
        processes = distributed.world_size()
        for _ in range(self.steps):
            gates = hard_concrete(log_alpha, generator)  # the same draw in every process (same seed)
            loss = data_parallel_loss(model, examples, next(batches), gates)
            loss = loss + self.penalty * open_probability(log_alpha).sum() / processes  # summed once over processes
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients([log_alpha])
            optimizer.step()
        return open_probability(log_alpha.detach()).double().cpu().numpy()
