"""Language modelling on decoders: corpora, sliding-window blocks, the causal-LM objective (loss by hand, either
padding side), perplexity, every method but CAHP on a causal-LM calibration, CAHP's refusal, and causal,
left-padded attention maps cropped like right-padded ones."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from cahp.calibration import (
    Calibration,
    CausalLanguageModeling,
    SequenceClassification,
    causal_position_ids,
    lm_calibration,
)
from cahp.data.batching import EncodedSplit
from cahp.data.lm import DEFAULT_CORPUS, TextCorpus, adds_bos, block_spans, load_corpus, make_blocks
from cahp.engine import Engine
from cahp.errors import CahpError, DataError
from cahp.evaluation.perplexity import perplexity
from cahp.methods import Budget, Constraints, HeadGrid, KeepPlan, available_methods, method_info
from cahp.signatures.collector import collect_signatures
from tests.unit.test_scorers import FAST
from tests.unit.tiny_models import build_model

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GQA_FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text")
WORDS = 90  # ids 4..93 fit the tiny models' 99-token vocabulary


def word_tokenizer(words: list[str] | None = None, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``words``
    (default ``w0 .. w89``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({word: 4 + i for i, word in enumerate(words or [f"w{i}" for i in range(WORDS)])})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = padding_side
    return tokenizer


def causal_lm(family: str, seed: int = 0) -> PreTrainedModel:
    """The tiny model of ``family`` (3 layers, 4 query / 2 key-value heads) with a language-modelling head."""
    config = build_model(family).config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model


def random_corpus(documents: int = 12, seed: int = 0) -> TextCorpus:
    rng = np.random.default_rng(seed)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, WORDS, int(rng.integers(3, 20)))) for _ in range(documents)]
    return TextCorpus("random-words", "file", texts, "memory")


def hand_nll(model: PreTrainedModel, ids: list[int], scored: int) -> float:
    """Summed NLL of the last ``scored`` tokens of one unpadded block, from a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = logits.log_softmax(-1)
    return -sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids) - scored, len(ids)))


# ---------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(("tokens", "length", "stride"), [(50, 16, 5), (50, 16, 15), (17, 16, 1), (9, 16, 4)])
def test_a_stride_below_the_length_scores_every_token_once(tokens: int, length: int, stride: int) -> None:
    spans = block_spans(tokens, length, stride)
    scored = [t for _, end, count in spans for t in range(end - count, end)]
    assert scored == list(range(1, tokens)), "every token after the first, once, in order"
    for start, end, count in spans:
        assert end - start <= length and end - count > start, "each target has context in its own block"
    later = [end - count - start for start, end, count in spans[1:]]
    assert all(context >= min(length - stride, tokens) for context in later), "at least length - stride of context"


def test_non_overlapping_blocks_leave_each_block_start_unscored_and_bad_geometry_is_refused() -> None:
    spans = block_spans(10, 4, 4)
    assert spans == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    for length, stride, message in [(4, 5, "would skip tokens"), (4, 0, "between 1 and"), (1, 1, "at least 2")]:
        with pytest.raises(CahpError, match=message):
            block_spans(10, length, stride)


def test_blocks_join_documents_with_eos_and_record_their_scored_counts() -> None:
    tokenizer = word_tokenizer()
    corpus = TextCorpus("c", "file", ["w0 w1 w2", "w3 w4"], "memory")
    blocks = make_blocks(tokenizer, corpus, context_length=4, stride=2)
    stream = [4, 5, 6, 2, 7, 8]
    assert [f["input_ids"] for f in blocks.examples.features] == [stream[0:4], stream[2:6]]
    assert blocks.examples.labels.tolist() == [3, 2] and blocks.scored_tokens == len(stream) - 1
    assert blocks.describe() | {"notes": None} == {
        "corpus": "c",
        "split": "file",
        "documents": 2,
        "source": "memory",
        "notes": None,
        "blocks": 2,
        "context_length": 4,
        "stride": 2,
        "stream_tokens": 6,
        "scored_tokens": 5,
    }
    first_two = make_blocks(tokenizer, random_corpus(), context_length=8, stride=4, max_blocks=2)
    assert len(first_two) == 2 and first_two.examples.labels.tolist() == [7, 4]
    with pytest.raises(CahpError, match="too short"):
        make_blocks(tokenizer, TextCorpus("c", "file", ["w1"], "memory"), 4)


