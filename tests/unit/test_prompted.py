"""Zero-shot prompted classification with a decoder: a tiny model with a hand-made vocabulary whose answer is
known, accuracy and macro-F1, either padding side, multi-token label words, and the prompt in the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from cahp.data.tasks import TextSplit
from cahp.errors import CahpError
from cahp.evaluation.prompted import (
    PROMPTS,
    Prompt,
    default_prompt,
    encode_prompts,
    evaluate_prompted,
    label_log_probs,
    label_token_ids,
)
from tests.unit.test_language_modeling import causal_lm, word_tokenizer

VOCABULARY = [
    "the", "film", "was", "good", "bad", "great", "awful", "positive", "negative", "review", ":", "?", "very",
    "premise", "hypothesis", "true", "false", "perhaps", "yes", "no", "maybe", "answer", "it", "rains",
]  # fmt: skip


def ids_of(word: str) -> int:
    return 4 + VOCABULARY.index(word)


def answering_model(answers: dict[str, str]) -> PreTrainedModel:
    """A tiny Llama whose next token after ``word`` is ``answers[word]`` (by far), whatever came before.

    Attention and MLP outputs are zeroed, so the last hidden state is the normalised embedding of the last token;
    each key word gets its own basis direction and the answer's lm_head row points the same way.
    """
    model = causal_lm("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
        model.lm_head.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        for direction, (word, answer) in enumerate(answers.items()):
            embeddings[ids_of(word)] = 0.0
            embeddings[ids_of(word), direction] = 1.0
            model.lm_head.weight[ids_of(answer), direction] = 10.0
    return model


SENTIMENT = {"good": "positive", "great": "positive", "bad": "negative", "awful": "negative"}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_the_label_word_after_the_last_real_token_decides_and_is_scored(padding_side: str) -> None:
    model = answering_model(SENTIMENT)
    tokenizer = word_tokenizer(VOCABULARY, padding_side)
    texts = ["the film was good", "bad", "the film was very great", "awful", "it was bad"]
    gold = np.array([1, 0, 1, 0, 1])  # the last is "wrong" on purpose: predictions 1 0 1 0 0
    split = TextSplit("validation", [(text,) for text in texts], gold, "memory")
    prompt = Prompt("review : {text}", (" negative", " positive"))
    result = evaluate_prompted(model, tokenizer, split, prompt, ("text",), batch_size=5)
    assert result["accuracy"] == pytest.approx(0.8)
    # class 0: precision 2/3, recall 1 -> 0.8; class 1: precision 1, recall 2/3 -> 0.8
    assert result["macro_f1"] == pytest.approx(0.8)
    assert result["predicted_counts"] == [3, 2] and result["examples"] == 5
    assert result["prompt"] == "review : {text}" and result["label_words"] == [" negative", " positive"]
    assert result["label_token_ids"] == [[ids_of("negative")], [ids_of("positive")]]
    assert result["multi_token"] == "first" and result["label_word_mass"] > 0.99


def test_pairs_fill_premise_and_hypothesis_and_three_label_words() -> None:
    model = answering_model({"true": "yes", "perhaps": "maybe", "false": "no"})
    tokenizer = word_tokenizer(VOCABULARY, "left")
    pairs = [("it rains", "it was true"), ("the film", "perhaps"), ("review", "it was false"), ("it", "true")]
    split = TextSplit("test", pairs, np.array([0, 1, 2, 0]), "memory")
    prompt = Prompt("premise : {premise} hypothesis : {hypothesis}", (" yes", " maybe", " no"))
    result = evaluate_prompted(model, tokenizer, split, prompt, ("premise", "hypothesis"))
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0 and result["predicted_counts"] == [2, 1, 1]
    with pytest.raises(CahpError, match=r"field\(s\) \['premise'\] are not text columns"):
        evaluate_prompted(model, tokenizer, split, prompt, ("text", "hypothesis"))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_left_and_right_padding_give_the_same_label_scores(family: str) -> None:
    model = causal_lm(family)
    split = TextSplit("v", [("the film was good",), ("bad",), ("it rains : very awful",)], np.array([1, 0, 0]), "m")
    prompt = Prompt("review : {text} ?", (" negative", " positive"))
    scores = {}
    for side in ("left", "right"):
        tokenizer = word_tokenizer(VOCABULARY, side)
        scores[side] = label_log_probs(model, tokenizer, encode_prompts(tokenizer, split, prompt, ("text",)), prompt)
    np.testing.assert_allclose(scores["left"], scores["right"], rtol=1e-5, atol=1e-6)
    assert np.all(scores["left"] < 0)


def test_summed_label_words_are_the_log_probability_of_every_token_computed_by_hand() -> None:
    model = causal_lm("qwen2")
    tokenizer = word_tokenizer(VOCABULARY, "left")
    split = TextSplit("v", [("the film",), ("it was very good",)], np.array([0, 1]), "m")
    prompt = Prompt("review : {text}", (" very bad", " great"), multi_token="sum")
    data = encode_prompts(tokenizer, split, prompt, ("text",))
    scores = label_log_probs(model, tokenizer, data, prompt, batch_size=2)
    for row, feature in enumerate(data.features):
        for label, word in enumerate(label_token_ids(tokenizer, prompt)):
            ids = feature["input_ids"] + word
            with torch.no_grad():
                log_probs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            expected = sum(float(log_probs[t - 1, ids[t]]) for t in range(len(feature["input_ids"]), len(ids)))
            assert scores[row, label] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(CahpError, match="share a first token"):
        label_token_ids(tokenizer, Prompt("{text}", (" very bad", " very good")))
    with pytest.raises(CahpError, match=r"\[' splendid'\] are unknown to the tokenizer"):
        label_token_ids(tokenizer, Prompt("{text}", (" bad", " splendid")))


def test_prompts_get_the_tokenizer_bos_and_keep_their_end_when_too_long() -> None:
    from tokenizers.processors import TemplateProcessing

    tokenizer = word_tokenizer(VOCABULARY)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    split = TextSplit("v", [("good",), ("the film was very very very bad",)], np.array([1, 0]), "m")
    encoded = encode_prompts(tokenizer, split, Prompt("review : {text} ?", (" no", " yes")), ("text",), max_length=6)
    assert encoded.features[0]["input_ids"] == [1, ids_of("review"), ids_of(":"), ids_of("good"), ids_of("?")]
    kept = ["was", "very", "very", "very", "bad", "?"]
    assert encoded.features[1] == {"input_ids": [ids_of(w) for w in kept], "attention_mask": [1] * 6}


def test_defaults_follow_the_class_ids_and_bad_prompts_are_refused() -> None:
    assert default_prompt("SST2").label_words == (" negative", " positive")
    assert default_prompt("mnli").label_words == (" yes", " maybe", " no")  # entailment, neutral, contradiction
    assert len(PROMPTS["sst5"].label_words) == 5 and PROMPTS["mnli"].fields == ("premise", "hypothesis")
    with pytest.raises(CahpError, match="no default prompt for task 'qnli'"):
        default_prompt("qnli")
    with pytest.raises(CahpError, match="at least two label words"):
        Prompt("{text}", (" yes",))
    with pytest.raises(CahpError, match="no \\{field\\}"):
        Prompt("Sentiment:", (" a", " b"))
    model, tokenizer = causal_lm("llama"), word_tokenizer(VOCABULARY)
    split = TextSplit("v", [("good",)], np.array([2]), "m")
    with pytest.raises(CahpError, match=r"labels outside 0..1"):
        evaluate_prompted(model, tokenizer, split, Prompt("{text}", (" no", " yes")), ("text",))
