"""Head analysis: the statistics on hand-built maps (a sink, a special-token head, identical adjacent layers),
their independence from the amount and side of padding, streaming over batches, the `sink` and `redundancy`
scorers through the Engine on every text family, and `cahp analyze` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Importing the scorer modules registers them (for when the registry's built-in list does not name them yet).
import cahp.scoring.redundancy
import cahp.scoring.sink  # noqa: F401
from cahp.analysis.heads import (
    SINK_EPSILON,
    HeadAnalysis,
    HeadStatistics,
    analyze_heads,
    first_token_attention,
    head_output_norms,
    is_causal_map,
    map_divergences,
    normalized_entropy,
    special_token_share,
)
from cahp.cli import main
from cahp.engine import Engine
from cahp.errors import CahpError
from cahp.methods.plan import Budget
from cahp.scoring import get_scorer
from tests.conftest import tiny_bert_folder, tiny_task_folder
from tests.unit.test_scorers import make_calibration
from tests.unit.tiny_models import FAMILIES, HEADS, LAYERS, SPECS, build_model

TEXT_FAMILIES = [family for family in FAMILIES if not SPECS[family].is_image]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from cahp.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm-l6"))


# ---- hand-built maps ------------------------------------------------------------------------------------------


def rows_from(weights: list[float]) -> torch.Tensor:
    """One attention row (normalised) ``[n]``."""
    row = torch.tensor(weights, dtype=torch.float64)
    return row / row.sum()


def random_maps(heads: int, n: int, causal: bool, seed: int) -> torch.Tensor:
    """``[1, heads, n, n]`` softmax maps over ``n`` real tokens (lower-triangular when causal)."""
    logits = torch.randn(1, heads, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def pad_maps(maps: torch.Tensor, pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ``[1, heads, n, n]`` maps of real tokens in a sequence of ``n + pad``: padded keys get 0 and padded
    query rows NaN (as a fully masked row may hold), padding on ``side``. Returns ``(maps, attention_mask)``."""
    _, heads, n, _ = maps.shape
    length = n + pad
    start = pad if side == "left" else 0
    padded = torch.zeros(1, heads, length, length, dtype=maps.dtype)
    padded[:, :, :, :] = 0.0
    real = slice(start, start + n)
    padded[:, :, real, real] = maps
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, real] = 1
    padded[:, :, mask[0] == 0, :] = float("nan")
    return padded, mask


def test_a_sink_head_scores_above_epsilon_and_a_uniform_head_does_not() -> None:
    n = 5
    sink_row = rows_from([6, 1, 1, 1, 1])  # 0.6 on the first token
    maps = torch.stack([sink_row.expand(n, n), torch.full((n, n), 1.0 / n, dtype=torch.float64)])[None]
    mask = torch.ones(1, n, dtype=torch.long)
    scores, valid = first_token_attention(maps, mask, causal=False)
    assert valid.tolist() == [True]
    assert scores[0].tolist() == pytest.approx([0.6, 0.2])
    assert scores[0, 0] > SINK_EPSILON > scores[0, 1]
    entropy, _ = normalized_entropy(maps, mask, causal=False)
    assert entropy[0, 1].item() == pytest.approx(1.0) and entropy[0, 0].item() < 0.9


def test_a_causal_sink_counts_the_first_real_token_after_left_padding() -> None:
    n = 4
    causal = torch.zeros(1, 1, n, n, dtype=torch.float64)
    causal[..., 0] = 1.0  # every query attends only to the first token: a perfect sink
    padded, mask = pad_maps(causal, pad=3, side="left")
    scores, _ = first_token_attention(padded, mask, causal=True)
    assert scores.item() == pytest.approx(1.0)
    uniform = torch.tril(torch.ones(n, n, dtype=torch.float64))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]
    padded, mask = pad_maps(uniform, pad=2, side="left")
    scores, _ = first_token_attention(padded, mask, causal=True)
    # queries 1..3 (query 0 sees only itself) give the first token 1/2, 1/3, 1/4
    assert scores.item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    entropy, _ = normalized_entropy(padded, mask, causal=True)
    assert entropy.item() == pytest.approx(1.0)  # uniform over the keys each query sees


