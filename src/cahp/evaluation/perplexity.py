"""Perplexity of a causal language model over language-modelling blocks (:mod:`cahp.data.lm`).

``perplexity = exp(total NLL / scored tokens)``: every scored target token of every block weighs the same (the
sliding-window protocol, each token of the stream scored once when ``stride < context_length``). Batched, no
gradients, padding-aware on either side (positions are counted over real tokens).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from cahp.calibration import CausalLanguageModeling, to_device
from cahp.data.batching import iter_batches, num_batches
from cahp.data.lm import LMBlocks
from cahp.errors import CahpError
from cahp.runtime import model_device


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    blocks: LMBlocks,
    batch_size: int = 8,
    progress: bool = False,
    objective: CausalLanguageModeling | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` (a ``*ForCausalLM``) on ``blocks``.

    Args:
        model: returns ``logits`` ``[batch, L, vocab]``.
        tokenizer: pads each batch (either side).
        blocks: the blocks and their scored-token counts.
        batch_size: blocks per forward (length-sorted to pad less).
        progress: show a progress bar.
        objective: how the NLL is computed (default :class:`~cahp.calibration.CausalLanguageModeling`).

    Returns:
        ``{"perplexity", "nll" (mean per scored token, nats), "tokens" (scored), "blocks", "context_length",
        "stride", "corpus", "split", "seconds"}``.

    Raises:
        CahpError: ``batch_size`` < 1 or no blocks.
    """
    if batch_size < 1:
        raise CahpError(f"the perplexity batch size must be a positive number, got {batch_size}")
    if len(blocks) == 0:
        raise CahpError("no language-modelling blocks to evaluate: give a corpus with text")
    objective = objective or CausalLanguageModeling()
    was_training = model.training
    model.eval()
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=num_batches(blocks.examples, batch_size), desc="perplexity", disable=not progress, leave=False)
    try:
        for _, batch in iter_batches(tokenizer, blocks.examples, batch_size, sort_by_length=True):
            totals, counts = objective.example_nll(model, to_device(batch, device))
            total_nll += float(totals.double().sum())
            total_tokens += int(counts.sum())
            bar.update()
    finally:
        bar.close()
        model.train(was_training)
    mean_nll = total_nll / max(total_tokens, 1)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "blocks": len(blocks),
        "context_length": blocks.context_length,
        "stride": blocks.stride,
        "corpus": blocks.corpus.get("corpus"),
        "split": blocks.corpus.get("split"),
        "seconds": round(time.perf_counter() - start, 3),
    }
