"""``cahp bench`` on the causal-LM objective (a tiny random Llama, 3 layers, 4 query / 2 key-value heads): every
cell's perplexity is the perplexity of the model its plan describes, key-value heads and the KV cache shrink with
whole groups, the summary ranks by perplexity, a finished grid resumes without work, and settings the objective
cannot run are refused before anything is loaded or written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cahp.bench import BenchConfig, run_bench
from cahp.decoder import load_causal_lm
from cahp.errors import CahpError
from cahp.evaluation.perplexity import perplexity
from cahp.surgery import heads_to_remove, prune_heads
from tests.unit.test_decoder import HAS_SST2, SHARED_DATA, lm_folders  # noqa: F401  (a fixture)
from tests.unit.tiny_models import HEADS, LAYERS


def grid(folders: dict[str, Path], out: Path, **changes: Any) -> dict[str, Any]:
    """A causal-LM grid as its JSON (``BenchConfig.from_dict`` reads it as ``cahp bench --config`` does)."""
    raw: dict[str, Any] = {
        "model": str(folders["llama"]),
        "out": str(out),
        "objective": "causal-lm",
        "lm": {
            "corpus": str(folders["corpus"]),
            "context_length": 16,
            "calibration_blocks": 6,
            "eval_blocks": 6,
            "calibration_batch_size": 3,
            "prompted": ["sst2"] if HAS_SST2 else [],
            "data_dir": str(SHARED_DATA),
            "prompted_examples": 6,
        },
        "methods": ["fisher", "magnitude", "random"],
        "budgets": [0.5],
        "seeds": [0, 1],
        "recovery": {"epochs": 1.0, "learning_rate": 1e-3, "batch_size": 3},
        "gqa_mode": "groups",
        "uniform_layers": True,  # one whole group per layer (else the guardrail may keep a group more)
    }
    raw.update(changes)
    return raw


def test_a_causal_lm_grid_measures_the_models_its_plans_describe(
    lm_folders: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    config = BenchConfig.from_dict(grid(lm_folders, out))
    # every seed sees the same blocks: magnitude (no randomness of its own) runs one seed, the others both
    assert run_bench(config, progress=False)["computed"] == 5
    assert sorted(path.stem.split("__")[0] for path in (out / "cells").glob("*.json")) == [
        "fisher",
        "fisher",
        "magnitude",
        "random",
        "random",
    ]
    dense = json.loads((out / "dense.json").read_text())
    cells = {path.stem.split("__")[0]: json.loads(path.read_text()) for path in (out / "cells").glob("*seed0*")}

    model, tokenizer = load_causal_lm(str(lm_folders["llama"]))
    blocks = config.lm.load(tokenizer, config.calibration_seed).evaluation  # type: ignore[union-attr]
    assert dense["quality"]["perplexity"]["perplexity"] == pytest.approx(
        perplexity(model, tokenizer, blocks)["perplexity"]
    )
    for cell in cells.values():
        # half of the 12 query heads as one whole key-value group per layer: 3 of 6 key-value heads
        assert (cell["kept"], cell["kv_kept"], cell["kv_total"]) == (LAYERS * HEADS // 2, LAYERS, 2 * LAYERS)
        quality = cell["quality"]
        assert set(quality) == {"after_pruning", "after_recovery"}
        if HAS_SST2:
            zero_shot = quality["after_pruning"]["sst2-zero-shot"]
            assert zero_shot["examples"] == 6 and 0.0 <= zero_shot["accuracy"] <= 1.0
        assert cell["recovery_history"] and quality["after_recovery"] != quality["after_pruning"]

    # the random cell's pruned perplexity is the perplexity of the model its kept heads describe
    kept = {int(layer): heads for layer, heads in cells["random"]["kept_heads_by_layer"].items()}
    prune_heads(model, heads_to_remove(model, kept, "groups"), gqa_mode="groups")
    expected = perplexity(model, tokenizer, blocks)["perplexity"]
    assert cells["random"]["quality"]["after_pruning"]["perplexity"]["perplexity"] == pytest.approx(expected)

    summary = (out / "summary.md").read_text()
    assert "on causal-lm" in summary and "## Perplexity after pruning (no recovery)" in summary
    assert "## Perplexity relative to the random control" in summary and "## Key-value heads kept" in summary
    assert ("## sst2-zero-shot accuracy (mean" in summary) == HAS_SST2
    record = json.loads((out / "summary.json").read_text())
    assert record["metric"] == "perplexity"
    random_pruned = [
        json.loads(path.read_text())["quality"]["after_pruning"]["perplexity"]["perplexity"]
        for path in (out / "cells").glob("random__*.json")
    ]
    assert record["table"]["random"]["0.5"]["after_pruning"]["n"] == 2
    assert record["table"]["random"]["0.5"]["after_pruning"]["mean"] == pytest.approx(sum(random_pruned) / 2)
    assert (out / "report.html").is_file() and (out / "plots" / "accuracy_vs_heads.png").is_file()
    assert run_bench(BenchConfig.from_dict(grid(lm_folders, out)), progress=False)["computed"] == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ["cahp", "random"]}, "compare classes"),
        ({"budgets": ["knee"]}, 'budget "knee"'),
        ({"recovery_objective": {"loss": "kd-relations", "hidden_weight": 0.5}}, "hidden_weight is not available"),
        ({"objective": "classification"}, 'give "objective": "causal-lm"'),
        ({"objective": "lm"}, '"objective" must be one of'),
        ({"lm": {"context_length": 1}}, r"^bench config\.lm: context_length must be at least 2"),
    ],
)
def test_settings_a_causal_lm_grid_cannot_run_are_refused_before_any_work(
    changes: dict[str, Any],
    message: str,
    lm_folders: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    with pytest.raises(CahpError, match=message):
        run_bench(BenchConfig.from_dict(grid(lm_folders, tmp_path / "bench", **changes)), progress=False)
    assert not (tmp_path / "bench").exists()
