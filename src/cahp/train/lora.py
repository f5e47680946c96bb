"""LoRA recovery: rank-``R`` adapters on every linear projection of the attention and MLP blocks, trained while the
rest stays frozen, then merged into the weights so that the saved model needs no peft (``pip install 'cahp[lora]'``
for the training only). Used by every workload's recovery (``--recovery-lora-rank R``)."""

from __future__ import annotations

from typing import Any

import torch

from cahp.errors import CahpError

#: LoRA's scale ``alpha / rank``: alpha is twice the rank.
LORA_ALPHA_PER_RANK = 2


def require_peft() -> Any:
    """The ``peft`` module.

    Raises:
        CahpError: peft is not installed (one line saying how to install it).
    """
    try:
        import peft
    except ImportError as error:
        raise CahpError(
            f"--recovery-lora-rank needs the peft package, which cannot be imported ({error}): "
            "pip install 'cahp[lora]', or recover without LoRA"
        ) from None
    return peft


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Names of the projections that get LoRA adapters: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) of
    the model but its output head, skipping projections that pruning left without rows or columns."""
    from transformers.pytorch_utils import Conv1D

    head = getattr(model, "get_output_embeddings", lambda: None)()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head and module.weight.numel() > 0
    ]


def add_lora(model: torch.nn.Module, rank: int) -> Any:
    """Wrap ``model`` in rank-``rank`` LoRA adapters on :func:`lora_target_modules` (scale 2, no dropout); only the
    adapters train. The adapters are injected into ``model``'s own modules; :func:`merge_lora` removes them.

    Returns:
        The peft model (call it like ``model``).
    """
    peft = require_peft()
    targets = lora_target_modules(model)
    if not targets:
        raise CahpError("the model has no linear projection to put LoRA adapters on; recover without LoRA")
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA_PER_RANK * rank,
        lora_dropout=0.0,
        target_modules=[f"{name}" for name in targets],
        bias="none",
    )
    return peft.get_peft_model(model, lora)


def describe_lora(peft_model: Any) -> dict[str, Any]:
    """Rank, alpha, adapted projections and trainable parameters of a LoRA-wrapped model."""
    config = next(iter(peft_model.peft_config.values()))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "target_modules": len(config.target_modules),
        "trainable_parameters": trainable,
        "merged": True,
    }


def merge_lora(peft_model: Any) -> torch.nn.Module:
    """Add each adapter's ``B @ A * scale`` into its projection's weight and drop the adapters; returns the
    plain model (the one :func:`add_lora` wrapped), which saves and loads without peft."""
    return peft_model.merge_and_unload()
