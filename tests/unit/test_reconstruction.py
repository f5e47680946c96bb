"""The reconstruction step (``--reconstruct bias|scale|weights``) on tiny models of every family.

Tiny random models from ``tiny_models`` (3 layers x 4 query heads; Llama-style: 2 key-value groups), padded
calibration batches, the plans of ``tiny_models.plan_for`` (uneven, one layer losing every head; whole groups for
GQA). Errors are checked two ways: from the step's statistics, and measured on the model's own forward. The step's
inputs, kept on disk and advanced one layer at a time, give what the full forward of the pruned model up to each layer
gave (the step's earlier way, kept here as the reference).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Cache

from cahp import reconstruction
from cahp.adapters import get_adapter
from cahp.calibration import Calibration, SequenceClassification
from cahp.data.batching import EncodedSplit
from cahp.reconstruction import LayerInputs, LayerStatistics, ReconstructionError, check_reconstruction, reconstruct
from cahp.surgery import load_pruned, prune_heads
from cahp.surgery.autoload import save_pruned
from cahp.surgery.reconstruct import can_store_output_bias
from cahp.surgery.removal import layer_geometries
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
    """``cahp prune`` (``--reconstruct weights`` by default) on a tiny classifier: the after-pruning figures are those
    of the reconstructed model, the report holds the per-layer errors; a bench cell with the same setting agrees;
    ``--reconstruct none`` has no step."""
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
    assert main([*common, "--reconstruct", "none", "--out", str(tmp_path / "none")]) == 0
    assert main([*common, "--out", str(tmp_path / "weights")]) == 0  # the default
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


class _Stop(Exception):
    """Stops the reference's forward at the layer being fitted."""


