"""cahp-consensus: one run is the faithful CAHP, a fixed seed gives a fixed result, planted clusters are recovered,
the consensus machinery (co-association, cut at k, PAC) is exact on known partitions, and plan() keeps to budgets.

The registry's contract test over every method (tests/unit/test_methods.py) covers cahp-consensus as well.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cahp.errors import CahpError
from cahp.methods import Budget, Constraints, KeepPlan, get_method
from cahp.methods.cahp import CAHP
from cahp.methods.cahp_consensus import (
    CAHPConsensus,
    ambiguous_pair_share,
    co_association,
    consensus_clustering,
    consensus_of_runs,
)
from cahp.selection.representatives import select_representatives
from tests.unit.test_scorers import calibrate, make_data
from tests.unit.tiny_models import build_model

#: Converged t-SNE (250 iterations stop inside early exaggeration, where planted clusters are not yet apart).
SETTINGS = CAHP(tsne_iterations=1000)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from cahp.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm-l6"))  # only pads: pad id 0 fits every tiny model


@pytest.fixture(scope="module")
def tiny() -> tuple:  # type: ignore[type-arg]
    return build_model("bert"), make_data(examples=24)


def planted_profiles(groups: int, per_group: int, spread: float, seed: int = 0, features: int = 32) -> np.ndarray:
    """``[groups * per_group, features]``: head ``i`` belongs to group ``i % groups``; centres ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, features))
    heads = groups * per_group
    return centres[np.arange(heads) % groups] + spread * rng.normal(size=(heads, features))