@pytest.mark.parametrize("stride", [None, 2])
def test_a_tokenizer_that_adds_bos_gets_it_before_every_block_and_every_token_scored_once(stride: int | None) -> None:
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    assert adds_bos(tokenizer) and not adds_bos(word_tokenizer())
    corpus = TextCorpus("c", "file", ["w0 w1 w2", "w3 w4 w5 w6"], "memory")
    blocks = make_blocks(tokenizer, corpus, context_length=4, stride=stride)
    stream = [4, 5, 6, 2, 7, 8, 9, 10]
    ids = [f["input_ids"] for f in blocks.examples.features]
    assert all(block[0] == 1 and len(block) <= 4 for block in ids), "a BOS, then at most 3 stream tokens"
    scored = [t for block, count in zip(ids, blocks.examples.labels, strict=True) for t in block[len(block) - count :]]
    assert scored == stream, "every stream token once, in order: the first of each block too, never the BOS"
    assert blocks.describe()["bos_first"] and blocks.stride == (3 if stride is None else 2)
    plain = make_blocks(word_tokenizer(), corpus, context_length=4)
    assert "bos_first" not in plain.describe() and plain.examples.features[0]["input_ids"] == stream[:4]


# ---------------------------------------------------------------------------------------------------- corpora


def test_local_corpus_files_of_every_kind(tmp_path: Path) -> None:
    text = "first line\nstill first\n\n\nsecond para\n"
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "a.txt.gz", "wt") as handle:
        handle.write(text)
    assert load_corpus(tmp_path / "a.txt").documents == ["first line\nstill first", "second para"]
    assert load_corpus(str(tmp_path / "a.txt.gz"), txt_documents="lines").documents == [
        "first line",
        "still first",
        "second para",
    ]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps({"body": body}) for body in ["one", "", "two"]))
    corpus = load_corpus(tmp_path / "b.jsonl.gz", column="body")
    assert corpus.documents == ["one", "two"] and corpus.name == "b.jsonl.gz"
    (tmp_path / "c.csv").write_text('text,x\n"a, b",1\nc,2\n')
    (tmp_path / "d.tsv").write_text("text\tx\na b\t1\nc\t2\n")
    assert load_corpus(tmp_path / "c.csv").documents == ["a, b", "c"]
    assert load_corpus(tmp_path / "d.tsv").documents == ["a b", "c"]
    with pytest.raises(DataError, match=r"column .body. not found .* available columns: text, x"):
        load_corpus(tmp_path / "c.csv", column="body")
    with pytest.raises(DataError, match="not found"):
        load_corpus(tmp_path / "missing.txt")