@torch.no_grad()
def full_forward_statistics(dense: Any, pruned: Any, calibration: Calibration, layer: int) -> LayerStatistics:
    """The reference: ``(G, s, n)`` of the unpruned layer ``layer`` with the pruned model's FULL forward run on every
    batch up to that layer's attention module (the step's earlier way, about ``(L + 1) / 2`` passes)."""
    adapter = get_adapter(pruned)
    dense_attention = adapter.attention_modules(dense)[layer]
    width = layer_geometries(dense)[layer].query_heads * adapter.head_size(dense)
    gram = torch.zeros(width, width, dtype=torch.float64)
    total = torch.zeros(width, dtype=torch.float64)
    count = 0
    state: dict[str, Any] = {}

    def read_context(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state["context"] = args[0] if args else kwargs["input"]

    def run_dense(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal gram, total, count
        kwargs = {name: (None if name in adapter.cache_arguments else value) for name, value in kwargs.items()}
        kwargs.pop("use_cache", None)
        outputs = dense_attention(*args, **kwargs)
        context = state["context"] if adapter.output_inside_attention() else outputs[0]
        context = context.double().reshape(-1, context.shape[-1])
        if state["mask"] is not None:
            context = context[state["mask"].reshape(-1) != 0]
        gram += context.t() @ context
        total += context.sum(0)
        count += context.shape[0]
        raise _Stop

    hooks = [
        adapter.attention_modules(pruned)[layer].register_forward_pre_hook(run_dense, with_kwargs=True, prepend=True),
        adapter.output_projections(dense)[layer].register_forward_pre_hook(read_context, with_kwargs=True),
    ]
    try:
        for batch in calibration.batches():
            state["mask"] = batch.get("attention_mask")
            with contextlib.suppress(_Stop):
                calibration.forward(pruned, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return LayerStatistics(gram, total, float(count))


def full_forward_reconstruct(
    dense: Any, pruned: Any, calibration: Calibration, mode: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The step with the reference statistics in place of the stored inputs'."""
    with monkeypatch.context() as patch:
        patch.setattr(
            reconstruction,
            "layer_statistics",
            lambda dense, inputs, layer: full_forward_statistics(dense, pruned, calibration, layer),
        )
        return reconstruct(dense, pruned, calibration, mode)


def _prune(dense: Any, family: str, gqa_mode: str) -> Any:
    if gqa_mode == "groups":
        return pruned_copy(dense, family)
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, {0: [1, 3], 1: [0, 1, 2, 3], 2: [0, 2]}, gqa_mode="uniform")
    return pruned


@pytest.mark.parametrize(
    ("family", "gqa_mode"), [*((family, "groups") for family in FAMILIES), ("llama", "uniform"), ("qwen2", "uniform")]
)
def test_the_stored_inputs_give_the_full_forward_results(
    family: str, gqa_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every family and mode: the same record errors, output projections and logits as with the pruned model's
    full forward up to each layer (padded batches; one layer without heads; GQA groups and uniform)."""
    dense = build_model(family)
    calibration = tiny_calibration(family)
    adapter = get_adapter(dense)
    for mode in modes_for(dense):
        stored, reference = _prune(dense, family, gqa_mode), _prune(dense, family, gqa_mode)
        record = reconstruct(dense, stored, calibration, mode)
        expected = full_forward_reconstruct(dense, reference, calibration, mode, monkeypatch)
        assert record["tokens"] == expected["tokens"] > 0
        for got, want in zip(record["layers"], expected["layers"], strict=True):
            assert got.keys() == want.keys(), mode
            for key in ("error_before", "error_after"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (mode, got["layer"], key)
        for got_projection, want_projection in zip(
            adapter.output_projections(stored), adapter.output_projections(reference), strict=True
        ):
            torch.testing.assert_close(got_projection.weight, want_projection.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(stored, calibration), logits(reference, calibration), atol=1e-5, rtol=1e-5)


def test_the_cost_is_counted_and_under_three_forward_passes() -> None:
    """3 batches, 3 layers: the capture pass runs layers 0 and 1, every layer runs once to its attention module
    (statistics), layers 0 and 1 once more whole; ``(3 L - 2) / L`` passes."""
    dense = build_model("llama")
    pruned = pruned_copy(dense, "llama")
    record = reconstruct(dense, pruned, tiny_calibration("llama"), "weights")
    assert record["layer_calls"] == {"capture": 6, "statistics": 9, "advance": 6}
    assert record["forward_passes"] == pytest.approx(7 / 3, abs=0.01)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpnet"])
def test_the_layers_shared_arguments_are_stored_once(family: str, tmp_path: Path) -> None:
    """Llama's rotary embeddings and mask, GPT-2's mask, MPNet's position bias: every layer gets the same object,
    stored once (it loads as one object); the hidden states are stored apart, and caches are dropped."""
    dense = build_model(family)
    inputs = LayerInputs(pruned_copy(dense, family), tmp_path)
    inputs.capture(tiny_calibration(family))
    assert inputs.batches == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"{kind}-{index}.pt" for kind in ("calls", "hidden") for index in range(3)
    ]
    calls = torch.load(tmp_path / "calls-0.pt", weights_only=False)["calls"]
    hidden = torch.load(tmp_path / "hidden-0.pt")
    first = [*calls[0].args, *calls[0].kwargs.values()]
    shared = [value for value in first if isinstance(value, (torch.Tensor, tuple))]
    assert shared, "the layers get masks or position arguments"
    for call in calls[1:]:
        values = [*call.args, *call.kwargs.values()]
        assert all(any(value is other for other in values) for value in shared)
    assert not any(isinstance(value, torch.Tensor) and value.shape == hidden.shape for value in first)
    assert all("use_cache" not in call.kwargs for call in calls)
    assert not any(isinstance(value, Cache) for call in calls for value in [*call.args, *call.kwargs.values()])


def test_the_temporary_folder_is_removed_after_success_and_after_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = build_model("bert")
    calibration = tiny_calibration("bert")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reconstruct(dense, pruned_copy(dense, "bert"), calibration, "weights")
    assert not list(tmp_path.iterdir())

    seen: list[int] = []
    fit = reconstruction.fit_layer

    def fail_on_the_second_layer(*args: Any, **kwargs: Any) -> Any:
        seen.append(len(list(next(tmp_path.iterdir()).iterdir())))  # the folder holds the stored inputs
        if len(seen) == 2:
            raise RuntimeError("stop")
        return fit(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "fit_layer", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="stop"):
        reconstruct(dense, pruned_copy(dense, "bert"), calibration, "weights")
    assert seen == [6, 6] and not list(tmp_path.iterdir())
