"""The bench summary built from hand-written cell folders: the planned cells (order, seeds under both
calibration rules), a focus method other than cahp, a control other than random, fit timings counted once,
folders of earlier versions (config keys, ``scores/``), comparisons paired by seed and repeated cells counted
once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import cahp.methods.base as method_registry
import cahp.scoring.base as scorer_registry
from cahp.methods.base import PruningMethod, available_methods, register_method
from cahp.reporting.bench_report import (
    NOISE_FLOOR_FILE,
    PERPLEXITY,
    _noise_floor_lines,
    _style,
    control_method,
    fit_seconds,
    focus_method,
    grid_noise_floor,
    method_seeds,
    noise_floor_key,
    paired_difference,
    paired_text,
    planned_cells,
    rebuild_published_summary,
    write_bench_report,
)
from cahp.scoring.base import HeadScorer, register_scorer

LAYERS, HEADS = 2, 2  # a 4-head toy grid


@pytest.fixture
def toy_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers ``toy_fixed`` (a deterministic head scorer) and ``toy_auto`` (a method that finds its own
    head count) for one test; the registry is restored afterwards."""
    available_methods()  # load the built-ins first, so that the toys are the last registrations
    monkeypatch.setitem(scorer_registry._SCORERS, "toy_fixed", HeadScorer)  # undone: the key is removed
    monkeypatch.setitem(method_registry._METHODS, "toy_auto", PruningMethod)

    @register_scorer("toy_fixed")
    class ToyFixed(HeadScorer):
        """A toy scorer whose scores do not depend on the seed."""

        deterministic = True

    @register_method("toy_auto")
    class ToyAuto(PruningMethod):
        """A toy method that finds its own head count."""

        finds_own_budget = True


def _config(methods: list[str], seeds: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "model": "/models/toy",
        "task": {"task": "sst5"},
        "methods": methods,
        "budgets": [0.5, "knee"],
        "seeds": seeds,
        "deterministic_seeds": 1,
        "calibration_size": 8,
        "calibration_seed": 0,
        "recovery": {"epochs": 1, "learning_rate": 1e-3},
        **extra,
    }


