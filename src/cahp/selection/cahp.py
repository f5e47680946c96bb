"""CAHP selection: from signature statistics and salience to the heads to keep.

profiles (JM per feature and class pair) -> head space (t-SNE 2-D, or none) -> FasterPAM for k = 2..N-1
scored by the mean simplified silhouette -> knee of the polynomial fit of MSS(k) (or an explicit budget)
-> the most salient head of each cluster -> every layer keeps at least one head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cahp.errors import CahpError
from cahp.scoring.separability import separability_profiles
from cahp.selection.clustering import embed_heads, head_distances, sweep_k
from cahp.selection.knee import find_knee
from cahp.selection.representatives import (
    HeadSelection,
    clusters_for_keep,
    clusters_for_sparsity,
    default_head_ids,
    normalize_salience,
    select_representatives,
)
from cahp.signatures.stats import StreamingMoments


@dataclass
class CAHPSettings:
    """CAHP's knobs; the defaults are the reference's.

    Attributes:
        metric: ``"jm"`` (Jeffries-Matusita) or ``"bhattacharyya"``.
        variance_ddof: 1 = sample variance, as the reference computes it.
        embedding: ``"tsne"`` (2-D head space) or ``"none"`` (cluster on profile distances directly).
        perplexity, tsne_iterations: t-SNE settings (reference: 10 and 1000).
        poly_degree: degree of the polynomial fitted to MSS(k) before the knee search (reference: 6).
        representative: ``"salience"`` (most salient head of each cluster) or ``"medoid"``.
        salience: where the salience comes from (read by :func:`cahp.prune` and ``cahp bench``, which hand
            it to :meth:`CAHPSelector.fit`): ``"gradient"`` (the reference: mean ``|dL/d gate|`` of each head
            over a share of the calibration batches) or the name of a registered head scorer that needs no
            budget (``fisher``, ``hies``, ``attattr``, ``random``, ...), run on the calibration examples.
        allow_empty_layers: let a layer lose every head (else its most salient head is kept).
        keep: keep this many clusters (heads) instead of the knee.
        sparsity: remove this share of heads instead of the knee (K = round((1 - S) N) clusters).
        seed: t-SNE and FasterPAM seed.
    """

    metric: str = "jm"
    variance_ddof: int = 1
    embedding: str = "tsne"
    perplexity: float = 10.0
    tsne_iterations: int = 1000
    poly_degree: int = 6
    representative: str = "salience"
    salience: str = "gradient"
    allow_empty_layers: bool = False
    keep: int | None = None
    sparsity: float | None = None
    seed: int = 42

    def budget_mode(self) -> str:
        if self.keep is not None and self.sparsity is not None:
            raise CahpError("give either keep or sparsity, not both")
        return "keep" if self.keep is not None else "sparsity" if self.sparsity is not None else "auto"


class CAHPSelector:
    """Choose complementary heads. ``fit`` sets ``kept_heads_by_layer_`` and everything the report shows.

    Learned state: ``profiles_ [N, P*D]``, ``embedding_ [N, 2]``, ``sweep_`` (MSS curve), ``knee_``, ``k_``,
    ``clustering_``, ``salience_ [layers, heads]`` (min-max normalised), ``selection_``,
    ``kept_heads_by_layer_``.
    """

    def __init__(self, settings: CAHPSettings | None = None):
        self.settings = settings or CAHPSettings()

    def fit(self, moments: StreamingMoments, salience: np.ndarray) -> CAHPSelector:
        """Args:
        moments: per-class statistics with features ``[layers * heads, D]``.
        salience: ``[layers, heads]`` raw gradient salience.
        """
        settings = self.settings
        mode = settings.budget_mode()
        layers, heads = salience.shape
        n_heads = layers * heads
        if moments.feature_shape[0] != n_heads:
            raise CahpError(f"signatures cover {moments.feature_shape[0]} heads but salience {n_heads}")
        if n_heads < 3:
            raise CahpError("CAHP needs at least 3 heads to cluster")
        means = moments.mean_
        variances = moments.variance(ddof=settings.variance_ddof)
        self.profiles_ = separability_profiles(
            means,
            variances,
            metric=settings.metric,
            counts=moments.count_,  # type: ignore[arg-type]
        )
        self.embedding_ = embed_heads(
            self.profiles_.astype(np.float32),
            method=settings.embedding,  # type: ignore[arg-type]
            perplexity=settings.perplexity,
            n_iter=settings.tsne_iterations,
            seed=settings.seed,
        )
        distances = head_distances(self.embedding_)
        self.sweep_ = sweep_k(distances, seed=settings.seed)
        self.knee_ = find_knee(self.sweep_.ks, self.sweep_.mss, degree=settings.poly_degree)
        if mode == "keep":
            self.k_ = clusters_for_keep(n_heads, int(settings.keep))  # type: ignore[arg-type]
        elif mode == "sparsity":
            self.k_ = clusters_for_sparsity(n_heads, float(settings.sparsity))  # type: ignore[arg-type]
        else:
            self.k_ = self.knee_.k
        self.clustering_ = self.sweep_.clustering(self.k_)
        self.salience_ = normalize_salience(salience)
        self.selection_ = self.selection_for(self.k_)
        self.kept_heads_by_layer_ = self.selection_.kept_heads_by_layer
        self.budget_mode_ = mode
        return self

    def selection_for(self, k: int, allow_empty_layers: bool | None = None) -> HeadSelection:
        """The heads kept with ``k`` clusters of the fitted sweep (any budget, no refit).

        ``allow_empty_layers`` defaults to the settings' value.
        """
        clustering = self.sweep_.clustering(k)
        layers, heads = self.salience_.shape
        return select_representatives(
            clustering.labels,
            self.salience_,
            medoids=clustering.medoids,
            representative=self.settings.representative,  # type: ignore[arg-type]
            allow_empty_layers=self.settings.allow_empty_layers if allow_empty_layers is None else allow_empty_layers,
            head_ids=default_head_ids(layers, heads),
        )

    def report(self) -> dict[str, Any]:
        """Every decision, JSON-ready."""
        return {
            "settings": asdict(self.settings),
            "budget_mode": self.budget_mode_,
            "k": int(self.k_),
            "knee": self.knee_.to_dict(),
            "mss_early_stop_at": self.sweep_.stopped_at,
            "clusters": self.clustering_.labels.tolist(),
            "medoids": self.clustering_.medoids.tolist(),
            "representatives": [int(i) for i in self.selection_.representatives],
            "guardrail_heads": [list(map(int, h)) for h in self.selection_.guardrail_heads],
            "salience": self.salience_.tolist(),
            "embedding": self.embedding_.tolist(),
            "kept_heads_by_layer": {str(k): v for k, v in self.kept_heads_by_layer_.items()},
            "kept_heads": int(self.selection_.n_kept),
            "profile_dimensions": int(self.profiles_.shape[1]),
        }