def test_a_special_token_head_puts_its_mass_on_special_tokens() -> None:
    n = 6
    special = torch.tensor([[True, False, False, False, False, True]])  # [CLS] ... [SEP]
    on_special = rows_from([45, 2.5, 2.5, 2.5, 2.5, 45])
    maps = torch.stack([on_special.expand(n, n), torch.full((n, n), 1.0 / n, dtype=torch.float64)])[None]
    shares, valid = special_token_share(maps, torch.ones(1, n, dtype=torch.long), special, causal=False)
    assert valid.tolist() == [True]
    assert shares[0].tolist() == pytest.approx([0.9, 2 / 6])


def test_identical_adjacent_layers_have_zero_divergence_and_are_matched_head_to_head() -> None:
    previous = random_maps(4, 7, causal=False, seed=0)
    permutation = [2, 0, 3, 1]
    current = previous[:, permutation]
    kl, js, valid = map_divergences(current, previous, torch.ones(1, 7, dtype=torch.long), causal=False)
    assert valid.tolist() == [True]
    for head, match in enumerate(permutation):
        assert kl[0, head, match].item() == pytest.approx(0.0, abs=1e-9)
        assert js[0, head, match].item() == pytest.approx(0.0, abs=1e-12)
        others = [g for g in range(4) if g != match]
        assert (js[0, head, others] > 1e-4).all() and (kl[0, head, others] > 1e-4).all()
    assert (js <= math.log(2) + 1e-12).all()
    layer_kl, layer_js, _ = map_divergences(
        current.mean(1, keepdim=True), previous.mean(1, keepdim=True), torch.ones(1, 7, dtype=torch.long), False
    )
    assert layer_kl.item() == pytest.approx(0.0, abs=1e-9) and layer_js.item() == pytest.approx(0.0, abs=1e-12)


def test_disjoint_attention_has_the_largest_js_divergence() -> None:
    n = 4
    first = torch.zeros(1, 1, n, n, dtype=torch.float64)
    first[..., 0] = 1.0
    last = torch.zeros_like(first)
    last[..., -1] = 1.0
    _, js, _ = map_divergences(first, last, torch.ones(1, n, dtype=torch.long), causal=False)
    assert js.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("causal", [False, True])
