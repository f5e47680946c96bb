"""Automatic head count: the knee of the MSS(k) curve, with a defined fallback when there is none.

Steps (the reference's choices: Kneedle on a degree-6 polynomial fit, ``curve="concave"``,
``direction="increasing"``, sensitivity ``S = 1.0``, offline mode = first knee found):

1. Fit ``MSS(k)`` with a least-squares polynomial of degree ``min(degree, K - 1)`` in the normalised
   variable ``t = (k - k_min) / (k_max - k_min)`` (better conditioned than raw k; the fitted values are the
   same polynomial fit). Evaluate it at the sampled ks.
2. Kneedle (Satopaa et al. 2011), exactly as ``kneed`` 0.9 does it for a concave increasing curve
   (``tests/unit/test_cahp_math.py`` compares the two on many curves): normalise k and the fitted values to
   ``[0, 1]``; difference curve ``d = y_n - x_n``; local maxima (``>=`` both neighbours, the ends compared
   with themselves) and local minima (``<=``) of ``d``; for a maximum at ``i`` the threshold is
   ``d[i] - S * mean(diff(x_n))``. Walk the curve from the first maximum: a maximum sets its threshold and
   arms detection, a minimum sets the threshold to 0 and disarms detection until the next maximum (so a dip
   of ``d`` below 0 after a minimum is not a knee: an S-shaped MSS curve gets its knee at the top of the
   rise, not at ``k_min``); while armed, ``d[i + 1] < threshold`` makes the last maximum a knee. Kneedle's
   offline answer (the reference's) is the first knee, kept in ``kneedle_k``; ``all_knees`` lists every
   knee of the walk in order.
3. Our acceptance rule, a deliberate difference from the reference (which takes ``kneedle_k`` as it is, even
   the endpoint ``k_min``, and crashes when Kneedle finds nothing): ``k*`` is the first knee of the walk that
   is an interior point (not the first or last k) where the fitted curve lies strictly above its chord
   (``d > 0``). When ``kneedle_k`` is such a knee, ``k* = kneedle_k`` as in the reference. The common
   other case is a fitted curve that falls right after ``k_min`` (``d[0]`` is then a maximum whose
   threshold is crossed at once): the reference keeps ``k_min`` = 2 clusters, we take the next knee, but
   only if it does not lie past the fallback's k (step 4; past it the fit overshoots a step, e.g. the MSS
   curve of an early-stopped sweep padded with 1), else the fallback.
4. Fallback when no knee is accepted (flat curve, convex or decreasing curve, a step, fewer than 3
   points, non-finite values): ``k*`` = the k of the largest raw MSS, the smallest such k on ties (so a
   curve that reaches 1 and was padded with 1 by the early stop gives the k where it first reached 1).
   ``method`` is ``"fallback"`` and ``fallback`` says why. The raw MSS rather than the fit is used because
   a degree-6 polynomial overshoots near steps and ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cahp.errors import CahpError

DEFAULT_DEGREE = 6
DEFAULT_SENSITIVITY = 1.0


@dataclass(frozen=True)
class KneeResult:
    """Where the MSS(k) knee is and how it was found.

    Attributes:
        k: the chosen number of clusters ``k*``.
        method: ``"kneedle"`` or ``"fallback"``.
        fallback: why the fallback was used (``None`` when Kneedle gave an accepted knee).
        kneedle_k: what plain Kneedle (the reference / ``kneed``) returns, ``None`` where it finds no knee.
        ks: ``[K]`` the sampled cluster counts.
        mss: ``[K]`` the MSS values.
        fitted: ``[K]`` the polynomial fit at ``ks``.
        coefficients: polynomial coefficients in ``t = (k - k_min) / (k_max - k_min)``, highest power
            first (``np.polyval`` order).
        degree: the degree actually fitted (``min(requested, K - 1)``).
        difference: ``[K]`` the Kneedle difference curve ``y_n - x_n`` (empty when not computed).
        sensitivity: Kneedle's ``S``.
        all_knees: the ks of every knee Kneedle's walk finds, in walk order (``kneed``'s ``all_knees``;
            the first is ``kneedle_k``).
    """

    k: int
    method: str
    fallback: str | None
    kneedle_k: int | None
    ks: np.ndarray
    mss: np.ndarray
    fitted: np.ndarray
    coefficients: np.ndarray
    degree: int
    difference: np.ndarray
    sensitivity: float
    all_knees: tuple[int, ...] = ()

    def fitted_at(self, k: np.ndarray | float) -> np.ndarray:
        """Evaluate the fitted polynomial at (possibly non-integer) ``k``."""
        return np.polyval(self.coefficients, _normalise(np.asarray(k, dtype=np.float64), self.ks))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "k": self.k,
            "method": self.method,
            "fallback": self.fallback,
            "kneedle_k": self.kneedle_k,
            "all_knees": list(self.all_knees),
            "degree": self.degree,
            "sensitivity": self.sensitivity,
            "ks": self.ks.tolist(),
            "mss": self.mss.tolist(),
            "fitted": self.fitted.tolist(),
            "coefficients": self.coefficients.tolist(),
        }


def find_knee(
    ks: np.ndarray,
    mss: np.ndarray,
    degree: int = DEFAULT_DEGREE,
    sensitivity: float = DEFAULT_SENSITIVITY,
) -> KneeResult:
    """Find ``k*`` on the MSS(k) curve (see the module docstring for the exact rules). Never raises on
    the curve's shape; raises :class:`CahpError` only for empty or mismatched input.

    Args:
        ks: ``[K]`` cluster counts, strictly increasing.
        mss: ``[K]`` MSS values.
        degree: polynomial degree (reference 6).
        sensitivity: Kneedle ``S`` (reference 1.0).
    """
    ks = np.asarray(ks, dtype=np.float64).reshape(-1)
    mss = np.asarray(mss, dtype=np.float64).reshape(-1)
    if ks.shape != mss.shape or ks.size == 0:
        raise CahpError(f"find_knee needs equally long, non-empty ks and mss; got {ks.size} ks and {mss.size} values.")
    if ks.size > 1 and np.any(np.diff(ks) <= 0):
        raise CahpError("find_knee needs strictly increasing ks.")
    if degree < 0:
        raise CahpError(f"polynomial degree must be >= 0, got {degree}.")
    int_ks = ks.astype(np.int64)
    degree_used = int(min(degree, ks.size - 1))
    finite = bool(np.all(np.isfinite(mss)))
    if finite and ks.size > 1:
        coefficients = np.polyfit(_normalise(ks, ks), mss, degree_used)
        fitted = np.polyval(coefficients, _normalise(ks, ks))
    elif finite:  # a single point: the constant polynomial through it
        coefficients, fitted = mss.copy(), mss.copy()
    else:
        coefficients, fitted = np.zeros(0), np.full_like(mss, np.nan)
    common: dict[str, Any] = {
        "ks": int_ks,
        "mss": mss,
        "fitted": fitted,
        "coefficients": coefficients,
        "degree": degree_used,
        "sensitivity": sensitivity,
        "all_knees": (),
    }

    def fallback(reason: str, kneedle_k: int | None = None, difference: np.ndarray | None = None) -> KneeResult:
        return KneeResult(
            k=int(int_ks[_first_argmax(mss)]),
            method="fallback",
            fallback=f"{reason}; took {_FALLBACK_RULE}",
            kneedle_k=kneedle_k,
            difference=np.zeros(0) if difference is None else difference,
            **common,
        )

    if not finite:
        return fallback("the MSS curve has non-finite values")
    if ks.size < 3:
        return fallback(f"only {ks.size} point(s) on the MSS curve (Kneedle needs at least 3)")
    if not np.all(np.isfinite(fitted)):
        return fallback("the polynomial fit is not finite")
    spread = float(fitted.max() - fitted.min())
    if spread <= 1e-12 * max(1.0, float(np.abs(fitted).max())):
        return fallback("the MSS curve is flat")

    x_norm = _normalise(ks, ks)
    difference = (fitted - fitted.min()) / spread - x_norm
    knee_indices = _kneedle_knees(x_norm, difference, sensitivity)
    common["all_knees"] = tuple(int(int_ks[index]) for index in knee_indices)
    if not knee_indices:
        return fallback("Kneedle found no knee", None, difference)
    kneedle_k = int(int_ks[knee_indices[0]])
    accepted = [index for index in knee_indices if 0 < index < ks.size - 1 and difference[index] > 0]
    listed = ", ".join(map(str, common["all_knees"]))
    if not accepted:
        return fallback(
            f"every knee Kneedle found ({listed}) is an endpoint or lies on/below the chord (the curve is not "
            "concave increasing there)",
            kneedle_k,
            difference,
        )
    knee_k = int(int_ks[accepted[0]])
    if knee_k != kneedle_k and knee_k > int(int_ks[_first_argmax(mss)]):
        return fallback(
            f"Kneedle's first knee k={kneedle_k} is an endpoint or lies on/below the chord and its next one, "
            f"k={knee_k}, lies past the largest raw MSS",
            kneedle_k,
            difference,
        )
    return KneeResult(k=knee_k, method="kneedle", fallback=None, kneedle_k=kneedle_k, difference=difference, **common)


_FALLBACK_RULE = "the k of the largest raw MSS (smallest such k)"


def _first_argmax(values: np.ndarray) -> int:
    """Index of the largest finite value (first on ties); 0 when none is finite."""
    scores = np.where(np.isfinite(values), values, -np.inf)
    top = float(np.max(scores))
    if not np.isfinite(top):
        return 0
    return int(np.flatnonzero(scores >= top - 1e-12 * max(1.0, abs(top)))[0])


def _normalise(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map ``values`` linearly so that ``reference``'s range becomes ``[0, 1]``."""
    low, high = float(np.min(reference)), float(np.max(reference))
    return (values - low) / (high - low) if high > low else values - low


