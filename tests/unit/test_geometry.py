"""Head geometry (:mod:`cahp.adapters.geometry`): which rows and columns are each head's, for every layout.

Checked against the models' own forward code (GPT-NeoX's per-head interleaving, GPT-2's ``[q | k | v]``),
on a synthetic fused grouped-query layout (where the k and v blocks are narrower than q), and through its
users: surgery, masking, the magnitude scorer and the FLOP accounting.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import Phi3Config, Phi3ForSequenceClassification

from cahp.adapters import ArchitectureAdapter, GeometryError, HeadGeometry, get_adapter
from cahp.evaluation.accounting import attention_flops
from cahp.scoring import magnitude
from cahp.surgery import head_mask, kept_heads_by_layer, layer_geometries, prune_heads
from tests.unit.tiny_models import HEADS, HIDDEN, LAYERS, build_model, make_inputs

ATOL = 1e-5


def _arange(start: int, size: int) -> list[int]:
    return list(range(start, start + size))


# ---- the index arithmetic ----------------------------------------------------------------------------------


def test_fused_per_head_rows_interleave_q_k_v_within_each_head() -> None:
    geometry = get_adapter("gpt_neox").geometry(build_model("gpt_neox"))
    hd = geometry.head_dim
    assert (geometry.layout, geometry.query_heads, geometry.kv_heads, hd) == ("fused_per_head", HEADS, HEADS, 8)
    for head, (part, kind) in itertools.product(range(HEADS), enumerate(("query", "key", "value"))):
        expected = [head * 3 * hd + part * hd + d for d in range(hd)]
        assert geometry.rows(kind, [head]).tolist() == expected, (head, kind)
    assert geometry.output_columns([2]).tolist() == _arange(2 * hd, hd)


def test_gpt_neox_geometry_matches_the_model_forward() -> None:
    """Project with ``query_key_value`` and split as GPT-NeoX's forward does; each head's q, k and v must be
    the projection restricted to the geometry's rows."""
    model = build_model("gpt_neox")
    attention = model.gpt_neox.layers[0].attention
    geometry = get_adapter(model).geometry(model)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        qkv = attention.query_key_value(x).view(2, 5, -1, 3 * attention.head_size).transpose(1, 2)
        parts = dict(zip(("query", "key", "value"), qkv.chunk(3, dim=-1), strict=True))  # [batch, heads, seq, hd]
        weight, bias = attention.query_key_value.weight, attention.query_key_value.bias
        for kind, head in itertools.product(parts, range(HEADS)):
            rows = geometry.rows(kind, [head])
            own = torch.nn.functional.linear(x, weight[rows], bias[rows])
            torch.testing.assert_close(own, parts[kind][:, head], atol=ATOL, rtol=0)  # matmul order only


def test_gpt2_geometry_matches_the_model_forward() -> None:
    """GPT-2's transposed ``Conv1D`` ``c_attn`` split with ``split_size`` and viewed per head."""
    model = build_model("gpt2")
    attention = model.transformer.h[0].attn
    geometry = get_adapter(model).geometry(model)
    assert geometry.transposed and geometry.out_axis == 1 and geometry.in_axis == 0
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        blocks = attention.c_attn(x).split(attention.split_size, dim=-1)
        weight, bias = attention.c_attn.weight, attention.c_attn.bias  # [hidden, 3 * width]
        for (kind, block), head in itertools.product(zip(("query", "key", "value"), blocks, strict=True), range(4)):
            rows = geometry.rows(kind, [head])
            own = x @ weight[:, rows] + bias[rows]
            torch.testing.assert_close(own, block.unflatten(-1, (HEADS, -1))[..., head, :], atol=ATOL, rtol=0)


