"""Class separability of each head's signature features: Bhattacharyya and Jeffries-Matusita distances.

Every feature of a head's signature is modelled, per class, as a 1-D Gaussian (mean, variance). For a pair
of classes the per-feature Bhattacharyya distance is

    B = 1/4 (mu1 - mu2)^2 / (v1 + v2) + 1/2 ln((v1 + v2) / (2 sqrt(v1 v2)))

with both variances floored at ``var_floor`` (1e-6), and the Jeffries-Matusita distance is
``JM = 2 (1 - exp(-B))``, bounded in ``[0, 2)``. A head's *profile* concatenates these values over all
class pairs.
"""

from __future__ import annotations

from itertools import combinations
from typing import Literal

import numpy as np

from cahp.errors import CahpError

Metric = Literal["jm", "bhattacharyya"]
DEFAULT_VAR_FLOOR = 1e-6


def bhattacharyya_distance(
    mean_a: np.ndarray,
    var_a: np.ndarray,
    mean_b: np.ndarray,
    var_b: np.ndarray,
    var_floor: float = DEFAULT_VAR_FLOOR,
) -> np.ndarray:
    """Elementwise Bhattacharyya distance between 1-D Gaussians (arrays broadcast together).

    Variances are floored at ``var_floor``; NaN variances (undefined, e.g. a class seen once with
    ``ddof=1``) count as the floor, as in the reference.

    Returns:
        float64 array of the broadcast shape, >= 0.
    """
    va = _floor(var_a, var_floor)
    vb = _floor(var_b, var_floor)
    diff = np.asarray(mean_a, dtype=np.float64) - np.asarray(mean_b, dtype=np.float64)
    total = va + vb
    return 0.25 * diff * diff / total + 0.5 * np.log(total / (2.0 * np.sqrt(va * vb)))


def jeffries_matusita_distance(
    mean_a: np.ndarray,
    var_a: np.ndarray,
    mean_b: np.ndarray,
    var_b: np.ndarray,
    var_floor: float = DEFAULT_VAR_FLOOR,
) -> np.ndarray:
    """Elementwise Jeffries-Matusita distance ``2 (1 - exp(-B))`` between 1-D Gaussians, in ``[0, 2)``."""
    return 2.0 * -np.expm1(-bhattacharyya_distance(mean_a, var_a, mean_b, var_b, var_floor))


def class_pairs(n_classes: int) -> list[tuple[int, int]]:
    """Class pairs in profile order: ``itertools.combinations(range(n_classes), 2)``."""
    return list(combinations(range(n_classes), 2))


def separability_profiles(
    means: np.ndarray,
    variances: np.ndarray,
    metric: Metric = "jm",
    var_floor: float = DEFAULT_VAR_FLOOR,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Per-head separability profiles over all class pairs.

    Layout is **pair-major**: ``profiles[h, p * D + d]`` is the distance of feature ``d`` for the
    ``p``-th pair of :func:`class_pairs` (the reference's layout: one block of ``D`` per pair).

    Args:
        means: ``[classes, heads, D]`` per-class feature means.
        variances: ``[classes, heads, D]`` per-class feature variances.
        metric: ``"jm"`` (default) or ``"bhattacharyya"``.
        var_floor: lower bound applied to every variance.
        counts: optional ``[classes]`` or ``[classes, heads]`` sample counts; a pair involving a class
            with no samples gets an all-zero block (as in the reference) instead of NaN.

    Returns:
        ``[heads, D * C(C-1)/2]`` float64. With fewer than 2 classes there are no pairs and the result
        has zero columns.
    """
    means = np.asarray(means, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    if means.ndim != 3 or means.shape != variances.shape:
        raise CahpError(
            f"means and variances must both be [classes, heads, D]; got {means.shape} and {variances.shape}."
        )
    if metric not in ("jm", "bhattacharyya"):
        raise CahpError(f"unknown separability metric {metric!r}; use 'jm' or 'bhattacharyya'.")
    n_classes, n_heads, n_features = means.shape
    pairs = class_pairs(n_classes)
    if not pairs:
        return np.zeros((n_heads, 0), dtype=np.float64)
    first = np.array([a for a, _ in pairs])
    second = np.array([b for _, b in pairs])
    distance = jeffries_matusita_distance if metric == "jm" else bhattacharyya_distance
    # [pairs, heads, D]
    values = distance(means[first], variances[first], means[second], variances[second], var_floor)
    if counts is not None:
        seen = np.asarray(counts) > 0
        seen = np.broadcast_to(seen.reshape(n_classes, -1), (n_classes, n_heads))
        missing = ~(seen[first] & seen[second])  # [pairs, heads]
        values[missing] = 0.0
    return np.ascontiguousarray(values.transpose(1, 0, 2).reshape(n_heads, len(pairs) * n_features))


def _floor(variance: np.ndarray, var_floor: float) -> np.ndarray:
    variance = np.asarray(variance, dtype=np.float64)
    return np.where(np.isnan(variance), var_floor, np.maximum(variance, var_floor))
