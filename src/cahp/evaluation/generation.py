"""What decoder users measure beyond quality: key-value cache size, prefill latency, generation speed, and greedy
continuations of fixed prompts.

* :func:`kv_cache_bytes_per_token`: bytes the generation cache holds per token, counted from the kept key-value
  heads (``2 x kv_heads x head_dim x bytes`` summed over layers) and measured on a real cache after one forward.
  Removing key-value heads (grouped-query attention in ``groups`` mode) shrinks it in proportion; removing query
  heads only (``uniform`` mode) leaves it as it is.
* :func:`measure_generation`: prefill latency (one forward of a full prompt that fills the cache) and generation
  tokens/s (greedy, a fixed number of new tokens) of several models at several batch sizes, timed round-robin in
  one run so that load changes on a shared machine hit every model alike. Read the ratios, not absolute numbers.
* :func:`greedy_continuations`: the greedy continuation of each prompt, one prompt at a time (no padding).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import CahpError
from cahp.evaluation.latency import measure_latency, synthetic_batch
from cahp.runtime import model_device
from cahp.surgery import kept_kv_heads_by_layer

#: The fixed prompts whose greedy continuations every decoder report shows before and after pruning.
CONTINUATION_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "To make a cup of tea, you",
    "The three primary colors are",
)


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


def sliding_windows(config: Any) -> list[int | None]:
    """Each layer's attention window in tokens (``None``: the whole context): ``sliding_attention`` layers of
    ``config.layer_types`` (Gemma 3, Qwen2) keep ``config.sliding_window`` tokens; a config with a window and no
    layer types (Mistral) applies it to every layer."""
    window = getattr(config, "sliding_window", None)
    layers = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * layers
    if types is None:
        return [int(window)] * layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def kv_cache_bytes(model_or_config: Any, context: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of key-value cache a pruned or dense model holds for one sequence of ``context`` tokens: kept
    key-value heads x head_dim x 2 per token, a sliding-window layer holding at most ``window - 1`` tokens (with the
    next token they make its window: what transformers' cache keeps between steps)."""
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    element = torch.empty((), dtype=dtype).element_size()
    if hasattr(model_or_config, "config"):
        kv_by_layer = [len(heads) for _, heads in sorted(kept_kv_heads_by_layer(model_or_config).items())]
    else:
        kv_by_layer = [adapter.num_kv_heads(config)] * int(config.num_hidden_layers)
    head_dim = adapter.head_size(config)
    return sum(
        2 * heads * head_dim * element * (context if window is None else min(context, window - 1))
        for heads, window in zip(kv_by_layer, sliding_windows(config), strict=True)
    )


@torch.inference_mode()
def kv_cache_bytes_per_token(model: PreTrainedModel, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Bytes of key-value cache per token of context, counted and measured.

    Args:
        model: a ``*ForCausalLM`` with a registered adapter (pruned or not).
        dtype: the cache's element type (default: the model's parameter dtype).

    Returns:
        ``{"bytes_per_token"`` (counted: ``sum over layers of 2 x kept kv heads x head_dim x element size``, what
        every token costs while the context fits every sliding window), ``"measured_bytes_per_token"`` (the keys
        and values of a real cache after one forward of 8 tokens, divided by 8), ``"kv_heads"`` (kept key-value
        heads over all layers), ``"kv_heads_by_layer"``, ``"head_dim"``, ``"dtype"``, ``"sliding_windows"`` (each
        layer's window, ``None`` for full attention: past its window a layer's cache stops growing; see
        :func:`kv_cache_bytes`)``}``.

    Raises:
        CahpError: the measured cache disagrees with the count (a cache layout this function does not know).
    """
    adapter = get_adapter(model)
    dtype = dtype or _parameter_dtype(model)
    element = torch.empty((), dtype=dtype).element_size()
    head_dim = adapter.head_size(model)
    kv_by_layer = [len(heads) for _, heads in sorted(kept_kv_heads_by_layer(model).items())]
    counted = sum(2 * heads * head_dim * element for heads in kv_by_layer)

    tokens = 8
    vocab = int(getattr(model.config, "vocab_size", 100))
    input_ids = torch.arange(tokens, device=model_device(model))[None] % max(vocab - 1, 1) + 1  # [1, tokens]
    was_training = model.training
    model.eval()
    try:
        output = model(input_ids=input_ids, use_cache=True)
        cache = output.get("cache", None)  # transformers 5; earlier versions call it past_key_values
        if cache is None:
            cache = output.get("past_key_values", None)
    finally:
        model.train(was_training)
    measured = _cache_bytes(cache, dtype)
    expected = kv_cache_bytes(model, tokens, dtype)
    if measured != expected:
        raise CahpError(
            f"the generation cache holds {measured / tokens:g} bytes per token but the kept key-value heads "
            f"({sum(kv_by_layer)}) x head_dim {head_dim} give {expected / tokens:g}: this cache layout is not "
            "supported here"
        )
    return {
        "bytes_per_token": counted,
        "measured_bytes_per_token": measured / tokens,
        "kv_heads": sum(kv_by_layer),
        "kv_heads_by_layer": kv_by_layer,
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "sliding_windows": sliding_windows(model.config),
    }


def _cache_bytes(cache: Any, dtype: torch.dtype) -> float:
    """Bytes of every key and value tensor in a transformers cache, counted at ``dtype``'s element size."""
    element = torch.empty((), dtype=dtype).element_size()
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
    else:  # older caches: parallel lists
        tensors = [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]
    return float(sum(tensor.numel() * element for tensor in tensors if isinstance(tensor, torch.Tensor)))