def test_fused_gqa_key_and_value_blocks_are_kv_heads_wide() -> None:
    """``[q | k | v]`` with 4 query heads and 2 key-value heads of size 3: q is 12 rows, k and v 6 each (an
    equal-width split, the old magnitude bug, would put k at rows 12..23)."""
    geometry = HeadGeometry("fused", query_heads=4, kv_heads=2, head_dim=3)
    assert geometry.rows("query").tolist() == list(range(12))
    assert geometry.rows("key").tolist() == list(range(12, 18))
    assert geometry.rows("value").tolist() == list(range(18, 24))
    assert geometry.rows("key", [1]).tolist() == [15, 16, 17]
    assert geometry.rows("value", [0]).tolist() == [18, 19, 20]
    assert geometry.kv_positions() == [0, 0, 1, 1]
    # Keeping key-value head 1 and its query heads 2 and 3 leaves the fused layout of 2 query / 1 kv heads.
    assert geometry.kept_rows(("query", "key", "value"), [2, 3], [1]).tolist() == [
        *range(6, 12),
        *range(15, 18),
        *range(21, 24),
    ]


LAYOUT_CASES = [("separate", 4, 2), ("separate", 4, 4), ("fused", 4, 2), ("fused", 6, 3), ("fused_per_head", 4, 4)]


@pytest.mark.parametrize(("layout", "query_heads", "kv_heads"), LAYOUT_CASES)
def test_kept_rows_give_the_same_layout_for_the_smaller_counts(layout: str, query_heads: int, kv_heads: int) -> None:
    """Slicing a projection to ``kept_rows`` must put every kept head's rows where the smaller layer's geometry
    looks for them; this is what lets surgery shrink a layer twice."""
    head_dim, group = 2, query_heads // kv_heads
    geometry = HeadGeometry(layout, query_heads, kv_heads, head_dim)  # type: ignore[arg-type]
    kinds = ("query", "key", "value") if geometry.fused else ("query",)
    width = sum(geometry.heads_of(kind) for kind in kinds) * head_dim
    weight = torch.arange(width * 5, dtype=torch.float32).reshape(width, 5)  # every row distinct
    for kept_kv in itertools.chain.from_iterable(itertools.combinations(range(kv_heads), n) for n in (1, 2)):
        kept_q = [g * group + i for g in kept_kv for i in range(group)]
        small = weight[geometry.kept_rows(kinds, kept_q, list(kept_kv))]
        smaller = HeadGeometry(layout, len(kept_q), len(kept_kv), head_dim)  # type: ignore[arg-type]
        for kind in kinds:
            kept = kept_q if kind == "query" else list(kept_kv)
            for new_position, old_position in enumerate(kept):
                torch.testing.assert_close(
                    small[smaller.rows(kind, [new_position])], weight[geometry.rows(kind, [old_position])]
                )


def test_impossible_geometries_are_refused() -> None:
    with pytest.raises(GeometryError, match=r"'fused_per_head'.*as many key-value heads"):
        HeadGeometry("fused_per_head", query_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(GeometryError, match="cannot share 3 key-value heads evenly"):
        HeadGeometry("fused", query_heads=4, kv_heads=3, head_dim=8)
    with pytest.raises(GeometryError, match="qkv_layout must be one of"):
        HeadGeometry("interleaved", query_heads=4, kv_heads=4, head_dim=8)  # type: ignore[arg-type]
    with pytest.raises(GeometryError, match=r"key head positions \[2\] are out of range: this layer has 2"):
        HeadGeometry("separate", query_heads=4, kv_heads=2, head_dim=8).rows("key", [2])
    with pytest.raises(GeometryError, match="must name the same module"):
        ArchitectureAdapter("x", "layers", "attn", "attn.q", "attn.k", "attn.v", "attn.o", qkv_layout="fused")


def test_layer_geometries_follow_the_pruned_structure() -> None:
    model = prune_heads(build_model("llama"), {0: [0, 1], 1: [0, 1, 2, 3]})
    counts = [(g.query_heads, g.kv_heads) for g in layer_geometries(model)]
    assert counts == [(2, 1), (0, 0), (4, 2)]


# ---- surgery and masking use it ----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "head"), list(itertools.product(["gpt_neox", "gpt2"], range(HEADS))))
def test_removing_one_fused_head_equals_gating_it(family: str, head: int) -> None:
    """Removing head ``h`` of layer 0 (and of layer 2 after layer 2 lost another head) equals gate 0 on it."""
    model = build_model(family)
    inputs = make_inputs(family)
    other = (head + 1) % HEADS
    gates = torch.ones(LAYERS, HEADS)
    gates[0, head] = gates[2, head] = gates[2, other] = 0.0
    with torch.no_grad(), head_mask(model, gates):
        masked = model(**inputs).logits
    pruned = prune_heads(copy.deepcopy(model), {0: [head], 2: [other]})
    prune_heads(pruned, {2: [head]})  # the second cut reads the geometry of the already smaller layer
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, masked, atol=ATOL, rtol=0)
        assert (masked - model(**inputs).logits).abs().max() > 100 * ATOL
    assert kept_heads_by_layer(pruned)[2] == sorted(set(range(HEADS)) - {head, other})


