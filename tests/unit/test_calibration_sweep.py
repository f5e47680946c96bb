"""The calibration sweep: signatures and gradient salience in one pass, batch orders, early stop at convergence,
and the per-process reductions of a distributed run (simulated in one process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahp import distributed
from cahp.calibration import Calibration, SequenceClassification
from cahp.data.batching import EncodedSplit
from cahp.errors import CahpError
from cahp.methods import Budget, get_method
from cahp.scoring.salience import gradient_salience
from cahp.signatures.collector import (
    CHUNK_BATCHES,
    Convergence,
    GateSalience,
    choose_batches,
    collect_signatures,
    signature_sweep,
    sweep_batches,
)
from cahp.signatures.resize import resize_attention_maps
from cahp.signatures.stats import StreamingMoments
from tests.unit.test_scorers import calibrate, make_data
from tests.unit.tiny_models import HEADS, LABELS, LAYERS, build_model

FAST_CAHP = {"tsne_iterations": 250}


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from cahp.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm-l6"))  # only pads: pad id 0 fits every tiny model


def reference_moments(model, calibration: Calibration, batch_size: int) -> StreamingMoments:  # type: ignore[no-untyped-def]
    """The signatures the straightforward way: every layer's maps from ``output_attentions``, resized per layer,
    folded in with ``StreamingMoments.add_batch`` (what the collector computed before the shared sweep)."""
    moments = StreamingMoments(LABELS)
    groups = calibration.groups()
    with torch.inference_mode():
        for indices, batch in calibration.indexed_batches(batch_size, sort_by_length=True):
            attentions = calibration.forward(model, batch, output_attentions=True).attentions
            values = torch.cat([resize_attention_maps(a, batch["attention_mask"]) for a in attentions], dim=1)
            moments.add_batch(values, groups[indices])
    return moments


def assert_same_moments(actual: StreamingMoments, expected: StreamingMoments) -> None:
    """Equal up to float32 rounding: the two sweeps batch the examples differently, so their attention maps come
    from differently padded float32 forwards (equal to ~1e-7 relative; which kernel a CPU runs decides the last
    digits: variances of maps near 0.02 then differ by a few 1e-8)."""
    np.testing.assert_array_equal(actual.count_, expected.count_)
    np.testing.assert_allclose(actual.mean_, expected.mean_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(actual.variance(1), expected.variance(1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["bert", "mpnet"])  # MPNet returns its maps only with output_attentions
def test_shared_sweep_gives_the_signatures_of_the_plain_collector(family: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model(family, "eager")
    calibration = calibrate(tokenizer, make_data(24, seed=1))
    expected = reference_moments(model, calibration, batch_size=5)
    assert_same_moments(collect_signatures(model, calibration, batch_size=5, progress=False), expected)
    salience = GateSalience(choose_batches(5, 0.5, seed=3), LAYERS, HEADS, "cpu")
    for order in ("sorted", "shuffled"):
        result = signature_sweep(
            model, calibration, batch_size=5, order=order, seed=7, consumers=[salience], progress=False
        )
        assert_same_moments(result.moments, expected)
        assert result.examples == 24 and result.batches == result.total_batches == 5
    assert salience.batches == 2 * 3, "3 of 5 batches per sweep take the gradient"
    assert all(p.grad is None and p.requires_grad for p in model.parameters()), "weights untouched, flags restored"


def test_shared_salience_equals_the_gradient_scorer_on_the_same_batches(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_model("bert", "sdpa")  # the scorer runs sdpa, the sweep eager: the same gradient to float rounding
    calibration = calibrate(tokenizer, make_data(30, seed=2))
    batch_size, fraction, seed = 4, 0.5, 11
    expected = gradient_salience(
        model, calibration, batch_size=batch_size, fraction=fraction, seed=seed, progress=False
    )
    # the scorer's batches: its seeded shuffle, the first ceil(fraction * 8) = 4 of them
    order = [indices for indices, _ in calibration.indexed_batches(batch_size, shuffle=True, seed=seed)]
    salience = GateSalience(range(4), LAYERS, HEADS, "cpu")
    signature_sweep(model, calibration, batches=order, consumers=[salience], progress=False)
    np.testing.assert_allclose(salience.result(), expected, rtol=1e-5, atol=1e-8)
    assert model.config._attn_implementation == "sdpa"


def test_cahp_shared_and_separate_sweeps_agree_when_one_batch_holds_every_example(tokenizer) -> None:  # type: ignore[no-untyped-def]
    calibration = calibrate(tokenizer, make_data(20, seed=3))
    fits = {}
    for sweep in ("separate", "shared"):
        settings = {"fraction": 1.0, "batch_size": 64}
        method = get_method("cahp", sweep=sweep, batch_size=64, salience_settings=settings, **FAST_CAHP)
        fits[sweep] = method.fit(build_model("bert", "eager"), calibration)
    np.testing.assert_allclose(fits["shared"].salience_, fits["separate"].salience_, rtol=1e-5)
    np.testing.assert_allclose(fits["shared"].selector_.profiles_, fits["separate"].selector_.profiles_, atol=1e-9)
    details = fits["shared"].plan(Budget.auto()).details
    assert set(details["stage_seconds"]) == {"signatures", "salience", "selection"}
    assert details["calibration"]["sweep"] == "shared" and details["calibration"]["salience_batches"] == 1


def repeated_calibration(tokenizer, distinct: int = 6, repeats: int = 40) -> Calibration:  # type: ignore[no-untyped-def]
    """Stationary statistics: the same few examples over and over."""
    data = make_data(distinct, seed=4)
    data.labels[:3] = [0, 1, 2]  # every class present
    features = data.features * repeats
    return Calibration(EncodedSplit(features, np.tile(data.labels, repeats)), tokenizer, SequenceClassification(LABELS))


@pytest.mark.parametrize("sweep", ["separate", "shared"])
def test_convergence_stops_early_on_stationary_statistics_and_never_with_tol_zero(sweep: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    calibration = repeated_calibration(tokenizer)  # 240 examples, 30 batches of 8
    common = {"sweep": sweep, "batch_size": 8, "converge_window": 3, "converge_min_examples": 48, **FAST_CAHP}
    model = build_model("bert", "eager")
    early = get_method("cahp", converge_tol=0.05, **common).fit(model, calibration)
    record = early.calibration_
    assert record["converged"] and record["order"] == "shuffled"
    assert 48 <= record["examples"] < 240 and record["batches"] < record["batches_total"] == 30
    assert record["converged_at"] == {"batches": record["batches"], "examples": record["examples"]}
    assert record["change_history"][-1]["change"] < 0.05
    assert early.plan(Budget.auto()).details["calibration"]["converged_at"] == record["converged_at"]
    if sweep == "shared":
        assert 1 <= record["salience_batches"] <= record["batches"]

    never = get_method("cahp", converge_tol=0.0, **common).fit(model, calibration).calibration_
    assert not never["converged"] and never["examples"] == 240 and never["batches"] == 30
    assert len(never["change_history"]) == 10 and never["change_history"][0]["change"] is None


def test_separate_salience_after_an_early_stop_uses_only_the_examples_seen(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cahp.scoring.gradient import GradientScorer

    seen_sizes: list[int] = []
    original = GradientScorer._score

    def recording(self, model, calibration):  # type: ignore[no-untyped-def]
        seen_sizes.append(len(calibration))
        return original(self, model, calibration)

    monkeypatch.setattr(GradientScorer, "_score", recording)
    settings = {"converge_tol": 0.05, "batch_size": 8, "converge_window": 3, "converge_min_examples": 0, **FAST_CAHP}
    method = get_method("cahp", **settings)
    method.fit(build_model("bert", "eager"), repeated_calibration(tokenizer))
    assert seen_sizes == [method.calibration_["examples"]] and seen_sizes[0] < 240


def test_batch_orders_and_the_salience_choice_are_seeded() -> None:
    lengths = np.random.default_rng(0).integers(3, 50, 100)
    sorted_batches = sweep_batches(lengths, 4)
    assert np.array_equal(np.concatenate(sorted_batches), np.argsort(lengths, kind="stable"))
    shuffled = sweep_batches(lengths, 4, order="shuffled", seed=5)
    flat = np.concatenate(shuffled)
    assert sorted(flat.tolist()) == list(range(100)) and [len(b) for b in shuffled] == [4] * 25
    chunk = 4 * CHUNK_BATCHES
    assert all(np.all(np.diff(lengths[flat[i : i + chunk]]) >= 0) for i in range(0, 100, chunk))
    assert np.array_equal(flat, np.concatenate(sweep_batches(lengths, 4, order="shuffled", seed=5)))
    assert not np.array_equal(flat, np.concatenate(sweep_batches(lengths, 4, order="shuffled", seed=6)))
    windows = np.concatenate(sweep_batches(lengths, 4, order="shuffled", seed=5, chunk_batches=3))
    assert all(np.all(np.diff(lengths[windows[i : i + 12]]) >= 0) for i in range(0, 100, 12)), "sorted per window"
    assert not all(np.all(np.diff(lengths[windows[i : i + 24]]) >= 0) for i in range(0, 100, 24))
    first = np.concatenate(shuffled[:5])
    assert lengths[first].max() > np.sort(lengths)[19], "a prefix is a sample, not the shortest examples"

    chosen = choose_batches(40, 0.25, seed=1)
    assert len(chosen) == 10 and np.array_equal(chosen, choose_batches(40, 0.25, seed=1))
    assert not np.array_equal(chosen, np.arange(10)) and not np.array_equal(chosen, choose_batches(40, 0.25, seed=2))
    assert len(choose_batches(3, 0.01, seed=0)) == 1
    with pytest.raises(CahpError, match=r"in \(0, 1\]"):
        choose_batches(10, 0.0, seed=0)
    with pytest.raises(CahpError, match="'sorted' or 'shuffled'"):
        sweep_batches(lengths, 4, order="random")  # type: ignore[arg-type]


def test_settings_that_cannot_work_are_refused_before_any_work(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CahpError, match="sweep must be one of"):
        get_method("cahp", sweep="both")
    with pytest.raises(CahpError, match="use sweep='separate'"):
        get_method("cahp", sweep="shared", salience="fisher")
    with pytest.raises(CahpError, match="max_examples does not apply"):
        get_method("cahp", sweep="shared", salience_settings={"max_examples": 10})
    with pytest.raises(CahpError, match="converge_tol"):
        get_method("cahp", converge_tol=-1.0)
    with pytest.raises(CahpError, match="needs the 'shuffled' order"):
        convergence = Convergence(tol=0.1, window=2, min_examples=0, statistic=lambda m: m.mean_)
        signature_sweep(build_model("bert"), calibrate(tokenizer, make_data()), convergence=convergence)


def test_each_process_sweeps_its_share_and_the_statistics_are_reduced(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two processes simulated one after the other: disjoint batch shares, moments merged before every
    convergence check and before returning, salience sums and batch counts summed before the division."""
    model = build_model("bert", "eager")
    calibration = calibrate(tokenizer, make_data(28, seed=5))  # 7 batches of 4
    expected = reference_moments(model, calibration, batch_size=4)
    merged: list[int] = []
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "merge_moments", lambda moments: merged.append(1) or moments)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensor: reduced.append(tensor) or tensor)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        salience = GateSalience(range(7), LAYERS, HEADS, "cpu")
        convergence = Convergence(tol=0.0, window=3, min_examples=0, statistic=lambda m: m.mean_)
        result = signature_sweep(
            model,
            calibration,
            batch_size=4,
            order="shuffled",
            consumers=[salience],
            convergence=convergence,
            progress=False,
        )
        salience.result()
        shares.append((result.moments, salience.batches))
        assert result.batches == 7 and result.examples == 28, "the counts are of the whole sweep"
    assert [batches for _, batches in shares] == [4, 3], "batch p goes to process p % 2"
    assert len(merged) == 2 * (3 + 1), "merged at each of the 3 windows and at the end"
    assert [tuple(t.shape) for t in reduced] == [(LAYERS, HEADS), (1,)] * 2
    combined = StreamingMoments(LABELS).merge(shares[0][0]).merge(shares[1][0])
    assert_same_moments(combined, expected)


