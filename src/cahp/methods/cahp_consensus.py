"""CAHP with a consensus head count and clusters: a stabilised variant of the faithful method (``"cahp-consensus"``).

The faithful CAHP (:mod:`cahp.methods.cahp`) runs t-SNE and the FasterPAM MSS(k) sweep once, with one seed, and
its knee is knife-edge sensitive: a 2e-6 change of the separability profiles, or another seed, moves k* by 1-2
and changes about half of the kept heads. This variant keeps CAHP's fitted statistics (profiles, salience) and
replaces the single run by ``runs`` of them, run ``r`` with seed ``seed + r`` (run 0 is the faithful CAHP's
own run):

1. each run embeds the profiles (t-SNE), sweeps k with FasterPAM and the MSS, and finds its knee k*_r (capped
   at its distinct points, as CAHP does), clustering its heads into k*_r groups;
2. the co-association matrix ``C[i, j]`` is the share of runs in which heads i and j share a cluster;
3. the consensus head count is the median k* (the lower median for an even number of runs);
4. the consensus clusters are the k groups of average-linkage clustering on ``1 - C`` (or FasterPAM on
   ``1 - C``), and the most salient head of each is kept, with CAHP's representative and guardrail rules.

An explicit budget of K heads clusters every run's own head space into K groups and takes the consensus of
those partitions at K. The plan's details list every k*, the consensus k and two stability measures: PAC,
the share of head pairs the runs disagree on (``0.1 < C < 0.9``; 0 = every run agrees), and the mean
adjusted Rand index between the runs' partitions.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from cahp.calibration import Calibration
from cahp.errors import CahpError
from cahp.methods.base import register_method
from cahp.methods.cahp import CAHP, cluster_priority
from cahp.methods.plan import Budget, Constraints, KeepPlan
from cahp.selection.cahp import HeadSpaceSettings
from cahp.selection.clustering import (
    Clustering,
    Embedding,
    cluster_heads,
    distinct_points,
    embed_heads,
    head_distances,
    sweep_k,
)
from cahp.selection.knee import find_knee

CONSENSUS_METHODS = ("average", "kmedoids")
#: Co-association values strictly between these bounds count as ambiguous pairs in PAC.
PAC_BOUNDS = (0.1, 0.9)


@dataclass(frozen=True)
class HeadSpaceRun:
    """One seeded run of CAHP's head space: its knee and the partition at that knee.

    Attributes:
        seed: the t-SNE and FasterPAM seed.
        k_star: the knee's cluster count, capped at the run's distinct points.
        knee_method: ``"kneedle"`` or ``"fallback"`` (see :mod:`cahp.selection.knee`).
        embedding: ``[N, 2]`` the run's head space (``[N, F]`` for ``embedding="none"``).
        labels: ``[N]`` cluster of each head at ``k_star``.
    """

    seed: int
    k_star: int
    knee_method: str
    embedding: np.ndarray
    labels: np.ndarray

    def labels_at(self, k: int) -> np.ndarray:
        """``[N]`` the run's partition into ``k`` clusters (FasterPAM with the run's seed)."""
        if k == self.k_star:
            return self.labels
        return cluster_heads(head_distances(self.embedding), k, self.seed).labels


def run_head_space(profiles: np.ndarray, settings: HeadSpaceSettings, seed: int) -> HeadSpaceRun:
    """CAHP's head space, MSS(k) sweep and knee on ``profiles`` with ``seed`` (the faithful run for its seed).

    Args:
        profiles: ``[N, F]`` separability profiles, one row per head.
        settings: CAHP's settings (a :class:`~cahp.methods.cahp.CAHP`; embedding, t-SNE and knee settings are read).
        seed: t-SNE and FasterPAM seed.
    """
    with warnings.catch_warnings():  # the faithful fit has already warned about these same profiles
        warnings.simplefilter("ignore", UserWarning)
        embedding = embed_heads(
            np.asarray(profiles).astype(np.float32),
            method=cast(Embedding, settings.embedding),  # one of them: CAHP checks its settings
            perplexity=settings.perplexity,
            n_iter=settings.tsne_iterations,
            seed=seed,
        )
    sweep = sweep_k(head_distances(embedding), seed=seed)
    knee = find_knee(sweep.ks, sweep.mss, degree=settings.poly_degree)
    n_heads = embedding.shape[0]
    k_star = max(1, min(knee.k, sweep.n_distinct_points, n_heads)) if n_heads else 0
    labels = sweep.clustering(k_star).labels if n_heads >= 2 else np.zeros(n_heads, dtype=np.int64)
    return HeadSpaceRun(seed, int(k_star), knee.method, embedding, np.asarray(labels, dtype=np.int64))


def co_association(partitions: np.ndarray) -> np.ndarray:
    """Share of partitions in which two heads share a cluster.

    Args:
        partitions: ``[runs, N]`` cluster labels, one row per run.

    Returns:
        ``[N, N]`` float64 in ``[0, 1]``, symmetric, ones on the diagonal.
    """
    partitions = np.asarray(partitions)
    if partitions.ndim != 2 or partitions.shape[0] == 0:
        raise CahpError(f"co_association needs [runs, heads] labels with at least one run, got {partitions.shape}")
    together = np.zeros((partitions.shape[1], partitions.shape[1]), dtype=np.float64)
    for labels in partitions:
        together += labels[:, None] == labels[None, :]
    return together / partitions.shape[0]


def consensus_clustering(co_association: np.ndarray, k: int, method: str = "average", seed: int = 42) -> Clustering:
    """Cluster heads on the consensus distance ``1 - C`` into ``k`` groups.

    Heads that every run puts together (distance 0) are never split: ``k`` is capped at their number of groups.
    ``"average"`` applies the first ``N - k`` merges of average linkage (deterministic; no seed); ``"kmedoids"``
    runs FasterPAM with ``seed``. Each cluster's medoid is its member with the smallest summed distance to the
    others (lowest index on ties).

    Args:
        co_association: ``[N, N]`` from :func:`co_association`.
        k: clusters wanted, ``1 <= k <= N``.

    Returns:
        A :class:`~cahp.selection.clustering.Clustering` with ``min(k, groups)`` clusters, labels numbered in order
        of first appearance.
    """
    distances = 1.0 - np.asarray(co_association, dtype=np.float64)
    n_heads = distances.shape[0]
    if not 1 <= k <= n_heads:
        raise CahpError(f"cannot cluster {n_heads} heads into k={k} consensus groups; need 1 <= k <= {n_heads}")
    if method not in CONSENSUS_METHODS:
        raise CahpError(f"consensus must be one of {', '.join(CONSENSUS_METHODS)}, got {method!r}")
    np.fill_diagonal(distances, 0.0)
    k = min(k, distinct_points(distances))
    labels = cluster_heads(distances, k, seed).labels if method == "kmedoids" else _average_linkage_labels(distances, k)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    labels = np.argsort(np.argsort(first))[inverse].astype(np.int64)  # clusters numbered by first member
    medoids = np.empty(int(labels.max()) + 1, dtype=np.int64)
    for cluster in range(medoids.size):
        members = np.flatnonzero(labels == cluster)
        medoids[cluster] = members[int(np.argmin(distances[np.ix_(members, members)].sum(axis=1)))]
    loss = float(distances[np.arange(n_heads), medoids[labels]].sum())
    return Clustering(labels=labels, medoids=medoids, loss=loss)


def _average_linkage_labels(distances: np.ndarray, k: int) -> np.ndarray:
    """``[N]`` labels after the first ``N - k`` merges of average linkage on ``[N, N]`` distances."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    n_heads = distances.shape[0]
    parent = np.arange(n_heads)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    if n_heads < 2:
        return np.zeros(n_heads, dtype=np.int64)
    merges = linkage(squareform(distances, checks=False), method="average")
    leaf_of = list(range(n_heads))  # a leaf of every cluster id of the linkage
    for left, right, *_ in merges[: n_heads - k]:
        a, b = leaf_of[int(left)], leaf_of[int(right)]
        parent[root(b)] = root(a)
        leaf_of.append(a)
    return np.array([root(i) for i in range(n_heads)], dtype=np.int64)


