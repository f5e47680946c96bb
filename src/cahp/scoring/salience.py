"""Gradient head salience (Michel et al., 2019): ``|dL/dm_h|`` for a gate ``m_h = 1`` on each head's output,
``L`` being the calibration objective's loss.

Weights are frozen (no parameter gradients are computed) and never modified; the gates act through
:func:`cahp.surgery.head_mask`, so this works on every architecture with an adapter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp import distributed
from cahp.adapters import get_adapter
from cahp.errors import CahpError
from cahp.runtime import model_device
from cahp.signatures.model_state import preserved_model
from cahp.surgery import head_mask

if TYPE_CHECKING:
    from cahp.calibration import Calibration


def gradient_salience(
    model: PreTrainedModel,
    calibration: Calibration,
    *,
    batch_size: int | None = None,
    fraction: float = 0.25,
    seed: int = 42,
    progress: bool = True,
) -> np.ndarray:
    """Mean over batches of ``|dL/dm|`` (``L``: the calibration's loss), for the first ``fraction`` of the
    batches in a seeded shuffled order.

    The seed matters even with ``fraction=1``: it decides which examples share a batch, and the absolute
    value is taken per batch. Frozen weights, eval mode; both restored afterwards. Under several processes each
    takes its share of those batches (:meth:`Calibration.indexed_batches`) and the sums are reduced: every process
    returns the one-process salience (up to float summation order).

    Args:
        model: an unpruned model with a registered adapter.
        calibration: the examples and the objective.
        batch_size: examples per gradient (``None``: the calibration's batch size).
        fraction: share of the batches used, in ``(0, 1]`` (at least one batch).
        seed: the shuffle.

    Returns:
        ``[layers, heads]`` float64 salience in original head numbering (not normalised).

    Raises:
        CahpError: ``fraction`` outside ``(0, 1]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise CahpError(f"the salience fraction is the share of batches used, in (0, 1]; got {fraction}")
    adapter = get_adapter(model)
    device = model_device(model)
    gates = torch.ones(adapter.num_layers(model), adapter.num_heads(model), device=device, requires_grad=True)
    used = max(1, math.ceil(fraction * calibration.num_batches(batch_size)))
    accumulated = torch.zeros_like(gates, dtype=torch.float64)
    with preserved_model(model), head_mask(model, gates):  # eval mode: no dropout
        # the first `used` batches of the global sequence; under several processes, this process's share of them
        batches = calibration.batches(batch_size, shuffle=True, seed=seed, limit=used)
        total = calibration.local_num_batches(batch_size, limit=used)
        for batch in tqdm(batches, total=total, desc="salience", disable=not progress, leave=False):
            (gradient,) = torch.autograd.grad(calibration.loss(model, batch), gates)
            accumulated += gradient.abs().double()
    return (distributed.all_reduce_sum(accumulated) / used).cpu().numpy()
