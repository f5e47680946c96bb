"""Unit tests of CAHP's numeric building blocks: statistics, resizing, separability, clustering, knee,
representatives. No models, no downloads; small N."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cahp.errors import CahpError, DataError
from cahp.methods import Budget, Constraints, HeadGrid, method_info, select_heads
from cahp.methods.cahp import cluster_priority
from cahp.scoring import (
    bhattacharyya_distance,
    class_pairs,
    jeffries_matusita_distance,
    separability_profiles,
)
from cahp.selection import (
    cluster_heads,
    effective_perplexity,
    embed_heads,
    find_knee,
    head_distances,
    mean_simplified_silhouette,
    normalize_salience,
    select_representatives,
    sweep_k,
)
from cahp.selection.cahp import CAHPSelector
from cahp.selection.clustering import Clustering, distinct_points
from cahp.signatures import StreamingMoments, interpolation_matrices, resize_attention_maps

# ---------------------------------------------------------------------------------------------- stats


def _random_batches(rng: np.random.Generator, n_batches: int, feature_shape: tuple[int, ...], classes: int):
    for _ in range(n_batches):
        size = int(rng.integers(0, 9))
        yield rng.normal(3.0, 2.0, (size, *feature_shape)), rng.integers(0, classes, size)


@pytest.mark.parametrize("feature_shape", [(5,), (4, 6)])
def test_streaming_moments_match_numpy(feature_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    batches = list(_random_batches(rng, 12, feature_shape, classes=3))
    moments = StreamingMoments(n_groups=4)  # group 3 never appears
    for values, labels in batches:
        moments.add_batch(torch.from_numpy(values).float(), torch.from_numpy(labels))
    values = np.concatenate([v.astype(np.float32).astype(np.float64) for v, _ in batches])
    labels = np.concatenate([lab for _, lab in batches])
    for group in range(3):
        members = values[labels == group]
        assert moments.count_[group] == members.shape[0]
        np.testing.assert_allclose(moments.mean_[group], members.mean(axis=0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(moments.var_[group], members.var(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(moments.variance(ddof=1)[group], members.var(axis=0, ddof=1), rtol=1e-9)
    assert moments.count_[3] == 0
    assert np.isnan(moments.mean_[3]).all() and np.isnan(moments.var_[3]).all()
    assert moments.mean_.shape == (4, *feature_shape)


def test_streaming_moments_merge_equals_single_pass_and_is_stable() -> None:
    rng = np.random.default_rng(1)
    # Large offset, small spread: the naive sum-of-squares formula loses every digit here.
    values = 1e6 + rng.normal(0.0, 1e-2, (200, 3, 7))
    labels = rng.integers(0, 2, 200)
    whole = StreamingMoments(2).add_batch(values, labels)
    left = StreamingMoments(2).add_batch(values[:70], labels[:70])
    right = StreamingMoments(2)
    for start in range(70, 200, 13):
        right.add_batch(values[start : start + 13], labels[start : start + 13])
    merged = left.merge(right)
    np.testing.assert_array_equal(merged.count_, whole.count_)
    np.testing.assert_allclose(merged.mean_, whole.mean_, rtol=1e-14)
    np.testing.assert_allclose(merged.var_, whole.var_, rtol=1e-8)
    for group in range(2):
        np.testing.assert_allclose(whole.var_[group], values[labels == group].var(axis=0), rtol=1e-7)


def test_streaming_moments_save_load_and_errors(tmp_path) -> None:
    rng = np.random.default_rng(2)
    moments = StreamingMoments(3).add_batch(rng.normal(size=(10, 2, 4)), rng.integers(0, 3, 10))
    path = tmp_path / "stats.npz"
    moments.save(path)
    loaded = StreamingMoments.load(path)
    np.testing.assert_array_equal(loaded.count_, moments.count_)
    np.testing.assert_array_equal(loaded.m2_, moments.m2_)
    # Resuming from a checkpoint equals never stopping.
    extra = rng.normal(size=(5, 2, 4)), rng.integers(0, 3, 5)
    loaded.add_batch(*extra)
    moments.add_batch(*extra)
    np.testing.assert_allclose(loaded.mean_, moments.mean_, rtol=1e-14)
    restored = StreamingMoments(3).load_state_dict(moments.state_dict())
    np.testing.assert_array_equal(restored.var_, moments.var_)
    with pytest.raises(CahpError, match="group indices"):
        moments.add_batch(rng.normal(size=(2, 2, 4)), np.array([0, 3]))
    with pytest.raises(CahpError, match="feature shape"):
        moments.add_batch(rng.normal(size=(2, 4)), np.array([0, 1]))
    with pytest.raises(CahpError, match="no data"):
        _ = StreamingMoments(2).mean_


# --------------------------------------------------------------------------------------------- resize


def _padded(maps: torch.Tensor, total: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed [heads, n, n] maps into [heads, total, total] with junk at pad positions, plus the mask."""
    heads, n, _ = maps.shape
    start = 0 if side == "right" else total - n
    out = torch.rand(heads, total, total)  # junk that must never leak into the signature
    out[:, start : start + n, start : start + n] = maps
    mask = torch.zeros(total, dtype=torch.int64)
    mask[start : start + n] = 1
    return out, mask


