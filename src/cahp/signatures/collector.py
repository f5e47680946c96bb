"""Collect per-head, per-class signature statistics from forward hooks, batch by batch, never storing maps.

For every batch, a hook on each layer's attention module reads the attention probabilities
``[batch, heads, L, L]``, crops each example to its real tokens (whichever side pads), resizes the crop to
``B x B`` and hands ``[batch, heads, B*B]`` on; the per-class streaming moments of all layers' heads are then
updated and the maps dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.data.batching import EncodedSplit, iter_batches, num_batches
from cahp.errors import CahpError
from cahp.evaluation.metrics import model_device
from cahp.signatures.resize import DEFAULT_SIZE, resize_attention_maps
from cahp.signatures.stats import StreamingMoments


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
    tokenizer: Any,
    data: EncodedSplit,
    num_classes: int,
    *,
    size: int = DEFAULT_SIZE,
    batch_size: int = 32,
    progress: bool = True,
) -> StreamingMoments:
    """Per-(class, head) streaming mean and variance of the padding-aware attention signatures.

    Args:
        model: an unpruned classifier with a registered adapter.
        data: the calibration examples (tokenized) and their labels.
        num_classes: number of classes ``C``.
        size: side ``B`` of the resized maps (reference default 32).

    Returns:
        Moments with groups = classes and features ``[layers * heads, B * B]`` (head index = layer * heads
        + head).
    """
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers(model), adapter.num_heads(model)
    moments = StreamingMoments(num_classes)
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
            bar = tqdm(total=num_batches(data, batch_size), desc="signatures", disable=not progress, leave=False)
            for _, batch in iter_batches(tokenizer, data, batch_size, sort_by_length=True):
                labels = batch.pop("labels")
                mask_holder["mask"] = batch["attention_mask"].to(device)
                model(**{k: v.to(device) for k, v in batch.items()}, **extra)
                stacked = torch.stack([m for m in per_layer if m is not None], dim=1)  # [b, layers, heads, D]
                if stacked.shape[1] != layers:
                    raise CahpError("not every layer reported its attention maps")
                moments.add_batch(stacked.flatten(1, 2).cpu(), labels)
                per_layer[:] = [None] * layers
                bar.update()
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments
