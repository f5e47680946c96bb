"""``cahp export --format gguf`` on a tiny Gemma 3 causal LM (3 sliding-window layers of 4 query / 2 key-value
heads of 8, QK-norm, random norms, a byte-fallback BPE tokenizer with ``▁`` for spaces trained in the test): the
dense model and a uniform prune are ``gemma3`` GGUFs whose logits llama.cpp reproduces over a prompt longer than
the window; Gemma's ``1 + weight`` norms are written shifted (a file without the shift is refused); an uneven
prune, which llama.cpp's gemma3 cannot run, is refused before anything is written."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from cahp.gguf_export import CHECK_TEXTS, GgufExportError, export_gguf
from cahp.surgery import prune_heads
from cahp.surgery.autoload import save_pruned
from tests.unit.test_gguf_export import needs_llama_cpp, read

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
BYTES = [f"<0x{value:02X}>" for value in range(256)]
#: Tolerances of the tiny model (logits below 5): ggml's CPU GELU reads an f16 table; f16 adds its rounding.
TOLERANCES = {"f32": 0.02, "f16": 0.1}
PLANS: dict[str, tuple[dict[int, list[int]] | None, str]] = {
    "dense": (None, "groups"),
    "uniform": ({layer: [1, 3] for layer in range(3)}, "uniform"),
    "uneven": ({0: [2, 3]}, "groups"),
}


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma 3's kind of tokenizer: spaces replaced by ``▁``, no pre-splitting, BPE merges trained on the check
    texts, unknown characters as ``<0xNN>`` bytes, BOS added; ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS + BYTES, show_progress=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator(list(CHECK_TEXTS[:2]) * 10, trainer)  # the others need the byte fallback
    vocab = trained.get_vocab(with_added_tokens=False)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(trained)]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def _merges(tokenizer: Any) -> list[Any]:
    import json

    return list(json.loads(tokenizer.to_str())["model"]["merges"])


def tiny_gemma3(vocab_size: int, seed: int = 0) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=6,
        layer_types=["sliding_attention"] * 3,  # llama.cpp's pattern: a global layer every 6
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma starts them at zero (a scale of 1); a wrong shift must show
                parameter.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3")
    tokenizer = sentencepiece_style_tokenizer()
    saved = {}
    for name, (removal, mode) in PLANS.items():
        model = tiny_gemma3(len(tokenizer))
        if removal is not None:
            prune_heads(model, removal, gqa_mode=mode)
        saved[name] = save_pruned(model, root / name, stock=name == "uniform", tokenizer=tokenizer)
    return saved


def test_the_tokenizer_falls_back_to_bytes() -> None:
    tokenizer = sentencepiece_style_tokenizer()
    ids = tokenizer(CHECK_TEXTS[3])["input_ids"]
    assert ids[0] == 2 and any(tokenizer.convert_ids_to_tokens(i) in BYTES for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHECK_TEXTS[3]


@needs_llama_cpp
@pytest.mark.parametrize(("plan", "heads"), [("dense", 4), ("uniform", 2)])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_runs_gemma3_as_transformers_does(
    plan: str, heads: int, outtype: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    result = export_gguf(folders[plan], tmp_path / "m.gguf", outtype=outtype, tolerance=TOLERANCES[outtype])
    assert result.check is not None and result.check.texts == len(CHECK_TEXTS)
    assert result.check.tokens > 6, "the check reads past the sliding window"
    metadata, tensors = read(result.path)
    assert metadata["general.architecture"] == "gemma3" and metadata["tokenizer.ggml.model"] == "llama"
    assert metadata["gemma3.attention.head_count"] == heads and metadata["gemma3.attention.head_count_kv"] == 2
    assert metadata["gemma3.attention.key_length"] == 8 and metadata["gemma3.attention.sliding_window"] == 6
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (32, heads * 8)
    assert "blk.0.attn_q_norm.weight" in tensors and "output.weight" not in tensors  # tied embeddings


@needs_llama_cpp
def test_norms_written_without_gemmas_shift_are_refused(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cahp.gguf_export

    real = cahp.gguf_export._gemma3_layer_arrays

    def unshifted(layer: Any) -> Any:
        for kind, array in real(layer):
            yield kind, array - 1.0 if array.ndim == 1 else array

    monkeypatch.setattr(cahp.gguf_export, "_gemma3_layer_arrays", unshifted)
    with pytest.raises(GgufExportError, match=r"llama\.cpp's logits differ from transformers'"):
        export_gguf(folders["dense"], tmp_path / "m.gguf", outtype="f32", tolerance=TOLERANCES["f32"])
    assert list(tmp_path.iterdir()) == []


def test_an_uneven_gemma3_prune_is_refused_before_writing(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(GgufExportError, match="gives every layer the head counts of layer 0"):
        export_gguf(folders["uneven"], tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
