"""Padding-aware crop and bilinear resize of attention maps, batched.

For one example with ``n`` real tokens, the signature of a head is its attention map restricted to the
real tokens (an ``n x n`` crop) resized to ``size x size`` exactly as
``F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)`` (no antialias).

Bilinear resizing is separable, so the crop-and-resize of a whole batch is one pair of matrix products:
``out = R @ A @ R^T`` with a per-example interpolation matrix ``R`` of shape ``[size, L]`` whose columns at
padding positions are zero. Padding may sit on either side (or anywhere): real positions are taken in
order from ``attention_mask``.
"""

from __future__ import annotations

import torch

from cahp.errors import CahpError

DEFAULT_SIZE = 32


def interpolation_matrices(
    attention_mask: torch.Tensor, size: int = DEFAULT_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-example bilinear interpolation matrices mapping the real tokens onto ``size`` output cells.

    Row ``o`` of ``R[b]`` holds the two bilinear weights (half-pixel centres, ``align_corners=False``,
    source index clamped at 0) of output cell ``o`` over the ``n_b`` real positions of example ``b``;
    weights are zero at padding positions.

    Args:
        attention_mask: ``[batch, L]``, nonzero = real token.
        size: output side ``B``.
        dtype: dtype of the returned matrices.

    Returns:
        ``[batch, size, L]`` interpolation matrices; each row sums to 1.
    """
    if attention_mask.ndim != 2:
        raise CahpError(f"attention_mask must be [batch, L], got shape {tuple(attention_mask.shape)}.")
    if size < 1:
        raise CahpError(f"resize size must be >= 1, got {size}.")
    real = attention_mask != 0
    batch, seq_len = real.shape
    device = attention_mask.device
    n_real = real.sum(dim=1)  # [batch]
    if bool((n_real == 0).any()):
        empty = torch.nonzero(n_real == 0).flatten().tolist()
        raise CahpError(f"examples {empty} have no real tokens in attention_mask; drop empty examples.")
    # Positions of the real tokens, in order, packed to the front: [batch, L].
    real_positions = torch.argsort((~real).to(torch.int8), dim=1, stable=True)

    # Source coordinate of each output cell, computed as PyTorch does (float32 scale = n / size).
    n_float = n_real.to(torch.float64)[:, None]  # [batch, 1]
    out_index = torch.arange(size, device=device, dtype=torch.float64)[None, :]  # [1, size]
    scale = (n_float.to(torch.float32) / size).to(torch.float64)
    source = ((out_index + 0.5) * scale - 0.5).clamp(min=0.0)  # [batch, size]
    lower = source.floor().to(torch.int64)
    lower = torch.minimum(lower, n_real[:, None] - 1)
    upper = torch.minimum(lower + 1, n_real[:, None] - 1)
    weight_upper = (source - lower.to(torch.float64)).clamp(0.0, 1.0)
    weight_lower = 1.0 - weight_upper

    matrices = torch.zeros(batch, size, seq_len, dtype=torch.float64, device=device)
    matrices.scatter_add_(2, real_positions.gather(1, lower)[..., None], weight_lower[..., None])
    matrices.scatter_add_(2, real_positions.gather(1, upper)[..., None], weight_upper[..., None])
    return matrices.to(dtype)


def resize_attention_maps(
    attentions: torch.Tensor, attention_mask: torch.Tensor | None = None, size: int = DEFAULT_SIZE
) -> torch.Tensor:
    """Crop every head's attention map to the real tokens and resize it bilinearly to ``size x size``.

    Args:
        attentions: ``[batch, heads, L, L]`` attention probabilities (``heads`` may be
            ``layers * heads`` flattened).
        attention_mask: ``[batch, L]``, nonzero = real token; ``None`` means no padding.
        size: output side ``B`` (reference default 32).

    Returns:
        ``[batch, heads, size * size]`` float32 (float64 if the input is float64), row-major flattening
        of the ``size x size`` grid, on the input's device.
    """
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise CahpError(f"attentions must be [batch, heads, L, L], got shape {tuple(attentions.shape)}.")
    batch, _, seq_len, _ = attentions.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.int64, device=attentions.device)
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise CahpError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match attentions "
            f"[batch={batch}, L={seq_len}]."
        )
    compute_dtype = torch.float64 if attentions.dtype == torch.float64 else torch.float32
    matrices = interpolation_matrices(attention_mask.to(attentions.device), size, compute_dtype)
    return resize_with_matrices(attentions, matrices)


def resize_with_matrices(attentions: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """:func:`resize_attention_maps` with the interpolation matrices given (build them once per batch with
    :func:`interpolation_matrices` and reuse them for every layer: they depend only on the attention mask).

    Args:
        attentions: ``[batch, heads, L, L]`` attention probabilities.
        matrices: ``[batch, size, L]`` from :func:`interpolation_matrices` (any float dtype).

    Returns:
        ``[batch, heads, size * size]`` float32 (float64 if the input is float64).
    """
    if matrices.ndim != 3 or matrices.shape[0] != attentions.shape[0] or matrices.shape[2] != attentions.shape[-1]:
        raise CahpError(
            f"interpolation matrices of shape {tuple(matrices.shape)} do not fit attentions "
            f"{tuple(attentions.shape)}: build them from this batch's attention mask."
        )
    compute_dtype = torch.float64 if attentions.dtype == torch.float64 else torch.float32
    maps = attentions.to(compute_dtype)
    matrices = matrices.to(device=maps.device, dtype=compute_dtype)
    rows = torch.matmul(matrices[:, None], maps)  # [batch, heads, size, L]
    resized = torch.matmul(rows, matrices.transpose(1, 2)[:, None])  # [batch, heads, size, size]
    return resized.flatten(2)
