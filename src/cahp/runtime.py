"""The one place that decides where a model runs: device placement and the model's device.

Nothing else in cahp calls ``.cuda()``: a run places its models with :func:`place` (the accelerator when there is
one, else the CPU), and code that needs a model's device asks :func:`model_device`. Speed measurements run on the
CPU (:func:`on_cpu`), so that the dense and the pruned model are timed on the same device.
"""

from __future__ import annotations

from typing import TypeVar

import torch

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def default_device() -> torch.device:
    """The accelerator when one is visible (CUDA), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def place(model: ModuleT) -> ModuleT:
    """Move ``model`` to :func:`default_device` in place; returns it."""
    return model.to(default_device())


def on_cpu(*models: torch.nn.Module) -> None:
    """Move each model to the CPU in place (speed measurements)."""
    for model in models:
        model.cpu()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (a model lives on one device)."""
    return next(model.parameters()).device
