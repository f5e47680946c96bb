"""Budgets in FLOPs and latency (``--flops F`` / ``--latency L``) and Kwon et al.'s search (``kwon``).

The FLOPs a plan promises are checked against :func:`cahp.evaluation.accounting.total_flops` of the model actually
pruned with it (read from the pruned weights' shapes), at the typical length computed here from the calibration
examples.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cahp.engine import Engine
from cahp.errors import CahpError
from cahp.evaluation.accounting import total_flops
from cahp.methods import Budget, Constraints, HeadGrid, get_method
from cahp.methods.cost import FlopsCost, LatencyCost, plan_within
from cahp.methods.kwon import rearranged
from cahp.surgery import prune_heads
from tests.unit.test_reconstruction import tiny_calibration
from tests.unit.tiny_models import FAMILIES, SPECS, build_model


def pruned_with(model: Any, kept: dict[int, list[int]], gqa: str = "groups") -> Any:
    grid = HeadGrid.of(model)
    removed = {layer: [h for h in range(grid.heads) if h not in kept.get(layer, [])] for layer in range(grid.layers)}
    return prune_heads(copy.deepcopy(model), removed, gqa_mode=gqa)  # type: ignore[arg-type]


def measured_share(model: Any, kept: dict[int, list[int]], seq_len: int, gqa: str = "groups") -> float:
    return total_flops(pruned_with(model, kept, gqa), seq_len) / total_flops(model, seq_len)


def mean_length(calibration: Any) -> int:
    lengths = [len(feature["input_ids"]) for feature in calibration.examples.features]
    return round(sum(lengths) / len(lengths))


@pytest.mark.parametrize("family", [f for f in FAMILIES if not SPECS[f].is_image])
@pytest.mark.parametrize("share", [0.95, 0.85])
def test_a_flops_budget_gives_the_flops_it_promises(family: str, share: float) -> None:
    """The plan costs at most F of the dense FLOPs (measured on the pruned model), one more unit would cost more,
    and the plan's own record says what the pruned model measures."""
    model = build_model(family)
    calibration = tiny_calibration(family)
    seq_len = mean_length(calibration)
    engine = Engine(model, calibration)
    plan = engine.plan("magnitude", {"seed": 0}, Budget.cost("flops", share))
    obtained = measured_share(model, plan.kept_heads_by_layer, seq_len)
    assert obtained <= share + 1e-9
    record = plan.details["budget_cost"]
    assert record["flops"]["seq_len"] == seq_len
    assert record["flops_share"] == pytest.approx(obtained, abs=1e-4)
    assert plan.budget.label() == f"flops={share:g}"
    grid, unit = HeadGrid.of(model), Constraints().unit_size(HeadGrid.of(model))
    if plan.heads_requested + unit <= grid.total:
        bigger = engine.fit("magnitude", {"seed": 0}).plan(Budget.keep(plan.heads_requested + unit), Constraints())
        assert measured_share(model, bigger.kept_heads_by_layer, seq_len) > share


@pytest.mark.parametrize("gqa", ["groups", "uniform"])
def test_a_flops_budget_under_grouped_query_attention(gqa: str) -> None:
    """Llama-style tiny model (2 key-value groups of 2): whole groups, or one head per group; the k/v projections
    shrink only with whole groups, and the promise holds either way."""
    family = next(f for f in FAMILIES if SPECS[f].gqa)
    model, calibration = build_model(family), tiny_calibration(family)
    constraints = Constraints(gqa=gqa)  # type: ignore[arg-type]
    plan = Engine(model, calibration).plan("magnitude", {"seed": 0}, Budget.cost("flops", 0.9), constraints)
    obtained = measured_share(model, plan.kept_heads_by_layer, mean_length(calibration), gqa)
    assert obtained <= 0.9 + 1e-9
    assert plan.details["budget_cost"]["flops_share"] == pytest.approx(obtained, abs=1e-4)
    assert plan.heads_kept % Constraints(gqa=gqa).unit_size(HeadGrid.of(model)) == 0  # type: ignore[arg-type]


def test_a_budget_below_the_floor_says_what_head_removal_can_reach() -> None:
    model, calibration = build_model("bert"), tiny_calibration("bert")
    with pytest.raises(CahpError, match="below what removing heads can reach"):
        Engine(model, calibration).plan("magnitude", {"seed": 0}, Budget.cost("flops", 0.05))


