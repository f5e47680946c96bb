"""The reconstruction step (``--reconstruct bias|scale|weights``) on tiny models of every family.

Tiny random models from ``tiny_models`` (3 layers x 4 query heads; Llama-style: 2 key-value groups), padded
calibration batches, the plans of ``tiny_models.plan_for`` (uneven, one layer losing every head; whole groups for
GQA). Errors are checked two ways: from the step's statistics, and measured on the model's own forward.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cahp.adapters import get_adapter
from cahp.calibration import Calibration, SequenceClassification
from cahp.data.batching import EncodedSplit
from cahp.reconstruction import ReconstructionError, check_reconstruction, reconstruct
from cahp.surgery import load_pruned, prune_heads
from cahp.surgery.autoload import save_pruned
from cahp.surgery.reconstruct import can_store_output_bias
from tests.unit.test_cahp_families import tiny_tokenizer
from tests.unit.tiny_models import FAMILIES, LABELS, SPECS, VOCAB, build_model, plan_for


class _Pixels:
    """Stacks ``pixel_values`` (what a tokenizer's ``pad`` does for token ids)."""

    def pad(self, features: list[dict[str, Any]], padding: bool = True, return_tensors: str = "pt") -> dict[str, Any]:
        return {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])}


def tiny_calibration(family: str, examples: int = 12, seed: int = 0) -> Calibration:
    """Padded batches of 4 (lengths 3 .. 9; left padding for Llama-style models), or random images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, LABELS, examples)
    if SPECS[family].is_image:
        images = torch.from_numpy(rng.standard_normal((examples, 3, 16, 16)).astype(np.float32))
        return Calibration(
            EncodedSplit([{"pixel_values": i} for i in images], labels), _Pixels(), SequenceClassification(LABELS), 4
        )
    lengths = rng.integers(3, 10, examples)
    features = [{"input_ids": rng.integers(3, VOCAB, n).tolist(), "attention_mask": [1] * int(n)} for n in lengths]
    side = "left" if SPECS[family].gqa else "right"
    return Calibration(EncodedSplit(features, labels), tiny_tokenizer(family, side), SequenceClassification(LABELS), 4)


def modes_for(model: Any) -> list[str]:
    return ["bias", "scale", "weights"] if can_store_output_bias(model) else ["scale", "weights"]


def logits(model: Any, calibration: Calibration) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([calibration.forward(model, batch).logits for batch in calibration.batches()])


def pruned_copy(dense: Any, family: str) -> Any:
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, plan_for(family))
    return pruned


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_removed_is_the_identity(family: str) -> None:
    dense = build_model(family)
    calibration = tiny_calibration(family)
    for mode in modes_for(dense):
        pruned = copy.deepcopy(dense)
        record = reconstruct(dense, pruned, calibration, mode)
        for (name, new), old in zip(pruned.state_dict().items(), dense.state_dict().values(), strict=True):
            torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4, msg=f"{mode}: {name}")
        assert all(layer["error_before"] < 1e-9 and layer["error_after"] < 1e-6 for layer in record["layers"])


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_and_weights_never_increase_the_calibration_error(family: str) -> None:
    dense = build_model(family)
    calibration = tiny_calibration(family)
    for mode in modes_for(dense):
        pruned = pruned_copy(dense, family)
        record = reconstruct(dense, pruned, calibration, mode)
        layers = record["layers"]
        assert len(layers) == 3 and record["tokens"] > 0
        for layer in layers:
            assert layer["error_after"] <= layer["error_before"] * (1 + 1e-6) + 1e-9, (mode, layer)
        if mode == "weights":  # a refit of the kept columns is strictly better where heads are kept and removed
            assert any(layer["error_after"] < 0.999 * layer["error_before"] for layer in layers), layers
        empty = [layer for layer in layers if layer["kept_heads"] == 0]
        assert empty, "every plan removes a whole layer"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_record_errors_are_the_measured_ones(family: str) -> None:
    """The first layer's errors from the statistics equal the ones measured on the forward (same input there)."""
    dense = build_model(family)
    calibration = tiny_calibration(family)
    adapter = get_adapter(dense)
    for mode in modes_for(dense):
        pruned = pruned_copy(dense, family)
        measured = []
        for model in (pruned,):
            before = _layer0_error(dense, model, calibration, adapter)
            record = reconstruct(dense, model, calibration, mode)
            after = _layer0_error(dense, model, calibration, adapter)
            measured = [before, after]
        first = record["layers"][0]
        assert first["error_before"] == pytest.approx(measured[0], rel=1e-3, abs=1e-6)
        assert first["error_after"] == pytest.approx(measured[1], rel=1e-3, abs=1e-6)


