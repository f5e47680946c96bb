"""The method interface: one contract over every registered method, budgets and constraints made expressible
before selection, KeepPlan's JSON round trip, and third-party methods reaching ``cahp prune --method``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cahp.errors import CahpError
from cahp.methods import Budget, Constraints, HeadGrid, KeepPlan, available_methods, get_method, select_heads
from cahp.scoring import HeadScorer, register_scorer
from tests.unit.test_scorers import FAST, calibrate, make_data
from tests.unit.tiny_models import build_model


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from cahp.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm-l6"))  # only pads: pad id 0 fits every tiny model


@register_scorer("test_layer_order")
class LayerOrderScorer(HeadScorer):
    """Scores a head by ``-(layer * 10 + head)``: the test's own scorer, known only to this module."""

    def _score(self, model, calibration):  # type: ignore[no-untyped-def]
        from cahp.scoring.base import head_grid

        layers, heads = head_grid(model)
        return -np.arange(layers * heads, dtype=float).reshape(layers, heads)


@pytest.mark.parametrize("name", [n for n in available_methods() if not n.startswith("test_")])
def test_every_registered_method_fits_and_plans(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model("bert")
    info = available_methods()[name]
    settings = {**FAST.get(name, {}), **({"tsne_iterations": 250} if name == "cahp" else {})}
    budget = Budget.keep(5)
    method = get_method(name, **settings, **({"keep": 5} if info.budget_aware else {}))
    method.fit(model, calibrate(tokenizer, make_data()))
    plan = method.plan(budget, Constraints())
    assert plan.method == name and plan.heads_requested == 5
    assert all(plan.kept_heads_by_layer[layer] for layer in range(3)), "one head per layer by default"
    assert plan.heads_kept == 5 + len(plan.guardrail_heads)
    assert KeepPlan.from_json(plan.to_json()) == plan
    if info.finds_own_budget:
        assert method.plan(Budget.auto()).heads_requested >= 1
    else:
        with pytest.raises(CahpError, match="no automatic head count"):
            method.plan(Budget.auto())


def test_budgets_parse_and_refuse() -> None:
    assert Budget.parse("keep=12") == Budget.keep(12) and Budget.parse("sparsity=0.7").heads(72) == 22
    assert Budget.parse("auto").is_auto
    for bad in ("keep=0", "keep=1.5", "sparsity=1", "sparsity=0", "half"):
        with pytest.raises(CahpError):
            Budget.parse(bad)
    with pytest.raises(CahpError, match="more than the model's 12 heads"):
        Budget.keep(13).heads(12)


def test_keep_plan_refuses_head_numbers_that_are_not_whole() -> None:
    plan = KeepPlan("m", {}, HeadGrid(1, 2, 2), Budget.keep(1), Constraints(), 1, {0: [1]})
    raw = plan.to_dict()
    raw["kept_heads_by_layer"] = {"0": [1.7]}
    with pytest.raises(CahpError, match="whole numbers"):
        KeepPlan.from_dict(raw)


def test_default_selection_is_global_top_k_with_the_guardrail() -> None:
    priority = np.array([[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0], [1.0, 0.5, 0.2, 0.1]])
    selection = select_heads(priority, 3, HeadGrid(3, 4, 4), Constraints())
    assert selection.kept_heads_by_layer == {0: [0, 1, 2], 1: [0], 2: [0]}
    assert selection.guardrail_heads == [(1, 0), (2, 0)] and selection.heads_requested == 3
    empty = select_heads(priority, 3, HeadGrid(3, 4, 4), Constraints(min_heads_per_layer=0))
    assert empty.kept_heads_by_layer == {0: [0, 1, 2], 1: [], 2: []}


def test_grouped_query_budgets_become_expressible_before_selection() -> None:
    """4 query heads reading 2 key-value heads: ``groups`` keeps whole groups, ``uniform`` the same count per group."""
    grid = HeadGrid(2, 4, 2)
    priority = np.array([[4.0, 0.0, 3.0, 2.5], [1.0, 0.9, 0.2, 0.1]])
    groups = select_heads(priority, 3, grid, Constraints(gqa="groups"))
    assert groups.heads_requested == 4, "3 heads round (half up) to two groups of 2"
    assert groups.kept_heads_by_layer == {0: [0, 1, 2, 3], 1: [0, 1]}, "group means 2.0, 2.75 | 0.95, 0.15"
    assert groups.guardrail_heads == [(1, 0), (1, 1)], "layer 1 keeps its best whole group"
    uniform = select_heads(priority, 2, grid, Constraints(gqa="uniform"))
    assert uniform.kept_heads_by_layer == {0: [0, 2], 1: [0, 2]}, "the best head of each group, in every layer"
    assert uniform.heads_requested == 2 and uniform.guardrail_heads == [(1, 0), (1, 2)]


@pytest.mark.parametrize("gqa_mode", ["groups", "uniform"])
def test_grouped_query_plans_prune_as_planned(gqa_mode: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The saved model keeps exactly the planned heads (a plan is expressible), in both GQA modes."""
    from cahp.surgery import heads_to_remove, kept_heads_by_layer, prune_heads

    model = build_model("llama")
    method = get_method("magnitude").fit(model, calibrate(tokenizer, make_data(token_types=False)))
    plan = method.plan(Budget.keep(5), Constraints(gqa=gqa_mode))  # type: ignore[arg-type]
    prune_heads(model, heads_to_remove(model, plan.kept_heads_by_layer, gqa_mode), gqa_mode=gqa_mode)  # type: ignore[arg-type]
    assert kept_heads_by_layer(model) == plan.kept_heads_by_layer
    assert plan.heads_kept == plan.heads_requested + len(plan.guardrail_heads)


def test_a_scorer_registered_in_a_test_module_runs_from_the_cli(tmp_path: Path) -> None:
    from cahp.cli import main
    from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune
    from tests.conftest import tiny_bert_folder, tiny_task_folder

    task = TaskOptions(str(tiny_task_folder(tmp_path / "task", examples=24)), max_length=16)
    model = tiny_bert_folder(tmp_path / "tiny", layers=2, heads=4)
    training = TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8)
    finetune(FinetuneConfig(model=str(model), task=task, training=training), tmp_path / "ft", progress=False)
    code = main(
        [
            *["prune", "--model", str(tmp_path / "ft"), "--task", task.task, "--max-length", "16"],
            *["--method", "test_layer_order", "--keep", "3", "--recovery-epochs", "0", "--out", str(tmp_path / "out")],
            *["--latency-seq-len", "16", "--latency-batch-size", "2"],
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kept_heads_by_layer"] == {"0": [0, 1, 2], "1": [0]}, "the scorer's top 3 plus the guardrail"


def test_entry_point_methods_are_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that declares a scorer under the ``cahp.methods`` entry-point group appears in the registry."""
    import cahp.methods.base as base

    (tmp_path / "cahp_plugin_example.py").write_text(
        "import numpy as np\n"
        "from cahp.scoring import HeadScorer\n"
        "class Plugged(HeadScorer):\n"
        '    """A scorer that a third-party package ships."""\n'
        "    def _score(self, model, calibration):\n"
        "        return np.zeros((1, 1))\n"
    )
    info = tmp_path / "cahp_plugin_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cahp-plugin-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[cahp.methods]\nplugged = cahp_plugin_example:Plugged\nbroken = cahp_plugin_missing:Nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_declared", None)  # read the entry points again (this plugin's among them) ...
    monkeypatch.setattr(base, "_cards", {})
    monkeypatch.setattr(base, "_failed", set())
    monkeypatch.setattr(base, "_SCORERS", dict(base._SCORERS))  # ... and forget them afterwards
    methods = available_methods()
    assert "plugged" in methods and methods["plugged"].description == "A scorer that a third-party package ships."
    assert methods["plugged"].kind == "scorer" and not methods["plugged"].finds_own_budget
    assert "broken" not in methods and "cahp" in methods, "a package that fails to load is skipped, not fatal"
    sys.modules.pop("cahp_plugin_example", None)