def test_every_plan_states_its_flops_share() -> None:
    """A head-count budget's plan says its FLOPs share too: the report gives the budget both ways."""
    model, calibration = build_model("bert"), tiny_calibration("bert")
    plan = Engine(model, calibration).plan("magnitude", {"seed": 0}, Budget.keep(6))
    obtained = measured_share(model, plan.kept_heads_by_layer, mean_length(calibration))
    assert plan.details["budget_cost"]["flops_share"] == pytest.approx(obtained, abs=1e-4)


def test_a_budget_aware_method_is_fitted_for_the_count_the_budget_allows() -> None:
    model, calibration = build_model("bert"), tiny_calibration("bert")
    engine = Engine(model, calibration)
    plan = engine.plan("dsp", {"seed": 0, "steps": 2}, Budget.cost("flops", 0.9))
    flops = engine.plan("magnitude", {"seed": 0}, Budget.cost("flops", 0.9))
    assert plan.heads_requested == flops.heads_requested  # every head of a layer costs the same
    assert plan.details["budget_cost"]["flops_share"] <= 0.9


def test_the_latency_table_is_measured_on_pruned_copies() -> None:
    model = build_model("bert")
    cost = LatencyCost(model, Constraints(), batch_size=2, seq_len=8, repeats=2)
    grid = HeadGrid.of(model)
    assert len(cost.measured_seconds) == grid.heads + 1 and all(s > 0 for s in cost.measured_seconds)
    assert all(b >= a for a, b in zip(cost.seconds, cost.seconds[1:], strict=False)), "made non-decreasing"
    full = {layer: list(range(grid.heads)) for layer in range(grid.layers)}
    assert cost.seconds_of(full) == pytest.approx(cost.seconds[-1])


def test_a_latency_budget_keeps_within_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a known table (0 .. 4 heads per layer: 1.0, 1.3, 1.5, 1.8, 2.0 s), a plan's
    predicted latency is T(0) + sum_l (T(u_l) - T(0)) / layers, and the budget keeps the most heads within it."""
    table = [1.0, 1.3, 1.5, 1.8, 2.0]
    monkeypatch.setattr(LatencyCost, "_measure", lambda self, model: table)
    model, calibration = build_model("bert"), tiny_calibration("bert")
    grid = HeadGrid.of(model)
    cost = LatencyCost(model, Constraints(), batch_size=2, seq_len=8)
    uneven = {0: [0], 1: [0, 1, 2], 2: [0, 1, 2, 3]}
    assert cost.seconds_of(uneven) == pytest.approx(1.0 + (0.3 + 0.8 + 1.0) / 3)
    fitted = get_method("magnitude", seed=0).fit(model, calibration)
    budget = Budget.cost("latency", 0.8)
    plan = plan_within(budget, lambda k: fitted.plan(Budget.keep(k), Constraints()), grid, Constraints(), cost)
    assert cost.share(plan) <= 0.8
    bigger = fitted.plan(Budget.keep(plan.heads_requested + 1), Constraints())
    assert cost.share(bigger) > 0.8
    assert plan.details["budget_cost"]["latency"]["table_seconds"] == table


def test_flops_cost_matches_the_accounting_of_the_dense_model() -> None:
    model = build_model("gpt2")
    cost = FlopsCost(model, 12)
    grid = HeadGrid.of(model)
    full = {layer: list(range(grid.heads)) for layer in range(grid.layers)}
    assert cost.flops(full) == pytest.approx(total_flops(model, 12))


def test_budget_text_round_trips_and_bad_shares_are_refused() -> None:
    assert Budget.parse("flops=0.6").label() == "flops=0.6"
    assert Budget.parse("latency=0.5") == Budget.cost("latency", 0.5)
    assert Budget.from_options(flops=0.7) == Budget.cost("flops", 0.7)
    for text in ("flops=0", "flops=1.5", "latency=x"):
        with pytest.raises(CahpError):
            Budget.parse(text)
    with pytest.raises(CahpError, match="give one budget"):
        Budget.from_options(keep=3, flops=0.5)
    with pytest.raises(CahpError, match="no head count of its own"):
        Budget.cost("flops", 0.5).heads(12)


# ---- kwon ----------------------------------------------------------------------------------------------------


def test_rearrangement_keeps_the_complementary_heads() -> None:
    """Heads 0 and 1 are redundant (removing both costs little), heads 2 and 3 matter together: the diagonal alone
    keeps 0 and 1, the layer's Fisher block keeps 2 and 3."""
    fisher = np.array([[2.0, -1.9, 0, 0], [-1.9, 2.0, 0, 0], [0, 0, 1.5, 1.4], [0, 0, 1.4, 1.5]])
    grid = HeadGrid(1, 4, 4)
    assert rearranged(fisher, [0, 1], grid, Constraints()) == [2, 3]
    assert rearranged(fisher, [2, 3], grid, Constraints()) == [2, 3]


