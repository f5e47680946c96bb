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

import math
import time
from dataclasses import replace
from typing import Any, Literal, cast

import numpy as np

from cahp.adapters import get_adapter
from cahp.calibration import Calibration
from cahp.data.batching import EncodedSplit
from cahp.errors import CahpError
from cahp.methods.base import register_method
from cahp.methods.method import PruningMethod
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.runtime import model_device
from cahp.scoring.base import get_scorer, scorer_class
from cahp.scoring.gradient import normalize_layers
from cahp.selection.cahp import CAHPSelector, profiles_from_moments
from cahp.selection.clustering import Clustering
from cahp.selection.representatives import HeadSelection, Representative, default_head_ids, select_representatives
from cahp.signatures.collector import Convergence, GateSalience, choose_batches, signature_sweep, sweep_batches
from cahp.surgery import is_pruned

#: The reference's salience: Michel et al.'s gradient on the first 25% of the (shuffled) calibration batches,
#: not normalised per layer (CAHP min-max normalises it globally).
REFERENCE_SALIENCE = "gradient"
REFERENCE_SALIENCE_SETTINGS: dict[str, Any] = {"normalize_layers": False, "fraction": 0.25}


#: What the registry lists without importing this module (read with ``ast``: see :mod:`cahp.methods.base`).
METHOD_CARD = {
    "class": "CAHP",
    "kind": "method",
    "finds_own_budget": True,
    "budget_aware": False,
    "deterministic": False,
    "needs_classes": True,
    "settings": {
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
        sweep: ``"separate"`` (the reference: the salience scorer runs its own pass over the calibration set) or
            ``"shared"`` (gradient salience only: the signature pass also takes ``|dL/dgate|`` on a seeded
            ``fraction`` of its batches, so no second forward; batches are the length-sorted ones of the signature
            pass, not the scorer's shuffled ones).
        converge_tol: stop collecting signatures once the relative change of the JM profiles between consecutive
            windows is below this (``None``: every example, the reference). The batch order is then a seeded
            shuffle (sorted by length within chunks), and the salience uses only the examples the sweep saw.
        converge_window: batches between two convergence checks.
        converge_min_examples: never stop before this many examples.
        seed: t-SNE, FasterPAM and the salience scorer's seed (and the shuffled order of a converging sweep).

    Learned state: ``grid_``, ``selector_`` (profiles, head space, sweep, knee), ``salience_`` ``[layers, heads]``
    (raw), ``fit_seconds_``, ``stage_seconds_`` (``signatures``, ``salience``, ``selection``; in a shared sweep
    ``salience`` is the time of its backward passes), ``calibration_`` (examples and batches used, whether and
    where the statistics converged, the change history).
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
        sweep: str = "separate",
        converge_tol: float | None = None,
        converge_window: int = 8,
        converge_min_examples: int = 512,
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
        self.sweep = sweep
        self.converge_tol = converge_tol
        self.converge_window = converge_window
        self.converge_min_examples = converge_min_examples
        self._check_settings()

    def _check_settings(self) -> None:
        choices = {
            "metric": ("jm", "bhattacharyya"),
            "embedding": ("tsne", "none"),
            "representative": ("salience", "medoid"),
            "sweep": ("separate", "shared"),
        }
        for setting, allowed in choices.items():
            if getattr(self, setting) not in allowed:
                raise CahpError(f"cahp: {setting} must be one of {', '.join(allowed)}, got {getattr(self, setting)!r}")
        if self.poly_degree < 1:
            raise CahpError(f"cahp: poly_degree must be at least 1, got {self.poly_degree}")
        if self.converge_tol is not None and not self.converge_tol >= 0:
            raise CahpError(
                f"cahp: converge_tol is a relative change >= 0 (or None: no early stop), got {self.converge_tol}"
            )
        if self.converge_window < 1 or self.converge_min_examples < 0:
            raise CahpError(
                f"cahp: converge_window must be >= 1 batch and converge_min_examples >= 0, got {self.converge_window} "
                f"and {self.converge_min_examples}"
            )
        scorer = (
            self.salience_scorer()
        )  # an unknown scorer, a budget-aware one or bad settings fail here, before any work
        if self.sweep == "shared":
            if self.salience != REFERENCE_SALIENCE:
                raise CahpError(
                    f"cahp: sweep='shared' computes the gradient salience inside the signature pass; the salience "
                    f"{self.salience!r} runs its own pass: use sweep='separate'"
                )
            if scorer.max_examples is not None:
                raise CahpError(
                    "cahp: sweep='shared' takes the gradient on the signature pass's batches, so the salience setting "
                    "max_examples does not apply: drop it, or use sweep='separate'"
                )

    def salience_scorer(self) -> Any:
        """The head scorer that gives the salience (built, not run)."""
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

    def fit(self, model: Any, calibration: Calibration, *, progress: bool = False) -> CAHP:
        start = time.perf_counter()
        self.grid_ = HeadGrid.of(model)
        if self.grid_.total < 3:
            raise CahpError(f"CAHP clusters heads and needs at least 3, the model has {self.grid_.total}")
        if is_pruned(model):
            raise CahpError(
                "cahp needs an unpruned model (signatures and salience cover every head); fit it before pruning"
            )
        scorer = self.salience_scorer()
        salience_batches: int | None
        order: Literal["sorted", "shuffled"] = "shuffled" if self.converge_tol is not None else "sorted"
        consumers = []
        if self.sweep == "shared":
            total = len(sweep_batches(calibration.examples.lengths, self.batch_size, order=order, seed=self.seed))
            adapter = get_adapter(model)
            salience = GateSalience(
                choose_batches(total, scorer.fraction, scorer.seed),
                adapter.num_layers(model),
                adapter.num_heads(model),
                model_device(model),
            )
            consumers.append(salience)
        convergence = self._convergence()
        result = signature_sweep(
            model,
            calibration,
            size=self.signature_size,
            batch_size=self.batch_size,
            order=order,
            seed=self.seed,
            consumers=consumers,
            convergence=convergence,
            progress=progress,
        )
        signature_seconds = result.seconds
        if self.sweep == "shared":
            raw = salience.result(reduce=getattr(calibration, "sharded", True))
            self.salience_ = normalize_layers(raw) if scorer.normalize_layers else raw
            salience_seconds = salience.seconds_
            signature_seconds -= salience.seconds_
            salience_batches = int(salience.batches)
        else:
            salience_start = time.perf_counter()
            seen = calibration if result.examples == len(calibration) else _seen_examples(calibration, result.indices)
            self.salience_ = np.asarray(scorer.score(model, seen), dtype=np.float64)
            salience_seconds = time.perf_counter() - salience_start
            fraction = getattr(scorer, "fraction", None)  # the gradient scorer's share of its batches
            batches = seen.num_batches(getattr(scorer, "batch_size", None))
            salience_batches = None if fraction is None else max(1, math.ceil(fraction * batches))
        selection_start = time.perf_counter()
        self.selector_ = CAHPSelector(self).fit(result.moments, self.salience_)
        self.stage_seconds_ = {
            "signatures": round(signature_seconds, 2),
            "salience": round(salience_seconds, 2),
            "selection": round(time.perf_counter() - selection_start, 2),
        }
        self.calibration_ = {
            "sweep": self.sweep,
            "order": order,
            "examples": int(result.examples),
            "examples_total": len(calibration),
            "batches": int(result.batches),
            "batches_total": int(result.total_batches),
            "salience_batches": salience_batches,
            "converge_tol": self.converge_tol,
            "converged": convergence is not None and convergence.converged_at is not None,
            "converged_at": None if convergence is None else convergence.converged_at,
            "change_history": [] if convergence is None else convergence.history,
        }
        self.fit_seconds_ = round(time.perf_counter() - start, 2)
        return self

    def _convergence(self) -> Convergence | None:
        """The early stop of the signature sweep (``None`` without ``converge_tol``), on the JM profiles."""
        if self.converge_tol is None:
            return None
        return Convergence(
            tol=float(self.converge_tol),
            window=self.converge_window,
            min_examples=self.converge_min_examples,
            statistic=lambda moments: profiles_from_moments(
                moments, metric=self.metric, variance_ddof=self.variance_ddof
            ),
        )

    @property
    def k_star_(self) -> int:
        """The knee's cluster count, capped at the number of distinct points of the head space."""
        self.check_fitted()
        return int(self.selector_.k_)

    def plan(self, budget: Budget, constraints: Constraints | None = None) -> KeepPlan:

        grid = self.check_fitted()
        selector = self.selector_
        k = self.k_star_ if budget.is_auto else budget.heads(grid.total)
        clustering = selector.sweep_.clustering(k)
        chosen, priority = cluster_priority(clustering, selector.salience_, self.representative, grid)
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
            "settings": self.get_settings(),
            "k": int(k),
            "knee": selector.knee_.to_dict(),
            "mss_early_stop_at": selector.sweep_.stopped_at,
            "clusters": clustering.labels.tolist(),
            "medoids": clustering.medoids.tolist(),
            "representatives": [int(i) for i in chosen.representatives],
            "salience": selector.salience_.tolist(),
            "embedding": selector.embedding_.tolist(),
            "profile_dimensions": int(selector.profiles_.shape[1]),
            "head_space": selector.head_space_summary(),
            "stage_seconds": dict(getattr(self, "stage_seconds_", {})),
            "calibration": dict(getattr(self, "calibration_", {})),
        }
        return self.plan_from_priority(priority, k, budget, constraints, details)


def _seen_examples(calibration: Calibration, indices: np.ndarray) -> Calibration:
    """The calibration restricted to ``indices`` (the examples an early-stopped sweep saw), in example order, so
    that the salience respects the same calibration budget."""
    chosen = np.sort(np.asarray(indices, dtype=np.int64))
    examples = EncodedSplit([calibration.examples.features[i] for i in chosen], calibration.examples.labels[chosen])
    description = {**calibration.description, "examples_seen_by_signature_sweep": len(chosen)}
    return replace(calibration, examples=examples, description=description)


def cluster_priority(
    clustering: Clustering, salience: np.ndarray, representative: str, grid: HeadGrid
) -> tuple[HeadSelection, np.ndarray]:
    """One representative per cluster and the heads' keep priority ``[layers, heads]``: the representatives
    first (a bonus above any head's normalised salience), then the normalised ``salience`` ``[layers, heads]``.

    Args:
        clustering: a clustering of the ``grid.total`` heads (``labels``, ``medoids``).
        salience: ``[layers, heads]`` normalised salience.
        representative: ``"salience"`` or ``"medoid"``.
        grid: the head grid.

    Returns:
        ``(representatives chosen, priority)``.
    """
    chosen = select_representatives(
        clustering.labels,
        salience,
        medoids=clustering.medoids,
        representative=cast(Representative, representative),  # one of them: CAHP checks its settings
        allow_empty_layers=True,
        head_ids=default_head_ids(grid.layers, grid.heads),
    )
    bonus = np.zeros(grid.total)
    bonus[chosen.representatives] = grid.total + 1.0
    return chosen, salience + bonus.reshape(grid.layers, grid.heads)