# ---- the magnitude scorer ----------------------------------------------------------------------------------


def _norm2(tensor: torch.Tensor) -> float:
    return float(tensor.detach().double().pow(2).sum())


def test_magnitude_reads_gpt_neox_interleaved_rows() -> None:
    model = build_model("gpt_neox")
    scores = magnitude.MagnitudeScorer()._score(model, None)
    hd = HIDDEN // HEADS
    for layer in range(LAYERS):
        attention = model.gpt_neox.layers[layer].attention
        per_head = attention.query_key_value.weight.view(HEADS, 3, hd, HIDDEN)  # the forward's view
        dense = attention.dense.weight.view(HIDDEN, HEADS, hd)
        for head in range(HEADS):
            expected = _norm2(per_head[head]) + _norm2(dense[:, head])
            assert scores[layer, head] == pytest.approx(expected**0.5, rel=1e-6)


def test_magnitude_on_fused_grouped_query_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Phi-3's ``qkv_proj`` is ``[q | k | v]`` with k and v ``kv_heads * head_dim`` wide. cahp has no Phi-3
    adapter (its forward reads the head count from the shared config), so the scorer is shown one here."""
    config = Phi3Config(
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=99,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Phi3ForSequenceClassification(config).eval()
    adapter = ArchitectureAdapter(
        family="phi3-test",
        layers="layers",
        attention="self_attn",
        query="self_attn.qkv_proj",
        key="self_attn.qkv_proj",
        value="self_attn.qkv_proj",
        output="self_attn.o_proj",
        num_kv_heads_key="num_key_value_heads",
        qkv_layout="fused",
    )
    monkeypatch.setattr(magnitude, "get_adapter", lambda _model: adapter)
    scores = magnitude.MagnitudeScorer()._score(model, None)
    hd, q_width = HIDDEN // HEADS, HEADS * (HIDDEN // HEADS)
    for layer in range(2):
        attention = model.model.layers[layer].self_attn
        qkv = attention.qkv_proj.weight  # split as Phi3Attention.forward does
        query, key, value = qkv[:q_width], qkv[q_width : q_width + 2 * hd], qkv[q_width + 2 * hd :]
        for head in range(HEADS):
            kv = head // 2
            expected = (
                _norm2(query[head * hd : (head + 1) * hd])
                + _norm2(key[kv * hd : (kv + 1) * hd])
                + _norm2(value[kv * hd : (kv + 1) * hd])
                + _norm2(attention.o_proj.weight[:, head * hd : (head + 1) * hd])
            )
            assert scores[layer, head] == pytest.approx(expected**0.5, rel=1e-6)


# ---- the accounting ----------------------------------------------------------------------------------------


def test_flops_by_hand_for_gpt_neox() -> None:
    model = build_model("gpt_neox")
    seq, hd = 10, HIDDEN // HEADS
    # fused q/k/v [3*hidden, hidden] and dense [hidden, hidden], then scores and context of every head
    per_layer = 2 * seq * (3 * HIDDEN * HIDDEN + HIDDEN * HIDDEN) + 2 * 2 * HEADS * seq * seq * hd
    assert attention_flops(model, seq) == LAYERS * per_layer
    prune_heads(model, {0: [3], 1: [0, 1, 2, 3]})
    per_head = 2 * seq * 4 * HIDDEN * hd + 2 * 2 * seq * seq * hd
    assert attention_flops(model, seq) == LAYERS * per_layer - 5 * per_head