@pytest.mark.parametrize("n", [1, 2, 7, 32, 45])
@pytest.mark.parametrize("side", ["right", "left"])
def test_resize_matches_interpolate_on_crop(n: int, side: str) -> None:
    torch.manual_seed(n)
    size, total = 32, 48
    crops = [torch.softmax(torch.randn(6, m, m), -1) for m in (n, max(1, n // 2), total)]
    padded = [_padded(c, total, side) for c in crops]
    attentions = torch.stack([p for p, _ in padded])
    mask = torch.stack([m for _, m in padded])
    out = resize_attention_maps(attentions, mask, size)
    assert out.shape == (3, 6, size * size)
    for example, crop in enumerate(crops):
        expected = F.interpolate(crop[:, None], size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[example], expected.flatten(1), atol=1e-6, rtol=0)


def test_resize_is_invariant_to_padding_length_and_side() -> None:
    torch.manual_seed(0)
    crop = torch.softmax(torch.randn(4, 11, 11), -1)
    variants = [_padded(crop, total, side) for total in (11, 16, 40) for side in ("left", "right")]
    outputs = [resize_attention_maps(p[None], m[None], 8)[0] for p, m in variants]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=1e-6, rtol=0)
    unpadded = resize_attention_maps(crop[None], None, 8)[0]
    torch.testing.assert_close(unpadded, outputs[0], atol=1e-6, rtol=0)


def test_interpolation_matrices_rows_sum_to_one_and_ignore_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    matrices = interpolation_matrices(mask, size=4, dtype=torch.float64)
    torch.testing.assert_close(matrices.sum(-1), torch.ones(3, 4, dtype=torch.float64))
    assert (matrices[mask[:, None, :].expand_as(matrices) == 0] == 0).all()
    with pytest.raises(CahpError, match="no real tokens"):
        interpolation_matrices(torch.tensor([[1, 1], [0, 0]]), size=4)


# ---------------------------------------------------------------------------------------- separability


def test_bhattacharyya_and_jm_hand_values() -> None:
    # Equal variances 1, means 0 and 2: B = 1/4 * 4 / 2 + 1/2 ln(1) = 0.5.
    assert bhattacharyya_distance(0.0, 1.0, 2.0, 1.0) == pytest.approx(0.5, abs=1e-15)
    assert jeffries_matusita_distance(0.0, 1.0, 2.0, 1.0) == pytest.approx(2 * (1 - math.exp(-0.5)), abs=1e-15)
    # Equal means, variances 1 and 4: B = 1/2 ln(5 / (2 * 2)).
    assert bhattacharyya_distance(1.0, 1.0, 1.0, 4.0) == pytest.approx(0.5 * math.log(1.25), abs=1e-15)
    # Variance floor 1e-6: zero variances behave like 1e-6 (and NaN, an undefined variance, too).
    assert bhattacharyya_distance(0.0, 0.0, 1e-3, np.nan) == pytest.approx(0.25 * 1e-6 / 2e-6)


def test_jm_properties() -> None:
    rng = np.random.default_rng(3)
    mean_a, mean_b = rng.normal(size=50), rng.normal(size=50)
    var_a, var_b = rng.uniform(0.01, 2, 50), rng.uniform(0.01, 2, 50)
    np.testing.assert_array_equal(jeffries_matusita_distance(mean_a, var_a, mean_a, var_a), 0.0)
    np.testing.assert_allclose(
        jeffries_matusita_distance(mean_a, var_a, mean_b, var_b),
        jeffries_matusita_distance(mean_b, var_b, mean_a, var_a),
        rtol=1e-15,
    )
    separations = np.linspace(0, 10, 200)
    jm = jeffries_matusita_distance(0.0, 1.0, separations, 1.0)
    assert jm[0] == 0.0 and np.all(np.diff(jm) > 0)  # strictly increasing with the mean separation
    assert np.all(jm < 2.0)
    assert jeffries_matusita_distance(0.0, 1.0, 100.0, 1.0) == pytest.approx(2.0, abs=1e-12)


def test_separability_profiles_layout_and_missing_classes() -> None:
    rng = np.random.default_rng(4)
    n_classes, n_heads, n_features = 4, 3, 5
    means = rng.normal(size=(n_classes, n_heads, n_features))
    variances = rng.uniform(0.1, 1, (n_classes, n_heads, n_features))
    profiles = separability_profiles(means, variances)
    pairs = class_pairs(n_classes)
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert profiles.shape == (n_heads, n_features * len(pairs))
    for p, (a, b) in enumerate(pairs):  # pair-major: block p holds the D features of pair p
        block = profiles[:, p * n_features : (p + 1) * n_features]
        np.testing.assert_allclose(block, jeffries_matusita_distance(means[a], variances[a], means[b], variances[b]))
    bhat = separability_profiles(means, variances, metric="bhattacharyya")
    np.testing.assert_allclose(profiles, 2 * (1 - np.exp(-bhat)), rtol=1e-12)
    means[2] = np.nan  # class 2 never seen
    masked = separability_profiles(means, variances, counts=np.array([5, 5, 0, 5]))
    for p, (a, b) in enumerate(pairs):
        block = masked[:, p * n_features : (p + 1) * n_features]
        if 2 in (a, b):
            assert (block == 0).all()
        else:
            np.testing.assert_allclose(block, profiles[:, p * n_features : (p + 1) * n_features])
    assert separability_profiles(means[:1], variances[:1]).shape == (n_heads, 0)


# ------------------------------------------------------------------------------------------ clustering


def test_mss_hand_example_uses_mean_and_excludes_zero_intra() -> None:
    points = np.array([[0.0], [1.0], [10.0], [12.0], [30.0]])
    distances = head_distances(points)
    labels, medoids = np.array([0, 0, 1, 1, 2]), np.array([0, 2, 4])
    # a = [0, 1, 0, 2, 0]; b = mean distance to the two other medoids.
    b1, b3 = (9 + 29) / 2, (12 + 18) / 2
    expected = ((b1 - 1) / b1 + (b3 - 2) / b3) / 2
    assert mean_simplified_silhouette(distances, labels, medoids) == pytest.approx(expected, abs=1e-14)
    textbook = (1 + (b1 - 1) / b1 + 1 + (b3 - 2) / b3 + 1) / 5
    assert mean_simplified_silhouette(distances, labels, medoids, exclude_zero_intra=False) == pytest.approx(
        textbook, abs=1e-14
    )
    # Every head on its medoid -> 1.
    duplicated = head_distances(np.array([[0.0], [0.0], [5.0], [5.0]]))
    assert mean_simplified_silhouette(duplicated, np.array([0, 0, 1, 1]), np.array([0, 2])) == 1.0


def test_sweep_k_stops_when_mss_reaches_one_and_is_deterministic() -> None:
    rng = np.random.default_rng(5)
    groups = rng.permutation(np.arange(20) % 5)
    profiles = rng.uniform(0, 2, (5, 40))[groups]  # 5 distinct profiles, each used by 4 heads
    distances = head_distances(embed_heads(profiles, method="none"))
    sweep = sweep_k(distances, seed=0)
    assert sweep.ks.tolist() == list(range(2, 20))
    assert sweep.stopped_at == 5
    assert np.all(sweep.mss[sweep.ks >= 5] == 1.0) and np.all(sweep.mss[sweep.ks < 5] < 1.0)
    assert sorted(sweep.clusterings) == [2, 3, 4, 5]
    partial = sweep_k(distances, k_range=range(2, 4), seed=0)
    recomputed = partial.clustering(4)  # a k the sweep did not cluster is computed on demand, same seed
    assert recomputed.k == 4 and 4 in partial.clusterings
    np.testing.assert_array_equal(recomputed.labels, sweep.clustering(4).labels)
    # Past the 5 distinct points k is capped: coinciding heads cannot be told apart, each group is one cluster.
    capped = sweep.clustering(7)
    assert capped.k == 5 and capped.loss == 0.0
    assert len({(int(g), int(c)) for g, c in zip(groups, capped.labels, strict=True)}) == 5
    assert sweep.n_distinct_points == 5
    again = sweep_k(distances, seed=0)
    np.testing.assert_array_equal(again.mss, sweep.mss)
    np.testing.assert_array_equal(again.clustering(3).labels, sweep.clustering(3).labels)
    no_stop = sweep_k(distances, k_range=range(2, 9), seed=0, early_stop=False)
    assert no_stop.stopped_at is None and sorted(no_stop.clusterings) == list(range(2, 9))


def test_embed_heads_tsne_shapes_determinism_and_tiny_inputs() -> None:
    rng = np.random.default_rng(6)
    profiles = rng.normal(size=(24, 30))
    first = embed_heads(profiles, perplexity=5, n_iter=250, seed=1)
    second = embed_heads(profiles, perplexity=5, n_iter=250, seed=1)
    assert first.shape == (24, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    assert effective_perplexity(24, 10) == 10 and effective_perplexity(4, 10) == 1.0
    with pytest.warns(UserWarning, match="perplexity"):
        tiny = embed_heads(profiles[:4], n_iter=250, seed=1)
    assert tiny.shape == (4, 2) and np.isfinite(tiny).all()
    pair = embed_heads(profiles[:2])
    assert head_distances(pair)[0, 1] == pytest.approx(np.linalg.norm(profiles[0] - profiles[1]))
    assert embed_heads(profiles[:1]).shape == (1, 2)
    assert sweep_k(head_distances(pair)).ks.size == 0  # k = 2 .. N-1 is empty for N = 2
    with pytest.raises(CahpError):
        cluster_heads(head_distances(pair), 3)


def test_tsne_head_space_does_not_depend_on_the_thread_count() -> None:
    """Barnes-Hut t-SNE sums gradients in parallel, so the thread count alone used to move the head space
    (and k*); the embedding runs on one thread, so a 2-core laptop and a 16-core server agree."""
    from threadpoolctl import threadpool_limits

    profiles = np.random.default_rng(0).normal(size=(72, 1024)).astype(np.float32)
    embeddings = []
    for threads in (1, 2, 4):
        with threadpool_limits(limits=threads):
            embeddings.append(embed_heads(profiles, n_iter=300, seed=0))
    for other in embeddings[1:]:
        np.testing.assert_array_equal(other, embeddings[0])


# ----------------------------------------------------------------------------------------------- knee


def test_knee_on_clear_concave_curve() -> None:
    ks = np.arange(2, 60)
    result = find_knee(ks, np.minimum(ks / 12.0, 1.0) - 0.002 * (ks - 12).clip(0))
    assert result.method == "kneedle" and result.fallback is None
    assert 10 <= result.k <= 15
    assert result.degree == 6 and result.coefficients.shape == (7,)
    # Fitting on normalised k gives the same polynomial as fitting on raw k.
    raw_fit = np.polyval(np.polyfit(ks, result.mss, 6), ks)
    np.testing.assert_allclose(result.fitted, raw_fit, atol=1e-8)
    np.testing.assert_allclose(result.fitted_at(ks), result.fitted, atol=1e-12)
    smooth = find_knee(ks, 1 - np.exp(-ks / 6.0))
    assert smooth.method == "kneedle" and 8 <= smooth.k <= 20


@pytest.mark.parametrize(
    ("name", "ks", "mss", "expected_k"),
    [
        ("convex", np.arange(2, 40), (np.arange(2, 40) / 40.0) ** 3, 39),
        ("flat", np.arange(2, 30), np.full(28, 0.4), 2),
        ("decreasing", np.arange(2, 30), 1.0 / np.arange(2, 30), 2),
        ("two points", np.array([2, 3]), np.array([0.3, 0.5]), 3),
        ("one point", np.array([2]), np.array([0.3]), 2),
        ("nan", np.arange(2, 10), np.array([0.1, 0.5, np.nan, 0.7, 0.8, 0.8, 0.8, 0.8]), 6),
    ],
)
def test_knee_fallbacks_never_crash(name: str, ks: np.ndarray, mss: np.ndarray, expected_k: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RankWarning / RuntimeWarning leaks either
        result = find_knee(ks, mss)
    assert result.method == "fallback", name
    assert isinstance(result.fallback, str) and "took" in result.fallback
    assert result.k == expected_k


def test_knee_step_curve_from_early_stop_falls_back_to_first_perfect_k() -> None:
    ks = np.arange(2, 24)
    mss = np.where(ks >= 6, 1.0, 0.05)  # MSS jumps to 1 at k = 6 and is padded with 1
    result = find_knee(ks, mss)
    assert result.k == 6
    with pytest.raises(CahpError):
        find_knee(np.array([]), np.array([]))


def _kneed(ks: np.ndarray, mss: np.ndarray, online: bool = False):
    """The reference Kneedle (``kneed``, a dev dependency) with the reference's settings."""
    import kneed  # not importorskip: the comparison must run (pip install -e '.[dev]')

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kneed.KneeLocator(
            ks,
            mss,
            curve="concave",
            direction="increasing",
            interp_method="polynomial",
            polynomial_degree=6,
            online=online,
        )


def _curve(rng: np.random.Generator, shape: str, ks: np.ndarray) -> np.ndarray:
    noise = rng.normal(0, 0.01, ks.size)
    if shape == "saturating":
        return 1 - np.exp(-ks / rng.uniform(2, 30)) + noise
    if shape == "sigmoid":  # slow start, steep rise, plateau: a local minimum of the difference curve
        return 1 / (1 + np.exp(-(ks - rng.uniform(3, ks[-1])) / rng.uniform(1, 10))) + noise
    if shape == "dip then rise":  # high MSS at k = 2, a dip, then a concave rise
        return rng.uniform(0.2, 0.7) * np.exp(-ks / rng.uniform(1, 5)) + 1 - np.exp(-ks / rng.uniform(5, 30)) + noise
    return np.cumsum(rng.normal(0.01, 0.03, ks.size))  # random walk


@pytest.mark.parametrize("shape", ["saturating", "sigmoid", "dip then rise", "random walk"])
def test_kneedle_matches_kneed_on_many_curves(shape: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        ks = np.arange(2, int(rng.integers(8, 150)))
        mss = _curve(rng, shape, ks)
        result = find_knee(ks, mss)
        reference = _kneed(ks, mss)
        assert result.kneedle_k == (None if reference.knee is None else int(reference.knee)), (shape, ks.size)
        every = _kneed(ks, mss, online=True).all_knees  # the whole walk, in order
        assert list(result.all_knees) == [int(k) for k in every], (shape, ks.size)


def _dip_then_rise(ks: np.ndarray) -> np.ndarray:
    return 0.2 * np.exp(-(ks - 2) / 2.0) + 0.9 * (1 - np.exp(-(ks - 2) / 18.0))


def test_knee_after_a_local_minimum_of_the_difference_curve_is_kneeds() -> None:
    """Regression: after a local minimum the walk used to go on detecting with threshold 0, so a dip of the
    difference curve below 0 returned the endpoint k = 2, rejected, and the fallback kept k = 71 of 72 heads.
    kneed disarms detection after a minimum until the next maximum and finds the knee at 29."""
    ks = np.arange(2, 72)  # a 6 x 12 model: k = 2 .. N - 1
    result = find_knee(ks, _dip_then_rise(ks))
    assert result.method == "kneedle" and result.fallback is None
    assert result.k == result.kneedle_k == 29
    assert _kneed(ks, _dip_then_rise(ks)).knee == 29


def test_knee_when_kneeds_first_knee_is_the_endpoint() -> None:
    """Deliberate difference: on a sigmoid the fitted curve falls right after k = 2, so Kneedle's first knee is
    the endpoint (the reference would keep 2 clusters); we take the walk's next knee, at the top of the rise."""
    ks = np.arange(2, 72)
    mss = 1 / (1 + np.exp(-(ks - 20) / 4.0))
    reference = _kneed(ks, mss, online=True)
    assert _kneed(ks, mss).knee == 2 and len(reference.all_knees) >= 2
    result = find_knee(ks, mss)
    assert result.kneedle_k == 2 and result.method == "kneedle"
    assert result.k == int(reference.all_knees[1]) and 25 <= result.k <= 40


# ------------------------------------------------------------------------------------- representatives


def test_budget_rules_and_salience_normalisation() -> None:
    assert Budget.sparsity(0.5).heads(72) == 36
    assert Budget.sparsity(0.5).heads(5) == 3  # 2.5 rounds half up
    assert Budget.sparsity(0.99).heads(10) == 1
    assert Budget.keep(20).heads(72) == 20
    with pytest.raises(CahpError):
        Budget.keep(0)
    with pytest.raises(CahpError):
        Budget.sparsity(1.0)
    normalised = normalize_salience(np.array([[2.0, 4.0], [3.0, 6.0]]))
    np.testing.assert_allclose(normalised, [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(normalize_salience(np.full((2, 3), 7.0)), np.ones((2, 3)))


def _grouped_heads(seed: int, n_layers: int = 4, heads_per_layer: int = 6, n_groups: int = 6):
    rng = np.random.default_rng(seed)
    n_heads = n_layers * heads_per_layer
    groups = rng.permutation(np.arange(n_heads) % n_groups)
    profiles = rng.uniform(0, 2, (n_groups, 64))[groups] + rng.normal(0, 1e-4, (n_heads, 64))
    salience = rng.uniform(size=(n_layers, heads_per_layer))
    return groups, profiles, salience


@pytest.mark.parametrize("embedding", ["none", "tsne"])
def test_duplicated_groups_keep_exactly_the_most_salient_head_of_each(embedding: str) -> None:
    groups, profiles, salience = _grouped_heads(8)
    points = embed_heads(profiles, method=embedding, perplexity=5, n_iter=500, seed=0)
    clustering = cluster_heads(head_distances(points), 6, seed=0)
    selection = select_representatives(clustering.labels, salience, allow_empty_layers=True)
    flat = salience.reshape(-1)
    expected = {int(np.flatnonzero(groups == g)[np.argmax(flat[groups == g])]) for g in range(6)}
    assert set(selection.representatives) == expected
    kept = {layer * 6 + head for layer, heads in selection.kept_heads_by_layer.items() for head in heads}
    assert kept == expected and selection.n_kept == 6
    assert len(selection.removed_heads) == 18
    medoid_selection = select_representatives(
        clustering.labels, salience, clustering.medoids, representative="medoid", allow_empty_layers=True
    )
    assert sorted(groups[medoid_selection.representatives].tolist()) == list(range(6))


def test_automatic_head_count_on_duplicated_groups() -> None:
    _, profiles, _ = _grouped_heads(9)
    sweep = sweep_k(head_distances(embed_heads(profiles, method="none")), seed=0)
    knee = find_knee(sweep.ks, sweep.mss)
    assert 6 <= knee.k <= 8  # 6 true groups; the polynomial fit may place the knee just past the corner


def test_guardrail_keeps_most_salient_head_of_an_empty_layer() -> None:
    # 3 layers x 2 heads. Clusters {2}, {1, 3}, {0, 4, 5}: layer 2's heads (4, 5) only sit in a cluster
    # that head 0 (salience 0.9) represents, so layer 2 would be empty without the guardrail.
    labels = np.array([2, 1, 0, 1, 2, 2])
    salience = np.array([[0.9, 0.8], [0.1, 0.2], [0.3, 0.5]])
    selection = select_representatives(labels, salience)
    assert selection.representatives == [2, 1, 0]
    assert selection.kept_heads_by_layer == {0: [0, 1], 1: [0], 2: [1]}
    assert selection.guardrail_heads == [(2, 1)] and selection.n_guardrail_added == 1
    assert selection.heads_to_prune == {1: [1], 2: [0]}
    allowed = select_representatives(labels, salience, allow_empty_layers=True)
    assert allowed.kept_heads_by_layer[2] == [] and allowed.n_guardrail_added == 0
    assert allowed.heads_to_prune[2] == [0, 1]


def test_whole_selection_is_deterministic_for_a_seed() -> None:
    _, profiles, salience = _grouped_heads(10)

    def run() -> tuple[int, dict[int, list[int]]]:
        points = embed_heads(profiles, perplexity=5, n_iter=300, seed=3)
        sweep = sweep_k(head_distances(points), seed=3)
        knee = find_knee(sweep.ks, sweep.mss)
        return knee.k, select_representatives(sweep.clustering(knee.k).labels, salience).kept_heads_by_layer

    assert run() == run()


# ------------------------------------------------------------------------------- degenerate head spaces


def test_embed_heads_identical_or_empty_profiles_are_one_point_not_a_crash() -> None:
    """Regression: t-SNE's PCA start divides by a zero spread on identical profiles (all zero for a single-class
    calibration split) and the process died with a segmentation fault (exit 139)."""
    for profiles in (np.zeros((72, 64), np.float32), np.ones((30, 8)), np.zeros((12, 0))):
        with pytest.warns(UserWarning, match="identical"):
            points = embed_heads(profiles, n_iter=250)
        np.testing.assert_array_equal(points, np.zeros((profiles.shape[0], 2)))
        assert distinct_points(head_distances(points)) == 1


def test_embed_heads_rescales_a_spread_float32_cannot_resolve() -> None:
    """A spread of 1e-25 underflows t-SNE's float32 squared distances (also a segmentation fault before)."""
    profiles = np.zeros((40, 16), np.float32)
    profiles[:20, 0] = 1e-25
    with pytest.warns(UserWarning, match="scaled to unit spread"):
        points = embed_heads(profiles, n_iter=250, seed=0)
    assert np.isfinite(points).all()
    # the two groups of identical heads stay apart: FasterPAM with k = 2 recovers them
    labels = cluster_heads(head_distances(points), 2, seed=0).labels
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1 and labels[0] != labels[-1]


@pytest.mark.parametrize("method", ["tsne", "none"])
def test_embed_heads_refuses_non_finite_profiles(method: str) -> None:
    profiles = np.random.default_rng(0).normal(size=(10, 4))
    profiles[3, 1] = np.nan
    with pytest.raises(CahpError, match="NaN/inf"):
        embed_heads(profiles, method=method)  # type: ignore[arg-type]


def test_clustering_caps_k_at_the_distinct_points() -> None:
    coinciding = head_distances(np.zeros((10, 3)))
    assert distinct_points(coinciding) == 1
    assert cluster_heads(coinciding, 4).k == 1
    sweep = sweep_k(coinciding)  # MSS is 1 from k = 2 on: every head sits on its medoid
    assert sweep.stopped_at == 2 and np.all(sweep.mss == 1.0) and sweep.clustering(5).k == 1
    three = head_distances(np.repeat(np.eye(3), [2, 3, 1], axis=0))
    clustering = cluster_heads(three, 5)
    assert clustering.k == 3 and clustering.loss == 0.0
    np.testing.assert_array_equal(clustering.labels, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(clustering.medoids, [0, 2, 5])


def _moments(class_values: list[np.ndarray]) -> StreamingMoments:
    """StreamingMoments over classes 0..C-1 from ``[n_c, heads, D]`` samples per class."""
    moments = StreamingMoments(len(class_values))
    for label, values in enumerate(class_values):
        if len(values):
            moments.add_batch(values, label)
    return moments


def _cahp_settings(**changes: Any) -> SimpleNamespace:
    """CAHP's settings as the method declares them (the registry's defaults), with ``changes``."""
    return SimpleNamespace(**{**method_info("cahp").defaults, **changes})


def _kept_heads(selector: CAHPSelector, clustering: Clustering, layers: int, heads: int) -> dict[int, list[int]]:
    """The heads CAHP keeps with ``clustering``: one per cluster, then the guardrail (as :meth:`CAHP.plan`)."""
    grid = HeadGrid(layers, heads, heads)
    _, priority = cluster_priority(clustering, selector.salience_, "salience", grid)
    return select_heads(priority, clustering.k, grid, Constraints()).kept_heads_by_layer


def test_cahp_selector_refuses_a_single_class() -> None:
    rng = np.random.default_rng(0)
    moments = _moments([rng.normal(size=(8, 24, 16)), np.zeros((0, 24, 16))])
    with pytest.raises(DataError, match=r"1 class.*at least two"):
        CAHPSelector(_cahp_settings()).fit(moments, rng.uniform(size=(4, 6)))


def test_cahp_selector_on_identical_profiles_keeps_the_most_salient_heads() -> None:
    """Both classes give every head the same statistics: all profiles are 0. Defined result: one point, k = 1,
    the most salient head plus each layer's most salient head (the guardrail), stated in the report."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=(6, 24, 16))
    salience = rng.uniform(size=(4, 6))
    with pytest.warns(UserWarning, match="same separability profile"):
        selector = CAHPSelector(_cahp_settings()).fit(_moments([values, values]), salience)
    assert selector.k_ == 1 and selector.k_capped_from_ == selector.knee_.k
    expected = {layer: [int(np.argmax(salience[layer]))] for layer in range(4)}
    assert _kept_heads(selector, selector.clustering_, 4, 6) == expected
    summary = selector.head_space_summary()
    assert summary["distinct_profiles"] == 1 and summary["distinct_points"] == 1
    assert any("one point" in note for note in summary["notes"])


def test_an_explicit_budget_above_the_distinct_profiles_gets_one_cluster_per_profile() -> None:
    rng = np.random.default_rng(2)
    group_of_head = np.arange(24) % 3  # 3 distinct heads, each repeated 8 times
    class_a = rng.normal(size=(5, 3, 8))[:, group_of_head]
    class_b = rng.normal(size=(5, 3, 8))[:, group_of_head]
    salience = rng.uniform(size=(4, 6))
    selector = CAHPSelector(_cahp_settings(embedding="none")).fit(_moments([class_a, class_b]), salience)
    assert selector.distinct_profiles_ == 3 and selector.distinct_points_ == 3
    clustering = selector.sweep_.clustering(10)  # what CAHP.plan uses for Budget.keep(10)
    assert clustering.k == 3
    flat = salience.reshape(-1)
    expected = {int(np.flatnonzero(group_of_head == g)[np.argmax(flat[group_of_head == g])]) for g in range(3)}
    chosen, _ = cluster_priority(clustering, selector.salience_, "salience", HeadGrid(4, 6, 6))
    assert set(chosen.representatives) == expected


def test_cahp_selector_refuses_bad_inputs_with_what_to_do() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 5, 24, 16))
    with pytest.raises(CahpError, match="at least 3"):
        CAHPSelector(_cahp_settings()).fit(_moments([values[0][:, :2], values[1][:, :2]]), rng.uniform(size=(1, 2)))
    salience = rng.uniform(size=(4, 6))
    salience[1, 2] = np.nan
    with pytest.raises(CahpError, match="salience has NaN"):
        CAHPSelector(_cahp_settings()).fit(_moments(list(values)), salience)
    broken = values.copy()
    broken[0, :, 7] = np.inf  # head 7 = (layer 1, head 1)
    with pytest.raises(CahpError, match=r"NaN/inf separability profiles .*\(1, 1\)"):
        CAHPSelector(_cahp_settings()).fit(_moments(list(broken)), rng.uniform(size=(4, 6)))


def test_scikit_learn_lower_bound_admits_tsne_max_iter() -> None:
    """``TSNE(max_iter=...)`` exists from scikit-learn 1.5 on; pyproject must not admit older versions."""
    import re
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    (requirement,) = [r for r in pyproject["project"]["dependencies"] if r.startswith("scikit-learn")]
    lower = re.search(r">=\s*(\d+)\.(\d+)", requirement)
    assert lower is not None and (int(lower[1]), int(lower[2])) >= (1, 5), requirement