def test_statistics_do_not_change_with_the_amount_or_side_of_padding(causal: bool) -> None:
    current = random_maps(3, 6, causal, seed=1)
    previous = random_maps(3, 6, causal, seed=2)
    special = torch.tensor([[True, False, False, True, False, False]])
    context = torch.randn(1, 6, 3 * 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    columns = torch.arange(12)

    def statistics(pad: int, side: str) -> list[torch.Tensor]:
        maps, mask = pad_maps(current, pad, side)
        before, _ = pad_maps(previous, pad, side)
        start = pad if side == "left" else 0
        padded_special = torch.zeros(1, 6 + pad, dtype=torch.bool)
        padded_special[:, start : start + 6] = special
        padded_special[mask == 0] = True  # a pad id that is also a special id (GPT-2: pad = EOS) must not count
        padded_context = torch.full((1, 6 + pad, 12), 1e3, dtype=torch.float64)
        padded_context[:, start : start + 6] = context
        kl, js, _ = map_divergences(maps, before, mask, causal)
        return [
            first_token_attention(maps, mask, causal)[0],
            special_token_share(maps, mask, padded_special, causal)[0],
            normalized_entropy(maps, mask, causal)[0],
            kl,
            js,
            head_output_norms(padded_context, mask, columns, 3)[0],
        ]

    reference = statistics(0, "right")
    assert all(torch.isfinite(value).all() for value in reference)
    for pad, side in [(1, "right"), (4, "right"), (1, "left"), (5, "left")]:
        for expected, got in zip(reference, statistics(pad, side), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_output_norms_follow_the_head_columns() -> None:
    context = torch.zeros(1, 2, 6)
    context[0, :, 0:3] = torch.tensor([3.0, 4.0, 0.0])  # head 0: norm 5
    context[0, :, 3:6] = torch.tensor([0.0, 0.0, 2.0])  # head 1: norm 2
    norms, valid = head_output_norms(context, torch.ones(1, 2, dtype=torch.long), torch.arange(6), 2)
    assert norms[0].tolist() == pytest.approx([5.0, 2.0]) and valid.tolist() == [True]


def test_causal_maps_are_told_from_bidirectional_ones() -> None:
    mask = torch.ones(1, 5, dtype=torch.long)
    assert is_causal_map(random_maps(2, 5, causal=True, seed=0), mask) is True
    assert is_causal_map(random_maps(2, 5, causal=False, seed=0), mask) is False
    assert is_causal_map(torch.ones(1, 2, 1, 1), torch.ones(1, 1, dtype=torch.long)) is None


def test_maps_and_masks_of_mismatched_shapes_are_refused() -> None:
    with pytest.raises(CahpError, match="attention_mask shape"):
        first_token_attention(random_maps(2, 5, False, 0), torch.ones(1, 4, dtype=torch.long), causal=False)


def _analysis(head_js: np.ndarray, sink: np.ndarray, special: np.ndarray, norms: np.ndarray) -> HeadAnalysis:
    layers, heads = sink.shape
    return HeadAnalysis(
        causal=False,
        examples=1,
        sink_score=sink,
        special_token_share=special,
        entropy=np.full((layers, heads), 0.5),
        output_norm=norms,
        head_kl=2 * head_js,
        head_js=head_js,
        layer_kl=np.zeros(layers - 1),
        layer_js=np.zeros(layers - 1),
        special_token_ids=[101, 102],
    )


def test_flags_best_matches_and_json_of_an_analysis() -> None:
    head_js = np.array([[[0.3, 0.01], [0.2, 0.4]]])  # layer 1: head 0 matches head 1, head 1 matches head 0
    norms = np.array([[1.0, 1.0], [1.0, 0.05]])
    analysis = _analysis(head_js, np.array([[0.5, 0.1], [0.1, 0.2]]), np.array([[0.0, 0.6], [0.1, 0.1]]), norms)
    assert analysis.best_match.tolist() == [[-1, -1], [1, 0]]
    assert analysis.best_match_divergence("js")[1].tolist() == [0.01, 0.2]
    assert analysis.best_match_divergence("kl")[1].tolist() == [0.02, 0.4]
    payload = json.loads(json.dumps(analysis.to_dict(), allow_nan=False))
    assert payload["summary"] == {"sink_heads": [[0, 0]], "special_token_heads": [[0, 1]], "dormant_heads": [[1, 1]]}
    assert payload["heads"]["best_match_js"][0] == [None, None] and payload["heads"]["separability"] is None
    assert payload["adjacent_layers"][0]["layers"] == [0, 1]


# ---- the calibration sweep -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_the_sweep_does_not_depend_on_batching(family: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Batches of 3 (little padding) and one batch of 20 (much padding) give the same statistics."""
    model = build_model(family)
    calibration = make_calibration(tokenizer, token_types=family == "bert")
    one = analyze_heads(model, calibration, batch_size=20)
    many = analyze_heads(model, calibration, batch_size=3)
    assert one.causal == (family != "bert") and one.examples == 20
    for name in ("sink_score", "special_token_share", "entropy", "output_norm", "head_kl", "head_js", "layer_js"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-5, atol=1e-7, err_msg=name)
    assert one.separability is not None and one.separability.shape == (LAYERS, HEADS)
    np.testing.assert_allclose(many.separability, one.separability, rtol=1e-4, atol=1e-6)


def test_statistics_of_two_parts_merge_into_those_of_the_whole() -> None:
    parts = [HeadStatistics(2, 3) for _ in range(3)]
    mask = torch.ones(1, 5, dtype=torch.long)
    special = torch.zeros(1, 5, dtype=torch.bool)
    for seed in range(2):
        maps = [random_maps(3, 5, False, 10 * seed + layer) for layer in range(2)]
        for target in (parts[seed], parts[2]):
            target.add_layer_maps(0, maps[0], mask, special, False)
            target.add_layer_maps(1, maps[1], mask, special, False, previous=maps[0])
    merged = parts[0].merge(parts[1])
    for name in ("sink_", "entropy_", "head_js_", "layer_kl_", "map_examples_", "pair_examples_"):
        torch.testing.assert_close(getattr(merged, name), getattr(parts[2], name))
    with pytest.raises(CahpError, match="cannot merge"):
        merged.merge(HeadStatistics(3, 3))


def test_the_sweep_leaves_the_model_as_given(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model("bert", attn_implementation="sdpa").train()
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    analysis = analyze_heads(model, make_calibration(tokenizer))
    assert np.isfinite(analysis.sink_score).all() and model.training
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(weights[key], value) for key, value in model.state_dict().items())


# ---- the scorers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sink", "redundancy"])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_scorers_plan_through_the_engine_on_every_family(name: str, family: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model(family)
    calibration = make_calibration(tokenizer, examples=12, token_types=family == "bert")
    plan = Engine(model, calibration).plan(name, {"seed": 0}, Budget.keep(6))
    assert plan.method == name and plan.heads_requested == 6
    assert plan.heads_kept == 6 + len(plan.guardrail_heads)  # every layer keeps a head
    assert set(plan.kept_heads_by_layer) == set(range(LAYERS))
    assert all(plan.kept_heads_by_layer[layer] for layer in range(LAYERS))
    assert all(set(heads) <= set(range(HEADS)) for heads in plan.kept_heads_by_layer.values())
    scores = np.asarray(plan.details["scores"])
    assert scores.shape == (LAYERS, HEADS) and np.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()


def test_the_sink_scorer_removes_sink_and_special_token_heads_first(monkeypatch, tokenizer) -> None:  # type: ignore[no-untyped-def]
    sink = np.full((LAYERS, HEADS), 0.1)
    special = np.full((LAYERS, HEADS), 0.05)
    sink[1, 2] = 0.8
    special[2, 0] = 0.7
    planted = _analysis(np.full((LAYERS - 1, HEADS, HEADS), 0.3), sink, special, np.ones((LAYERS, HEADS)))
    monkeypatch.setattr("cahp.analysis.heads.analyze_heads", lambda *args, **kwargs: planted)
    scores = get_scorer("sink").score(build_model("bert"), make_calibration(tokenizer))
    assert scores[1, 2] == pytest.approx(0.2) and scores[2, 0] == pytest.approx(0.3)
    assert sorted(np.argsort(scores, axis=None)[:2].tolist()) == [1 * HEADS + 2, 2 * HEADS + 0]


def test_the_redundancy_scorer_removes_heads_repeating_the_previous_layer_first(monkeypatch, tokenizer) -> None:  # type: ignore[no-untyped-def]
    head_js = np.full((LAYERS - 1, HEADS, HEADS), 0.5)
    head_js[0, 3, 1] = 0.0  # layer 1 head 3 repeats layer 0 head 1
    head_js[1, 0, 2] = 0.01
    flat = np.full((LAYERS, HEADS), 0.1)
    planted = _analysis(head_js, flat, flat, np.ones((LAYERS, HEADS)))
    monkeypatch.setattr("cahp.analysis.heads.analyze_heads", lambda *args, **kwargs: planted)
    scores = get_scorer("redundancy").score(build_model("bert"), make_calibration(tokenizer))
    assert scores[0].tolist() == [1.0] * HEADS  # no previous layer: kept last
    assert scores[1, 3] == 0.0 and scores[2, 0] == pytest.approx(0.01 / math.log(2))
    assert np.argsort(scores, axis=None)[:2].tolist() == [1 * HEADS + 3, 2 * HEADS + 0]


@pytest.mark.parametrize("name", ["sink", "redundancy"])
def test_scorers_are_seeded_and_use_at_most_max_examples(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model("gpt2")
    calibration = make_calibration(tokenizer, examples=20)
    first = get_scorer(name, seed=1, max_examples=8)
    scores = first.score(model, calibration)
    np.testing.assert_array_equal(get_scorer(name, seed=1, max_examples=8).score(model, calibration), scores)
    assert first.analysis_.examples == 8
    assert not np.array_equal(get_scorer(name, seed=2, max_examples=8).score(model, calibration), scores)


# ---- cahp analyze ------------------------------------------------------------------------------------------------


def test_cahp_analyze_writes_the_documented_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_bert_folder(tmp_path / "model", layers=3, heads=4, num_labels=3)
    task = tiny_task_folder(tmp_path / "task", examples=30)
    out = tmp_path / "analysis.json"
    argv = ["analyze", "--model", str(model), "--task", str(task), "--out", str(out)]
    argv += ["--calibration-size", "12", "--max-length", "16", "--quiet"]
    assert main(argv) == 0
    assert "head analysis saved" in capsys.readouterr().out
    payload: dict[str, Any] = json.loads(out.read_text())
    assert payload["format"] == "cahp-head-analysis" and payload["version"] == 1
    assert payload["grid"] == {"layers": 3, "heads": 4} and payload["causal"] is False
    assert payload["examples"] == 12 and payload["model_type"] == "bert"
    assert payload["task"] == str(task) and (payload["task_name"], payload["num_labels"]) == (task.name, 3)
    assert {101, 102} <= set(payload["special_token_ids"])  # [CLS], [SEP] of MiniLM's tokenizer
    for key in ("sink_score", "special_token_share", "entropy", "output_norm", "separability", "is_sink"):
        assert np.asarray(payload["heads"][key]).shape == (3, 4), key
    shares = np.asarray(payload["heads"]["special_token_share"])
    assert (shares > 0).all() and (shares < 1).all()  # every example holds [CLS] and [SEP]
    assert [pair["layers"] for pair in payload["adjacent_layers"]] == [[0, 1], [1, 2]]
    assert np.asarray(payload["adjacent_layers"][0]["head_js"]).shape == (4, 4)
    assert payload["heads"]["best_match_previous_layer"][0] == [-1] * 4

    assert main(argv) == 1  # the file exists
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    folder = ["analyze", "--model", str(model), "--task", str(task), "--out", str(tmp_path)]
    assert main(folder) == 1
    assert "is a folder" in capsys.readouterr().err


def test_cahp_analyze_records_each_heads_cahp_cluster_and_whether_cahp_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_bert_folder(tmp_path / "model", layers=3, heads=4, num_labels=3)
    task = tiny_task_folder(tmp_path / "task", examples=30)
    out = tmp_path / "analysis.json"
    argv = ["analyze", "--model", str(model), "--task", str(task), "--out", str(out), "--cahp"]
    assert main([*argv, "--calibration-size", "24", "--max-length", "16", "--quiet"]) == 0
    assert "CAHP keeps" in capsys.readouterr().out
    found = json.loads(out.read_text())["cahp"]
    clusters, kept = np.asarray(found["cluster"]), np.asarray(found["kept"])
    assert clusters.shape == kept.shape == (3, 4)
    assert len(np.unique(clusters)) == found["k"]
    representatives = np.zeros(12, dtype=bool)
    representatives[found["representatives"]] = True
    assert (kept.reshape(-1) >= representatives).all()  # every cluster's representative is kept
    assert kept.sum() >= found["k"]


def test_cahp_analyze_measures_a_causal_lm_on_its_calibration_blocks(tmp_path: Path) -> None:
    """The causal-lm workload loads the model and draws the blocks; sinks and redundancy are measured, CAHP's
    clusters (which need classes) are refused in one line before any work."""
    from cahp.analysis.run import analyze
    from cahp.errors import CahpError
    from cahp.workloads.causal_lm import LMOptions
    from tests.unit.test_decoder import tiny_tokenizer
    from tests.unit.test_language_modeling import causal_lm, random_corpus

    causal_lm("llama").save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "corpus.txt").write_text("\n\n".join(random_corpus(documents=40).documents) + "\n")
    lm = LMOptions(corpus=str(tmp_path / "corpus.txt"), context_length=16, calibration_blocks=5, prompted=())
    out = tmp_path / "analysis.json"
    with pytest.raises(CahpError, match="compares classes"):
        analyze(str(tmp_path / "llama"), None, out, objective="causal-lm", lm=lm, cahp=True, progress=False)
    assert not out.exists()
    payload = analyze(str(tmp_path / "llama"), None, out, objective="causal-lm", lm=lm, progress=False)
    assert payload["task"] == "causal-lm" and payload["calibration"]["blocks"] == 5
    assert payload["model_type"] == "llama" and payload["num_labels"] == 0
    sinks = payload["heads"]["sink_score"]
    assert len(sinks) == 3 and all(len(row) == 4 for row in sinks)
    assert all(0.0 <= value <= 1.0 for row in sinks for value in row)
    assert payload["heads"]["separability"] is None, "no classes: no separability"
    assert len(payload["adjacent_layers"]) == 2
    assert json.loads(out.read_text())["heads"] == payload["heads"] and out.with_suffix(".html").is_file()


def test_cahp_analyze_command_line_takes_the_causal_lm_objective(tmp_path: Path) -> None:
    from cahp.cli import main
    from tests.unit.test_decoder import tiny_tokenizer
    from tests.unit.test_language_modeling import causal_lm, random_corpus

    causal_lm("llama").save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "corpus.txt").write_text("\n\n".join(random_corpus(documents=40).documents) + "\n")
    text = ["--corpus", str(tmp_path / "corpus.txt"), "--context-length", "16", "--calibration-blocks", "4"]
    assert main(["analyze", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "a.json"), *text]) == 2
    argv = ["analyze", "--objective", "causal-lm", "--model", str(tmp_path / "llama"), *text, "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["calibration"]["blocks"] == 4 and payload["calibration"]["context_length"] == 16