def ambiguous_pair_share(co_association: np.ndarray) -> float:
    """PAC: the share of head pairs ``i < j`` with ``0.1 < C[i, j] < 0.9`` (0 = the runs agree on every pair)."""
    upper = np.asarray(co_association)[np.triu_indices(np.asarray(co_association).shape[0], k=1)]
    if upper.size == 0:
        return 0.0
    return float(np.mean((upper > PAC_BOUNDS[0]) & (upper < PAC_BOUNDS[1])))


def mean_pairwise_rand(partitions: np.ndarray) -> float | None:
    """Mean adjusted Rand index over every pair of runs' partitions (``None`` for a single run)."""
    from sklearn.metrics import adjusted_rand_score

    partitions = np.asarray(partitions)
    scores = [
        adjusted_rand_score(partitions[a], partitions[b])
        for a in range(partitions.shape[0])
        for b in range(a + 1, partitions.shape[0])
    ]
    return float(np.mean(scores)) if scores else None


@dataclass(frozen=True)
class Consensus:
    """The consensus of seeded head-space runs (what :func:`consensus_of_runs` returns).

    Attributes:
        runs: one :class:`HeadSpaceRun` per seed, in seed order.
        k_stars: each run's k*.
        k: the lower median of ``k_stars``.
        co_association: ``[N, N]`` share of runs in which two heads share a cluster.
        clustering: the consensus clusters at ``k`` (fewer when heads that every run puts together cap it).
        pac: share of ambiguous head pairs (:func:`ambiguous_pair_share`).
        run_agreement: mean pairwise adjusted Rand index of the runs' partitions (``None`` for one run).
    """

    runs: list[HeadSpaceRun]
    k_stars: list[int]
    k: int
    co_association: np.ndarray
    clustering: Clustering
    pac: float
    run_agreement: float | None