def test_cli_shortcuts_set_the_sweep_and_convergence_settings() -> None:
    from cahp.cli import build_parser
    from cahp.commands.prune import prune_config

    args = ["prune", "--model", "m", "--out", "o", "--sweep", "shared", "--converge-tol", "0.02"]
    settings = prune_config(build_parser().parse_args([*args, "--converge-window", "4"])).method_settings
    assert settings == {"sweep": "shared", "converge_tol": 0.02, "converge_window": 4}
    assert get_method("cahp", **settings).get_settings()["converge_window"] == 4


def test_the_sweep_does_not_stop_before_the_salience_had_a_batch(tokenizer) -> None:  # type: ignore[no-untyped-def]
    calibration = calibrate(tokenizer, make_data(24, seed=6))  # 6 batches of 4
    salience = GateSalience([5], LAYERS, HEADS, "cpu")  # only the last batch
    convergence = Convergence(tol=1e9, window=1, min_examples=0, statistic=lambda m: m.mean_)
    result = signature_sweep(
        build_model("bert", "eager"),
        calibration,
        batch_size=4,
        order="shuffled",
        consumers=[salience],
        convergence=convergence,
        progress=False,
    )
    assert result.batches == 6 and salience.batches == 1
    assert convergence.converged_at == {"batches": 6, "examples": 24}, "it converged, at the last batch"


def test_batch_moments_keep_the_small_variance_of_a_nearly_constant_feature() -> None:
    """Regression: the batch's sum of squared deviations was ``sum x^2 - n mean^2``, which cancels to rounding
    noise for a feature near 1 with a variance of 1e-14; deviations from the class mean keep it."""
    from cahp.signatures.collector import _add_batch

    generator = torch.Generator().manual_seed(0)
    values = 1.0 - 1e-7 * torch.rand(32, 2, 3, generator=generator, dtype=torch.float64)
    groups = torch.arange(32) % 2
    fast, reference = StreamingMoments(2), StreamingMoments(2)
    _add_batch(fast, values, groups, 2)
    reference.add_batch(values, groups)
    np.testing.assert_allclose(fast.variance(ddof=1), reference.variance(ddof=1), rtol=1e-6)
    np.testing.assert_allclose(fast.mean_, reference.mean_, rtol=0, atol=1e-15)
