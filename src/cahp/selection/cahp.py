"""CAHP selection: from signature statistics and salience to the heads to keep.

profiles (JM per feature and class pair) -> head space (t-SNE 2-D, or none) -> FasterPAM for k = 2..N-1
scored by the mean simplified silhouette -> knee of the polynomial fit of MSS(k) (or an explicit budget)
-> the most salient head of each cluster -> every layer keeps at least one head.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cahp.errors import CahpError, DataError
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


def profiles_from_moments(moments: StreamingMoments, *, metric: str = "jm", variance_ddof: int = 1) -> np.ndarray:
    """The separability profiles CAHP clusters on, from per-class signature moments.

    Args:
        moments: per-class statistics with features ``[heads, D]``.
        metric: ``"jm"`` or ``"bhattacharyya"``.
        variance_ddof: 1 = sample variance (the reference).

    Returns:
        ``[heads, P * D]`` float64 (``P`` class pairs; pairs with an unseen class are 0).
    """
    return separability_profiles(
        moments.mean_,
        moments.variance(ddof=variance_ddof),
        metric=metric,  # type: ignore[arg-type]
        counts=moments.count_,  # type: ignore[arg-type]
    )


class CAHPSelector:
    """Choose complementary heads. ``fit`` sets ``kept_heads_by_layer_`` and everything the report shows.

    Learned state: ``profiles_ [N, P*D]``, ``embedding_ [N, 2]``, ``sweep_`` (MSS curve), ``knee_``, ``k_``,
    ``clustering_``, ``salience_ [layers, heads]`` (min-max normalised), ``selection_``,
    ``kept_heads_by_layer_``; for degenerate head spaces ``distinct_profiles_``, ``distinct_points_``,
    ``k_capped_from_`` (the k asked when it was capped, else ``None``) and ``head_space_notes_``.
    """

    def __init__(self, settings: CAHPSettings | None = None):
        self.settings = settings or CAHPSettings()

    def fit(self, moments: StreamingMoments, salience: np.ndarray) -> CAHPSelector:
        """Profiles -> head space -> MSS(k) sweep -> knee (or the budget's k) -> representatives.

        Degenerate head spaces give a defined result, stated in :meth:`report` (``head_space.notes``) and
        warned about: when some heads have identical profiles (or coincide in the head space), ``k`` is
        capped at the number of distinct points (coinciding heads cannot be told apart, so each group of
        them is one cluster); when every profile is the same, t-SNE is skipped, the head space is one point
        and ``k = 1``: the most salient head stays (plus each layer's most salient head, by the guardrail).
        Inputs CAHP cannot work with raise a :class:`CahpError` before any work.

        Args:
            moments: per-class statistics with features ``[layers * heads, D]``.
            salience: ``[layers, heads]`` raw salience (e.g. gradient), finite.

        Raises:
            DataError: the statistics hold fewer than two classes with examples.
            CahpError: fewer than 3 heads, a salience or signatures of the wrong shape, NaN/inf values.
        """
        settings = self.settings
        mode = settings.budget_mode()
        salience = np.asarray(salience, dtype=np.float64)
        if salience.ndim != 2:
            raise CahpError(f"salience must be [layers, heads], got shape {salience.shape}.")
        layers, heads = salience.shape
        n_heads = layers * heads
        if n_heads < 3:
            raise CahpError(
                f"CAHP clusters heads and needs at least 3; the model has {n_heads}. Rank them with a head scorer "
                "instead (e.g. --method gradient)."
            )
        if moments.feature_shape[0] != n_heads:
            raise CahpError(f"signatures cover {moments.feature_shape[0]} heads but salience {n_heads}")
        if not np.isfinite(salience).all():
            raise CahpError(
                f"the salience has NaN/inf values for {int((~np.isfinite(salience)).sum())} heads; recompute it "
                "(a model that overflows in float16 gives this: use float32)."
            )
        counts = np.asarray(moments.count_).reshape(-1)  # [classes]
        if int((counts > 0).sum()) < 2:
            raise DataError(
                f"the signatures hold examples of {int((counts > 0).sum())} class(es) (examples per class: "
                f"{counts.tolist()}); CAHP measures how heads separate classes and needs at least two. Use a "
                "calibration split with examples of at least two classes."
            )
        self.profiles_ = profiles_from_moments(moments, metric=settings.metric, variance_ddof=settings.variance_ddof)
        bad = np.flatnonzero(~np.isfinite(self.profiles_).all(axis=1))
        if bad.size:
            ids = [divmod(int(g), heads) for g in bad[:5]]
            raise CahpError(
                f"{bad.size} heads have NaN/inf separability profiles (first (layer, head): {ids}): their "
                "signature statistics are not finite, e.g. a model that overflows in float16; collect the "
                "signatures again in float32."
            )
        notes: list[str] = []
        self.distinct_profiles_ = int(np.unique(self.profiles_.astype(np.float32), axis=0).shape[0])
        if self.distinct_profiles_ == 1:
            notes.append(
                f"all {n_heads} heads have the same separability profile (every head separates the classes "
                "alike): the head space is one point (t-SNE skipped) and k = 1"
            )
        with warnings.catch_warnings():
            # the identical-profiles warning of embed_heads is replaced by the note above (and the warning below)
            warnings.filterwarnings("ignore", message="all .* head profiles are identical")
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
            asked = clusters_for_keep(n_heads, int(settings.keep))  # type: ignore[arg-type]
        elif mode == "sparsity":
            asked = clusters_for_sparsity(n_heads, float(settings.sparsity))  # type: ignore[arg-type]
        else:
            asked = self.knee_.k
        self.distinct_points_ = self.sweep_.n_distinct_points
        self.k_ = min(asked, self.distinct_points_)
        self.k_capped_from_ = asked if self.k_ != asked else None
        if self.k_capped_from_ is not None:
            notes.append(
                f"k = {asked} capped at {self.k_}, the number of distinct points of the head space (heads that "
                "coincide cannot be told apart: each group of them is one cluster)"
            )
        if notes:
            warnings.warn("CAHP head space: " + "; ".join(notes) + ".", UserWarning, stacklevel=2)
        self.head_space_notes_ = notes
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
            "head_space": {
                "distinct_profiles": self.distinct_profiles_,
                "distinct_points": self.distinct_points_,
                "k_capped_from": self.k_capped_from_,
                "notes": list(self.head_space_notes_),
            },
        }
