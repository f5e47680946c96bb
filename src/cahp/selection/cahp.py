"""CAHP's head space: from signature statistics and salience to the clusters that the CAHP method keeps one head of.

profiles (JM per feature and class pair) -> head space (t-SNE 2-D, or none) -> FasterPAM for k = 2..N-1
scored by the mean simplified silhouette -> knee of the polynomial fit of MSS(k). The keep-plan (one head per
cluster, for the knee's k or any budget) is the method's: :meth:`cahp.methods.cahp.CAHP.plan`, which also declares
CAHP's settings (the selector reads them from the method).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, cast

import numpy as np

from cahp.errors import CahpError, DataError
from cahp.scoring.separability import Metric, separability_profiles
from cahp.selection.clustering import Embedding, embed_heads, head_distances, sweep_k
from cahp.selection.knee import find_knee
from cahp.selection.representatives import normalize_salience
from cahp.signatures.stats import StreamingMoments


class HeadSpaceSettings(Protocol):
    """The settings the head space reads: those of :class:`cahp.methods.cahp.CAHP`, which documents them."""

    metric: str
    variance_ddof: int
    embedding: str
    perplexity: float
    tsne_iterations: int
    poly_degree: int
    seed: int


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
        metric=cast(Metric, metric),  # one of them: CAHP checks its settings
        counts=moments.count_,
    )


class CAHPSelector:
    """CAHP's head space and its knee. ``fit`` sets what the method plans from and the report shows.

    Learned state: ``profiles_ [N, P*D]``, ``embedding_ [N, 2]``, ``sweep_`` (MSS curve), ``knee_``, ``k_`` (the
    knee's k, capped at the distinct points of the head space), ``clustering_`` (at ``k_``), ``salience_
    [layers, heads]`` (min-max normalised); for degenerate head spaces ``distinct_profiles_``,
    ``distinct_points_``, ``k_capped_from_`` (the knee's k when it was capped, else ``None``) and
    ``head_space_notes_``.

    Args:
        settings: CAHP's settings (a :class:`cahp.methods.cahp.CAHP` method, or anything with those attributes).
    """

    def __init__(self, settings: HeadSpaceSettings) -> None:
        self.settings = settings

    def fit(self, moments: StreamingMoments, salience: np.ndarray) -> CAHPSelector:
        """Profiles -> head space -> MSS(k) sweep -> knee.

        Degenerate head spaces give a defined result, stated in :meth:`head_space_summary` and warned about: when
        some heads have identical profiles (or coincide in the head space), ``k`` is capped at the number of
        distinct points (coinciding heads cannot be told apart, so each group of them is one cluster); when every
        profile is the same, t-SNE is skipped, the head space is one point and ``k = 1``. Inputs CAHP cannot work
        with raise a :class:`CahpError` before any work.

        Args:
            moments: per-class statistics with features ``[layers * heads, D]``.
            salience: ``[layers, heads]`` raw salience (e.g. gradient), finite.

        Raises:
            DataError: the statistics hold fewer than two classes with examples.
            CahpError: fewer than 3 heads, a salience or signatures of the wrong shape, NaN/inf values.
        """
        settings = self.settings
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
                method=cast(Embedding, settings.embedding),  # one of them: CAHP checks its settings
                perplexity=settings.perplexity,
                n_iter=settings.tsne_iterations,
                seed=settings.seed,
            )
        distances = head_distances(self.embedding_)
        self.sweep_ = sweep_k(distances, seed=settings.seed)
        self.knee_ = find_knee(self.sweep_.ks, self.sweep_.mss, degree=settings.poly_degree)
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
        return self

    def head_space_summary(self) -> dict[str, Any]:
        """How degenerate the head space is, JSON-ready: distinct profiles and points, the capped k, notes."""
        return {
            "distinct_profiles": self.distinct_profiles_,
            "distinct_points": self.distinct_points_,
            "k_capped_from": self.k_capped_from_,
            "notes": list(self.head_space_notes_),
        }
