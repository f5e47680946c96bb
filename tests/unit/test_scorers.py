"""Head scorers: one contract test over every registered scorer, a planted head, GQA/GPT-2 shapes, top-K."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cahp.adapters import get_adapter
from cahp.data.batching import EncodedSplit
from cahp.errors import CahpError
from cahp.scoring import available_scorers, get_scorer
from cahp.selection.budget import keep_from_budget, select_top_k
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
    data = make_data()

    scorer = get_scorer(name, seed=3, **FAST.get(name, {}))
    scores = scorer.score(model, tokenizer, data, LABELS)

    assert scores.shape == (LAYERS, HEADS) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores)) and scorer.scores_ is scores
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), f"{name} changed {key}"
    assert {key: p.requires_grad for key, p in model.named_parameters()} == flags
    assert {key: m.training for key, m in model.named_modules()} == modes
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    json.dumps(scorer.get_settings())  # settings are JSON-ready (cached next to the scores)
    again = get_scorer(name, seed=3, **FAST.get(name, {})).score(model, tokenizer, data, LABELS)
    np.testing.assert_array_equal(scores, again)


def planted_model(tokenizer, data: EncodedSplit) -> tuple[torch.nn.Module, EncodedSplit]:  # type: ignore[no-untyped-def]
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
    return model, EncodedSplit(data.features, labels)


@pytest.mark.parametrize("name", ["gradient", "fisher", "attattr", "l0", "dsp"])
def test_planted_head_ranks_first(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, data = planted_model(tokenizer, make_data(32, seed=1))
    settings = {"l0": {"steps": 40}, "dsp": {"steps": 40}, "attattr": {"steps": 5}}.get(name, {})
    scores = get_scorer(name, **settings).score(model, tokenizer, data, LABELS)
    assert np.unravel_index(np.argmax(scores), scores.shape) == PLANTED, np.round(scores, 4)


def _rows(weight: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return weight[start : start + size]


def test_magnitude_counts_shared_kv_heads_and_fused_gpt2_weights(tokenizer) -> None:  # type: ignore[no-untyped-def]
    llama, gpt2 = build_model("llama"), build_model("gpt2")
    llama_scores = get_scorer("magnitude").score(llama, tokenizer, make_data(4, token_types=False), LABELS)
    gpt2_scores = get_scorer("magnitude").score(gpt2, tokenizer, make_data(4, token_types=False), LABELS)
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
    data = make_data(8, token_types=False)
    for name in ("gradient", "fisher"):
        scores = get_scorer(name).score(model, tokenizer, data, LABELS)
        assert scores.shape == (LAYERS, HEADS) and np.all(np.isfinite(scores)) and scores.max() > 0


def test_scorers_refuse_pruned_models(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from cahp.surgery import prune_heads

    model = prune_heads(build_model("bert"), {0: [1]})
    with pytest.raises(CahpError, match="unpruned"):
        get_scorer("magnitude").score(model, tokenizer, make_data(4), LABELS)


def test_select_top_k_guardrail_ties_and_budgets() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.7, 0.95, 0.2], [0.05, 0.3, 0.3]])
    kept, guardrail = select_top_k(scores, keep=3)
    assert kept == {0: [0, 1], 1: [1], 2: [1]}  # the tie in layer 2 goes to the lower head
    assert guardrail == [(2, 1)]
    kept, guardrail = select_top_k(scores, keep=3, allow_empty_layers=True)
    assert kept == {0: [0, 1], 1: [1], 2: []} and guardrail == []
    kept, _ = select_top_k(np.zeros((2, 3)), keep=2)
    assert kept == {0: [0, 1], 1: [0]}  # ties: lower global index first, then the guardrail
    assert keep_from_budget(12, keep=5) == 5 and keep_from_budget(12, sparsity=0.5) == 6
    assert keep_from_budget(72, sparsity=1 - 0.3) == 22
    for bad in ({}, {"keep": 3, "sparsity": 0.5}, {"keep": 13}, {"sparsity": 1.0}):
        with pytest.raises(CahpError):
            keep_from_budget(12, **bad)
    with pytest.raises(CahpError, match="non-finite"):
        select_top_k(np.array([[np.nan, 1.0]]), keep=1)