def _relative_extrema(values: np.ndarray, maxima: bool) -> np.ndarray:
    """Indices ``i`` with ``values[i] >= (or <=)`` both neighbours; an end is compared with itself."""
    left = np.concatenate([values[:1], values[:-1]])
    right = np.concatenate([values[1:], values[-1:]])
    if maxima:
        return np.flatnonzero((values >= left) & (values >= right))
    return np.flatnonzero((values <= left) & (values <= right))


def _kneedle_knees(x_norm: np.ndarray, difference: np.ndarray, sensitivity: float) -> list[int]:
    """Indices of the knees of a normalised concave-increasing difference curve, in the order the walk
    finds them (``kneed``'s ``all_knees``); the first is Kneedle's offline answer. Empty when none.

    The walk starts at the first local maximum of ``difference``. A maximum sets the threshold
    ``d[i] - S * mean(diff(x_n))`` and arms detection; a minimum (checked after, so a flat point that is
    both ends up disarmed) sets the threshold to 0 and disarms detection until the next maximum. While
    armed, ``d[i + 1] < threshold`` makes the last maximum a knee.
    """
    maxima = _relative_extrema(difference, maxima=True)
    if maxima.size == 0:
        return []
    minima = set(_relative_extrema(difference, maxima=False).tolist())
    thresholds = difference[maxima] - sensitivity * np.abs(np.diff(x_norm).mean())
    maxima_set = {int(index): position for position, index in enumerate(maxima)}
    knees: list[int] = []
    threshold, threshold_index, armed = 0.0, int(maxima[0]), True
    for i in range(int(maxima[0]), difference.size - 1):
        if i in maxima_set:
            threshold, threshold_index, armed = float(thresholds[maxima_set[i]]), i, True
        if i in minima:
            threshold, armed = 0.0, False
        if armed and difference[i + 1] < threshold and threshold_index not in knees:
            knees.append(threshold_index)
    return knees
