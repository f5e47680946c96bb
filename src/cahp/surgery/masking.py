"""Soft head masking: scale each head's slice of the context vector by a gate, without touching weights.

The gate multiplies the INPUT of the output projection, ``[..., heads * head_dim]``: every column a head owns
(the adapter's :meth:`~cahp.adapters.HeadGeometry.output_columns`) is scaled by that head's gate, so a gate
of 0 gives exactly what removing the head gives (its q/k/v rows and o columns stop mattering) and a gate of 1
changes nothing. Gates are indexed in ORIGINAL head numbers; on a pruned model each layer reads the gates
of its kept heads and ignores the rest.

Gradients flow to the gates (``gates.requires_grad_()``, forward, ``loss.backward()``, read
``gates.grad``), which is what gradient-based head scorers need.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import PruningError
from cahp.surgery.removal import kept_heads_by_layer, layer_geometries


class HeadGateHandle:
    """Removes the gate hooks installed by :func:`attach_head_gates`; also usable as a context manager."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Detach every gate hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> HeadGateHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def attach_head_gates(model: PreTrainedModel, gates: torch.Tensor) -> HeadGateHandle:
    """Multiply every head's context by ``gates[layer, head]`` until ``handle.remove()``.

    Args:
        model: a model with a registered adapter, pruned or not.
        gates: float tensor ``[layers, heads]`` in ORIGINAL head numbering; may require grad. It is read at
            every forward, so editing it in place between forwards changes the mask.

    Raises:
        PruningError: ``gates`` has the wrong shape.
    """
    adapter = get_adapter(model)
    expected = (adapter.num_layers(model), adapter.num_heads(model))
    if tuple(gates.shape) != expected:
        raise PruningError(
            f"gates must have shape [layers, heads] = {list(expected)} in original head numbering, "
            f"got {list(gates.shape)}"
        )
    kept, geometries = kept_heads_by_layer(model), layer_geometries(model)
    handles = []
    for layer, projection in enumerate(adapter.output_projections(model)):
        if not kept[layer]:
            continue  # a layer without heads never calls its output projection
        geometry = geometries[layer]
        columns = geometry.output_columns(device=gates.device)  # [kept * head_dim], head-major
        if not torch.equal(columns, torch.arange(columns.numel(), device=gates.device)):
            raise PruningError(f"layer {layer}: the output projection's input is not head-major; masking needs it")
        index = torch.tensor(kept[layer], dtype=torch.long, device=gates.device)
        handles.append(projection.register_forward_pre_hook(_gate_hook(gates, layer, index, geometry.head_dim)))
    return HeadGateHandle(handles)


@contextmanager
def head_mask(model: PreTrainedModel, gates: torch.Tensor) -> Iterator[PreTrainedModel]:
    """Context manager form of :func:`attach_head_gates`: ``with head_mask(model, gates): model(**batch)``."""
    handle = attach_head_gates(model, gates)
    try:
        yield model
    finally:
        handle.remove()


def _gate_hook(gates: torch.Tensor, layer: int, index: torch.Tensor, head_dim: int) -> Any:
    """Pre-hook scaling head ``index[i]``'s block of ``head_dim`` input columns of the output projection by
    ``gates[layer, index[i]]`` (one product per head, so gate gradients sum in a fixed order)."""

    def scale_heads(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        context = args[0]  # [..., kept_heads * head_dim]
        layer_gates = gates[layer].index_select(0, index).to(device=context.device, dtype=context.dtype)
        scaled = context.unflatten(-1, (index.numel(), head_dim)) * layer_gates[:, None]
        return (scaled.flatten(-2), *args[1:])

    return scale_heads