def consensus_of_runs(
    profiles: np.ndarray,
    settings: HeadSpaceSettings,
    seeds: list[int],
    consensus: str = "average",
    progress: bool = False,
) -> Consensus:
    """Run CAHP's head space for every seed and take the consensus at the median k* (one seed: the faithful run).

    Args:
        profiles: ``[N, F]`` separability profiles.
        settings: CAHP's settings (a :class:`~cahp.methods.cahp.CAHP`).
        seeds: one seed per run (at least one).
        consensus: ``"average"`` or ``"kmedoids"`` (see :func:`consensus_clustering`).
    """
    from tqdm.auto import tqdm

    if not seeds:
        raise CahpError("consensus_of_runs needs at least one seed")
    runs = [
        run_head_space(profiles, settings, seed)
        for seed in tqdm(seeds, desc="consensus runs", disable=not progress, leave=False)
    ]
    partitions = np.stack([run.labels for run in runs])
    k_stars = [run.k_star for run in runs]
    k = int(sorted(k_stars)[(len(k_stars) - 1) // 2])
    matrix = co_association(partitions)
    return Consensus(
        runs=runs,
        k_stars=k_stars,
        k=k,
        co_association=matrix,
        clustering=consensus_clustering(matrix, k, consensus, seeds[0]),
        pac=ambiguous_pair_share(matrix),
        run_agreement=mean_pairwise_rand(partitions),
    )


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "CAHPConsensus",
    "kind": "method",
    "finds_own_budget": True,
    "budget_aware": False,
    "deterministic": False,
    "needs_classes": True,
    "settings": {
        "runs": 11,
        "consensus": "average",
        "metric": "jm",
        "variance_ddof": 1,
        "embedding": "tsne",
        "perplexity": 10.0,
        "tsne_iterations": 1000,
        "poly_degree": 6,
        "representative": "salience",
        "salience": "gradient",
        "salience_settings": None,
        "salience_seed": None,
        "signature_size": 32,
        "batch_size": 32,
        "sweep": "separate",
        "converge_tol": None,
        "converge_window": 8,
        "converge_min_examples": 512,
        "seed": 42,
    },
}


@register_method("cahp-consensus")
class CAHPConsensus(CAHP):
    """CAHP stabilised: the consensus of several seeded head-space runs sets k (median knee) and the clusters.

    Args:
        runs: head-space runs (t-SNE + MSS(k) sweep + knee); run ``r`` uses seed ``seed + r``.
        consensus: how the co-association matrix is clustered: ``"average"`` (average linkage on ``1 - C``,
            deterministic) or ``"kmedoids"`` (FasterPAM on ``1 - C`` with ``seed``).
        **cahp_settings: every setting of :class:`~cahp.methods.cahp.CAHP` (``metric``, ``perplexity``, ``seed``,
            ...), whose fit this method reuses; ``seed`` is also the base of the runs' seeds.

    Learned state: CAHP's (``grid_``, ``selector_``, ``salience_``, ``fit_seconds_``) and ``runs_`` (one
    :class:`HeadSpaceRun` per seed), ``k_stars_`` (each run's k*), ``k_`` (the median k*), ``co_association_``
    ``[N, N]``, ``clustering_`` (the consensus clusters at ``k_``), ``pac_``, ``run_agreement_``,
    ``consensus_seconds_``.
    """

    def __init__(self, *, runs: int = 11, consensus: str = "average", **cahp_settings: Any) -> None:
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise CahpError(f"cahp-consensus: runs must be a whole number of at least 1, got {runs!r}")
        if consensus not in CONSENSUS_METHODS:
            raise CahpError(
                f"cahp-consensus: consensus must be one of {', '.join(CONSENSUS_METHODS)}, got {consensus!r}"
            )
        self.runs = runs
        self.consensus = consensus
        super().__init__(**cahp_settings)

    # The settings are this method's two and every setting of CAHP (whatever CAHP's constructor takes), so that the
    # registry, get_settings and the engine's cache key see them all.
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("runs", inspect.Parameter.KEYWORD_ONLY, default=11, annotation="int"),
            inspect.Parameter("consensus", inspect.Parameter.KEYWORD_ONLY, default="average", annotation="str"),
            *[
                parameter
                for name, parameter in inspect.signature(CAHP.__init__).parameters.items()
                if name != "self" and parameter.kind == inspect.Parameter.KEYWORD_ONLY
            ],
        ]
    )

    @classmethod
    def from_cahp(
        cls,
        fitted: CAHP,
        *,
        runs: int = 11,
        consensus: str = "average",
        seed: int | None = None,
        progress: bool = False,
    ) -> CAHPConsensus:
        """The consensus on top of an already fitted faithful CAHP: its settings, profiles and salience are reused,
        only the head-space runs are computed.

        Args:
            fitted: a fitted :class:`~cahp.methods.cahp.CAHP` (or consensus).
            runs, consensus: this method's settings.
            seed: base seed of the runs (``None``: the fitted method's seed). Signatures and salience stay the fitted
                ones, so the settings record the salience's seed as ``salience_seed``.

        Raises:
            CahpError: ``fitted`` is not fitted.
        """
        fitted.check_fitted()
        base = {key: value for key, value in fitted.get_settings().items() if key not in ("runs", "consensus")}
        if seed is not None and seed != base["seed"]:
            base["salience_seed"] = base["seed"] if base.get("salience_seed") is None else base["salience_seed"]
            base["seed"] = seed
        method = cls(runs=runs, consensus=consensus, **base)
        method.grid_, method.selector_, method.salience_ = fitted.grid_, fitted.selector_, fitted.salience_
        method.fit_consensus(progress=progress)
        method.fit_seconds_ = round(getattr(fitted, "fit_seconds_", 0.0) + method.consensus_seconds_, 2)
        return method

    def fit(self, model: Any, calibration: Calibration, *, progress: bool = False) -> CAHPConsensus:
        super().fit(model, calibration, progress=progress)
        self.fit_consensus(progress=progress)
        self.fit_seconds_ = round(self.fit_seconds_ + self.consensus_seconds_, 2)
        return self

    def fit_consensus(self, progress: bool = False) -> CAHPConsensus:
        """The runs, the co-association matrix, the median k* and the consensus clusters, from the fitted profiles."""
        self.check_fitted()
        start = time.perf_counter()
        seeds = [self.seed + run for run in range(self.runs)]
        result = consensus_of_runs(self.selector_.profiles_, self, seeds, self.consensus, progress)
        self.runs_, self.k_stars_, self.k_ = result.runs, result.k_stars, result.k
        self.co_association_, self.clustering_ = result.co_association, result.clustering
        self.pac_, self.run_agreement_ = result.pac, result.run_agreement
        self._consensus_by_k: dict[int, tuple[np.ndarray, Clustering, float | None]] = {}
        self.consensus_seconds_ = round(time.perf_counter() - start, 2)
        return self

    @property
    def k_star_(self) -> int:
        """The consensus head count: the median of the runs' k*."""
        self.check_fitted()
        return int(self.k_)

    def consensus_at(self, k: int) -> tuple[np.ndarray, Clustering, float | None]:
        """The co-association ``[N, N]`` of the runs each clustered into ``k`` groups, its consensus at ``k`` and the
        runs' mean pairwise adjusted Rand index at ``k``.

        This serves explicit budgets; the auto budget uses the fitted consensus of the runs at their own k*.
        """
        if k not in self._consensus_by_k:
            partitions = np.stack([run.labels_at(k) for run in self.runs_])
            matrix = co_association(partitions)
            clustering = consensus_clustering(matrix, k, self.consensus, self.seed)
            self._consensus_by_k[k] = (matrix, clustering, mean_pairwise_rand(partitions))
        return self._consensus_by_k[k]

    def plan(self, budget: Budget, constraints: Constraints | None = None) -> KeepPlan:

        grid = self.check_fitted()
        k = self.k_star_ if budget.is_auto else budget.heads(grid.total)
        if budget.is_auto:
            matrix, clustering, agreement = self.co_association_, self.clustering_, self.run_agreement_
        else:
            matrix, clustering, agreement = self.consensus_at(k)
        chosen, priority = cluster_priority(clustering, self.selector_.salience_, self.representative, grid)
        source = "the budget" if not budget.is_auto else f"median knee of {self.runs} runs"
        linkage = "average linkage" if self.consensus == "average" else "k-medoids"
        details = {
            "how": f"{k} clusters: {source}; consensus of the runs' clusters by {linkage} on 1 - co-association",
            "settings": self.get_settings(),
            "k": int(k),
            "consensus_clusters": int(clustering.k),
            "k_star_runs": list(self.k_stars_),
            "k_median": int(self.k_),
            "run_seeds": [run.seed for run in self.runs_],
            "knee_methods": [run.knee_method for run in self.runs_],
            "faithful_k_star": int(self.selector_.k_),
            "stability": {
                "pac": round(ambiguous_pair_share(matrix), 6),
                "pac_bounds": list(PAC_BOUNDS),
                "run_agreement_ari": None if agreement is None else round(agreement, 6),
                "k_star_range": [min(self.k_stars_), max(self.k_stars_)],
            },
            "clusters": clustering.labels.tolist(),
            "medoids": clustering.medoids.tolist(),
            "representatives": [int(i) for i in chosen.representatives],
            "salience": self.selector_.salience_.tolist(),
            "profile_dimensions": int(self.selector_.profiles_.shape[1]),
        }
        return self.plan_from_priority(priority, k, budget, constraints, details)