def _cell(
    method: str,
    seed: int,
    budget: str,
    accuracy: float,
    *,
    keep: int = 2,
    scoring: float = 0.0,
    cell_seconds: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    """One cell as the runner writes it: ``keep`` heads kept from the first layers' heads."""
    heads = [(layer, head) for layer in range(LAYERS) for head in range(HEADS)][:keep]
    kept = {str(layer): [h for la, h in heads if la == layer] for layer in range(LAYERS)}

    def scores(value: float) -> dict[str, Any]:
        return {"test": {"accuracy": value, "macro_f1": value / 2, "examples": 100}}

    return {
        "method": method,
        "seed": seed,
        "budget": budget,
        "keep": keep,
        "heads_total": LAYERS * HEADS,
        "layers": LAYERS,
        "heads_per_layer": HEADS,
        "kept": keep,
        "kept_heads_by_layer": kept,
        "selected_heads_by_layer": kept,
        "guardrail_heads": [],
        "accuracy": {"after_pruning": scores(accuracy), "after_recovery": scores(accuracy + 0.1)},
        "seconds": {
            "scoring": scoring,
            "selection": 0.0,
            "prune_and_evaluate": cell_seconds / 2,
            "recovery_and_evaluate": cell_seconds / 2,
        },
        **extra,
    }


def _folder(root: Path, config: dict[str, Any], cells: list[dict[str, Any]]) -> Path:
    (root / "cells").mkdir(parents=True)
    (root / "bench_config.json").write_text(json.dumps(config))
    dense = {"accuracy": {"test": {"accuracy": 0.6}}, "heads_total": LAYERS * HEADS, "task": {"task": "sst5"}}
    (root / "dense.json").write_text(json.dumps(dense))
    for cell in cells:
        (root / "cells" / f"{cell['method']}__seed{cell['seed']}__{cell['budget']}.json").write_text(json.dumps(cell))
    return root


def _section(summary: str, title: str) -> list[str]:
    """The table rows under the ``## title`` heading (header lines left out; a paragraph above the table too)."""
    block = summary.split(f"## {title}\n\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in block.splitlines() if line.startswith("|")]
    return table[2:]


# ---- planned cells ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("toy_methods")
def test_planned_cells_fixed_calibration_runs_deterministic_methods_on_the_first_seeds_only() -> None:
    config = _config(["toy_fixed", "random", "toy_auto"], [0, 1, 2])
    order = {0: ["toy_auto", "toy_fixed", "random"], 1: ["toy_auto", "random"], 2: ["toy_auto", "random"]}
    expected = [
        (method, seed, budget) for seed, methods in order.items() for method in methods for budget in (0.5, "knee")
    ]
    assert planned_cells(config) == expected, "seed-major, the method that finds its own budget first"
    assert method_seeds("toy_fixed", config) == [0]
    assert method_seeds("toy_fixed", {**config, "deterministic_seeds": 2}) == [0, 1]
    assert method_seeds("random", config) == [0, 1, 2]


@pytest.mark.usefixtures("toy_methods")
def test_planned_cells_resampled_calibration_runs_every_method_on_every_seed() -> None:
    config = _config(["toy_fixed", "random", "toy_auto"], [0, 1], resample_calibration=True)
    assert method_seeds("toy_fixed", config) == [0, 1]
    assert planned_cells(config) == [
        (method, seed, budget)
        for seed in (0, 1)
        for method in ("toy_auto", "toy_fixed", "random")
        for budget in (0.5, "knee")
    ]


def test_config_roles_and_settings_of_current_and_earlier_records() -> None:
    assert focus_method(_config(["gradient", "cahp"], [0], focus="gradient")) == "gradient"
    assert focus_method(_config(["random", "cahp"], [0])) == "cahp", "earlier records compare cahp"
    assert focus_method(_config(["random", "gradient"], [0])) == "random", "else the first method"
    assert control_method(_config(["random"], [0])) == "random"
    assert control_method(_config(["magnitude"], [0], control="magnitude")) == "magnitude"
    from cahp.errors import CahpError
    from cahp.legacy import upgrade_bench_record

    earlier = _config(["cahp", "fisher"], [0], cahp={"salience": "fisher"}, scorer_settings={"fisher": {"a": 1}})
    assert upgrade_bench_record(earlier)["method_settings"] == {
        "cahp": {"salience": "fisher", "salience_settings": {"a": 1}, "salience_seed": 0},
        "fisher": {"a": 1},
    }, "CAHP's salience took the settings of its scorer, and the first calibration seed"
    current = _config(["fisher"], [0], method_settings={"fisher": {"a": 2}})
    assert upgrade_bench_record(current)["method_settings"] == {"fisher": {"a": 2}}
    with pytest.raises(CahpError, match="method_settings"):
        upgrade_bench_record({**current, "scorer_settings": {"fisher": {"a": 1}}})


# ---- the summary ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("focus", ["gradient", "magnitude"])
def test_summary_compares_the_configured_focus_with_the_best_other_method(tmp_path: Path, focus: str) -> None:
    accuracy = {"random": 0.30, "gradient": 0.50, "magnitude": 0.40}
    cells = [
        _cell(method, 0, budget, value - (0.05 if budget == "knee" else 0.0))
        for method, value in accuracy.items()
        for budget in ("0.5", "knee")
    ]
    config = _config(list(accuracy), [0], focus=focus)
    summary = write_bench_report(_folder(tmp_path / "bench", config, cells)).read_text()

    rows = _section(summary, f"{focus} vs the best other method (mean accuracy)")
    assert f"| budget | stage | {focus} | best other | difference | rank of {focus} |" in summary
    first = rows[0].split(" | ")
    best, best_value = max(((m, v) for m, v in accuracy.items() if m != focus), key=lambda item: item[1])
    assert first[2] == f"{accuracy[focus]:.4f}" and first[3] == f"{best} {best_value:.4f}"
    assert first[4] == f"{accuracy[focus] - best_value:+.4f}"
    rank = 1 + sum(value > accuracy[focus] for value in accuracy.values())
    assert first[5] == f"{rank} of 3 |"
    assert "CAHP" not in summary and "cahp" not in summary
    assert "(`knee` =" not in summary, "no method here finds its own head count"
    assert json.loads((tmp_path / "bench" / "summary.json").read_text())["cells_planned"] == 6


def test_summary_gain_table_is_over_the_configured_control(tmp_path: Path) -> None:
    cells = [_cell(method, 0, "0.5", value) for method, value in (("gradient", 0.5), ("magnitude", 0.4))]
    config = _config(["gradient", "magnitude"], [0], budgets=[0.5], control="magnitude")
    summary = write_bench_report(_folder(tmp_path / "bench", config, cells)).read_text()
    rows = _section(summary, "Gain over the magnitude control (mean accuracy, after pruning / after recovery)")
    assert rows == ["| gradient | +0.1000 / +0.1000 |"]
    assert "`magnitude` is the control." in summary


def test_plot_style_highlights_the_focus_and_dashes_the_control() -> None:
    assert _style("gradient", 0, "gradient", "random")["lw"] == 2.2
    assert _style("random", 1, "gradient", "random")["ls"] == "--"
    assert "lw" not in _style("cahp", 2, "gradient", "random"), "cahp is drawn like any other method"


def test_missing_seeds_of_a_method_no_longer_deterministic_are_named(tmp_path: Path) -> None:
    """A grid run when ``gradient`` was taken for deterministic holds its seed 0 only: the summary says which
    cells are missing and why, and still renders gradient's row from seed 0."""
    cells = [_cell("random", seed, budget, 0.3 + seed / 100) for seed in (0, 1) for budget in ("0.5", "knee")]
    cells += [_cell("gradient", 0, budget, 0.5) for budget in ("0.5", "knee")]
    config = _config(["gradient", "random"], [0, 1], focus="gradient")
    summary = write_bench_report(_folder(tmp_path / "bench", config, cells)).read_text()
    assert "**Partial grid: 6 of the 8 cells this config plans.** Not run yet: gradient (seed 1)." in summary
    assert "gradient ran only seed 0 while the grid went on to later seeds" in summary
    assert "| gradient | 0.5000 | 0.5000 |" in summary, "one seed: no ±"
    assert "| random | 0.3050 ± 0.0071 | 0.3050 ± 0.0071 |" in summary


def test_missing_cells_of_an_interrupted_grid_give_no_reason(tmp_path: Path) -> None:
    cells = [_cell(method, 0, budget, 0.4) for method in ("gradient", "random") for budget in ("0.5", "knee")]
    config = _config(["gradient", "random"], [0, 1])
    summary = write_bench_report(_folder(tmp_path / "bench", config, cells)).read_text()
    assert "Not run yet: gradient (seed 1), random (seed 1)." in summary
    assert "ran only seed 0" not in summary, "no seed after 0 was reached: nothing says it was skipped"


# ---- timings ---------------------------------------------------------------------------------------------------


def test_a_fit_shared_by_several_budgets_is_counted_once(tmp_path: Path) -> None:
    cells = [
        _cell("gradient", 0, "0.5", 0.5, scoring=10.0, fit_cached=False, budget_aware=False),
        _cell("gradient", 0, "0.25", 0.5, keep=1, scoring=10.0, fit_cached=True, budget_aware=False),
        _cell("gradient", 0, "knee", 0.5, keep=1, scoring=10.0, fit_cached=True, budget_aware=False),
        # a budget-aware method fits once per head count: knee reuses the fit of 0.25 (same keep)
        _cell("dsp", 0, "0.5", 0.5, keep=2, scoring=4.0, fit_cached=False, budget_aware=True),
        _cell("dsp", 0, "0.25", 0.5, keep=1, scoring=6.0, fit_cached=False, budget_aware=True),
        _cell("dsp", 0, "knee", 0.5, keep=1, scoring=6.0, fit_cached=True, budget_aware=True),
        # every cell reused a fit made before these cells: it counts once
        _cell("random", 0, "0.5", 0.3, scoring=2.0, fit_cached=True, budget_aware=False),
        _cell("random", 0, "0.25", 0.3, keep=1, scoring=2.0, fit_cached=True, budget_aware=False),
    ]
    assert fit_seconds(cells) == {"gradient": [10.0], "dsp": [4.0, 6.0], "random": [2.0]}
    config = _config(["gradient", "dsp", "random"], [0], budgets=[0.5, 0.25, "knee"])
    summary = write_bench_report(_folder(tmp_path / "bench", config, cells)).read_text()
    assert "| gradient | 1 | 10.0 | 1.0 | 13.0 |" in summary
    assert "A cell = prune, evaluate, recover, evaluate." in summary
    timings = json.loads((tmp_path / "bench" / "summary.json").read_text())["timings"]
    assert timings["gradient"] == {
        "scoring_runs": 1,
        "scoring_seconds_mean": 10.0,
        "cell_seconds_mean": 1.0,
        "total_seconds": 13.0,
    }
    assert (timings["dsp"]["scoring_runs"], timings["dsp"]["total_seconds"]) == (2, 13.0)
    assert (timings["random"]["scoring_runs"], timings["random"]["total_seconds"]) == (1, 4.0)


def test_a_refit_counts_again_and_cells_of_earlier_versions_count_once_per_fit() -> None:
    refit = [_cell("gradient", 0, b, 0.5, scoring=s, fit_cached=False) for b, s in (("0.5", 3.0), ("knee", 5.0))]
    assert fit_seconds(refit) == {"gradient": [3.0, 5.0]}, "the cache was lost between two runs: two fits"
    # earlier cells carry neither fit_cached nor budget_aware: dsp is budget-aware in the registry
    earlier = [_cell("dsp", 0, b, 0.5, keep=k, scoring=s) for b, k, s in (("0.5", 2, 4.0), ("knee", 1, 6.0))]
    earlier += [_cell("fisher", seed, "0.5", 0.5, scoring=7.0 + seed) for seed in (0, 1)]
    earlier += [_cell("fisher", 0, "knee", 0.5, keep=1, scoring=7.0)]
    assert fit_seconds(earlier) == {"dsp": [4.0, 6.0], "fisher": [7.0, 8.0]}


def test_folder_of_an_earlier_version_reads_its_scores(tmp_path: Path) -> None:
    """Folders written before the cells said ``fit_cached`` keep each fit's time in ``scores/``, and CAHP's
    signatures and salience, shared by every seed, in ``scores/cahp_shared.json``."""
    cells = [_cell(method, 0, budget, 0.4, scoring=99.0) for method in ("cahp", "random") for budget in ("0.5", "knee")]
    root = _folder(tmp_path / "bench", _config(["cahp", "random"], [0], cahp={}, scorer_settings={}), cells)
    (root / "scores").mkdir()
    for name, seconds in (("cahp__seed0", 1.5), ("random__seed0", 0.0), ("cahp_shared", 20.0)):
        (root / "scores" / f"{name}.json").write_text(json.dumps({"seconds": seconds}))
    summary = write_bench_report(root).read_text()
    timings = json.loads((root / "summary.json").read_text())["timings"]
    assert timings["cahp"]["shared_signatures_salience_seconds"] == 20.0
    assert timings["cahp"]["total_seconds"] == 1.5 + 2.0 + 20.0
    assert "| cahp | 1 | 1.5 | 1.0 | 23.5 |" in summary
    assert "CAHP's signatures and salience (20.0 s) are computed once for all seeds" in summary
    assert "## cahp vs the best other method (mean accuracy)" in summary, "cahp is the focus of earlier records"
    assert "(`knee` = cahp's k*, the head count it finds itself)" in summary


def test_the_summary_names_a_distillation_objective_and_not_cross_entropy() -> None:
    from cahp.reporting.bench_report import _objective_text

    kd = {"loss": "kd", "temperature": 2.0, "alpha": 0.5}
    assert _objective_text(kd) == ", distilled from the dense model (kd, T=2.0, alpha=0.5)"
    assert _objective_text({"loss": "ce"}) == _objective_text(None) == ""  # grids from before objectives: ce


# ---- paired comparisons ----------------------------------------------------------------------------------------


def test_paired_interval_by_hand() -> None:
    """Differences 0.10, 0.15, 0.20 over seeds 0-2 (seed 3 has no partner): mean 0.15, sample sd 0.05, so the
    95% interval is 0.15 ± t(0.975, 2) * 0.05 / sqrt(3) with t(0.975, 2) = 4.302653."""
    result = paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.45, 2: 0.5, 3: 0.9})
    assert result is not None
    half = 4.302653 * 0.05 / 3**0.5  # 0.124206
    assert result["seeds"] == [0, 1, 2] and result["n"] == 3
    assert result["mean"] == pytest.approx(0.15)
    assert (result["low"], result["high"]) == (
        pytest.approx(0.15 - half, abs=1e-6),
        pytest.approx(0.15 + half, abs=1e-6),
    )
    assert result["within_noise"] is False
    assert paired_text(result) == "+0.1500 [+0.0258, +0.2742]"

    around_zero = paired_difference({0: 0.6, 1: 0.45, 2: 0.52}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert around_zero is not None and around_zero["low"] < 0 < around_zero["high"]
    assert around_zero["within_noise"] is True and paired_text(around_zero).endswith(" within noise")
    assert paired_difference({0: 0.5}, {1: 0.5}) is None, "no common seed: nothing to pair"


def test_paired_perplexity_is_the_geometric_mean_ratio() -> None:
    """Perplexity pairs the log-ratio: ratios 2 and 3 average to sqrt(6) (t(0.975, 1) = 12.7062)."""
    result = paired_difference({0: 20.0, 1: 30.0}, {0: 10.0, 1: 10.0}, PERPLEXITY)
    assert result is not None
    assert result["ratio"] == pytest.approx(6**0.5)
    log_sd = (math.log(3) - math.log(2)) / 2**0.5
    assert result["ratio_high"] == pytest.approx(math.exp(math.log(6) / 2 + 12.7062 * log_sd / 2**0.5), rel=1e-4)
    assert result["ratio_low"] < 1 < result["ratio_high"] and result["within_noise"] is True, "two seeds: wide"
    assert paired_text(result, PERPLEXITY) == (
        f"x2.449 [x{result['ratio_low']:.3f}, x{result['ratio_high']:.3f}] within noise"
    )


def _paired_grid(root: Path) -> tuple[str, dict[str, Any]]:
    """gradient against random over seeds 0-2: ahead in every seed at 0.5 (+0.10, +0.12, +0.11), mixed at
    0.25 (+0.05, -0.04, +0.01); magnitude ran seed 0 only."""
    random = {0: 0.40, 1: 0.30, 2: 0.35}
    ahead = {0: 0.10, 1: 0.12, 2: 0.11}
    mixed = {0: 0.05, 1: -0.04, 2: 0.01}
    cells = [
        _cell("random", seed, budget, random[seed], keep=keep)
        for seed in random
        for budget, keep in (("0.5", 2), ("0.25", 1))
    ]
    cells += [_cell("gradient", seed, "0.5", random[seed] + ahead[seed], keep=2) for seed in random]
    cells += [_cell("gradient", seed, "0.25", random[seed] + mixed[seed], keep=1) for seed in random]
    cells += [_cell("magnitude", 0, budget, 0.2, keep=keep) for budget, keep in (("0.5", 2), ("0.25", 1))]
    config = _config(["gradient", "random", "magnitude"], [0, 1, 2], budgets=[0.5, 0.25], focus="gradient")
    folder = _folder(root, config, cells)
    summary = write_bench_report(folder).read_text()
    return summary, json.loads((folder / "summary.json").read_text())


def test_within_noise_only_where_the_interval_contains_zero(tmp_path: Path) -> None:
    summary, record = _paired_grid(tmp_path / "bench")
    rows = _section(summary, "Against the random control, paired by seed (accuracy difference, 95% interval)")
    paired = record["paired"]["vs_control"]["methods"]
    shown = 0
    for row in rows:
        method, budget, _, *stages = [part.strip() for part in row.strip("|").split("|")]
        for stage, text in zip(("after_pruning", "after_recovery"), stages, strict=True):
            result = paired[method][budget][stage]
            inside = result["low"] is not None and result["low"] <= 0 <= result["high"]
            assert ("within noise" in text) == inside, (method, budget, stage, text)
            shown += 1
    assert shown == 8, "gradient and magnitude, two budgets, two stages"
    gradient = paired["gradient"]
    assert gradient["0.5"]["after_pruning"]["within_noise"] is False
    assert gradient["0.25"]["after_recovery"]["within_noise"] is True
    assert gradient["0.5"]["after_pruning"]["mean"] == pytest.approx(0.11)
    assert "| gradient | 0.25 | 0, 1, 2 | +0.0067 [" in summary
    assert record["paired"]["scale"] == "difference"
    noise = [line for line in summary.splitlines() if "within noise" in line and not line.startswith("|")]
    assert noise == [line for line in noise if "interval contains zero" in line], "the words explain the rule only"


def test_one_common_seed_gives_no_interval(tmp_path: Path) -> None:
    summary, record = _paired_grid(tmp_path / "bench")
    magnitude = record["paired"]["vs_control"]["methods"]["magnitude"]["0.5"]["after_pruning"]
    assert magnitude == {
        "mean": pytest.approx(0.2 - 0.40),
        "low": None,
        "high": None,
        "n": 1,
        "seeds": [0],
        "within_noise": None,
    }
    assert "| magnitude | 0.5 | 0 | -0.2000 (one seed) | -0.2000 (one seed) |" in summary
    best = _section(summary, "gradient vs the best other method, paired by seed (accuracy difference, 95% interval)")
    assert best[0] == "| 0.5 | after pruning | random | 0, 1, 2 | +0.1100 [+0.0852, +0.1348] |"


# ---- distinct cells ------------------------------------------------------------------------------------------


def test_a_budget_that_resolves_to_another_budgets_heads_is_counted_once(tmp_path: Path) -> None:
    """Seed 1's knee keeps the 2 heads of its 0.5 budget and measures the same: one experiment. Seed 0's knee
    keeps 1 head; random's seed 1 knee keeps the same heads as its 0.5 but measured otherwise (not a repeat)."""
    cells = [_cell("gradient", seed, "0.5", 0.5 + seed / 100, keep=2) for seed in (0, 1)]
    cells += [_cell("gradient", 0, "knee", 0.45, keep=1), _cell("gradient", 1, "knee", 0.51, keep=2)]
    cells += [_cell("random", seed, budget, 0.3 + seed / 100, keep=2) for seed in (0, 1) for budget in ("0.5",)]
    cells += [_cell("random", 0, "knee", 0.25, keep=1), _cell("random", 1, "knee", 0.33, keep=2)]
    config = _config(["gradient", "random"], [0, 1], resample_calibration=True)
    root = _folder(tmp_path / "bench", config, cells)
    summary = write_bench_report(root).read_text()
    record = json.loads((root / "summary.json").read_text())
    assert (record["cells"], record["cells_distinct"], record["cells_planned"]) == (8, 7, 8)
    assert record["repeated_cells"] == [
        {"method": "gradient", "seed": 1, "budget": "knee", "same_as": {"seed": 1, "budget": "0.5"}}
    ]
    assert "**Distinct cells: 7 of the 8 cells.**" in summary
    assert "seed 1's `knee` repeats its `0.5` cell for gradient (the budget resolved to the same heads)" in summary
    assert "so its `knee` mean shares seed 1's cell with its `0.5` mean" in summary
    assert "Behind this table: 8 cells, 7 distinct." in summary
    assert record["table"]["gradient"]["knee"]["repeats"] == [{"seed": 1, "same_as": {"seed": 1, "budget": "0.5"}}]
    assert record["table"]["gradient"]["knee"]["distinct"] == 2 and "repeats" not in record["table"]["random"]["knee"]


def test_two_seeds_that_chose_the_same_heads_are_one_experiment(tmp_path: Path) -> None:
    cells = [_cell("gradient", seed, "0.5", 0.5, keep=2) for seed in (0, 1)]
    cells += [_cell("gradient", 2, "0.5", 0.52, keep=2), *(_cell("random", s, "0.5", 0.3 + s / 100) for s in (0, 1, 2))]
    config = _config(["gradient", "random"], [0, 1, 2], budgets=[0.5], resample_calibration=True)
    root = _folder(tmp_path / "bench", config, cells)
    summary = write_bench_report(root).read_text()
    record = json.loads((root / "summary.json").read_text())
    assert record["cells_distinct"] == 5
    assert record["table"]["gradient"]["0.5"]["distinct"] == 2
    assert "gradient's seed 1 repeats its seed 0 at 0.5 (both seeds kept the same heads)" in summary
    assert "gradient at `0.5`: 2 distinct of 3" in summary
    assert "Behind this table: 6 cells, 5 distinct." in summary


def test_a_grid_without_repeats_says_so(tmp_path: Path) -> None:
    summary, record = _paired_grid(tmp_path / "bench")
    assert record["cells_distinct"] == record["cells"] == 14 and record["repeated_cells"] == []
    assert "**Distinct cells: 14 of the 14 cells.** No two cells repeat each other" in summary
    assert summary.count("Behind this table: 14 cells, all distinct.") >= 6


# ---- a published folder ---------------------------------------------------------------------------------------


def test_a_published_folder_is_rebuilt_with_what_it_was_published_with(tmp_path: Path) -> None:
    """A published grid keeps neither ``scores/`` nor a registry of its time: its timings and planned count come
    from the summary it was published with; the plots are left alone."""
    cells = [_cell(method, 0, budget, 0.4, scoring=99.0) for method in ("cahp", "random") for budget in ("0.5", "knee")]
    root = _folder(tmp_path / "bench", _config(["cahp", "random"], [0], cahp={}, scorer_settings={}), cells)
    (root / "scores").mkdir()
    for name, seconds in (("cahp__seed0", 1.5), ("random__seed0", 0.0), ("cahp_shared", 20.0)):
        (root / "scores" / f"{name}.json").write_text(json.dumps({"seconds": seconds}))
    write_bench_report(root)
    published = json.loads((root / "summary.json").read_text())
    for path in [*(root / "scores").iterdir(), *(root / "plots").iterdir(), root / "report.html"]:
        path.unlink()
    (root / "scores").rmdir()
    (root / "plots").rmdir()
    summary = rebuild_published_summary(root).read_text()
    rebuilt = json.loads((root / "summary.json").read_text())
    assert {key: rebuilt[key] for key in published} == published, "every key keeps its value"
    assert "| cahp | 1 | 1.5 | 1.0 | 23.5 |" in summary
    assert not (root / "plots").exists() and not (root / "report.html").exists()

    (root / "summary.json").write_text(json.dumps({**published, "cells_planned": 2}))
    for path in (root / "cells").glob("random__*"):
        path.unlink()
    summary = rebuild_published_summary(root).read_text()
    assert json.loads((root / "summary.json").read_text())["cells_planned"] == 2
    assert (
        "**Complete as published: all 2 cells this config planned then ran.** Today's method registry plans 4."
        in summary
    )


# ---- the noise floor and the recovery seed ----------------------------------------------------------------------


def _noise_grid(root: Path, model: str, **extra: Any) -> Path:
    cells = [_cell(method, 0, "0.5", 0.4) for method in ("gradient", "random")]
    return _folder(root, _config(["gradient", "random"], [0], budgets=[0.5], model=model, **extra), cells)


def _noise_paragraph(summary: str) -> str:
    return next(line for line in summary.splitlines() if line.startswith("Noise floor:"))


def test_the_noise_floor_of_the_dense_fine_tune_is_printed_beside_the_tables(tmp_path: Path) -> None:
    root = _noise_grid(tmp_path / "bench", str(tmp_path / "cache" / "finetuned" / "toy-sst5"))
    floors = tmp_path / "noise_floor.json"
    floors.write_text(json.dumps({"finetuned/toy-sst5": {"split": "test", "mean": 0.5, "sd": 0.0061, "n": 3}}))
    summary = write_bench_report(root, noise_floor=floors).read_text()
    line = _noise_paragraph(summary)
    assert line.startswith(
        "Noise floor: a dense fine-tune's test accuracy varies by sd 0.0061 over 3 training seeds "
        "(benchmarks/noise_floor.py)."
    )
    assert summary.index("Noise floor:") < summary.index("## Accuracy after pruning"), "beside the tables"
    record = json.loads((root / "summary.json").read_text())
    assert "Measured on" not in line, "this grid's own checkpoint"
    assert record["noise_floor"] == {
        "key": "finetuned/toy-sst5",
        "measured": True,
        "measured_on": "finetuned/toy-sst5",
        "split": "test",
        "mean": 0.5,
        "sd": 0.0061,
        "n": 3,
        "file": str(floors),
    }
    assert {"split", "metric", "dense_accuracy", "table", "timings", "cells", "paired"} <= set(record)


def test_an_unmeasured_noise_floor_says_how_to_measure_it(tmp_path: Path) -> None:
    root = _noise_grid(tmp_path / "bench", str(tmp_path / "cache" / "finetuned" / "toy-sst5"))
    floors = tmp_path / "noise_floor.json"
    other_rows = {
        "finetuned/other-sst5": {"model": "other", "task": "sst5", "sd": 0.01, "n": 3},  # another model
        "demo/toy-mnli": {"model": "toy", "task": "mnli", "sd": 0.01, "n": 3},  # another task
        "finetuned/toy-sst5-long": {"model": "toy", "task": "sst5", "sd": 0.01, "n": 1},  # one seed: no spread
    }
    for content in (None, other_rows):
        if content is not None:
            floors.write_text(json.dumps(content))
        line = _noise_paragraph(write_bench_report(root, noise_floor=floors).read_text())
        assert line.startswith(
            "Noise floor: not measured yet for finetuned/toy-sst5 (a dense fine-tune's spread over training seeds); "
            "`python benchmarks/noise_floor.py --rows finetuned/toy-sst5` measures it"
        )
        floor = json.loads((root / "summary.json").read_text())["noise_floor"]
        assert floor["measured"] is False
        assert floor["command"] == "python benchmarks/noise_floor.py --rows finetuned/toy-sst5"
    other = _noise_grid(tmp_path / "other", "/models/toy")
    line = _noise_paragraph(write_bench_report(other, noise_floor=floors).read_text())
    assert line.startswith("Noise floor: not measured for this grid's model")
    assert json.loads((other / "summary.json").read_text())["noise_floor"]["key"] is None
    without_test = {"model": "/cache/finetuned/toy-sst2", "task": {"task": "sst2"}, "eval_splits": ["validation"]}
    floor = grid_noise_floor(without_test, floors)
    assert floor is not None and floor["command"] == (
        "python benchmarks/noise_floor.py --rows finetuned/toy-sst2 --split validation"
    ), "scored on the split the grid reports"


def test_a_grid_on_another_recipe_reads_the_noise_floor_of_its_model_and_task_and_says_so(tmp_path: Path) -> None:
    root = _noise_grid(tmp_path / "bench", str(tmp_path / "cache" / "finetuned" / "toy-sst5-grouped"))
    floors = tmp_path / "noise_floor.json"
    rows = {
        "demo/toy-sst5": {"model": "toy", "task": "sst5", "split": "test", "mean": 0.48, "sd": 0.009, "n": 3},
        "finetuned/toy-mnli": {"model": "toy", "task": "mnli", "split": "test", "mean": 0.6, "sd": 0.002, "n": 3},
    }
    floors.write_text(json.dumps(rows))
    line = _noise_paragraph(write_bench_report(root, noise_floor=floors).read_text())
    assert "varies by sd 0.0090 over 3 training seeds" in line
    assert (
        "Measured on `demo/toy-sst5`, another fine-tune recipe of the same model and task (this grid's "
        "`finetuned/toy-sst5-grouped` was not measured: `python benchmarks/noise_floor.py --rows "
        "finetuned/toy-sst5-grouped`)." in line
    )
    floor = json.loads((root / "summary.json").read_text())["noise_floor"]
    assert floor["key"] == "finetuned/toy-sst5-grouped" and floor["measured_on"] == "demo/toy-sst5"
    rows["finetuned/toy-sst5-grouped"] = {"model": "toy", "task": "sst5", "split": "test", "sd": 0.004, "n": 2}
    floors.write_text(json.dumps(rows))
    line = _noise_paragraph(write_bench_report(root, noise_floor=floors).read_text())
    assert "sd 0.0040 over 2 training seeds" in line and "Measured on" not in line, "its own row first"


def test_a_causal_lm_grid_says_it_has_no_fine_tune_to_measure(tmp_path: Path) -> None:
    assert grid_noise_floor({"objective": "causal-lm", "model": "m"}) is None
    text = " ".join(_noise_floor_lines(None, {"objective": "causal-lm"}))
    assert text.startswith("Noise floor: none to measure: the dense model is the released checkpoint")


def test_the_summary_says_whether_each_seed_recovers_with_its_own_training_seed(tmp_path: Path) -> None:
    recovery = {"epochs": 1, "learning_rate": 1e-3, "seed": 42}
    fixed = _noise_grid(tmp_path / "fixed", "/models/toy", recovery=recovery)  # a record without the key
    line = _noise_paragraph(write_bench_report(fixed).read_text())
    assert "Every cell recovers with training seed 42, so the spread over seeds leaves training noise out." in line
    assert json.loads((fixed / "summary.json").read_text())["recovery_seeding"] == "fixed"
    varied = _noise_grid(tmp_path / "varied", "/models/toy", recovery=recovery, recovery_seeding="per_seed")
    line = _noise_paragraph(write_bench_report(varied).read_text())
    assert "Each seed s recovers with training seed 42 + s" in line and "includes training noise" in line
    free = _noise_grid(tmp_path / "free", "/models/toy", recovery={"epochs": 0}, recovery_seeding="per_seed")
    assert "recovers with" not in _noise_paragraph(write_bench_report(free).read_text()), "no recovery ran"


@pytest.mark.usefixtures("toy_methods")
def test_a_per_seed_recovery_runs_deterministic_methods_on_every_seed() -> None:
    per_seed = _config(["toy_fixed", "random"], [0, 1, 2], recovery_seeding="per_seed")
    assert method_seeds("toy_fixed", per_seed) == [0, 1, 2], "each seed recovers otherwise"
    assert method_seeds("toy_fixed", {**per_seed, "recovery": {"epochs": 0}}) == [0], "retraining-free"
    assert method_seeds("toy_fixed", {**per_seed, "recovery_seeding": "fixed"}) == [0]
    assert method_seeds("toy_fixed", _config(["toy_fixed"], [0, 1, 2])) == [0], "a record without the key: fixed"


def test_noise_floor_keys_of_the_committed_grids() -> None:
    """A grid on ``$CAHP_HOME/finetuned/<name>`` or ``$CAHP_HOME/demo/<name>`` reads the noise floor of that
    folder's row; a causal LM none."""
    from cahp.bench import BenchConfig

    configs = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"

    def key(name: str) -> str | None:
        return noise_floor_key(BenchConfig.from_file(configs / f"{name}.json").to_dict())

    assert key("minilm_sst5") == "finetuned/minilm-l6-sst5" and key("mpnet_mnli") == "finetuned/mpnet-base-mnli"
    assert key("recovery_minilm_mnli_kd") == "finetuned/minilm-l6-mnli"
    assert key("reconstruction_pilot_minilm_sst5_none") == "demo/minilm-l6-sst5", "the demo's fine-tune"
    assert key("ablation_minilm_mnli_reference") == "finetuned/minilm-l6-mnli-grouped"
    assert key("smollm2_lm_groups") is None, "a causal LM is not fine-tuned"
    assert NOISE_FLOOR_FILE.parts[-3:] == ("benchmarks", "results", "noise_floor.json")
