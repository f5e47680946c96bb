"""Attention attribution of Hao et al. (2021), "Self-Attention Attribution: Interpreting Information
Interactions Inside Transformer".

For layer ``l`` and an example ``x`` with target ``y`` (the gold label for classification), let ``F(A)`` be
the probability of ``y`` (the calibration objective's ``target_probability``) when layer ``l``'s attention
maps are replaced by ``A`` (the other layers unchanged). The attribution of every map entry
is the integrated gradient from the zero map, by an ``m``-step Riemann sum::

    Attr_h(A) = A_h * (1/m) * sum_{k=1..m} dF/dX_h at X = (k/m) A

and the head's importance is ``E_x[max over entries of Attr_h]`` (the paper's choice: the strongest single
attention link the head contributes).

Implementation: a head's context is ``A_h V_h``, and ``V_h`` does not depend on ``A_h``, so scaling the map by
``alpha`` is exactly scaling that head's context by ``alpha``; the scaling is a head gate of ``alpha`` on
layer ``l`` (:func:`cahp.surgery.head_mask`, weights untouched). The gradient w.r.t. the map the layer
actually used (read by a forward hook, see :func:`cahp.scoring.base.captured_attention`) is then
``alpha * dF/dX``, which the sum divides by ``alpha``. Cost: ``layers * steps`` forward+backward passes per
batch, so the defaults use few examples.

Seed: batches are sorted by length (no shuffle), so the seed only draws the subset when the calibration set
has more than ``max_examples`` examples; with ``max_examples=None`` (or a calibration set no larger) the
scores do not depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp import distributed
from cahp.calibration import to_device
from cahp.runtime import model_device
from cahp.scoring.base import HeadScorer, captured_attention, head_grid, register_scorer
from cahp.surgery import head_mask

if TYPE_CHECKING:
    from cahp.calibration import Calibration


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "AttentionAttributionScorer",
    "kind": "scorer",
    "budget_aware": False,
    "deterministic": False,
    "settings": {"steps": 20, "batch_size": 16, "max_examples": 32, "seed": 0},
}


@register_scorer("attattr")
class AttentionAttributionScorer(HeadScorer):
    """Mean over examples of the max integrated-gradients attribution of each head's attention map.

    Args:
        steps: Riemann steps ``m`` of the integral (paper: 20).
        batch_size: examples per forward/backward.
        max_examples: at most this many examples (seeded subset); default 32 (cost: layers * steps passes per batch).
        seed: picks the subset (only when the calibration set is larger than ``max_examples``).
    """

    def __init__(self, *, steps: int = 20, batch_size: int = 16, max_examples: int | None = 32, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.steps = steps
        self.batch_size = batch_size
        self.max_examples = max_examples

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        layers, heads = head_grid(model)
        examples = calibration.subset(self.max_examples, self.seed)
        total = torch.zeros(layers, heads, dtype=torch.float64)
        embeddings = model.get_input_embeddings()
        # Frozen weights and integer inputs build no graph: let the embedding output require grad instead.
        handle = embeddings.register_forward_hook(lambda module, args, output: output.detach().requires_grad_())
        try:
            with captured_attention(model) as (probabilities, extra):
                for cpu_batch in examples.batches(self.batch_size, sort_by_length=True):
                    batch = to_device(cpu_batch, model_device(model))  # once, not at every step
                    for layer in range(layers):
                        total[layer] += self._layer_attribution(model, examples, batch, layer, probabilities, extra)
        finally:
            handle.remove()
        return (distributed.all_reduce_sum(total) / max(1, len(examples))).numpy()  # every process's batches

    def _layer_attribution(
        self,
        model: PreTrainedModel,
        calibration: Calibration,
        batch: dict[str, torch.Tensor],
        layer: int,
        probabilities: list[torch.Tensor | None],
        extra: dict[str, Any],
    ) -> torch.Tensor:
        """Sum over the batch of each head's max attribution in ``layer``: ``[heads]``."""
        layers, heads = head_grid(model)
        device = model_device(model)
        integral: torch.Tensor | None = None
        attention: torch.Tensor | None = None
        for step in range(1, self.steps + 1):
            alpha = step / self.steps
            gates = torch.ones(layers, heads, device=device)
            gates[layer] = alpha
            with head_mask(model, gates):
                target = calibration.target_probability(model, batch, **extra).sum()  # sum over the batch of F
                attention = probabilities[layer]  # [b, h, q, k], the same at every alpha
                (gradient,) = torch.autograd.grad(target, attention)  # type: ignore[arg-type]
            gradient = gradient.double() / alpha
            integral = gradient if integral is None else integral + gradient
        # steps >= 1: the loop has set both
        attribution = attention.detach().double() * integral / self.steps  # type: ignore[union-attr, operator]
        real = batch["attention_mask"].bool()  # [b, s]: padded rows and keys take no part in the max
        attribution = attribution.masked_fill(~(real[:, None, :, None] & real[:, None, None, :]), -torch.inf)
        return attribution.amax(dim=(2, 3)).sum(0).cpu()
