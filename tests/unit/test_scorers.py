"""Head scorers: one contract test over every registered scorer, what the seed does, a planted head, GQA/GPT-2
shapes, the gradient fraction, the HIES sign, the signature collector's classes, top-K."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from cahp.adapters import get_adapter
from cahp.calibration import Calibration, SequenceClassification
from cahp.data.batching import EncodedSplit
from cahp.errors import CahpError
from cahp.methods import Budget, Constraints, HeadGrid, select_heads
from cahp.scoring import BUILTIN_SCORERS, available_scorers, get_scorer, scorer_class
from cahp.scoring.base import minmax
from cahp.scoring.salience import gradient_salience
from cahp.signatures.collector import collect_signatures
from tests.unit.tiny_models import HEADS, LABELS, LAYERS, VOCAB, build_model

#: Fewer steps for the trained scorers, only to keep the suite quick; every other setting is the default.
FAST = {"l0": {"steps": 6}, "dsp": {"steps": 6}, "attattr": {"steps": 3}}
PLANTED = (1, 2)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from cahp.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm-l6"))  # only pads: pad id 0 fits every tiny model


def make_data(examples: int = 20, seed: int = 0, token_types: bool = True) -> EncodedSplit:
    """Token ids below the tiny vocabulary, lengths 3..10 (so batches get padded), 3 labels."""
    rng = np.random.default_rng(seed)
    features = []
    for _ in range(examples):
        ids = [1, *rng.integers(3, VOCAB, int(rng.integers(1, 9))).tolist(), 2]
        feature = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if token_types:
            feature["token_type_ids"] = [0] * len(ids)
        features.append(feature)
    return EncodedSplit(features, rng.integers(0, LABELS, examples))


def calibrate(tokenizer: Any, data: EncodedSplit) -> Calibration:  # type: ignore[no-untyped-def]
    return Calibration(data, tokenizer, SequenceClassification(LABELS))


def make_calibration(tokenizer: Any, examples: int = 20, seed: int = 0, token_types: bool = True) -> Calibration:
    return calibrate(tokenizer, make_data(examples, seed, token_types))


def test_registry_lists_every_method_and_rejects_unknown_names() -> None:
    names = available_scorers()
    assert {"random", "magnitude", "entropy", "gradient", "hies", "attattr", "l0", "dsp", "fisher"} <= set(names)
    with pytest.raises(CahpError, match=r"available: .*random"):
        get_scorer("no-such-scorer")
    with pytest.raises(CahpError, match="no setting"):
        get_scorer("random", temperature=3)


@pytest.mark.parametrize("name", available_scorers())
def test_scorer_contract(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Shape ``[layers, heads]``, finite, same seed same scores, and the model left exactly as given."""
    model = build_model("bert", attn_implementation="sdpa").train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # mixed flags must come back as they were
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    modes = {key: m.training for key, m in model.named_modules()}
    calibration = make_calibration(tokenizer)

    scorer = get_scorer(name, seed=3, **FAST.get(name, {}))
    scores = scorer.score(model, calibration)

    assert scores.shape == (LAYERS, HEADS) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores)) and scorer.scores_ is scores
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), f"{name} changed {key}"
    assert {key: p.requires_grad for key, p in model.named_parameters()} == flags
    assert {key: m.training for key, m in model.named_modules()} == modes
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    json.dumps(scorer.get_settings())  # settings are JSON-ready (cached next to the scores)
    again = get_scorer(name, seed=3, **FAST.get(name, {})).score(model, calibration)
    np.testing.assert_array_equal(scores, again)


