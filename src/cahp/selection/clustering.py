"""The head space: 2-D t-SNE embedding, k-medoids (FasterPAM) and the Mean Simplified Silhouette sweep.

All heads of all layers are rows of one global space. The pairwise Euclidean distance matrix of that space
is computed once (:func:`head_distances`) and reused by every k of the sweep.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import kmedoids
import numpy as np
from scipy.spatial.distance import pdist, squareform

from cahp.errors import CahpError

Embedding = Literal["tsne", "none"]
DEFAULT_PERPLEXITY = 10.0
DEFAULT_TSNE_ITERATIONS = 1000
DEFAULT_SEED = 42


def effective_perplexity(n_samples: int, perplexity: float = DEFAULT_PERPLEXITY) -> float:
    """The perplexity t-SNE can use for ``n_samples`` points (scikit-learn needs perplexity < n_samples).

    Returns ``perplexity`` unchanged when valid, otherwise ``max(1, (n_samples - 1) / 3)`` (the usual
    rule of thumb of ~3 perplexities per neighbourhood).
    """
    if perplexity < n_samples:
        return float(perplexity)
    return max(1.0, (n_samples - 1) / 3.0)


def embed_heads(
    profiles: np.ndarray,
    method: Embedding = "tsne",
    perplexity: float = DEFAULT_PERPLEXITY,
    n_iter: int = DEFAULT_TSNE_ITERATIONS,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """Map head profiles to the space that is clustered.

    ``"tsne"`` uses scikit-learn's ``TSNE(n_components=2, perplexity=10, max_iter=1000,
    random_state=seed)`` with its other defaults (PCA init, ``learning_rate="auto"``, Barnes-Hut), the
    reference settings, on float32 profiles as the reference does, on one thread (so that the thread count
    does not move the head space). scikit-learn needs perplexity < N: for
    small models the perplexity is lowered to :func:`effective_perplexity` with a ``UserWarning``. t-SNE is
    not run for fewer than 3 heads: N = 1 gives ``[[0, 0]]``, N = 2 places the heads at ``(0, 0)`` and
    ``(d, 0)``, ``d`` being their profile distance. ``"none"`` returns the profiles themselves (float64), so
    that clustering works on Euclidean profile distances.

    Degenerate head spaces (t-SNE's PCA start divides by a zero spread there and the process crashes):

    * profiles that are all equal as float32 (every head separates the classes alike, e.g. all zero, or
      no features at all) are not embedded: every head is placed at ``(0, 0)``, one point (a
      ``UserWarning`` says so; :func:`distinct_points` of the result is 1);
    * profiles whose float32 spread is below ``1e-12`` or above ``1e12`` (t-SNE's squared distances would
      underflow or overflow float32) are centred and scaled to unit spread before t-SNE (a ``UserWarning``
      says so); every other input goes to t-SNE unchanged, as in the reference.

    Args:
        profiles: ``[N, F]`` one row per head, finite.

    Returns:
        ``[N, 2]`` (t-SNE) or ``[N, F]`` (none).

    Raises:
        CahpError: ``profiles`` is not 2-D or has NaN/inf values, or an unknown ``method``.
    """
    profiles = np.asarray(profiles)
    if profiles.ndim != 2:
        raise CahpError(f"profiles must be [heads, features], got shape {profiles.shape}.")
    if method not in ("tsne", "none"):
        raise CahpError(f"unknown embedding {method!r}; use 'tsne' or 'none'.")
    bad_rows = np.flatnonzero(~np.isfinite(profiles).all(axis=1)) if profiles.size else np.zeros(0, dtype=np.int64)
    if bad_rows.size:
        raise CahpError(
            f"{bad_rows.size} of {profiles.shape[0]} head profiles have NaN/inf values (first head rows: "
            f"{bad_rows[:5].tolist()}): the signature statistics are not finite, e.g. a model that overflows in "
            "float16; collect the signatures again in float32."
        )
    if method == "none":
        return profiles.astype(np.float64)
    n_heads = profiles.shape[0]
    if n_heads < 2:
        return np.zeros((n_heads, 2), dtype=np.float64)
    if n_heads == 2:
        gap = float(np.linalg.norm(profiles[0].astype(np.float64) - profiles[1]))
        return np.array([[0.0, 0.0], [gap, 0.0]])
    points = profiles.astype(np.float32)
    if points.shape[1] == 0 or bool((points == points[0]).all()):
        warnings.warn(
            f"all {n_heads} head profiles are identical (every head separates the classes alike); t-SNE is "
            "skipped and the head space is one point.",
            UserWarning,
            stacklevel=2,
        )
        return np.zeros((n_heads, 2), dtype=np.float64)
    centred = points.astype(np.float64) - points.astype(np.float64).mean(axis=0)
    spread = float(np.abs(centred).max())
    if not _TSNE_SAFE_SPREAD[0] <= spread <= _TSNE_SAFE_SPREAD[1]:
        warnings.warn(
            f"head profiles spread only {spread:.3g} around their mean (t-SNE needs 1e-12 .. 1e12 in float32); "
            "they are centred and scaled to unit spread before t-SNE.",
            UserWarning,
            stacklevel=2,
        )
        points = (centred / spread).astype(np.float32)
    used = effective_perplexity(n_heads, perplexity)
    if used != perplexity:
        warnings.warn(
            f"t-SNE perplexity {perplexity} needs more than {n_heads} heads; using {used:.3g} instead.",
            UserWarning,
            stacklevel=2,
        )
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    tsne = TSNE(n_components=2, perplexity=used, max_iter=n_iter, random_state=seed)
    # One thread: parallel BLAS (PCA init) and parallel Barnes-Hut sums change the embedding with the thread
    # count, and with it k*. A few hundred points take well under a second on one thread.
    with threadpool_limits(limits=1):
        embedding = tsne.fit_transform(points).astype(np.float64)
    if not np.isfinite(embedding).all():
        raise CahpError(
            "t-SNE gave a non-finite head space for these profiles; cluster the profiles directly instead "
            "(CAHP setting embedding='none')."
        )
    return embedding


#: Spread (largest absolute deviation from the mean) that t-SNE handles in float32 without under/overflow.
_TSNE_SAFE_SPREAD = (1e-12, 1e12)


def duplicate_groups(distances: np.ndarray) -> np.ndarray:
    """Group exactly coinciding points (distance 0, as :func:`head_distances` gives for identical rows).

    Args:
        distances: ``[N, N]`` pairwise distances.

    Returns:
        ``[N]`` int64: for each point the index of the first point it coincides with (itself when none
        before it does); the number of distinct values is the number of distinct points.
    """
    distances = np.asarray(distances)
    if distances.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(distances == 0, axis=1).astype(np.int64)


def distinct_points(distances: np.ndarray) -> int:
    """How many distinct points the ``[N, N]`` distance matrix describes (0 for N = 0)."""
    return int(np.unique(duplicate_groups(distances)).size)


def head_distances(points: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances (computed directly, so identical rows are exactly 0 apart).

    Args:
        points: ``[N, F]``.

    Returns:
        ``[N, N]`` float64, symmetric, zero diagonal.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise CahpError(f"points must be [N, F], got shape {points.shape}.")
    if points.shape[0] < 2:
        return np.zeros((points.shape[0], points.shape[0]))
    return squareform(pdist(points, metric="euclidean"))


def mean_simplified_silhouette(
    distances: np.ndarray, labels: np.ndarray, medoids: np.ndarray, exclude_zero_intra: bool = True
) -> float:
    """Mean Simplified Silhouette of a medoid clustering.

    For head ``i`` in cluster ``c``: ``a_i`` = distance to medoid ``c``; ``b_i`` = MEAN distance to the
    other ``k - 1`` medoids (not the nearest); ``s_i = (b_i - a_i) / max(a_i, b_i)``.

    Heads with ``a_i = 0`` (every medoid, and exact duplicates of a medoid) are left out of the mean
    (``exclude_zero_intra=True``, the reference's rule); if every ``a_i`` is 0 the MSS is 1. With
    ``exclude_zero_intra=False`` they count as ``s = 1`` (or 0 when ``b_i`` is 0 too), the textbook
    simplified silhouette.

    Args:
        distances: ``[N, N]`` pairwise distances of the clustered space.
        labels: ``[N]`` cluster of each head, ``0 .. k-1``; ``labels[medoids[c]] == c``.
        medoids: ``[k]`` head index of each cluster's medoid, ``k >= 2``.

    Returns:
        MSS in ``[-1, 1]``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    medoids = np.asarray(medoids, dtype=np.int64)
    n_clusters = medoids.shape[0]
    if n_clusters < 2:
        raise CahpError(f"the simplified silhouette needs at least 2 clusters, got {n_clusters}.")
    to_medoids = distances[:, medoids]  # [N, k]
    intra = to_medoids[np.arange(labels.shape[0]), labels]
    other = (to_medoids.sum(axis=1) - intra) / (n_clusters - 1)
    nonzero = intra != 0
    if exclude_zero_intra:
        if not nonzero.any():
            return 1.0
        a, b = intra[nonzero], other[nonzero]
        return float(np.mean((b - a) / np.maximum(a, b)))
    denominator = np.maximum(intra, other)
    scores = np.divide(other - intra, denominator, out=np.zeros_like(intra), where=denominator > 0)
    return float(scores.mean())


@dataclass(frozen=True)
class Clustering:
    """A k-medoids partition of the heads.

    Attributes:
        labels: ``[N]`` cluster id ``0 .. k-1`` per head.
        medoids: ``[k]`` head index of each cluster's medoid (``labels[medoids[c]] == c``).
        loss: sum of distances of the heads to their medoids.
    """

    labels: np.ndarray
    medoids: np.ndarray
    loss: float

    @property
    def k(self) -> int:
        return int(self.medoids.shape[0])


def cluster_heads(distances: np.ndarray, k: int, seed: int = DEFAULT_SEED) -> Clustering:
    """FasterPAM k-medoids on a precomputed distance matrix (reference: random init, seeded, 100 iters).

    Exactly coinciding points cannot be told apart, so ``k`` is capped at the number ``d`` of distinct
    points (:func:`distinct_points`): for ``k >= d`` the clustering is the ``d`` groups of coinciding
    points, each medoid the group's first point (loss 0); check :attr:`Clustering.k` for the count used.
    With distinct points (every t-SNE head space in practice) this is ``k == N``: every head its own medoid.

    Args:
        distances: ``[N, N]``.
        k: number of clusters, ``1 <= k <= N``.

    Returns:
        The :class:`Clustering` with ``min(k, d)`` clusters.
    """
    distances = np.ascontiguousarray(distances, dtype=np.float64)
    n_heads = distances.shape[0]
    if not 1 <= k <= n_heads:
        raise CahpError(f"cannot cluster {n_heads} heads into k={k} groups; need 1 <= k <= {n_heads}.")
    groups = duplicate_groups(distances)
    medoids, labels = np.unique(groups, return_inverse=True)
    if k >= medoids.size:
        return Clustering(labels=labels.astype(np.int64), medoids=medoids.astype(np.int64), loss=0.0)
    result = kmedoids.fasterpam(distances, k, max_iter=100, init="random", random_state=seed, n_cpu=1)
    return Clustering(
        labels=np.asarray(result.labels, dtype=np.int64),
        medoids=np.asarray(result.medoids, dtype=np.int64),
        loss=float(result.loss),
    )


@dataclass
class KSweep:
    """MSS(k) over a range of cluster counts.

    Attributes:
        ks: ``[K]`` the cluster counts, increasing.
        mss: ``[K]`` MSS of each k (1.0 for the ks padded after the early stop).
        clusterings: the partition of every k actually clustered (padded ks are absent).
        stopped_at: the k at which MSS reached 1 and the sweep stopped, or ``None``.
        distances: the ``[N, N]`` matrix the sweep used (to recompute a padded k).
        seed: FasterPAM seed.
    """

    ks: np.ndarray
    mss: np.ndarray
    clusterings: dict[int, Clustering] = field(repr=False)
    stopped_at: int | None
    distances: np.ndarray = field(repr=False)
    seed: int = DEFAULT_SEED

    @property
    def n_distinct_points(self) -> int:
        """Distinct points of the head space; ``k`` above it is capped (see :func:`cluster_heads`)."""
        return distinct_points(self.distances)

    def clustering(self, k: int) -> Clustering:
        """The partition for ``k``: the stored one, or FasterPAM rerun with the same seed (``k`` capped at
        :attr:`n_distinct_points`)."""
        if k not in self.clusterings:
            self.clusterings[k] = cluster_heads(self.distances, k, self.seed)
        return self.clusterings[k]


def sweep_k(
    distances: np.ndarray,
    k_range: Iterable[int] | None = None,
    seed: int = DEFAULT_SEED,
    early_stop: bool = True,
    exclude_zero_intra: bool = True,
) -> KSweep:
    """Cluster the heads for every k and score each partition with the MSS.

    Args:
        distances: ``[N, N]`` pairwise distances of the head space (see :func:`head_distances`).
        k_range: cluster counts to try; default ``2 .. N-1`` as in the reference (empty when N < 3).
        seed: FasterPAM seed, the same for every k.
        early_stop: reference behaviour — once MSS reaches 1 (every head coincides with its medoid) stop
            and give the remaining ks MSS = 1. That happens at the latest at ``k = d``, the number of
            distinct points: there the clustering is the groups of coinciding points (:func:`cluster_heads`);
            when every head coincides (``d = 1``) no k >= 2 can be formed and MSS is 1 from ``k = 2`` on.
        exclude_zero_intra: see :func:`mean_simplified_silhouette`.

    Returns:
        A :class:`KSweep`.
    """
    distances = np.ascontiguousarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise CahpError(f"distances must be a square [N, N] matrix, got shape {distances.shape}.")
    n_heads = distances.shape[0]
    ks = np.array(sorted(set(k_range)) if k_range is not None else range(2, n_heads), dtype=np.int64)
    if ks.size and (ks[0] < 2 or ks[-1] > n_heads):
        raise CahpError(f"k_range must lie within 2 .. {n_heads} for {n_heads} heads, got {ks.tolist()}.")
    mss = np.ones(ks.shape[0], dtype=np.float64)
    clusterings: dict[int, Clustering] = {}
    stopped_at: int | None = None
    for position, k in enumerate(ks.tolist()):
        clustering = cluster_heads(distances, k, seed)
        clusterings[k] = clustering
        if clustering.k < 2:  # every head coincides (one distinct point): each head sits on its medoid
            mss[position] = 1.0
        else:
            mss[position] = mean_simplified_silhouette(
                distances, clustering.labels, clustering.medoids, exclude_zero_intra
            )
        if early_stop and mss[position] == 1.0:
            stopped_at = k
            break
    return KSweep(ks=ks, mss=mss, clusterings=clusterings, stopped_at=stopped_at, distances=distances, seed=seed)
