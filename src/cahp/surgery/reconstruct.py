"""Weight writes of the reconstruction step (:mod:`cahp.reconstruction`): the output projection of one layer.

The statistics and the solves live in :mod:`cahp.reconstruction`; this module is the only place where they change
weights, like the rest of :mod:`cahp.surgery`. Shapes never change here: the kept heads' columns are rewritten in
place (``nn.Linear`` ``[out, in]`` or ``Conv1D`` ``[in, out]``, read from the adapter's ``transposed``), and the
bias is rewritten only where the projection has one.

A bias is never ADDED to a projection that has none: a stock Llama, Mistral or Qwen2 config cannot store an
``o_proj`` bias (``attention_bias`` would add q/k/v biases too), so a folder with one would not load without cahp.
:func:`can_store_output_bias` says whether a model can take the ``bias`` reconstruction; the run refuses it
before any work where it cannot (:func:`cahp.reconstruction.check_reconstruction`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import PruningError


def output_weight(projection: nn.Module, transposed: bool) -> torch.Tensor:
    """The output projection's weight as ``[out, in]`` float64 (a copy; ``in`` = current heads * head_dim)."""
    weight = cast(torch.Tensor, projection.weight).detach()
    return (weight.t() if transposed else weight).to(torch.float64).clone()


def output_bias(projection: nn.Module) -> torch.Tensor | None:
    """The output projection's bias ``[out]`` as float64 (a copy), or ``None`` where it has none."""
    bias = getattr(projection, "bias", None)
    return None if bias is None else bias.detach().to(torch.float64).clone()


def can_store_output_bias(model: PreTrainedModel) -> bool:
    """Whether every layer's output projection has a bias (so a bias can be folded in without a new parameter)."""
    return all(
        getattr(projection, "bias", None) is not None for projection in get_adapter(model).output_projections(model)
    )


@torch.no_grad()
def write_output_projection(
    projection: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> None:
    """Overwrite one output projection in place (dtype and device kept; shapes must not change).

    Args:
        projection: ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight ``[in, out]``, ``transposed``).
        weight: ``[out, in]`` new weight, any float dtype.
        bias: ``[out]`` new bias, or ``None`` to leave the bias as it is.
        transposed: the adapter's ``transposed``.

    Raises:
        PruningError: a shape differs, or a bias is given for a projection without one.
    """
    target = cast(torch.Tensor, projection.weight)
    new = weight.t() if transposed else weight
    if tuple(new.shape) != tuple(target.shape):
        raise PruningError(
            f"reconstruction: weight of shape {tuple(new.shape)} for a projection of {tuple(target.shape)}"
        )
    target.copy_(new.to(dtype=target.dtype, device=target.device))
    if bias is None:
        return
    current = getattr(projection, "bias", None)
    if current is None:
        raise PruningError(
            "reconstruction: this output projection has no bias and none is added (a stock config could not store "
            "it); use --reconstruct scale or weights"
        )
    if tuple(bias.shape) != tuple(current.shape):
        raise PruningError(f"reconstruction: bias of shape {tuple(bias.shape)} for one of {tuple(current.shape)}")
    current.copy_(bias.to(dtype=current.dtype, device=current.device))