#: What the seed does, as each scorer's docs say: (scorer, settings, same scores for seeds 3 and 4?) on 12
#: examples. Subset-only scorers ignore the seed when the subset is the whole calibration set.
SEED_CASES = [
    ("random", {}, False),
    ("l0", FAST["l0"], False),  # gate noise and batch order
    ("dsp", FAST["dsp"], False),  # Gumbel noise and batch order
    ("gradient", {"batch_size": 4}, False),  # all examples, but the shuffle decides who shares a batch
    ("hies", {"batch_size": 4}, False),  # its gradient term, likewise
    ("entropy", {"max_examples": 6}, False),  # the subset
    ("entropy", {}, True),  # 512 >= 12: every example, sorted by length
    ("fisher", {"max_examples": 6}, False),
    ("fisher", {}, True),  # 256 >= 12
    ("attattr", {"steps": 2, "max_examples": 6}, False),
    ("attattr", {"steps": 2, "max_examples": None}, True),
    ("sink", {"max_examples": 6}, False),
    ("sink", {}, True),
    ("redundancy", {"max_examples": 6}, False),
    ("redundancy", {}, True),
]


def test_seed_cases_cover_every_builtin_scorer_that_uses_its_seed() -> None:
    seeded = {name for name in BUILTIN_SCORERS if not scorer_class(name).deterministic}
    assert seeded <= {name for name, _, _ in SEED_CASES}


