"""``cahp export --format gguf``: a (pruned) Llama-family or Gemma 3 causal LM as one GGUF file for llama.cpp,
checked there.

saved folder (or alias) -> :func:`cahp.models.load_causal_lm` (fp32) -> the query and key-value heads each layer
kept (:func:`cahp.surgery.removal.kept_heads_by_layer`) decide the llama.cpp architecture (:func:`gguf_layout`):

* ``llama`` when every layer kept the same, non-zero numbers of query and key-value heads (an unpruned model, or a
  uniform prune): ``llama.attention.head_count`` / ``head_count_kv`` are those numbers, and ``key_length`` /
  ``value_length`` the ORIGINAL head size, which no longer equals ``embedding_length / head_count``;
* ``deci`` otherwise: llama.cpp's architecture for Llama models whose layers differ (DeciLM, Nemotron-51B), which
  reads ``deci.attention.head_count``, ``head_count_kv`` and ``feed_forward_length`` as per-layer arrays and runs
  a layer with ``head_count`` 0 without attention (no q/k/v/o tensors, no attention norm: exactly what cahp's
  head-less layer computes). llama.cpp reads the head size only when layer 0 has heads, and an attention-free
  layer drops an output-projection bias, so an empty layer that is layer 0, or that has such a bias, is written
  as one placeholder head whose output projection is zero instead: the same output, one head's KV cache.

Gemma 3 (``gemma3_text``) is written as llama.cpp's ``gemma3`` when every layer kept the same heads; that
architecture has no per-layer head counts, so an uneven Gemma 3 prune is refused. Its norms (QK-norms too) are
written as ``1 + weight`` (Gemma's RMSNorm scales by that), its rotary embedding needs no reordering (llama.cpp's
gemma3 rotates halves, as transformers does), its sliding window and the two rope bases are carried over (the layer
pattern must be llama.cpp's: a global layer every sixth), and its vocabulary (byte-fallback BPE with ``▁`` for
spaces) becomes llama.cpp's SentencePiece model with scores from the merge ranks.

Tensors: llama.cpp's rotary embedding rotates pairs of neighbouring values where transformers' Llama rotates the
two halves of each head, so the rows of every query and key head are interleaved (:func:`rope_permutation`, per
layer with that layer's head counts). Tied embeddings (SmolLM2) write ``token_embd`` only, which llama.cpp then
reuses as the output layer. ``--outtype``: ``f32``; ``f16``; ``q8_0`` (blocks of 32 values, numpy
quantization of the ``gguf`` package; a matrix whose rows are not a multiple of 32 is written f16). Norms and rope
factors stay f32. The tokenizer (byte-level BPE: tokens, types, merges, special ids, whether BOS/EOS are added,
llama.cpp's name of its pre-tokenizer), the chat template, the rope settings (theta; ``linear`` scaling; ``llama3``
frequency factors) and the RMS-norm epsilon are carried over.

The check (needs ``llama-cpp-python``, ``pip install 'cahp[gguf]'``): the file is written to a temporary name
beside ``--out``; llama.cpp loads it, must tokenize a few texts as the model's tokenizer does, and its logits over
a prompt and its own greedy continuation (f32 KV cache, so the check measures the file, not the cache) must
stay within an outtype-dependent tolerance of transformers' logits for the same tokens (:data:`TOLERANCES`).
Only then is the file renamed into place: a failure leaves nothing and never replaces an earlier export. Without
llama-cpp-python the file is written unchecked, and :func:`describe` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cahp.errors import CahpError

if TYPE_CHECKING:
    import numpy.typing as npt

#: The weight encodings ``--outtype`` offers.
OUTTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")

#: Default largest absolute logit difference to transformers accepted per outtype. Measured on SmolLM2-135M
#: (logits up to about 30), dense / pruned uniformly / unevenly / unevenly with empty layers: f32 5e-5 / 1e-3 /
#: 9e-5 / 8e-5, f16 0.09 / 0.14 / 0.04 / 0.05, q8_0 1.5 / 7.4 / 1.7 / 2.2 (llama.cpp also rounds the activations
#: to 8 bits; the uniform prune, without recovery, suffers most and is refused at q8_0 unless the tolerance is
#: raised); a file with the rope pairs wrong differs by 13 to 21. docs/decoders.md has the table.
TOLERANCES: dict[str, float] = {"f32": 1e-2, "f16": 0.5, "q8_0": 4.0}

#: The least default tolerance per llama.cpp architecture: ggml's CPU GELU (Gemma 3's MLPs) reads a table of f16
#: values, which moves Gemma 3 270M's logits (up to about 26) by 0.011 even in an f32 file.
ARCHITECTURE_TOLERANCE: dict[str, float] = {"gemma3": 0.05}

#: ``model_type`` values (a pruned folder's ``cahp_`` prefix removed) that the export writes.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "gemma3_text")

#: Greedy tokens llama.cpp generates in the check (transformers' choice is compared at each).
CHECK_NEW_TOKENS = 8

#: The check's prompt: its logits and greedy continuation are compared.
CHECK_PROMPT = "The capital of France is Paris, and the capital of Italy is"

#: Texts llama.cpp must tokenize exactly as the model's tokenizer does (numbers, punctuation, runs of spaces and
#: newlines, accents, other scripts).
CHECK_TEXTS: tuple[str, ...] = (
    CHECK_PROMPT,
    "In 1969, 3 astronauts flew 384,400 km -- and came back!",
    "  two spaces,\ttab\n\nnewlines   and it's   done.",
    "Naïve café owners in Zürich said: «très bien» — 東京 2024",
)

#: The regular expression of Llama 3's pre-tokenizer (its ``tokenizer.json``), llama.cpp's ``llama-bpe``.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


class GgufExportError(CahpError):
    """A GGUF export that cannot be done or that llama.cpp does not run as transformers does (the message says
    what to do)."""


@dataclass(frozen=True)
class GgufLayout:
    """How a model's attention is written: the architecture and the heads of every layer as written.

    Attributes:
        architecture: ``"llama"`` (every layer alike) or ``"deci"`` (per-layer head counts).
        head_dim: the size of one head (the original model's).
        query_heads: query heads written per layer (0: an attention-free ``deci`` layer).
        kv_heads: key-value heads written per layer.
        placeholder_layers: layers that kept no head but are written with one zero-output head (see the module
            docstring).
    """

    architecture: str
    head_dim: int
    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    placeholder_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class GgufCheck:
    """llama.cpp against transformers on the written file.

    Attributes:
        tokens: positions whose logits were compared (prompt and continuation).
        max_abs_diff: the largest absolute logit difference.
        tolerance: the largest accepted.
        continuation: llama.cpp's greedy continuation of :data:`CHECK_PROMPT` (token ids).
        agreed: leading tokens of ``continuation`` that transformers also picks, given the same tokens before.
        runner_up_gap: where they first differ, how far transformers' logit of llama.cpp's pick is below its
            best (at most twice the tolerance: the logit bound implies it); ``None`` when all agree.
        texts: texts tokenized alike by llama.cpp and the tokenizer.
    """

    tokens: int
    max_abs_diff: float
    tolerance: float
    continuation: tuple[int, ...]
    agreed: int
    runner_up_gap: float | None
    texts: int


@dataclass(frozen=True)
class GgufExportResult:
    """What :func:`export_gguf` wrote and how it was checked (``check`` is ``None`` without llama-cpp-python)."""

    path: Path
    model: str
    outtype: str
    layout: GgufLayout
    size_bytes: int
    check: GgufCheck | None


def export_gguf(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    tolerance: float | None = None,
    overwrite: bool = False,
) -> GgufExportResult:
    """Export a saved Llama-family causal LM (pruned or not) to one GGUF file, checked in llama.cpp when
    llama-cpp-python is installed.

    Args:
        model: an alias (``smollm2-135m``), a folder (a pruned one too) or a hub id of a causal LM.
        out: the ``.gguf`` file to write (its folder is created).
        outtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` (see the module docstring).
        tolerance: the largest absolute logit difference to transformers accepted; ``None``: the outtype's
            :data:`TOLERANCES` (at least the architecture's :data:`ARCHITECTURE_TOLERANCE`).
        overwrite: replace an existing ``out``.

    Returns:
        What was written and how it was checked.

    Raises:
        GgufExportError: a bad ``out`` or outtype, a model that is not a Llama-family causal LM (an encoder, a
            classifier, another family), something llama.cpp cannot represent (a tokenizer, a rope scaling), or a
            check that fails (then nothing is written).
        ModelNotFoundError: ``model`` is not a model.
    """
    if outtype not in OUTTYPES:
        raise GgufExportError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if tolerance is not None and not tolerance > 0:
        raise GgufExportError(f"tolerance must be above 0, got {tolerance!r}")
    path = check_output_file(out, overwrite)
    _check_causal_llama(model)
    import gguf

    from cahp.errors import is_disk_full
    from cahp.models import load_causal_lm
    from cahp.outputs import atomic_write

    causal_lm, tokenizer = load_causal_lm(model)
    layout = gguf_layout(causal_lm)
    limit = (
        tolerance
        if tolerance is not None
        else max(TOLERANCES[outtype], ARCHITECTURE_TOLERANCE.get(layout.architecture, 0.0))
    )
    writer = gguf.GGUFWriter(None, layout.architecture)
    _add_metadata(writer, causal_lm, tokenizer, layout, outtype, name=path.stem)
    for name, array, raw_dtype in _gguf_tensors(causal_lm, layout, outtype):
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    checked = importlib.util.find_spec("llama_cpp") is not None
    checks: list[GgufCheck] = []

    def write_and_check(temporary: Path) -> None:
        writer.write_header_to_file(temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if checked:
            checks.append(check_in_llama_cpp(temporary, causal_lm, tokenizer, outtype, limit))

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, write_and_check)
    except OSError as error:
        if is_disk_full(error):
            raise GgufExportError(
                f"no space left on device at {path.parent} while writing {path.name}: free space or choose "
                "another --out"
            ) from error
        raise
    return GgufExportResult(
        path=path,
        model=str(model),
        outtype=outtype,
        layout=layout,
        size_bytes=path.stat().st_size,
        check=checks[0] if checks else None,
    )


def check_output_file(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a bad ``--out`` (:func:`cahp.outputs.check_output_file`, for ``.gguf``).

    Raises:
        GgufExportError: what is wrong with ``out`` and what to do.
    """
    from cahp.outputs import check_output_file as check_file

    return check_file(out, overwrite, ".gguf", "llama.cpp", GgufExportError)


def _check_causal_llama(model: str | os.PathLike[str]) -> None:
    """Refuse, from the config alone, an encoder, a sequence classifier or a family other than Llama.

    Raises:
        GgufExportError: which of these ``model`` is.
        ModelNotFoundError: ``model`` is not a model (from :func:`cahp.models.load_model_config`).
    """
    from cahp.models import ENCODER_MODEL_TYPES, is_classifier_config, load_model_config

    config = load_model_config(model)
    model_type = str(getattr(config, "model_type", "")).removeprefix("cahp_")
    supported = (
        f"model_type {', '.join(SUPPORTED_MODEL_TYPES)}: SmolLM2, Llama 3 and other Llama models with a byte-level "
        "BPE tokenizer, and Gemma 3 (text) with its SentencePiece-style vocabulary"
    )
    if model_type in ENCODER_MODEL_TYPES:
        raise GgufExportError(f"{model} is an encoder: GGUF export is for causal LMs ({supported})")
    if is_classifier_config(config):
        raise GgufExportError(
            f"{model} is a sequence classifier: GGUF export is for causal LMs; export it with --format onnx"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GgufExportError(f"{model} has model_type {model_type!r}: GGUF export supports {supported}")


# ---- layout ------------------------------------------------------------------------------------------------


def gguf_layout(model: Any) -> GgufLayout:
    """The architecture and per-layer heads that represent ``model`` (a Llama causal LM, pruned or not) exactly.

    Raises:
        GgufExportError: a layer's weights do not have the shapes its kept heads imply.
    """
    from cahp.adapters import get_adapter
    from cahp.surgery.removal import kept_heads_by_layer, kept_kv_heads_by_layer

    head_dim = get_adapter(model).head_size(model)
    kept = [
        (len(query), len(kv))
        for query, kv in zip(kept_heads_by_layer(model).values(), kept_kv_heads_by_layer(model).values(), strict=True)
    ]
    for layer, (query, kv) in zip(model.model.layers, kept, strict=True):
        attention = layer.self_attn
        shapes = (attention.q_proj.weight.shape[0], attention.k_proj.weight.shape[0], attention.o_proj.weight.shape[1])
        if shapes != (query * head_dim, kv * head_dim, query * head_dim):
            raise GgufExportError(
                f"layer {layer.self_attn.layer_idx}: q/k/o projections of {shapes} rows/columns do not match its "
                f"{query} query and {kv} key-value heads of {head_dim}; re-save the model with cahp"
            )
    if model.config.model_type.removeprefix("cahp_") == "gemma3_text":
        if len(set(kept)) != 1 or kept[0][0] == 0:
            raise GgufExportError(
                f"the layers kept (query, key-value) heads {sorted(set(kept))}, but llama.cpp's gemma3 architecture "
                "gives every layer the head counts of layer 0 (it has no per-layer arrays, unlike deci for Llama): "
                "only a Gemma 3 prune with the same heads in every layer runs there (cahp prune --uniform-layers)"
            )
        ((query, kv),) = set(kept)
        return GgufLayout("gemma3", head_dim, (query,) * len(kept), (kv,) * len(kept))
    if len(set(kept)) == 1 and kept[0][0] > 0:
        ((query, kv),) = set(kept)
        return GgufLayout("llama", head_dim, (query,) * len(kept), (kv,) * len(kept))
    has_output_bias = model.model.layers[0].self_attn.o_proj.bias is not None
    placeholders = tuple(i for i, (query, _) in enumerate(kept) if query == 0 and (i == 0 or has_output_bias))
    written = [(1, 1) if i in placeholders else counts for i, counts in enumerate(kept)]
    return GgufLayout(
        "deci",
        head_dim,
        tuple(query for query, _ in written),
        tuple(kv for _, kv in written),
        placeholders,
    )


def rope_permutation(weight: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """Rows of a query or key projection reordered for llama.cpp's rotary embedding.

    transformers' Llama rotates value ``i`` of a head with value ``i + head_dim / 2``; llama.cpp rotates
    neighbours ``2i`` and ``2i + 1``. Within each head, row ``i`` of the first half moves to ``2i`` and row ``i``
    of the second half to ``2i + 1``.

    Args:
        weight: ``[heads * head_dim, in_features]`` (a weight) or ``[heads * head_dim]`` (a bias).
        heads: the heads the rows hold.

    Returns:
        The same shape, rows reordered.
    """
    head_dim = weight.shape[0] // heads
    halves = weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


# ---- metadata ----------------------------------------------------------------------------------------------


def _add_metadata(writer: Any, model: Any, tokenizer: Any, layout: GgufLayout, outtype: str, name: str) -> None:
    """The model's hyperparameters, rope settings and tokenizer as GGUF key-values of ``layout.architecture``."""
    import gguf

    config = model.config
    gemma = layout.architecture == "gemma3"
    activation = getattr(config, "hidden_activation", None) if gemma else config.hidden_act
    if activation != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise GgufExportError(
            f"hidden activation {activation!r}: llama.cpp's {layout.architecture} runs "
            f"{'tanh-GELU' if gemma else 'SiLU'} MLPs only"
        )
    layers = len(layout.query_heads)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[outtype]
    )
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    if layout.architecture in ("llama", "gemma3"):
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(layout.query_heads[0])
        writer.add_head_count_kv(layout.kv_heads[0])
    else:
        writer.add_feed_forward_length([config.intermediate_size] * layers)
        writer.add_head_count(list(layout.query_heads))
        writer.add_head_count_kv(list(layout.kv_heads))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if gemma:
        _add_gemma3_settings(writer, config, layout.head_dim)
        _add_sentencepiece_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
        return
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    _add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])


#: llama.cpp's gemma3 architecture: every sixth layer attends globally, the others in a sliding window.
GEMMA3_SWA_PATTERN = 6


def _add_gemma3_settings(writer: Any, config: Any, head_dim: int) -> None:
    """Gemma 3's rope bases (global and sliding layers), window and soft-capping, refusing what llama.cpp's gemma3
    would compute differently: another layer pattern, a query scale other than ``1 / sqrt(head_dim)``, attention
    soft-capping, a rope other than the default one.

    Raises:
        GgufExportError: which of these the model has.
    """
    types = list(getattr(config, "layer_types", None) or [])
    expected = [
        "full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(len(types))
    ]
    if types != expected:
        raise GgufExportError(
            f"layer_types {types}: llama.cpp's gemma3 expects a global layer every {GEMMA3_SWA_PATTERN} layers"
        )
    if config.query_pre_attn_scalar != head_dim or getattr(config, "attn_logit_softcapping", None):
        raise GgufExportError(
            "query_pre_attn_scalar differs from head_dim, or attention soft-capping is set: llama.cpp's gemma3 "
            "computes neither for this model size"
        )
    rope = config.rope_parameters
    for kind in ("full_attention", "sliding_attention"):
        if rope[kind].get("rope_type", "default") != "default":
            raise GgufExportError(f"{kind} rope_type {rope[kind].get('rope_type')!r}: cahp writes the default only")
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _rope_parameters(config: Any) -> dict[str, Any]:
    """The config's ``rope_parameters`` (``rope_theta``, ``rope_type`` and the type's own settings).

    Raises:
        GgufExportError: a rope type other than default, linear and llama3.
    """
    rope: dict[str, Any] = config.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise GgufExportError(
            f"rope_type {rope_type!r} is not supported by cahp's GGUF export (supported: default, linear, llama3)"
        )
    return rope


def _rope_frequency_factors(config: Any, head_dim: int) -> npt.NDArray[Any] | None:
    """llama.cpp's ``rope_freqs`` ``[head_dim / 2]`` for a ``llama3`` rope (``None`` for the others): the default
    inverse frequencies divided by transformers' llama3 ones, since llama.cpp divides each angle by its factor."""
    import numpy as np
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    default = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return np.asarray((default / scaled.double()).numpy(), dtype=np.float32)


@dataclass(frozen=True)
class _Vocabulary:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model reads it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def _add_tokenizer(writer: Any, tokenizer: Any, rows: int) -> None:
    """Tokens, types, merges, pre-tokenizer, special ids, BOS/EOS habits and chat template of ``tokenizer``
    (``rows``: the embedding's rows; tokens beyond the tokenizer's are written as unused placeholders)."""
    vocabulary = _vocabulary(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges(vocabulary.merges)
    _add_special_tokens(writer, tokenizer)


def _add_special_tokens(writer: Any, tokenizer: Any) -> None:
    """BOS / EOS / unknown / padding ids, whether BOS and EOS are added, and the chat template."""
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    from cahp.data.lm import adds_bos

    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and encoded[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _add_sentencepiece_tokenizer(writer: Any, tokenizer: Any, rows: int) -> None:
    """A byte-fallback BPE tokenizer whose spaces are ``▁`` (Gemma 3's) as llama.cpp's SentencePiece model
    (``llama``): every id's token with a score and a type. llama.cpp's SentencePiece tokenizer merges the adjacent
    pair whose merged token scores highest, so the score of a token is minus the rank of the first merge that
    makes it (tokens no merge makes: below every merge); the check's texts must then tokenize as the tokenizer
    does. Types: added special tokens CONTROL, other added tokens USER_DEFINED, ``<0xNN>`` BYTE, the unknown
    token UNKNOWN, the rest NORMAL.

    Raises:
        GgufExportError: the tokenizer is not that kind, or has more tokens than the embedding has rows.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    bpe = state.get("model") or {}
    normalizer = state.get("normalizer") or {}
    if (
        bpe.get("type") != "BPE"
        or not bpe.get("byte_fallback")
        or normalizer.get("type") != "Replace"
        or normalizer.get("content") != "\u2581"
    ):
        raise GgufExportError(
            f"{type(tokenizer).__name__} is not a byte-fallback BPE tokenizer with '\u2581' for spaces (Gemma 3's); "
            "cahp writes Gemma 3's vocabulary as SentencePiece only from that kind"
        )
    vocab: dict[str, int] = bpe["vocab"]
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    by_id.update({token_id: entry["content"] for token_id, entry in added.items()})
    if max(by_id) >= rows:
        raise GgufExportError(f"the tokenizer has token ids up to {max(by_id)} but the embedding only {rows} rows")
    merges = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in bpe["merges"]]
    scores = {token_id: -float(len(merges)) - 1.0 for token_id in by_id}
    for rank, (left, right) in enumerate(merges):
        token_id = vocab.get(left + right)
        if token_id is not None and scores[token_id] < -float(rank):
            scores[token_id] = -float(rank)
    tokens, types, values = [], [], []
    for token_id in range(rows):
        token = by_id.get(token_id, f"[PAD{token_id}]")
        if token_id not in by_id:
            kind = gguf.TokenType.UNUSED
        elif token_id == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif re.fullmatch("<0x[0-9A-F]{2}>", token):  # the byte-fallback pieces, wherever the tokenizer lists them
            kind = gguf.TokenType.BYTE
        elif token_id in added:
            kind = gguf.TokenType.CONTROL if added[token_id]["special"] else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(int(kind))
        values.append(scores.get(token_id, -float(len(merges)) - 1.0))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(values)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    _add_special_tokens(writer, tokenizer)


def _vocabulary(tokenizer: Any, rows: int) -> _Vocabulary:
    """The tokenizer's vocabulary as llama.cpp lists it: every id's token (byte-level strings, as in
    ``tokenizer.json``), its type (special added tokens CONTROL, other added tokens USER_DEFINED, the rest
    NORMAL; ids without a token UNUSED ``[PAD<id>]``), the merges as ``"left right"`` and the pre-tokenizer's name.

    Raises:
        GgufExportError: not a byte-level BPE tokenizer, a pre-tokenizer llama.cpp has no name for, or more
            tokens than the embedding has rows.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    bpe = state.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
        raise GgufExportError(
            f"{type(tokenizer).__name__} is not a byte-level BPE tokenizer (GPT-2 style: SmolLM2, Llama 3); "
            "cahp's GGUF export writes only those"
        )
    pre = _pre_tokenizer_name(state.get("normalizer"), state.get("pre_tokenizer"))
    by_id = {token_id: token for token, token_id in bpe["vocab"].items()}
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    by_id.update({token_id: entry["content"] for token_id, entry in added.items()})
    if max(by_id) >= rows:
        raise GgufExportError(
            f"the tokenizer has token ids up to {max(by_id)} but the embedding only {rows} rows; "
            "save the model with its own tokenizer"
        )
    tokens, types = [], []
    for token_id in range(rows):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe["merges"]]
    return _Vocabulary(tokens, [int(kind) for kind in types], merges, pre)


def _pre_tokenizer_name(normalizer: dict[str, Any] | None, pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` normalizer and pre-tokenizer: ``gpt-2``
    (byte-level with GPT-2's regex), ``smollm`` (single digits first, then that), ``llama-bpe`` (Llama 3's
    split, then bytes).

    Raises:
        GgufExportError: a normalizer, or another pre-tokenizer.
    """
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space") else None
    if normalizer is None and byte_level is not None:
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex"):
            return "smollm"
        if (
            kinds == ["Split", "ByteLevel"]
            and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and steps[0].get("behavior") == "Isolated"
            and not byte_level.get("use_regex")
        ):
            return "llama-bpe"
    raise GgufExportError(
        f"the tokenizer's pre-tokenizer {'+'.join(str(kind) for kind in kinds)}"
        f"{' with a normalizer' if normalizer else ''} has no llama.cpp counterpart cahp knows (byte-level BPE "
        "with GPT-2's regex, SmolLM's digit split or Llama 3's split)"
    )


# ---- tensors -----------------------------------------------------------------------------------------------


def _gguf_tensors(model: Any, layout: GgufLayout, outtype: str) -> Iterator[tuple[str, npt.NDArray[Any], Any]]:
    """``(gguf name, array, raw GGML type or None)`` for every tensor llama.cpp's architecture loads, in
    ``outtype`` (2-D weights) or f32 (norms, biases, rope factors)."""
    import gguf

    def named(kind: Any, array: npt.NDArray[Any], layer: int | None = None, suffix: str = "weight") -> Any:
        return (f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.{suffix}", *_encode(array, outtype))

    tensor = gguf.MODEL_TENSOR
    embeddings = model.get_input_embeddings().weight
    yield named(tensor.TOKEN_EMBD, _as_numpy(embeddings))
    if layout.architecture == "gemma3":  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by its weight
        yield named(tensor.OUTPUT_NORM, _as_numpy(model.model.norm.weight) + 1.0)
        if model.get_output_embeddings().weight.data_ptr() != embeddings.data_ptr():
            yield named(tensor.OUTPUT, _as_numpy(model.get_output_embeddings().weight))
        for index, layer in enumerate(model.model.layers):
            for kind, array in _gemma3_layer_arrays(layer):
                yield named(kind, array, index)
        return
    yield named(tensor.OUTPUT_NORM, _as_numpy(model.model.norm.weight))
    if model.get_output_embeddings().weight.data_ptr() != embeddings.data_ptr():
        yield named(tensor.OUTPUT, _as_numpy(model.get_output_embeddings().weight))
    factors = _rope_frequency_factors(model.config, layout.head_dim)
    if factors is not None:
        yield named(tensor.ROPE_FREQS, factors)
    for index, layer in enumerate(model.model.layers):
        for kind, array, suffix in _layer_arrays(layer, index, layout, model.config.hidden_size):
            yield named(kind, array, index, suffix)


def _layer_arrays(
    layer: Any, index: int, layout: GgufLayout, hidden_size: int
) -> Iterator[tuple[Any, npt.NDArray[Any], str]]:
    """``(tensor kind, f32 array, "weight" or "bias")`` of decoder layer ``index`` as written: q and k rows
    permuted for llama.cpp's rope (:func:`rope_permutation`); no attention norm or projection for an
    attention-free layer; zero projections for a placeholder head (its output-projection bias, if any, kept)."""
    import gguf
    import numpy as np

    tensor = gguf.MODEL_TENSOR
    attention, mlp = layer.self_attn, layer.mlp
    query_heads, head_dim = layout.query_heads[index], layout.head_dim
    placeholder = index in layout.placeholder_layers
    if query_heads > 0:
        yield tensor.ATTN_NORM, _as_numpy(layer.input_layernorm.weight), "weight"
        projections = (
            (tensor.ATTN_Q, attention.q_proj, query_heads, (head_dim, hidden_size)),
            (tensor.ATTN_K, attention.k_proj, layout.kv_heads[index], (head_dim, hidden_size)),
            (tensor.ATTN_V, attention.v_proj, 0, (head_dim, hidden_size)),
            (tensor.ATTN_OUT, attention.o_proj, 0, (hidden_size, head_dim)),
        )
        for kind, projection, rotated_heads, placeholder_shape in projections:
            for suffix in ("weight", "bias"):
                parameter = getattr(projection, suffix)
                if parameter is None:
                    continue
                array = _as_numpy(parameter)
                if placeholder and not (kind == tensor.ATTN_OUT and suffix == "bias"):
                    array = np.zeros(placeholder_shape[: array.ndim], dtype=np.float32)
                elif rotated_heads:
                    array = rope_permutation(array, rotated_heads)
                yield kind, array, suffix
    yield tensor.FFN_NORM, _as_numpy(layer.post_attention_layernorm.weight), "weight"
    for kind, projection in (
        (tensor.FFN_GATE, mlp.gate_proj),
        (tensor.FFN_UP, mlp.up_proj),
        (tensor.FFN_DOWN, mlp.down_proj),
    ):
        for suffix in ("weight", "bias"):
            if getattr(projection, suffix) is not None:
                yield kind, _as_numpy(getattr(projection, suffix)), suffix


def _gemma3_layer_arrays(layer: Any) -> Iterator[tuple[Any, npt.NDArray[Any]]]:
    """``(tensor kind, f32 array)`` of a Gemma 3 decoder layer (no biases): the projections as they are (llama.cpp's
    gemma3 rotates the two halves of a head, as transformers does) and every norm, QK-norms included, plus 1."""
    import gguf

    tensor = gguf.MODEL_TENSOR
    attention, mlp = layer.self_attn, layer.mlp
    for kind, module in (
        (tensor.ATTN_NORM, layer.input_layernorm),
        (tensor.ATTN_Q_NORM, attention.q_norm),
        (tensor.ATTN_K_NORM, attention.k_norm),
        (tensor.ATTN_POST_NORM, layer.post_attention_layernorm),
        (tensor.FFN_NORM, layer.pre_feedforward_layernorm),
        (tensor.FFN_POST_NORM, layer.post_feedforward_layernorm),
    ):
        yield kind, _as_numpy(module.weight) + 1.0
    for kind, projection in (
        (tensor.ATTN_Q, attention.q_proj),
        (tensor.ATTN_K, attention.k_proj),
        (tensor.ATTN_V, attention.v_proj),
        (tensor.ATTN_OUT, attention.o_proj),
        (tensor.FFN_GATE, mlp.gate_proj),
        (tensor.FFN_UP, mlp.up_proj),
        (tensor.FFN_DOWN, mlp.down_proj),
    ):
        if projection.bias is not None:
            raise GgufExportError("a Gemma 3 projection with a bias: llama.cpp's gemma3 has none")
        yield kind, _as_numpy(projection.weight)


def _as_numpy(parameter: Any) -> npt.NDArray[Any]:
    """A parameter as a contiguous f32 NumPy array (same shape)."""
    import numpy as np

    return np.ascontiguousarray(parameter.detach().float().cpu().numpy())


def _encode(array: npt.NDArray[Any], outtype: str) -> tuple[npt.NDArray[Any], Any]:
    """``(array to write, raw GGML type or None)``: 1-D arrays f32; matrices f32, f16, or Q8_0 blocks (f16
    when a row is not a whole number of blocks)."""
    import gguf
    import numpy as np

    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    if array.ndim == 1 or outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "q8_0" and array.shape[-1] % block == 0:
        quantized = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        return quantized, gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


# ---- the check in llama.cpp --------------------------------------------------------------------------------


def check_in_llama_cpp(path: Path, model: Any, tokenizer: Any, outtype: str, tolerance: float) -> GgufCheck:
    """Load ``path`` in llama.cpp and compare it with ``model`` (transformers, fp32) on the same tokens.

    llama.cpp must tokenize :data:`CHECK_TEXTS` as ``tokenizer`` does. It then reads :data:`CHECK_PROMPT` and
    generates :data:`CHECK_NEW_TOKENS` greedy tokens (one at a time, through its KV cache); transformers reads
    the prompt and that continuation in one forward. At every position the largest absolute logit difference
    must be at most ``tolerance``. Where transformers' greedy token differs from llama.cpp's, its logits of the
    two are then within twice the tolerance (a near tie; q8_0 has some): the result says how many tokens agree
    and how near the tie was. ``outtype`` (what the file holds) only shapes the advice of a failure.

    Raises:
        GgufExportError: llama.cpp cannot load the file, tokenizes differently, or its logits differ by more
            than ``tolerance`` (or a greedy token differs where transformers had no near tie).
    """
    import numpy as np
    import torch

    prompt = list(tokenizer(CHECK_PROMPT)["input_ids"])
    with _llama_cpp_errors() as errors:
        llm = _load_in_llama_cpp(path, len(prompt) + CHECK_NEW_TOKENS + 8, errors)
        try:
            for text in CHECK_TEXTS:
                expected = list(tokenizer(text)["input_ids"])
                tokenized = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                if tokenized != expected:
                    raise GgufExportError(
                        f"llama.cpp tokenizes {text!r} as {tokenized[:12]}..., the tokenizer as {expected[:12]}...: "
                        f"its pre-tokenizer is not llama.cpp's {_read_pre(path)!r}; nothing was written"
                    )
            llm.eval(prompt)
            continuation: list[int] = []
            for step in range(CHECK_NEW_TOKENS):
                continuation.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                if step < CHECK_NEW_TOKENS - 1:
                    llm.eval(continuation[-1:])
            scores = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
        finally:
            llm.close()
    ids = prompt + continuation[:-1]
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    max_abs_diff = float(np.abs(scores - reference).max())
    chosen = reference[len(prompt) - 1 :]
    gaps = chosen.max(axis=1) - chosen[np.arange(len(continuation)), continuation]
    differing = np.flatnonzero(gaps > 0)
    if not max_abs_diff <= tolerance:  # NaN fails too
        if outtype == "f32":
            advice = "the file does not compute what the model does: report the model type"
        else:
            advice = (
                f"{outtype} rounding moves this model's logits that much, or the file is wrong: export with "
                "--outtype f32 to tell (its check is tight), or raise --tolerance to accept the rounding"
            )
        raise GgufExportError(
            f"llama.cpp's logits differ from transformers' by up to {max_abs_diff:.3g} (tolerance {tolerance:g}) "
            f"over {len(ids)} tokens; nothing was written. {advice}"
        )
    agreed, gap = (int(differing[0]), float(gaps[differing[0]])) if differing.size else (len(continuation), None)
    return GgufCheck(len(ids), max_abs_diff, tolerance, tuple(continuation), agreed, gap, len(CHECK_TEXTS))


def _load_in_llama_cpp(path: Path, n_ctx: int, errors: list[str]) -> Any:
    """``llama_cpp.Llama`` of ``path`` (every position's logits, f32 KV cache, torch's thread count); ``errors``
    collects llama.cpp's error lines (:func:`_llama_cpp_errors`) for the message of a file it cannot load.

    Raises:
        GgufExportError: llama.cpp cannot load the file.
    """
    import torch

    llama_cpp = importlib.import_module("llama_cpp")  # optional (the gguf extra): typed as Any where it is missing
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(),
            verbose=False,
        )
    except ValueError as error:
        reason = "; ".join(errors) or str(error)
        version = importlib.metadata.version("llama-cpp-python")
        raise GgufExportError(
            f"llama.cpp (llama-cpp-python {version}) cannot load the written file ({reason}); nothing was written. "
            "Upgrade llama-cpp-python, or report the model type"
        ) from error


@contextlib.contextmanager
def _llama_cpp_errors() -> Iterator[list[str]]:
    """Route llama.cpp's log to a list that keeps the lines that report an error (``... error loading model:
    <why>``; matched by text, since ggml's log levels were renumbered across versions) and drops the rest, so
    nothing is printed; llama-cpp-python's own log callback is restored afterwards."""
    llama_cpp = importlib.import_module("llama_cpp")
    default_callback = importlib.import_module("llama_cpp._logger").llama_log_callback
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def keep_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace").strip()
        if "error" in line.lower():
            errors.append(line)

    llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(default_callback, ctypes.c_void_p(0))


def _read_pre(path: Path) -> str:
    """The ``tokenizer.ggml.pre`` written in ``path``."""
    import gguf

    return str(gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents())


def describe(result: GgufExportResult) -> str:
    """A few lines for the terminal."""
    layout = result.layout
    if layout.architecture in ("llama", "gemma3"):
        heads = f"{layout.query_heads[0]} query / {layout.kv_heads[0]} key-value heads per layer"
    else:
        heads = f"query heads per layer {list(layout.query_heads)}, key-value {list(layout.kv_heads)}"
        if layout.placeholder_layers:
            heads += f" (layers {list(layout.placeholder_layers)}: one placeholder head with zero output)"
    saved = (
        f"saved {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.outtype}, llama.cpp architecture "
        f"{layout.architecture}: {heads}, head size {layout.head_dim})"
    )
    check = result.check
    if check is None:
        return "\n".join(
            [saved, "not checked in llama.cpp: llama-cpp-python is not installed (pip install 'cahp[gguf]')"]
        )
    tokens = len(check.continuation)
    if check.runner_up_gap is None:
        same = f"greedy continuation of {tokens} tokens the same"
    else:
        same = (
            f"greedy continuation the same for {check.agreed} of {tokens} tokens, then a near tie (transformers "
            f"ranks llama.cpp's pick {check.runner_up_gap:.2g} below its own)"
        )
    return "\n".join(
        [
            f"llama.cpp vs transformers, max abs logit diff {check.max_abs_diff:.2e} (tolerance {check.tolerance:g}, "
            f"{check.tokens} tokens); {same}; "
            f"{check.texts} texts tokenized alike",
            saved,
        ]
    )