def test_one_run_is_the_faithful_cahp(tiny, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    calibration = calibrate(tokenizer, data)
    faithful = get_method("cahp", seed=3).fit(model, calibration)
    single = get_method("cahp-consensus", runs=1, seed=3).fit(model, calibration)
    for budget in (Budget.auto(), Budget.keep(6)):
        assert single.plan(budget).kept_heads_by_layer == faithful.plan(budget).kept_heads_by_layer
    assert single.k_ == faithful.k_star_ and single.k_stars_ == [faithful.k_star_]
    # another run seed on the same statistics is the faithful CAHP with that seed and the fitted salience's seed
    moved = CAHPConsensus.from_cahp(faithful, runs=1, seed=8)
    assert moved.get_settings()["seed"] == 8 and moved.get_settings()["salience_seed"] == 3
    refit = get_method("cahp", seed=8, salience_seed=3).fit(model, calibration)
    assert moved.plan(Budget.auto()).kept_heads_by_layer == refit.plan(Budget.auto()).kept_heads_by_layer


def test_consensus_is_deterministic_for_a_fixed_seed(tiny, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    first = get_method("cahp-consensus", runs=5, seed=1).fit(model, calibrate(tokenizer, data))
    second = get_method("cahp-consensus", runs=5, seed=1).fit(model, calibrate(tokenizer, data))
    assert first.k_stars_ == second.k_stars_
    np.testing.assert_array_equal(first.co_association_, second.co_association_)
    for budget in (Budget.auto(), Budget.keep(4)):
        assert first.plan(budget).to_dict() == second.plan(budget).to_dict()
    # composing on a fitted CAHP gives the same method as fitting the consensus directly
    composed = CAHPConsensus.from_cahp(get_method("cahp", seed=1).fit(model, calibrate(tokenizer, data)), runs=5)
    assert composed.get_settings() == first.get_settings()
    assert composed.plan(Budget.auto()).to_dict() == first.plan(Budget.auto()).to_dict()


def test_consensus_recovers_planted_clusters() -> None:
    groups = 6
    profiles = planted_profiles(groups, per_group=6, spread=0.05)
    truth = np.arange(profiles.shape[0]) % groups
    result = consensus_of_runs(profiles, SETTINGS, seeds=list(range(5)))
    # the knee is CAHP's (here one group more than planted); the runs agree on it and on their partitions
    assert abs(result.k - groups) <= 1, f"median knee {result.k} for {groups} planted groups ({result.k_stars})"
    assert result.pac == 0.0 and result.run_agreement == 1.0
    partitions = np.stack([run.labels_at(groups) for run in result.runs])
    planted = consensus_clustering(co_association(partitions), groups)
    assert planted.k == groups and adjusted_rand_score(truth, planted.labels) == 1.0
    assert ambiguous_pair_share(co_association(partitions)) == 0.0


def test_perturbations_of_1e6_leave_the_consensus_at_the_planted_count_unmoved() -> None:
    """What holds, measured: with clear structure and K = the planted count, the kept heads do not move.

    At the auto budget they can: on these small profiles the seed barely changes the t-SNE space, while a 1e-6
    change of the profiles moves the space of every seed alike, so the runs move together and the consensus with
    them. Here (k* = 7 for 6 planted groups, one group split) three such perturbations gave a kept-head Jaccard of
    0.75 for both the faithful run and an 11-run consensus. (On MiniLM's profiles the seeds move the space as much
    as such a perturbation does: benchmarks/stability_consensus.py measures that case.)
    """
    groups, per_group = 6, 6
    base = planted_profiles(groups, per_group, spread=0.05)
    salience = np.random.default_rng(5).random((3, 12))
    kept = []
    for trial in range(3):
        profiles = base + (1e-6 * np.random.default_rng(100 + trial).normal(size=base.shape) if trial else 0.0)
        result = consensus_of_runs(profiles, SETTINGS, seeds=list(range(5)))
        partitions = np.stack([run.labels_at(groups) for run in result.runs])
        clustering = consensus_clustering(co_association(partitions), groups)
        chosen = select_representatives(clustering.labels, salience, allow_empty_layers=True)
        kept.append(sorted(chosen.representatives))
    assert kept[1] == kept[0] and kept[2] == kept[0]


def test_co_association_and_the_cut_at_k_are_exact_on_known_partitions() -> None:
    partitions = np.array([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 2], [5, 5, 7, 7, 7, 9]])
    matrix = co_association(partitions)
    assert matrix[0, 1] == 1.0 and matrix[3, 4] == pytest.approx(2 / 3) and matrix[0, 2] == 0.0
    np.testing.assert_array_equal(np.diag(matrix), np.ones(6))
    assert ambiguous_pair_share(matrix) == pytest.approx(3 / 15)  # (2, 4) and (3, 4) at 2/3, (4, 5) at 1/3
    for method in ("average", "kmedoids"):
        three = consensus_clustering(matrix, 3, method)
        assert three.labels.tolist() == [0, 0, 1, 1, 1, 2] and three.k == 3
    two = consensus_clustering(matrix, 2)
    assert two.labels.tolist() == [0, 0, 1, 1, 1, 1]
    # heads that every run puts together are never split: k is capped at the number of such groups (4)
    assert consensus_clustering(matrix, 6).k == 4
    with pytest.raises(CahpError, match="consensus must be one of"):
        consensus_clustering(matrix, 2, "ward")


def test_plan_respects_budgets_and_reports_the_runs(tiny, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    method = get_method("cahp-consensus", runs=4, seed=0).fit(model, calibrate(tokenizer, data))
    assert len(method.k_stars_) == 4 and method.k_ == sorted(method.k_stars_)[1], "lower median of 4 runs"
    auto = method.plan(Budget.auto())
    assert auto.heads_requested == method.k_ and auto.details["k_star_runs"] == method.k_stars_
    assert set(auto.details["stability"]) >= {"pac", "run_agreement_ari", "k_star_range"}
    for budget in (Budget.keep(3), Budget.keep(7), Budget.sparsity(0.5)):
        plan = method.plan(budget)
        asked = budget.heads(12)
        assert plan.heads_requested == asked and plan.details["k"] == asked
        assert plan.heads_kept == asked + len(plan.guardrail_heads)
        assert all(plan.kept_heads_by_layer[layer] for layer in range(3))
        assert KeepPlan.from_json(plan.to_json()) == plan
    uniform = method.plan(Budget.keep(6), Constraints(uniform_layers=True))
    assert [len(heads) for heads in uniform.kept_heads_by_layer.values()] == [2, 2, 2]


def test_settings_are_cahps_plus_the_consensus_and_are_checked() -> None:
    from cahp.methods import method_info

    cahp_settings = set(method_info("cahp").settings)
    assert set(method_info("cahp-consensus").settings) == cahp_settings | {"runs", "consensus"}
    with pytest.raises(CahpError, match="runs must be"):
        get_method("cahp-consensus", runs=0)
    with pytest.raises(CahpError, match="consensus must be"):
        get_method("cahp-consensus", consensus="ward")
    with pytest.raises(CahpError, match="not fitted"):
        CAHPConsensus.from_cahp(get_method("cahp"))  # type: ignore[arg-type]
