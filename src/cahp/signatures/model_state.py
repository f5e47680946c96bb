"""Temporary model states for reading a model without changing it: frozen eval mode and eager attention.

Both context managers restore exactly what they changed on exit, so that scoring and signature collection leave
a model as they found it (the scorer contract of :mod:`cahp.scoring.base`). They live below both users
(:mod:`cahp.signatures.collector` and :mod:`cahp.scoring.base`), so neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@contextmanager
def preserved_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Freeze every parameter and switch to eval mode; restore both flags (per parameter/module) on exit."""
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    for parameter, _ in requires_grad:
        parameter.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        for module, flag in training:
            module.training = flag


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Temporarily switch the model to eager attention (the only implementation that returns maps)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if previous not in (None, "eager"):
            model.set_attn_implementation(previous)
