"""Contract tests of head surgery over every registered family, on tiny random models (no downloads).

The central property: masking heads (gate 0) and physically removing them give the same logits, including
uneven pruning and a layer left with no head at all.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, T5Config

from cahp.adapters import (
    ArchitectureAdapter,
    attention_modules,
    get_adapter,
    num_heads,
    num_kv_heads,
    num_layers,
    output_projections,
    register_adapter,
)
from cahp.errors import PrunedModelError, PruningError, UnreadableWeightsError, UnsupportedArchitectureError
from cahp.evaluation.accounting import attention_flops, count_parameters, total_flops
from cahp.surgery import (
    attach_head_gates,
    export_onnx,
    head_mask,
    kept_heads_by_layer,
    kept_kv_heads_by_layer,
    load_pruned,
    prune_heads,
)
from tests.unit.tiny_models import FAMILIES, HEADS, LAYERS, SPECS, build_model, make_inputs, plan_for

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine idle-spinning threads make every
    small op wait for a descheduled peer (30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gates_without(plan: dict[int, list[int]]) -> torch.Tensor:
    """Gates ``[layers, heads]``: 1 everywhere except 0 at the planned heads."""
    gates = torch.ones(LAYERS, HEADS)
    for layer, heads in plan.items():
        gates[layer, heads] = 0.0
    return gates


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **extra: object) -> torch.Tensor:
    return model(**inputs, **extra).logits


def _run_kwargs(family: str) -> dict[str, object]:
    return {"output_attentions": True} if get_adapter(family).probs_need_output_attentions else {}


# ---- adapters ----------------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported_types() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 't5' has no adapter; supported: .*bert"):
        get_adapter(T5Config())


def test_third_party_registration() -> None:
    custom = ArchitectureAdapter(
        family="custom",
        layers="encoder.layer",
        attention="attention.self",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        output="attention.output.dense",
    )
    register_adapter(["cahp-test-custom"], custom)
    assert get_adapter("cahp-test-custom") is custom
    assert get_adapter(BertConfig()).family == "bert"


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_counts_and_modules(family: str) -> None:
    model = build_model(family)
    assert num_layers(model) == LAYERS
    assert num_heads(model) == HEADS
    assert num_kv_heads(model) == (2 if SPECS[family].gqa else HEADS)
    head_dim = get_adapter(model).head_size(model)
    for projection in output_projections(model):
        width = projection.weight.shape[0] if family == "gpt2" else projection.weight.shape[1]
        assert width == HEADS * head_dim  # the projection's input is the per-head context


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_modules_return_probabilities(family: str) -> None:
    model = prune_heads(build_model(family, "eager"), plan_for(family))
    inputs = make_inputs(family)
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _a, out: captured.append(out[1])) for m in attention_modules(model)]
    logits(model, inputs, **_run_kwargs(family))
    for handle in handles:
        handle.remove()
    kept = kept_heads_by_layer(model)
    assert len(captured) == LAYERS
    for layer, probs in enumerate(captured):
        assert probs.shape[:2] == (2, len(kept[layer]))
        assert probs.shape[-1] == probs.shape[-2]
        if kept[layer]:
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    if "attention_mask" in inputs and kept[0]:
        assert captured[0][1, :, :, -2:].abs().max() < 1e-6  # padded keys get no attention


# ---- masking == removal ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "attn"),
    [(f, "eager") for f in FAMILIES] + [(f, "sdpa") for f in FAMILIES if f != "mpnet"],  # MPNet has no sdpa
)
def test_masking_equals_removal(family: str, attn: str) -> None:
    model = build_model(family, attn)
    inputs, plan = make_inputs(family), plan_for(family)
    dense = logits(model, inputs)
    with head_mask(model, gates_without(plan)):
        masked = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs), dense, atol=0, rtol=0)  # the hooks are gone
    pruned_model = prune_heads(copy.deepcopy(model), plan)
    pruned = logits(pruned_model, inputs)
    assert (masked - dense).abs().max() > 100 * ATOL, "the plan must change the output for the test to mean much"
    torch.testing.assert_close(pruned, masked, atol=ATOL, rtol=0)
    expected = {layer: [h for h in range(HEADS) if h not in plan.get(layer, [])] for layer in range(LAYERS)}
    assert kept_heads_by_layer(pruned_model) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_head_layer_runs_no_projection(family: str) -> None:
    model = prune_heads(build_model(family), {1: list(range(HEADS))})
    adapter = get_adapter(model)
    layer = adapter.layer_modules(model)[1]
    query = layer.get_submodule(adapter.query)
    assert query.weight.numel() == 0
    calls: list[int] = []
    query.register_forward_hook(lambda *_: calls.append(1))
    logits(model, make_inputs(family))
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_zero_head_layer_keeps_the_generation_cache(family: str) -> None:
    """A decoder layer without heads stores its (empty) keys in the cache under the argument name its model
    uses (``cache``; GPT-NeoX: ``layer_past``), so a cached step sees every earlier position and gives the
    logits of the full forward."""
    import inspect

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = build_model(family).config
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prune_heads(model, {1: list(range(HEADS))})
    ids = make_inputs(family)["input_ids"]
    probs: list[torch.Tensor] = []
    get_adapter(model).attention_modules(model)[1].register_forward_hook(lambda _m, _a, out: probs.append(out[1]))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        name = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )  # 5.x renamed it
        step = model(ids[:, -1:], **{name: prefix[name]}, use_cache=True).logits[:, -1]
    assert probs[-1].shape == (ids.shape[0], 0, 1, ids.shape[1])  # one query over every cached key
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_a_pruned_model_reads_original_numbers(family: str) -> None:
    model = build_model(family)
    inputs = make_inputs(family)
    first, second = ({0: [2, 3]}, {2: [0, 1]}) if SPECS[family].gqa else ({0: [1], 2: [3]}, {0: [2], 2: [0]})
    union = {layer: first.get(layer, []) + second.get(layer, []) for layer in range(LAYERS)}
    with head_mask(model, gates_without(union)):
        reference = logits(model, inputs)
    prune_heads(model, first)
    with head_mask(model, gates_without(second)):  # gates of removed heads are ignored
        torch.testing.assert_close(logits(model, inputs), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_twice_uses_original_numbers(family: str) -> None:
    model = build_model(family)
    inputs = make_inputs(family)
    if SPECS[family].gqa:
        steps, union = [{0: [0, 1]}, {0: [0, 1, 2, 3], 2: [2, 3]}], {0: [0, 1, 2, 3], 2: [2, 3]}
    else:
        steps, union = [{0: [1], 2: [0]}, {0: [1, 3], 2: [2]}], {0: [1, 3], 2: [0, 2]}
    with head_mask(model, gates_without(union)):
        reference = logits(model, inputs)
    for step in steps:
        prune_heads(model, step)
    torch.testing.assert_close(logits(model, inputs), reference, atol=ATOL, rtol=0)
    assert kept_heads_by_layer(model)[0] == [h for h in range(HEADS) if h not in union[0]]


def test_out_of_range_head_is_refused() -> None:
    model = build_model("bert")
    with pytest.raises(PruningError, match=r"head numbers \[4\] do not exist"):
        prune_heads(model, {0: [4]})
    with pytest.raises(PruningError, match="layer 3 does not exist"):
        prune_heads(model, {3: [0]})


# ---- grouped-query attention -------------------------------------------------------------------------------


def test_gqa_groups_mode_refuses_split_group() -> None:
    model = build_model("llama")
    with pytest.raises(PruningError, match=r"splits groups \[0\].*group 0 keeps \[0\] of \[0, 1\]"):
        prune_heads(model, {0: [1]}, gqa_mode="groups")
    assert kept_heads_by_layer(model)[0] == [0, 1, 2, 3]  # nothing changed


def test_gqa_uniform_mode_refuses_uneven_groups() -> None:
    model = build_model("llama")
    with pytest.raises(PruningError, match=r"gqa_mode='uniform'.*\{0: 0, 1: 2\}"):
        prune_heads(model, {0: [0, 1]}, gqa_mode="uniform")
    with pytest.raises(PruningError, match=r"\{0: 1, 1: 2\}"):
        prune_heads(model, {0: [0]}, gqa_mode="uniform")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_uniform_mode_matches_masking(family: str) -> None:
    model = build_model(family)
    inputs, plan = make_inputs(family), {0: [0, 3], 1: [0, 1, 2, 3], 2: [1, 2]}
    with head_mask(model, gates_without(plan)):
        masked = logits(model, inputs)
    prune_heads(model, plan, gqa_mode="uniform")
    torch.testing.assert_close(logits(model, inputs), masked, atol=ATOL, rtol=0)
    assert kept_kv_heads_by_layer(model) == {0: [0, 1], 1: [], 2: [0, 1]}
    attention = get_adapter(model).attention_modules(model)[0]
    assert attention.num_key_value_groups == 1
    assert attention.k_proj.weight.shape[0] == 2 * get_adapter(model).head_size(model)


def test_gqa_groups_mode_drops_kv_heads() -> None:
    model = prune_heads(build_model("llama"), {0: [0, 1]})
    attention = get_adapter(model).attention_modules(model)[0]
    head_dim = get_adapter(model).head_size(model)
    assert kept_kv_heads_by_layer(model)[0] == [1]
    assert attention.k_proj.weight.shape[0] == head_dim
    assert attention.num_key_value_groups == 2


# ---- gradients ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_gates(family: str) -> None:
    model = prune_heads(build_model(family), {0: [1, 3]} if not SPECS[family].gqa else {0: [2, 3]})
    weights_before = {name: t.clone() for name, t in model.state_dict().items()}
    gates = torch.ones(LAYERS, HEADS).requires_grad_()
    handle = attach_head_gates(model, gates)
    model(**make_inputs(family)).logits.pow(2).sum().backward()
    handle.remove()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights_before[name]), f"masking changed {name}"
    kept = kept_heads_by_layer(model)
    for layer in range(LAYERS):
        for head in range(HEADS):
            if head in kept[layer]:
                assert gates.grad[layer, head] != 0, f"no gradient for kept head {layer}.{head}"
            else:
                assert gates.grad[layer, head] == 0


def test_wrong_gate_shape_is_refused() -> None:
    with pytest.raises(PruningError, match=r"\[3, 4\]"):
        attach_head_gates(build_model("bert"), torch.ones(4, 3))


# ---- parameters and FLOPs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_drops_by_removed_projections(family: str) -> None:
    model = build_model(family)
    adapter = get_adapter(model)
    geometry = adapter.geometry(model)
    layer = adapter.layer_modules(model)[0]

    # Parameters per output row of a projection, measured on the DENSE model: its input width, plus the bias.
    def per_row(path: str) -> int:
        module = layer.get_submodule(path)
        return module.weight.shape[geometry.in_axis] + (getattr(module, "bias", None) is not None)

    output = layer.get_submodule(adapter.output).weight
    per_query_head = geometry.head_dim * (per_row(adapter.query) + output.shape[geometry.out_axis])
    per_kv_head = geometry.head_dim * (per_row(adapter.key) + per_row(adapter.value))
    plan = plan_for(family)
    removed_q = sum(len(heads) for heads in plan.values())
    removed_kv = removed_q // (HEADS // num_kv_heads(model))
    before = count_parameters(model)
    prune_heads(model, plan)
    assert before - count_parameters(model) == removed_q * per_query_head + removed_kv * per_kv_head


def test_flops_by_hand_for_bert() -> None:
    model = build_model("bert")
    seq, hidden, head_dim = 10, 32, 8
    per_layer_attention = 4 * 2 * seq * hidden * hidden + 2 * 2 * HEADS * seq * seq * head_dim
    assert attention_flops(model, seq) == LAYERS * per_layer_attention
    ffn = 2 * seq * (hidden * 37) * 2
    heads = 2 * (hidden * hidden + hidden * 3)  # pooler + classifier, once per sequence
    assert total_flops(model, seq) == LAYERS * (per_layer_attention + ffn) + heads
    prune_heads(model, {0: [0, 1], 1: [0, 1, 2, 3]})
    removed_heads = 6
    per_head = 4 * 2 * seq * hidden * head_dim + 2 * 2 * seq * seq * head_dim
    assert attention_flops(model, seq) == LAYERS * per_layer_attention - removed_heads * per_head


# ---- save and reload ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_pruned(family: str, tmp_path: Path) -> None:
    model = prune_heads(build_model(family, "eager"), plan_for(family))
    inputs = make_inputs(family)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["cahp_kept_heads"]
    assert record == {str(k): v for k, v in kept_heads_by_layer(model).items()}
    reloaded = load_pruned(tmp_path, attn_implementation="eager")
    assert type(reloaded) is type(model)
    assert kept_heads_by_layer(reloaded) == kept_heads_by_layer(model)
    assert kept_kv_heads_by_layer(reloaded) == kept_kv_heads_by_layer(model)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=0, rtol=0)
    reloaded.save_pretrained(tmp_path / "again")  # a reloaded model saves and reloads too
    torch.testing.assert_close(
        logits(load_pruned(tmp_path / "again", attn_implementation="eager"), inputs),
        logits(model, inputs),
        atol=0,
        rtol=0,
    )


def test_unpruned_folder_loads_normally(tmp_path: Path) -> None:
    model = build_model("bert")
    model.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(logits(reloaded, make_inputs("bert")), logits(model, make_inputs("bert")))


def test_plain_from_pretrained_loads_what_save_pretrained_wrote(tmp_path: Path) -> None:
    model = prune_heads(build_model("bert"), plan_for("bert"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "cahp_bert"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager")
    inputs = make_inputs("bert")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_mismatched_folder_is_refused(family: str, tmp_path: Path) -> None:
    prune_heads(build_model(family), plan_for(family)).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["cahp_kept_heads"]["0"] = list(range(HEADS))  # claim layer 0 was never pruned
    if "cahp_kept_kv_heads" in config:
        config["cahp_kept_kv_heads"]["0"] = [0, 1]
    config_file.write_text(json.dumps(config))
    with pytest.raises(PrunedModelError, match=r"do not match the pruned structure.*layers?\.0\."):
        load_pruned(tmp_path)


def test_impossible_record_is_refused(tmp_path: Path) -> None:
    prune_heads(build_model("llama"), plan_for("llama")).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["cahp_kept_heads"]["2"] = [0, 2, 3]  # group 0 keeps one head, group 1 two
    config_file.write_text(json.dumps(config))
    with pytest.raises(PrunedModelError, match="cannot have"):
        load_pruned(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("no weights", "weights of this pruned model cannot be read"),
        ("truncated weights", r"model\.safetensors in .* cannot be read"),
        ("entry not a list", "must be a list of head numbers"),
        ("fractional head", r"must hold whole head numbers, got 1\.7"),
    ],
)
def test_a_damaged_pruned_folder_is_one_clear_error(tmp_path: Path, edit: str, message: str) -> None:
    prune_heads(build_model("bert"), plan_for("bert")).save_pretrained(tmp_path)
    weights, config_file = tmp_path / "model.safetensors", tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    if edit == "no weights":
        weights.unlink()
    elif edit == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        config["cahp_kept_heads"]["0"] = 5 if edit == "entry not a list" else [0, 1.7]
        config_file.write_text(json.dumps(config))
    with pytest.raises((PrunedModelError, UnreadableWeightsError), match=message) as refused:
        load_pruned(tmp_path)
    assert "\n" not in str(refused.value)


def test_head_numbers_are_never_rounded() -> None:
    """A head number 1.7 is refused, not read as head 1."""
    with pytest.raises(PruningError, match=r"whole head numbers, got 1\.7"):
        prune_heads(build_model("bert"), {0: [1.7]})
    with pytest.raises(PruningError, match="whole head numbers, got True"):
        prune_heads(build_model("bert"), {0: [True]})


# ---- ONNX --------------------------------------------------------------------------------------------------

needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnxruntime and onnxscript are needed for the ONNX export test",
)


#: ONNX export families run in CI (about 5 s each); the others are marked slow.
ONNX_IN_CI = ("mpnet", "llama", "gpt_neox", "gpt2", "vit")


@needs_onnxruntime
@pytest.mark.parametrize(
    "family",
    [
        *ONNX_IN_CI,
        *[pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES if f not in ONNX_IN_CI],
    ],
)
def test_onnx_export_matches_pytorch(family: str, tmp_path: Path) -> None:
    import onnxruntime

    model = prune_heads(build_model(family), plan_for(family))
    path = export_onnx(model, tmp_path / "model.onnx", make_inputs(family))
    session = onnxruntime.InferenceSession(str(path))
    other = make_inputs(family, seed=7)  # another batch size and sequence length than the example
    if "input_ids" in other:
        other = {name: torch.cat([t, t[:1]])[:, :5] for name, t in other.items()}
    else:
        other = {name: torch.cat([t, t[:1]]) for name, t in other.items()}
    (onnx_logits,) = session.run(None, {name: t.numpy() for name, t in other.items()})
    torch.testing.assert_close(torch.from_numpy(onnx_logits), logits(model, other), atol=ATOL, rtol=0)


def test_heads_to_remove_keeps_whole_kv_groups() -> None:
    from cahp.surgery import heads_to_remove

    model = build_model("llama")
    adapter = get_adapter(model)
    heads, groups = adapter.num_heads(model), adapter.num_kv_heads(model)
    size = heads // groups
    plan = heads_to_remove(model, {0: [0], 1: [size * (groups - 1) + 1]})
    assert plan[0] == list(range(size, heads))
    assert plan[1] == list(range(0, size * (groups - 1)))
    assert heads_to_remove(model, {0: [0]}, gqa_mode="uniform")[0] == list(range(1, heads))
    prune_heads(model, plan)  # feasible by construction
    assert kept_heads_by_layer(model)[0] == list(range(size))