@pytest.mark.parametrize(("name", "settings", "same"), SEED_CASES)
def test_seed_is_used_where_the_docs_say(name: str, settings: dict, same: bool, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, calibration = build_model("bert"), make_calibration(tokenizer, 12)
    first, second = (get_scorer(name, seed=seed, **settings).score(model, calibration) for seed in (3, 4))
    assert np.array_equal(first, second) == same
    assert not scorer_class(name).deterministic, "depends on the seed for some calibration set"


@pytest.mark.parametrize("name", [name for name in available_scorers() if scorer_class(name).deterministic])
def test_deterministic_scorers_ignore_the_seed(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model("bert")
    calibration = make_calibration(tokenizer, 30)
    settings = {"max_examples": 10} if "max_examples" in scorer_class(name)().get_settings() else {}
    first, second = (get_scorer(name, seed=seed, **settings).score(model, calibration) for seed in (3, 4))
    np.testing.assert_array_equal(first, second)


def planted_model(tokenizer, data: EncodedSplit) -> tuple[torch.nn.Module, Calibration]:  # type: ignore[no-untyped-def]
    """Every head's value projection zeroed except ``PLANTED``'s: only that head moves information between
    tokens. The labels follow the model's own (centred) logits, so that head carries all of the task signal."""
    from cahp.evaluation.metrics import predict_logits

    model = build_model("bert")
    adapter = get_adapter(model)
    size = adapter.head_size(model)
    with torch.no_grad():
        for layer, module in enumerate(adapter.layer_modules(model)):
            value = module.get_submodule(adapter.value)
            for head in range(HEADS):
                if (layer, head) != PLANTED:
                    value.weight[head * size : (head + 1) * size] = 0.0
                    value.bias[head * size : (head + 1) * size] = 0.0
    logits = predict_logits(model, tokenizer, data, progress=False)
    labels = (logits - logits.mean(0)).argmax(-1)  # without attention [CLS] is constant: all variation is PLANTED's
    return model, calibrate(tokenizer, EncodedSplit(data.features, labels))


@pytest.mark.parametrize("name", ["gradient", "fisher", "attattr", "l0", "dsp"])
def test_planted_head_ranks_first(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, calibration = planted_model(tokenizer, make_data(32, seed=1))
    settings = {"l0": {"steps": 40}, "dsp": {"steps": 40}, "attattr": {"steps": 5}}.get(name, {})
    scores = get_scorer(name, **settings).score(model, calibration)
    assert np.unravel_index(np.argmax(scores), scores.shape) == PLANTED, np.round(scores, 4)


def _rows(weight: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return weight[start : start + size]


def test_magnitude_counts_shared_kv_heads_and_fused_gpt2_weights(tokenizer) -> None:  # type: ignore[no-untyped-def]
    llama, gpt2 = build_model("llama"), build_model("gpt2")
    calibration = make_calibration(tokenizer, 4, token_types=False)
    llama_scores = get_scorer("magnitude").score(llama, calibration)
    gpt2_scores = get_scorer("magnitude").score(gpt2, calibration)
    size, group = 32 // HEADS, HEADS // 2  # 2 key-value heads: query heads {0, 1} read kv 0, {2, 3} read kv 1
    for layer in range(LAYERS):
        attention = llama.model.layers[layer].self_attn
        c_attn = gpt2.transformer.h[layer].attn.c_attn.weight  # [hidden, 3 * hidden], columns [q | k | v]
        c_proj = gpt2.transformer.h[layer].attn.c_proj.weight  # [hidden (input: heads * size), hidden]
        for head in range(HEADS):
            parts = [
                _rows(attention.q_proj.weight, head * size, size),
                _rows(attention.k_proj.weight, (head // group) * size, size),
                _rows(attention.v_proj.weight, (head // group) * size, size),
                attention.o_proj.weight[:, head * size : (head + 1) * size],
            ]
            expected = float(torch.sqrt(sum(p.detach().pow(2).sum() for p in parts)))
            assert llama_scores[layer, head] == pytest.approx(expected, rel=1e-5)
            columns = [c_attn[:, block * 32 + head * size : block * 32 + (head + 1) * size] for block in range(3)]
            parts = [*columns, c_proj[head * size : (head + 1) * size]]
            expected = float(torch.sqrt(sum(p.detach().pow(2).sum() for p in parts)))
            assert gpt2_scores[layer, head] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_scores_gqa_and_gpt2(family: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model(family)
    calibration = make_calibration(tokenizer, 8, token_types=False)
    for name in ("gradient", "fisher"):
        scores = get_scorer(name).score(model, calibration)
        assert scores.shape == (LAYERS, HEADS) and np.all(np.isfinite(scores)) and scores.max() > 0


def test_scorers_refuse_pruned_models(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from cahp.surgery import prune_heads

    model = prune_heads(build_model("bert"), {0: [1]})
    with pytest.raises(CahpError, match="unpruned"):
        get_scorer("magnitude").score(model, make_calibration(tokenizer, 4))


def test_gradient_fraction_is_the_reference_salience_and_is_validated(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """CAHP's reference salience is the gradient scorer with ``normalize_layers=False, fraction=0.25``."""
    model, calibration = build_model("bert"), make_calibration(tokenizer)
    settings = {"normalize_layers": False, "batch_size": 4, "seed": 5}
    quarter = get_scorer("gradient", fraction=0.25, **settings).score(model, calibration)
    reference = gradient_salience(model, calibration, batch_size=4, fraction=0.25, seed=5, progress=False)
    np.testing.assert_array_equal(quarter, reference)
    whole = get_scorer("gradient", **settings).score(model, calibration)
    assert not np.allclose(quarter, whole), "2 of the 5 batches, not all of them"
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(CahpError, match=r"fraction .*\(0, 1\]"):
            get_scorer("gradient", fraction=bad).score(model, calibration)


def test_hies_entropy_sign_and_weight(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Default: low-entropy (focused) heads score high; ``focused_is_important=False`` flips the entropy term."""
    model, calibration = build_model("bert"), make_calibration(tokenizer)
    focus = get_scorer("hies", alpha=0.0).score(model, calibration)
    diverse = get_scorer("hies", alpha=0.0, focused_is_important=False).score(model, calibration)
    focused_entropy = get_scorer("entropy").score(model, calibration)  # 1 - H
    np.testing.assert_allclose(focus, minmax(focused_entropy), atol=1e-12)
    np.testing.assert_allclose(focus + diverse, 1.0, atol=1e-12)
    importance = get_scorer("gradient", normalize_layers=False).score(model, calibration)
    np.testing.assert_allclose(get_scorer("hies", alpha=1.0).score(model, calibration), minmax(importance))
    with pytest.raises(CahpError, match=r"alpha .*\[0, 1\]"):
        get_scorer("hies", alpha=1.5).score(model, calibration)


@dataclass(frozen=True)
class LossOnly:
    """An objective with a loss but no target probabilities."""

    name: str = "loss-only"
    num_groups: int = 0

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value for key, value in batch.items() if key != "labels"}


def test_scorers_run_on_any_objective_and_attattr_says_what_it_needs(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, data = build_model("bert"), make_data()
    classification = calibrate(tokenizer, data)
    loss_only = Calibration(data, tokenizer, LossOnly())
    np.testing.assert_array_equal(
        get_scorer("fisher").score(model, loss_only), get_scorer("fisher").score(model, classification)
    )
    with pytest.raises(CahpError, match="'loss-only' defines no target probabilities"):
        get_scorer("attattr", steps=2).score(model, loss_only)


class PerExampleGroups(Calibration):
    """Every example its own group: the collector's moments are then the per-example signatures."""

    @property
    def num_groups(self) -> int:
        return len(self)

    def groups(self) -> np.ndarray:
        return np.arange(len(self))


def test_signature_classes_come_from_the_calibration_groups(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Batches are sorted by length, so a class/example mix-up would show in the per-class means."""
    model, data = build_model("bert"), make_data(13)
    by_class = collect_signatures(model, calibrate(tokenizer, data), size=4, batch_size=5, progress=False)
    per_example = collect_signatures(
        model, PerExampleGroups(data, tokenizer, SequenceClassification(LABELS)), size=4, batch_size=5, progress=False
    )
    np.testing.assert_array_equal(by_class.count_, np.bincount(data.labels, minlength=LABELS))
    np.testing.assert_array_equal(per_example.count_, np.ones(len(data)))
    for label in range(LABELS):
        expected = per_example.mean_[data.labels == label].mean(0)
        np.testing.assert_allclose(by_class.mean_[label], expected, rtol=1e-6, atol=1e-9)


def test_signatures_refuse_one_class_before_any_forward(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, data = build_model("bert"), make_data(6)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    one_class = calibrate(tokenizer, EncodedSplit(data.features, np.full(len(data), 2)))
    with pytest.raises(CahpError, match="only class 2; give a split with at least two classes"):
        collect_signatures(model, one_class, progress=False)
    with pytest.raises(CahpError, match="'loss-only' defines 0 class"):
        collect_signatures(model, Calibration(data, tokenizer, LossOnly()), progress=False)
    assert forwards == []


def test_global_top_k_guardrail_ties_and_budgets() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.7, 0.95, 0.2], [0.05, 0.3, 0.3]])
    grid = HeadGrid(3, 3, 3)
    selection = select_heads(scores, 3, grid, Constraints())
    assert selection.kept_heads_by_layer == {0: [0, 1], 1: [1], 2: [1]}  # the tie in layer 2 goes to the lower head
    assert selection.guardrail_heads == [(2, 1)]
    selection = select_heads(scores, 3, grid, Constraints(min_heads_per_layer=0))
    assert selection.kept_heads_by_layer == {0: [0, 1], 1: [1], 2: []} and selection.guardrail_heads == []
    selection = select_heads(np.zeros((2, 3)), 2, HeadGrid(2, 3, 3), Constraints())
    assert selection.kept_heads_by_layer == {0: [0, 1], 1: [0]}  # ties: lower global index first, then the guardrail
    assert Budget.keep(5).heads(12) == 5 and Budget.sparsity(0.5).heads(12) == 6
    assert Budget.sparsity(1 - 0.3).heads(72) == 22
    for bad in ({"keep": 3, "sparsity": 0.5}, {"keep": 13}, {"sparsity": 1.0}):
        with pytest.raises(CahpError):
            Budget.from_options(**bad).heads(12)  # type: ignore[arg-type]
    assert Budget.from_options().is_auto, "neither a count nor a share: the method finds its own"
    with pytest.raises(CahpError, match="non-finite"):
        select_heads(np.array([[np.nan, 1.0]]), 1, HeadGrid(1, 2, 2), Constraints())
