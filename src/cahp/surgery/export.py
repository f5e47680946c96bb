"""ONNX export of (pruned) classifiers through ``torch.onnx.export(dynamo=True)``.

Pruned models export like any other: sliced projections are ordinary smaller weights, a layer without heads
exports as its output-projection bias, and MPNet's per-layer position-bias slice is a constant gather.
The graph takes the example inputs by name and returns one output, ``logits``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


class _LogitsOnly(nn.Module):
    """Positional-input wrapper: ``forward(*tensors) -> logits``, tensors in the order of ``input_names``."""

    def __init__(self, model: PreTrainedModel, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        outputs = self.model(**dict(zip(self.input_names, tensors, strict=True)), return_dict=True)
        return outputs["logits"] if "logits" in outputs else outputs[0]


def export_onnx(
    model: PreTrainedModel,
    path: str | PathLike[str],
    example_inputs: Mapping[str, torch.Tensor],
    *,
    dynamic: bool = True,
    opset_version: int | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` and return the path.

    Args:
        model: a classifier returning ``logits``, pruned or not.
        path: the ``.onnx`` file to write (its folder is created).
        example_inputs: named tensors as for ``model(**example_inputs)``, e.g. ``input_ids`` and
            ``attention_mask`` ``[batch, seq]`` or ``pixel_values`` ``[batch, channels, height, width]``.
        dynamic: make the batch axis of every input, and the sequence axis of 2-D integer inputs, dynamic.
        opset_version: ONNX opset; ``None`` uses the exporter's default.

    Returns:
        The written path. Run it with ``onnxruntime.InferenceSession(path).run(None, {name: array})``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(example_inputs)
    tensors = tuple(example_inputs[name] for name in names)
    dynamic_shapes = (tuple(_dynamic_axes(tensor) for tensor in tensors),) if dynamic else None
    was_training = model.training
    wrapper = _LogitsOnly(model, names).eval()
    try:
        with _quiet_exporter():
            torch.onnx.export(
                wrapper,
                tensors,
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
                verbose=False,
            )
    finally:
        model.train(was_training)
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notices that concern nothing exported here: unregistered torchvision operators
    (logged once per process) and deprecations inside torch's own export code."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def _dynamic_axes(tensor: torch.Tensor) -> dict[int, Any]:
    """Batch axis always; sequence axis for ``[batch, seq]`` integer inputs (ids, masks)."""
    axes: dict[int, Any] = {0: torch.export.Dim.DYNAMIC}
    if tensor.ndim == 2 and not tensor.is_floating_point():
        axes[1] = torch.export.Dim.DYNAMIC
    return axes