def _generate(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int, pad_token_id: int, *, exact: bool = True
) -> torch.Tensor:
    """Greedy generation of ``new_tokens`` tokens with the KV cache; returns ``[batch, L + new]``. ``exact``: exactly
    that many (EOS does not stop it, as timing needs); otherwise at most that many (EOS stops it)."""
    generate = cast(Callable[..., torch.Tensor], model.generate)  # the token ids: no return_dict_in_generate
    return generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_token_id,
    )


@torch.inference_mode()
def measure_generation(
    models: dict[str, nn.Module],
    *,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """Prefill latency and generation tokens/s of each model at each batch size, interleaved in one run.

    Args:
        models: ``{name: *ForCausalLM}``, e.g. ``{"dense": ..., "pruned": ...}`` (same vocabulary).
        batch_sizes: prompts generated together.
        prompt_tokens: tokens per prompt (random ids, no padding).
        new_tokens: tokens generated per prompt (greedy, EOS does not stop it).
        repeats: timed repeats per model and batch size (after one warm-up).
        pad_token_id: passed to ``generate`` (no padding occurs).

    Returns:
        ``{"prompt_tokens", "new_tokens", "repeats", "torch_threads", "by_batch": {"1": {name: {"prefill_seconds",
        "generate_seconds", "tokens_per_second"}, "prefill_ratio", "tokens_per_second_ratio", "prefill_ratio_range",
        "tokens_per_second_ratio_range"}, ...}}``; ratios are of the second model over the first (``pruned / dense``
        for prefill seconds and for tokens/s), of the medians; a range is the lowest and highest ratio of the two
        models timed back to back in one repeat.

    Raises:
        CahpError: no models, or a batch size, prompt length, new-token count or repeat count below 1.
    """
    if not models:
        raise CahpError("measure_generation needs at least one model")
    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("repeats", repeats)):
        if value < 1:
            raise CahpError(f"{name} must be at least 1, got {value}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise CahpError(f"batch_sizes must list positive batch sizes, got {list(batch_sizes)}")
    first = next(iter(models.values()))
    by_batch: dict[str, Any] = {}
    for batch_size in batch_sizes:
        prefill_batch: dict[str, Any] = {**synthetic_batch(first, batch_size, prompt_tokens), "use_cache": True}
        prefill = measure_latency(models, prefill_batch, repeats=repeats, warmup=1)
        input_ids = prefill_batch["input_ids"]
        for model in models.values():  # warm-up
            _generate(model, input_ids, new_tokens, pad_token_id)
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                output = _generate(model, input_ids, new_tokens, pad_token_id)
                samples[name].append(time.perf_counter() - start)
                if output.shape[1] != prompt_tokens + new_tokens:
                    raise CahpError(f"{name} generated {output.shape[1] - prompt_tokens} tokens, not {new_tokens}")
        row: dict[str, Any] = {}
        for name in models:
            seconds = statistics.median(samples[name])
            row[name] = {
                "prefill_seconds": prefill[name]["median_seconds"],
                "generate_seconds": seconds,
                "tokens_per_second": batch_size * new_tokens / seconds,
            }
        names = list(models)
        if len(names) >= 2:
            base, other = row[names[0]], row[names[1]]
            row["prefill_ratio"] = round(other["prefill_seconds"] / base["prefill_seconds"], 3)
            row["tokens_per_second_ratio"] = round(other["tokens_per_second"] / base["tokens_per_second"], 3)
            # the spread: the same ratio in every repeat (the two models timed back to back in each)
            pairs = zip(prefill[names[1]]["seconds"], prefill[names[0]]["seconds"], strict=True)
            prefill_ratios = [o / b for o, b in pairs]
            speed_ratios = [b / o for o, b in zip(samples[names[1]], samples[names[0]], strict=True)]
            row["prefill_ratio_range"] = [round(min(prefill_ratios), 3), round(max(prefill_ratios), 3)]
            row["tokens_per_second_ratio_range"] = [round(min(speed_ratios), 3), round(max(speed_ratios), 3)]
        by_batch[str(batch_size)] = row
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "by_batch": by_batch,
    }


@torch.inference_mode()
def greedy_continuations(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str] = CONTINUATION_PROMPTS, max_new_tokens: int = 16
) -> list[dict[str, Any]]:
    """The greedy continuation of each prompt (one at a time, so no padding; stops at EOS).

    Args:
        model: a ``*ForCausalLM``.
        tokenizer: encodes the prompts with the tokenizer's own special tokens (a BOS where it adds one).
        prompts: the texts to continue.
        max_new_tokens: the most tokens generated per prompt.

    Returns:
        One ``{"prompt", "continuation" (decoded new tokens, special tokens dropped), "token_ids" (new tokens)}``
        per prompt.
    """
    if max_new_tokens < 1:
        raise CahpError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    results = []
    try:
        for prompt in prompts:
            input_ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
            output = _generate(model, input_ids, max_new_tokens, pad, exact=False)
            new = output[0, input_ids.shape[1] :].tolist()
            results.append(
                {
                    "prompt": prompt,
                    "continuation": tokenizer.decode(new, skip_special_tokens=True),
                    "token_ids": new,
                }
            )
    finally:
        model.train(was_training)
    return results