def test_rearrangement_is_never_worse_than_the_search() -> None:
    rng = np.random.default_rng(0)
    grid = HeadGrid(1, 6, 6)
    for _ in range(20):
        gradients = rng.standard_normal((10, 6))
        fisher = gradients.T @ gradients
        search = sorted(rng.choice(6, 3, replace=False).tolist())
        kept = rearranged(fisher, search, grid, Constraints())

        def objective(heads: list[int], fisher: np.ndarray = fisher) -> float:
            removed = [h for h in range(6) if h not in heads]
            return float(fisher[np.ix_(removed, removed)].sum())

        assert len(kept) == 3 and objective(kept) <= objective(search) + 1e-12


def test_rearrangement_moves_whole_groups_or_keeps_each_groups_count() -> None:
    rng = np.random.default_rng(1)
    gradients = rng.standard_normal((8, 4))
    fisher = gradients.T @ gradients
    grid = HeadGrid(1, 4, 2)  # groups {0, 1} and {2, 3}
    groups = rearranged(fisher, [0, 1], grid, Constraints(gqa="groups"))
    assert groups in ([0, 1], [2, 3])
    uniform = rearranged(fisher, [0, 2], grid, Constraints(gqa="uniform"))
    assert len(uniform) == 2 and {h // 2 for h in uniform} == {0, 1}


@pytest.mark.parametrize("family", ["bert", next(f for f in FAMILIES if SPECS[f].gqa)])
def test_kwon_without_rearrangement_is_fisher_and_with_it_keeps_each_layers_count(family: str) -> None:
    model, calibration = build_model(family), tiny_calibration(family)
    budget = Budget.keep(4)
    kwon = get_method("kwon", max_examples=None, seed=0).fit(model, calibration)
    fisher = get_method("fisher", max_examples=None, seed=0).fit(model, calibration)
    np.testing.assert_allclose(kwon.scores_, fisher.scores_, rtol=1e-10)
    search = get_method("kwon", max_examples=None, rearrange=False, seed=0).fit(model, calibration).plan(budget)
    assert search.kept_heads_by_layer == fisher.plan(budget).kept_heads_by_layer
    plan = kwon.plan(budget)
    assert {layer: len(heads) for layer, heads in plan.kept_heads_by_layer.items()} == {
        layer: len(heads) for layer, heads in search.kept_heads_by_layer.items()
    }
    assert json.loads(plan.to_json())["method"] == "kwon"


def test_cahp_prune_with_a_flops_budget_and_a_bench_grid_of_flops_budgets(tmp_path: Path) -> None:
    """``cahp prune --method kwon --flops F --reconstruct scale`` end to end, and a bench grid with ``"flops=F"``."""
    from cahp.bench import BenchConfig, run_bench
    from cahp.cli import main
    from cahp.train import TaskOptions, TrainingConfig
    from tests.conftest import tiny_bert_folder, tiny_task_folder

    model = tiny_bert_folder(tmp_path / "model", layers=3, heads=4, num_labels=3)
    task = tiny_task_folder(tmp_path / "task", 40)
    arguments = [
        *("prune", "--model", str(model), "--task", str(task), "--max-length", "16", "--method", "kwon"),
        *("--flops", "0.9", "--reconstruct", "scale", "--seed", "0", "--recovery-epochs", "0"),
        *("--latency-repeats", "1", "--latency-seq-len", "16", "--latency-batch-size", "2"),
        *("--out", str(tmp_path / "run")),
    ]
    assert main(arguments) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["plan"]["budget"] == {"mode": "flops", "value": 0.9}
    assert report["plan"]["details"]["budget_cost"]["flops_share"] <= 0.9
    assert report["post_surgery"]["reconstruction"]["mode"] == "scale"

    bench = BenchConfig(
        model=str(model),
        out=str(tmp_path / "bench"),
        task=TaskOptions(str(task), max_length=16),
        methods=["kwon", "random"],
        budgets=["flops=0.9", 0.5],
        seeds=[0],
        calibration_size=None,
        calibration_seed=0,
        recovery=TrainingConfig(epochs=0.0),
    )
    run_bench(bench, progress=False)
    cell = json.loads((tmp_path / "bench" / "cells" / "kwon__seed0__flops=0.9.json").read_text())
    assert cell["budget"] == "flops=0.9" and cell["budget_fraction"] is None
    assert cell["budget_cost"]["flops_share"] <= 0.9
    summary = (tmp_path / "bench" / "summary.md").read_text()
    assert "flops=0.9" in summary