def test_a_hub_corpus_that_cannot_load_says_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import cahp.data.tasks as tasks

    def offline(path: str, config: str | None) -> Any:
        raise DataError("ConnectionError: no route to huggingface.co\nmore detail")

    monkeypatch.setattr(tasks, "hub_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_corpus("wikitext:wikitext-2-raw-v1")
    message = str(caught.value)
    assert "\n" not in message and "pass a local .txt/.jsonl/.csv/.tsv file" in message
    assert "'wikitext:wikitext-2-raw-v1'" in message and "ConnectionError" in message


@pytest.mark.skipif(not (SHARED_DATA / "mnli").is_dir(), reason="the shared MNLI data is not here")
def test_the_offline_default_is_deduplicated_mnli_premises_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
    calibration = load_corpus(DEFAULT_CORPUS, "calibration", data_dir=SHARED_DATA)
    evaluation = load_corpus(DEFAULT_CORPUS, "evaluation", data_dir=SHARED_DATA)
    assert (calibration.name, calibration.split) == ("mnli-premises", "validation_matched")
    assert (evaluation.name, evaluation.split) == ("mnli-premises", "validation_mismatched")
    assert len(set(calibration.documents)) == len(calibration.documents) < 9815
    assert calibration.documents[0] == "The new rights are nice enough"
    blocks = make_blocks(word_tokenizer(), evaluation, context_length=32, max_blocks=3)
    assert blocks.describe()["corpus"] == "mnli-premises" and len(blocks) == 3
    with pytest.raises(DataError, match="Set CAHP_DATA_DIR"):
        load_corpus(DEFAULT_CORPUS, data_dir=SHARED_DATA / "sst2")


# ---------------------------------------------------------------------------------------------------- objective


def lm_batch(padding_side: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[list[int]], list[int]]:
    """A padded batch of three blocks of different lengths, their ids and scored counts."""
    rng = np.random.default_rng(seed)
    ids = [(4 + rng.integers(0, WORDS, n)).tolist() for n in (9, 5, 7)]
    scored = [8, 2, 4]
    data = EncodedSplit([{"input_ids": i, "attention_mask": [1] * len(i)} for i in ids], np.array(scored))
    calibration = lm_calibration_of(data, word_tokenizer(padding_side=padding_side))
    return next(calibration.batches()), ids, scored


def lm_calibration_of(data: EncodedSplit, tokenizer: Any, batch_size: int = 8) -> Calibration:
    return Calibration(data, tokenizer, CausalLanguageModeling(), batch_size)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_the_loss_is_the_mean_nll_of_the_scored_tokens_computed_by_hand(family: str) -> None:
    model = causal_lm(family)
    batch, ids, scored = lm_batch("right")
    expected = sum(hand_nll(model, i, n) for i, n in zip(ids, scored, strict=True)) / sum(scored)
    objective = CausalLanguageModeling()
    assert float(objective.loss(model, batch).detach()) == pytest.approx(expected, rel=1e-5)
    geometric = [math.exp(-hand_nll(model, i, n) / n) for i, n in zip(ids, scored, strict=True)]
    np.testing.assert_allclose(objective.target_probability(model, batch).detach().numpy(), geometric, rtol=1e-5)


@pytest.mark.parametrize("family", [*GQA_FAMILIES, "gpt2"])
def test_left_and_right_padding_give_the_same_loss_and_perplexity(family: str) -> None:
    model = causal_lm(family)
    (right, _, _), (left, _, _) = lm_batch("right"), lm_batch("left")
    assert left["attention_mask"][1, 0] == 0 and right["attention_mask"][1, -1] == 0, "both sides really pad"
    objective = CausalLanguageModeling()
    on_the_right_loss = float(objective.loss(model, right).detach())
    assert float(objective.loss(model, left).detach()) == pytest.approx(on_the_right_loss, rel=1e-5)
    if family == "gpt2":  # absolute positions: without positions from the mask, left padding would shift them
        unpositioned = float(CausalLanguageModeling(position_ids=False).loss(model, left).detach())
        assert unpositioned != pytest.approx(on_the_right_loss, rel=1e-3)
    blocks = make_blocks(word_tokenizer(), random_corpus(), context_length=12, stride=5)
    on_the_right = perplexity(model, word_tokenizer(padding_side="right"), blocks, batch_size=3)
    on_the_left = perplexity(model, word_tokenizer(padding_side="left"), blocks, batch_size=3)
    assert on_the_left["perplexity"] == pytest.approx(on_the_right["perplexity"], rel=1e-5)


def test_causal_positions_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert causal_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_perplexity_is_exp_of_the_hand_computed_nll_over_scored_tokens() -> None:
    model = causal_lm("llama")
    blocks = make_blocks(word_tokenizer(), random_corpus(), context_length=10, stride=4)
    total = sum(
        hand_nll(model, feature["input_ids"], int(scored))
        for feature, scored in zip(blocks.examples.features, blocks.examples.labels, strict=True)
    )
    result = perplexity(model, word_tokenizer(), blocks, batch_size=4)
    assert result["tokens"] == blocks.scored_tokens == blocks.stream_tokens - 1
    assert result["perplexity"] == pytest.approx(math.exp(total / blocks.scored_tokens), rel=1e-5)
    assert {key: result[key] for key in ("blocks", "context_length", "stride", "corpus", "split")} == {
        "blocks": len(blocks),
        "context_length": 10,
        "stride": 4,
        "corpus": "random-words",
        "split": "file",
    }


def test_a_batch_that_scores_more_tokens_than_it_has_is_refused() -> None:
    model = causal_lm("llama")
    batch, _, _ = lm_batch("right")
    batch["labels"] = torch.tensor([8, 5, 4])  # the second block has 5 tokens: at most 4 can be targets
    with pytest.raises(CahpError, match="example 1 of the batch scores 5 target tokens but has 5 real tokens"):
        CausalLanguageModeling().loss(model, batch)
    del batch["labels"]
    with pytest.raises(CahpError, match="needs labels"):
        CausalLanguageModeling().loss(model, batch)


# ---------------------------------------------------------------------------------------------------- methods

LM_METHODS = [
    name for name in available_methods() if not method_info(name).needs_classes and not name.startswith("test_")
]
CLASS_METHODS = [name for name in available_methods() if method_info(name).needs_classes]


@pytest.mark.parametrize("name", LM_METHODS)
def test_every_method_without_classes_fits_a_causal_lm_calibration_and_plans(name: str) -> None:
    """Through the engine, on the three GQA families in turn, in both grouped-query modes."""
    family = GQA_FAMILIES[LM_METHODS.index(name) % len(GQA_FAMILIES)]
    model = causal_lm(family)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    blocks = make_blocks(word_tokenizer(padding_side="left"), random_corpus(), context_length=12, stride=6)
    calibration = lm_calibration(blocks, word_tokenizer(padding_side="left"), batch_size=4)
    engine = Engine(model, calibration)
    settings = dict(FAST.get(name, {}))
    groups = engine.plan(name, settings, Budget.keep(6), Constraints(gqa="groups"))
    assert groups.method == name and groups.grid == HeadGrid(3, 4, 2)
    assert groups.heads_kept == groups.heads_requested + len(groups.guardrail_heads) >= 6
    assert all(heads in ([0, 1], [2, 3], [0, 1, 2, 3]) for heads in groups.kept_heads_by_layer.values())
    uniform = engine.plan(name, settings, Budget.keep(6), Constraints(uniform_layers=True, gqa="uniform"))
    assert uniform.heads_kept == 6, "one query head of each key-value group, in every layer"
    assert all(len(heads) == 2 and heads[0] < 2 <= heads[1] for heads in uniform.kept_heads_by_layer.values())
    for plan in (groups, uniform):
        assert KeepPlan.from_json(plan.to_json()) == plan
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", CLASS_METHODS)
def test_methods_that_compare_classes_refuse_the_causal_lm_objective_with_a_clear_error(name: str) -> None:
    model = causal_lm("llama")
    blocks = make_blocks(word_tokenizer(), random_corpus(), context_length=12)
    engine = Engine(model, lm_calibration(blocks, word_tokenizer()))
    with pytest.raises(CahpError, match=r"CAHP compares classes: .*'causal-lm' defines 0 class\(es\)"):
        engine.fit(name, {"tsne_iterations": 250})
    with pytest.raises(CahpError, match="'causal-lm' has no example groups"):
        engine.calibration.groups()


# ---------------------------------------------------------------------------------------------------- signatures


class PositionedClassification(SequenceClassification):
    """Classification groups, with positions counted over real tokens (for a left-padded causal model)."""

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = super().model_inputs(batch)
        return inputs | {"position_ids": causal_position_ids(inputs["attention_mask"])}


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_causal_left_padded_maps_are_cropped_like_right_padded_ones(family: str) -> None:
    """The signatures (crop to real tokens, resize) of a causal model do not depend on the padding side."""
    model = causal_lm(family)
    rng = np.random.default_rng(3)
    features = []
    for _ in range(12):
        ids = (4 + rng.integers(0, WORDS, int(rng.integers(3, 11)))).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    data = EncodedSplit(features, np.arange(12) % 2)
    moments = {
        side: collect_signatures(
            model,
            Calibration(data, word_tokenizer(padding_side=side), PositionedClassification(2), 5),
            size=8,
            progress=False,
        )
        for side in ("left", "right")
    }
    left, right = moments["left"], moments["right"]
    np.testing.assert_allclose(left.mean_, right.mean_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(left.variance(1), right.variance(1), rtol=1e-3, atol=1e-7)
