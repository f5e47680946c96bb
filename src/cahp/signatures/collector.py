"""Collect per-head, per-class signature statistics from forward hooks, batch by batch, never storing maps.

For every batch, a hook on each layer's attention module reads the attention probabilities
``[batch, heads, L, L]``, crops each example to its real tokens (whichever side pads), resizes the crop to
``B x B`` and hands ``[batch, heads, B*B]`` on; the per-class streaming moments of all layers' heads are then
updated and the maps dropped. The classes are the calibration's example groups
(:meth:`cahp.calibration.Calibration.groups`), so the collector never reads a task's targets itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import CahpError
from cahp.evaluation.metrics import model_device
from cahp.signatures.resize import DEFAULT_SIZE, resize_attention_maps
from cahp.signatures.stats import StreamingMoments

if TYPE_CHECKING:
    from cahp.calibration import Calibration


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


def collect_signatures(
    model: PreTrainedModel,
    calibration: Calibration,
    *,
    size: int = DEFAULT_SIZE,
    batch_size: int | None = None,
    progress: bool = True,
) -> StreamingMoments:
    """Per-(class, head) streaming mean and variance of the padding-aware attention signatures.

    Args:
        model: an unpruned model with a registered adapter.
        calibration: the examples; their classes are ``calibration.groups()`` (``calibration.num_groups`` of
            them), and at least two must be present.
        size: side ``B`` of the resized maps (reference default 32).
        batch_size: examples per forward (``None``: the calibration's batch size); batches are sorted by length.
        progress: show a progress bar.

    Returns:
        Moments with groups = classes and features ``[layers * heads, B * B]`` (head index = layer * heads
        + head).

    Raises:
        CahpError: the calibration has fewer than two classes present (checked before any forward), or the
            model is pruned or returns no attention maps.
    """
    groups = check_two_classes(calibration)
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers(model), adapter.num_heads(model)
    moments = StreamingMoments(calibration.num_groups)
    device = model_device(model)
    per_layer: list[torch.Tensor | None] = [None] * layers
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probabilities is None:
                raise CahpError(
                    f"layer {layer} returned no attention probabilities: the model must run with eager attention"
                )
            if probabilities.shape[1] != heads:
                raise CahpError("signatures need an unpruned model (every layer with all its heads)")
            per_layer[layer] = resize_attention_maps(probabilities.float(), mask_holder["mask"], size)

        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(adapter.attention_modules(model))]
    was_training = model.training
    model.eval()
    extra = {"output_attentions": True} if adapter.probs_need_output_attentions else {}
    try:
        with eager_attention(model), torch.inference_mode():
            bar = tqdm(total=calibration.num_batches(batch_size), desc="signatures", disable=not progress, leave=False)
            for indices, batch in calibration.indexed_batches(batch_size, sort_by_length=True):
                mask_holder["mask"] = batch["attention_mask"].to(device)
                calibration.forward(model, batch, **extra)
                stacked = torch.stack([m for m in per_layer if m is not None], dim=1)  # [b, layers, heads, D]
                if stacked.shape[1] != layers:
                    raise CahpError("not every layer reported its attention maps")
                moments.add_batch(stacked.flatten(1, 2).cpu(), torch.as_tensor(groups[indices], dtype=torch.long))
                per_layer[:] = [None] * layers
                bar.update()
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments


def check_two_classes(calibration: Calibration) -> np.ndarray:
    """``[examples]`` class of every calibration example, after checking that CAHP can compare classes.

    Raises:
        CahpError: the objective defines fewer than two classes, or fewer than two are present.
    """
    if calibration.num_groups < 2:
        raise CahpError(
            f"CAHP compares classes: the calibration objective {calibration.objective.name!r} defines "
            f"{calibration.num_groups} class(es); give a calibration whose objective has at least two classes"
        )
    groups = np.asarray(calibration.groups())
    present = np.unique(groups)
    if len(present) < 2:
        raise CahpError(
            f"CAHP compares classes: the calibration split has only class {present[0]}; "
            "give a split with at least two classes"
        )
    return groups
