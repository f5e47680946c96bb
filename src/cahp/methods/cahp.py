"""CAHP as a method: signatures -> salience -> head space, MSS(k) sweep and knee -> one head per cluster.

:meth:`CAHP.fit` does every expensive step once: the padding-aware signatures
(:func:`cahp.signatures.collector.collect_signatures`), the salience (a head scorer; by default the reference's
gradient salience), the separability profiles, the head space and the MSS(k) sweep with its knee
(:class:`cahp.selection.cahp.CAHPSelector`). :meth:`CAHP.plan` then serves any budget without refitting: an
auto budget keeps the knee's k* clusters, ``keep=K`` / ``sparsity=S`` keep K clusters; each cluster's most
salient head (or its medoid) is kept, and the guardrail keeps a layer's most salient head when no cluster's
representative lies in it. Under constraints that single heads cannot express (same count per layer,
grouped-query groups) the representatives rank first and salience orders the rest
(:mod:`cahp.methods.select`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from cahp.calibration import Calibration
from cahp.errors import CahpError
from cahp.methods.base import PruningMethod, register_method
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan

#: The reference's salience: Michel et al.'s gradient on the first 25% of the (shuffled) calibration batches,
#: not normalised per layer (CAHP min-max normalises it globally).
REFERENCE_SALIENCE = "gradient"
REFERENCE_SALIENCE_SETTINGS: dict[str, Any] = {"normalize_layers": False, "fraction": 0.25}


@register_method("cahp")
class CAHP(PruningMethod):
    """Complementary attention heads: cluster heads by class-separability profiles, keep one per cluster (finds k*).

    Args:
        metric: ``"jm"`` (Jeffries-Matusita) or ``"bhattacharyya"``.
        variance_ddof: 1 = sample variance, as the reference computes it.
        embedding: ``"tsne"`` (2-D head space) or ``"none"`` (cluster on profile distances directly).
        perplexity, tsne_iterations: t-SNE settings (reference: 10 and 1000).
        poly_degree: degree of the polynomial fitted to MSS(k) before the knee search (reference: 6).
        representative: ``"salience"`` (most salient head of each cluster) or ``"medoid"``.
        salience: the head scorer that ranks the heads of a cluster: ``"gradient"`` (the reference) or any
            registered scorer that needs no budget (``fisher``, ``hies``, ...), run on the calibration set.
        salience_settings: that scorer's settings; for ``gradient`` they default to
            ``{"normalize_layers": false, "fraction": 0.25}`` (the reference's first 25% of the batches).
        salience_seed: the salience scorer's seed (``None``: ``seed``).
        signature_size: side ``B`` of the resized attention maps (reference: 32).
        batch_size: examples per forward when collecting signatures.
        seed: t-SNE, FasterPAM and the salience scorer's seed.

    Learned state: ``grid_``, ``selector_`` (profiles, head space, sweep, knee), ``salience_`` ``[layers, heads]``
    (raw), ``fit_seconds_``.
    """

    finds_own_budget = True
    needs_classes = True

    def __init__(
        self,
        *,
        metric: str = "jm",
        variance_ddof: int = 1,
        embedding: str = "tsne",
        perplexity: float = 10.0,
        tsne_iterations: int = 1000,
        poly_degree: int = 6,
        representative: str = "salience",
        salience: str = REFERENCE_SALIENCE,
        salience_settings: dict[str, Any] | None = None,
        salience_seed: int | None = None,
        signature_size: int = 32,
        batch_size: int = 32,
        seed: int = 42,
    ) -> None:
        super().__init__(seed=seed)
        self.metric = metric
        self.variance_ddof = variance_ddof
        self.embedding = embedding
        self.perplexity = perplexity
        self.tsne_iterations = tsne_iterations
        self.poly_degree = poly_degree
        self.representative = representative
        self.salience = salience
        self.salience_settings = dict(salience_settings or {})
        self.salience_seed = salience_seed
        self.signature_size = signature_size
        self.batch_size = batch_size
        self._check_settings()

    def _check_settings(self) -> None:
        choices = {
            "metric": ("jm", "bhattacharyya"),
            "embedding": ("tsne", "none"),
            "representative": ("salience", "medoid"),
        }
        for setting, allowed in choices.items():
            if getattr(self, setting) not in allowed:
                raise CahpError(f"cahp: {setting} must be one of {', '.join(allowed)}, got {getattr(self, setting)!r}")
        if self.poly_degree < 1:
            raise CahpError(f"cahp: poly_degree must be at least 1, got {self.poly_degree}")
        self.salience_scorer()  # an unknown scorer, a budget-aware one or unknown settings fail here, before any work

    def salience_scorer(self) -> Any:
        """The head scorer that gives the salience (built, not run)."""
        from cahp.scoring.base import get_scorer, scorer_class

        try:
            cls = scorer_class(self.salience)
        except CahpError as error:
            raise CahpError(f"cahp: unknown salience {self.salience!r}: {error}") from None
        if cls.budget_aware:
            raise CahpError(
                f"cahp: {self.salience!r} scores depend on how many heads are kept, so they cannot rank the heads of "
                "a cluster; choose another salience"
            )
        defaults = REFERENCE_SALIENCE_SETTINGS if self.salience == REFERENCE_SALIENCE else {}
        seed = self.seed if self.salience_seed is None else self.salience_seed
        return get_scorer(self.salience, **{"seed": seed, **defaults, **self.salience_settings})

    def _selector_settings(self) -> Any:
        from cahp.selection.cahp import CAHPSettings

        return CAHPSettings(
            metric=self.metric,
            variance_ddof=self.variance_ddof,
            embedding=self.embedding,
            perplexity=self.perplexity,
            tsne_iterations=self.tsne_iterations,
            poly_degree=self.poly_degree,
            representative=self.representative,
            salience=self.salience,
            seed=self.seed,
        )

    def fit(self, model: Any, calibration: Calibration, *, progress: bool = False) -> CAHP:
        from cahp.selection.cahp import CAHPSelector
        from cahp.signatures.collector import collect_signatures

        start = time.perf_counter()
        self.grid_ = HeadGrid.of(model)
        if self.grid_.total < 3:
            raise CahpError(f"CAHP clusters heads and needs at least 3, the model has {self.grid_.total}")
        moments = collect_signatures(
            model, calibration, size=self.signature_size, batch_size=self.batch_size, progress=progress
        )
        self.salience_ = np.asarray(self.salience_scorer().score(model, calibration), dtype=np.float64)
        self.selector_ = CAHPSelector(self._selector_settings()).fit(moments, self.salience_)
        self.fit_seconds_ = round(time.perf_counter() - start, 2)
        return self

    @property
    def k_star_(self) -> int:
        """The knee's cluster count, capped at the number of distinct points of the head space."""
        self._check_fitted()
        return int(self.selector_.k_)

    def plan(self, budget: Budget, constraints: Constraints | None = None) -> KeepPlan:
        from cahp.selection.representatives import default_head_ids, select_representatives

        grid = self._check_fitted()
        selector = self.selector_
        k = self.k_star_ if budget.is_auto else budget.heads(grid.total)
        clustering = selector.sweep_.clustering(k)
        chosen = select_representatives(
            clustering.labels,
            selector.salience_,
            medoids=clustering.medoids,
            representative=self.representative,  # type: ignore[arg-type]
            allow_empty_layers=True,
            head_ids=default_head_ids(grid.layers, grid.heads),
        )
        # representatives first (a bonus above any unit's mean salience), then normalised salience
        bonus = np.zeros(grid.total)
        bonus[chosen.representatives] = grid.total + 1.0
        priority = selector.salience_ + bonus.reshape(grid.layers, grid.heads)
        knee = selector.knee_
        how = (
            f"{k} clusters: "
            + (
                "the budget"
                if not budget.is_auto
                else "knee of MSS(k)"
                if knee.method == "kneedle"
                else f"fallback ({knee.fallback})"
            )
            + ("" if self.salience == REFERENCE_SALIENCE else f"; one head per cluster by {self.salience} scores")
        )
        details = {
            "how": how,
            "settings": asdict(selector.settings),
            "k": int(k),
            "knee": selector.knee_.to_dict(),
            "mss_early_stop_at": selector.sweep_.stopped_at,
            "clusters": clustering.labels.tolist(),
            "medoids": clustering.medoids.tolist(),
            "representatives": [int(i) for i in chosen.representatives],
            "salience": selector.salience_.tolist(),
            "embedding": selector.embedding_.tolist(),
            "profile_dimensions": int(selector.profiles_.shape[1]),
            "head_space": selector.report()["head_space"],
        }
        return self._plan_from_priority(priority, k, budget, constraints, details)