def _layer0_error(dense: Any, pruned: Any, calibration: Calibration, adapter: Any) -> float:
    """``sum ||Y_pruned - Y_dense||^2 / sum ||Y_dense||^2`` of layer 0's output projection (real tokens)."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        adapter.output_projections(model)[0].register_forward_hook(
            lambda module, args, out, key=key: outputs.__setitem__(key, out)
        )
        for key, model in (("dense", dense), ("pruned", pruned))
    ]
    if not adapter.output_projections(pruned)[0].weight.numel():  # headless: returns the bias, never calls it
        hooks.pop().remove()
    error = energy = 0.0
    try:
        for batch in calibration.batches():
            with torch.no_grad():
                calibration.forward(dense, batch)
                calibration.forward(pruned, batch)
            y = outputs["dense"]
            y_hat = outputs.get("pruned")
            if y_hat is None:
                y_hat = adapter.output_projections(pruned)[0].bias.expand_as(y)
            mask = batch.get("attention_mask", torch.ones(y.shape[:2]))
            keep = mask.reshape(-1) != 0
            diff = (y_hat - y).reshape(-1, y.shape[-1])[keep].double()
            error += float((diff**2).sum())
            energy += float((y.reshape(-1, y.shape[-1])[keep].double() ** 2).sum())
    finally:
        for hook in hooks:
            hook.remove()
    return error / energy


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_bias_recovers_removed_heads_that_output_a_constant(family: str) -> None:
    """Removed heads whose value rows are zero with a constant bias output that constant: folded into the bias,
    the pruned layer 0 gives the dense output exactly."""
    dense = build_model(family)
    adapter = get_adapter(dense)
    geometry = adapter.geometry(dense)
    removed = plan_for(family)[0]
    layer = adapter.layer_modules(dense)[0]
    value = layer.get_submodule(adapter.value)
    kv = sorted({head // max(geometry.query_group_size, 1) for head in removed})
    rows = geometry.rows("value", kv)
    with torch.no_grad():
        weight = value.weight
        if adapter.transposed:
            weight[:, rows] = 0
        else:
            weight[rows] = 0
        value.bias[rows] = torch.linspace(-1, 1, rows.numel())
    calibration = tiny_calibration(family)
    pruned = pruned_copy(dense, family)
    record = reconstruct(dense, pruned, calibration, "bias")
    assert record["layers"][0]["error_before"] > 1e-3
    assert record["layers"][0]["error_after"] < 1e-10
    assert _layer0_error(dense, pruned, calibration, adapter) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reconstructed_model_saves_and_reloads_with_identical_logits(family: str, tmp_path: Path) -> None:
    dense = build_model(family)
    calibration = tiny_calibration(family)
    pruned = pruned_copy(dense, family)
    reconstruct(dense, pruned, calibration, "weights")
    save_pruned(pruned, tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned").eval()
    torch.testing.assert_close(logits(reloaded, calibration), logits(pruned, calibration), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_bias_is_refused_where_the_output_projection_has_none(family: str) -> None:
    """A stock Mistral/Qwen2 config cannot store an o_proj bias: ``bias`` is refused, ``weights`` fits without
    an intercept (GQA groups removed whole, one layer without heads)."""
    dense = build_model(family)
    with pytest.raises(ReconstructionError, match=r"has none"):
        check_reconstruction(dense, "bias")
    pruned = pruned_copy(dense, family)
    record = reconstruct(dense, pruned, tiny_calibration(family), "weights")
    assert [layer["kept_heads"] for layer in record["layers"]] == [2, 0, 4]
    assert record["layers"][0]["intercept"] is False
    assert record["layers"][1]["note"].startswith("no kept heads")


def test_uniform_gqa_mode_is_reconstructed() -> None:
    """GQA ``uniform``: one query head of each group removed; the kept heads' columns are the right ones (the
    error drops and never rises)."""
    dense = build_model("llama")
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, {0: [1, 3], 2: [0, 2]}, gqa_mode="uniform")
    record = reconstruct(dense, pruned, tiny_calibration("llama"), "weights")
    for layer in record["layers"]:
        assert layer["error_after"] <= layer["error_before"] + 1e-9
    assert record["layers"][1]["error_before"] < 1e-9
    assert record["layers"][0]["error_after"] < record["layers"][0]["error_before"]


def test_an_ill_conditioned_solve_falls_back_and_says_so() -> None:
    """Contexts that are all zero (value weights and biases zero) give a singular Gram: the layer is unchanged."""
    dense = build_model("bert")
    with torch.no_grad():
        attention = get_adapter(dense).layer_modules(dense)[0].attention.self
        attention.value.weight.zero_()
        attention.value.bias.zero_()
    pruned = pruned_copy(dense, "bert")
    weight = get_adapter(pruned).output_projections(pruned)[0].weight.clone()
    record = reconstruct(dense, pruned, tiny_calibration("bert"), "weights")
    first = record["layers"][0]
    assert first["fallback"] is True and "ill-conditioned" in first["note"]
    assert record["fallbacks"] >= 1
    torch.testing.assert_close(get_adapter(pruned).output_projections(pruned)[0].weight, weight)


def test_cahp_prune_reconstruct_weights_end_to_end_and_in_a_bench_cell(tmp_path: Path) -> None:
    """``cahp prune --reconstruct weights`` on a tiny classifier: the after-pruning figures are those of the
    reconstructed model, the report holds the per-layer errors; a bench cell with the same setting agrees."""
    import json

    from cahp.bench import BenchConfig, run_bench
    from cahp.cli import main
    from cahp.train import TaskOptions, TrainingConfig
    from tests.conftest import tiny_bert_folder, tiny_task_folder

    model = tiny_bert_folder(tmp_path / "model", layers=3, heads=4, num_labels=3)
    task = tiny_task_folder(tmp_path / "task", 40)
    common = [
        *("prune", "--model", str(model), "--task", str(task), "--max-length", "16", "--method", "fisher"),
        *("--keep", "6", "--seed", "0", "--recovery-epochs", "0", "--latency-repeats", "1"),
        *("--latency-seq-len", "16", "--latency-batch-size", "2"),
    ]
    assert main([*common, "--out", str(tmp_path / "none")]) == 0
    assert main([*common, "--reconstruct", "weights", "--out", str(tmp_path / "weights")]) == 0
    plain = json.loads((tmp_path / "none" / "report.json").read_text())
    report = json.loads((tmp_path / "weights" / "report.json").read_text())
    assert "post_surgery" not in plain
    record = report["post_surgery"]["reconstruction"]
    assert record["mode"] == "weights" and len(record["layers"]) == 3 and record["tokens"] > 0
    for layer in record["layers"]:
        assert layer["error_after"] <= layer["error_before"] + 1e-9
    assert report["kept_heads_by_layer"] == plain["kept_heads_by_layer"]
    assert "after_pruning" in report["accuracy"]
    assert report["accuracy"]["after_pruning"] != plain["accuracy"]["after_pruning"], "the weights changed"

    bench = BenchConfig(
        model=str(model),
        out=str(tmp_path / "bench"),
        task=TaskOptions(str(task), max_length=16),
        methods=["fisher"],
        budgets=[0.5],
        seeds=[0],
        calibration_size=None,
        calibration_seed=0,
        recovery=TrainingConfig(epochs=0.0),
        reconstruct="weights",
    )
    run_bench(bench, progress=False)
    cell = json.loads((tmp_path / "bench" / "cells" / "fisher__seed0__0.5.json").read_text())
    strip = {"seconds", "examples_per_second"}
    for split, result in report["accuracy"]["after_pruning"].items():
        figures = {key: value for key, value in result.items() if key not in strip and "second" not in key}
        assert {key: cell["accuracy"]["after_pruning"][split][key] for key in figures} == figures
