"""Text corpora for language modelling, cut into fixed-length blocks for perplexity and causal-LM calibration.

Where a corpus comes from (:func:`load_corpus`):

* ``"mnli-premises"`` (the offline default): the deduplicated premises of the shared MNLI data
  (``$CAHP_DATA_DIR/mnli/validation_matched.jsonl.gz`` for calibration, ``validation_mismatched`` for
  evaluation; ten genres of English prose). Every description names it ``mnli-premises``.
* a local file: ``.txt`` (one document per blank-line-separated paragraph, or per line with
  ``txt_documents="lines"``), ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` (the ``column`` holds the text,
  default ``text``); any of them gzipped (``.gz``).
* a hub dataset through ``datasets``: ``"wikitext:wikitext-2-raw-v1"`` (``path[:config]``); calibration reads
  its ``train`` split, evaluation its ``test`` split (``validation`` when there is no test). WikiText's rows
  are lines of one article stream, so they are joined with ``"\\n\\n"`` into one document, the usual
  WikiText-2 perplexity protocol. Offline this fails with a one-line :class:`~cahp.errors.DataError`.

Blocks (:func:`make_blocks`): the documents are tokenized without special tokens and concatenated with the
tokenizer's EOS token between them, and the stream is cut into windows of ``context_length`` tokens that start
every ``stride`` tokens (the sliding-window protocol). Each token of the stream after the first is scored
exactly once: a block scores the tokens that no earlier block scored, with everything before them in the
block as context. With ``stride < context_length`` every scored token after the first block has at least
``context_length - stride`` tokens of context; with ``stride == context_length`` the blocks do not overlap and
the first token of each block is not scored (nothing in its block precedes it).

A tokenizer that adds a BOS token to every text (Gemma, Llama 2 and 3; not SmolLM2) gets it at the start of every
block, as its model was trained to see: a window then holds ``context_length - 1`` stream tokens after the BOS,
windows start every ``min(stride, context_length - 1)`` tokens, the BOS is never a target, and every token of the
stream is scored exactly once, the first of each block included (the BOS precedes it).

A block set is an :class:`~cahp.data.batching.EncodedSplit` whose ``labels`` are the number of scored target
tokens of each block: the LAST ``labels[i]`` real tokens of block ``i`` are its targets. That holds on either
padding side, so the ordinary batching (:func:`~cahp.data.batching.iter_batches`) serves it unchanged, and
:class:`cahp.calibration.CausalLanguageModeling` reads the count from ``batch["labels"]``.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cahp.data.batching import EncodedSplit
from cahp.errors import CahpError, DataError

#: The offline default corpus: deduplicated MNLI premises.
DEFAULT_CORPUS = "mnli-premises"
#: The MNLI split the default corpus reads, by role.
MNLI_PREMISE_SPLITS = {"calibration": "validation_matched", "evaluation": "validation_mismatched"}
#: The hub split a hub corpus reads, by role (first one present).
HUB_SPLITS = {"calibration": ("train",), "evaluation": ("test", "validation")}

Role = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class TextCorpus:
    """Raw documents of one corpus split.

    Attributes:
        name: ``"mnli-premises"``, a file name or a hub id; recorded in every result.
        split: the split the documents come from (``validation_matched``, ``test``, or ``file``).
        documents: the texts, in corpus order, none empty.
        source: where they were read from (a path or ``hub <id>``).
        notes: how the documents were formed (deduplication, joining), for reports.
    """

    name: str
    split: str
    documents: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "corpus": self.name,
            "split": self.split,
            "documents": len(self.documents),
            "source": self.source,
            "notes": list(self.notes),
        }


@dataclass
class LMBlocks:
    """Fixed-length token blocks of a corpus, ready for batching.

    Attributes:
        examples: one feature dict per block (``input_ids``, ``attention_mask``); ``labels`` ``[blocks]`` is the
            number of scored target tokens at the end of each block.
        corpus: the corpus description (:meth:`TextCorpus.describe`).
        context_length: tokens per block (the last block may be shorter).
        stride: tokens between block starts.
        stream_tokens: tokens of the concatenated stream that the blocks cover.
        bos: every block starts with the tokenizer's BOS token (never scored; see the module doc).
    """

    examples: EncodedSplit
    corpus: dict[str, Any]
    context_length: int
    stride: int
    stream_tokens: int
    bos: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def scored_tokens(self) -> int:
        """Target tokens scored over all blocks."""
        return int(np.sum(self.examples.labels))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (corpus, split, block geometry), recorded with calibrations and results."""
        return {
            **self.corpus,
            "blocks": len(self),
            "context_length": self.context_length,
            "stride": self.stride,
            "stream_tokens": self.stream_tokens,
            "scored_tokens": self.scored_tokens,
            **({"bos_first": True} if self.bos else {}),
        }


# ---------------------------------------------------------------------------------------------------- corpora


def load_corpus(
    source: str | Path = DEFAULT_CORPUS,
    role: Role = "calibration",
    *,
    column: str | None = None,
    txt_documents: Literal["paragraphs", "lines"] = "paragraphs",
    data_dir: str | Path | None = None,
) -> TextCorpus:
    """Read a corpus split: the default MNLI premises, a local file, or a hub dataset (see the module doc).

    Args:
        source: ``"mnli-premises"``, a file path, or a hub id ``path[:config]``.
        role: ``"calibration"`` or ``"evaluation"``: which split a built-in or hub corpus reads (a file is read
            whole for either).
        column: the text column of ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` files and hub datasets
            (default ``text``).
        txt_documents: how a ``.txt`` file splits into documents: ``"paragraphs"`` (blank lines separate
            documents; the lines of a paragraph are joined with newlines) or ``"lines"`` (one per line).
        data_dir: a folder holding ``mnli/validation_matched.jsonl.gz`` ... (before ``$CAHP_DATA_DIR``).

    Raises:
        DataError: a file that cannot be read or has no such column, no documents, MNLI data not found, or a hub
            dataset that cannot be loaded (offline: pass a local file).
    """
    if role not in MNLI_PREMISE_SPLITS:
        raise CahpError(f"role must be 'calibration' or 'evaluation', got {role!r}")
    if txt_documents not in ("paragraphs", "lines"):
        raise CahpError(f"txt_documents must be 'paragraphs' or 'lines', got {txt_documents!r}")
    name = str(source)
    if name == DEFAULT_CORPUS:
        return _mnli_premises(role, data_dir)
    path = Path(name).expanduser()
    if path.is_file():
        return _file_corpus(path, column, txt_documents)
    if path.suffix in (".txt", ".jsonl", ".json", ".csv", ".tsv", ".gz"):
        raise DataError(f"corpus file {path} not found: give an existing .txt/.jsonl/.csv/.tsv file (or .gz)")
    return _hub_corpus(name, role, column or "text")


def _non_empty(texts: Iterable[Any]) -> list[str]:
    return [str(text) for text in texts if text is not None and str(text).strip()]


def _mnli_premises(role: Role, data_dir: str | Path | None) -> TextCorpus:
    from cahp.data.tasks import data_dirs, find_split_file, read_rows

    split = MNLI_PREMISE_SPLITS[role]
    looked = []
    for folder in data_dirs(data_dir):
        looked.append(str(folder / "mnli"))
        path = find_split_file(folder / "mnli", split)
        if path is None:
            continue
        premises = [str(row.get("premise") or "").strip() for row in read_rows(path).rows]
        unique = list(dict.fromkeys(p for p in premises if p))  # first occurrence order
        note = f"MNLI {split} premises, stripped and deduplicated ({len(premises)} rows -> {len(unique)} documents)"
        return TextCorpus(DEFAULT_CORPUS, split, unique, str(path), [note])
    where = "; ".join(looked) or "nowhere (no data_dir and no $CAHP_DATA_DIR)"
    raise DataError(
        f"corpus {DEFAULT_CORPUS!r} needs mnli/{split}.jsonl.gz; looked in: {where}. Set CAHP_DATA_DIR (or pass "
        "data_dir), or give a local text file as the corpus"
    )


def _file_corpus(path: Path, column: str | None, txt_documents: str) -> TextCorpus:
    stem = path.name.removesuffix(".gz")
    if stem.endswith(".txt"):
        text = _read_text(path)
        if txt_documents == "lines":
            documents = _non_empty(line.strip() for line in text.splitlines())
        else:
            paragraphs = [block.strip() for block in _paragraphs(text.splitlines())]
            documents = _non_empty(paragraphs)
        note = f"one document per {'line' if txt_documents == 'lines' else 'blank-line-separated paragraph'}"
    elif stem.endswith((".jsonl", ".json", ".csv", ".tsv")):
        rows = _read_records(path)
        column = column or "text"
        if rows and column not in rows[0]:
            raise DataError(
                f"column {column!r} not found in {path}; available columns: {', '.join(map(str, rows[0]))}; "
                "pass the text column"
            )
        documents = _non_empty(row.get(column) for row in rows)
        note = f"one document per record (column {column!r})"
    else:
        raise DataError(f"{path}: unknown corpus file type; use .txt, .jsonl, .json, .csv or .tsv (optionally .gz)")
    if not documents:
        raise DataError(f"{path} holds no text: give a corpus file with at least one non-empty document")
    return TextCorpus(path.name, "file", documents, str(path), [note])


def _paragraphs(lines: Sequence[str]) -> Iterable[str]:
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            yield "\n".join(current)
            current = []
    if current:
        yield "\n".join(current)


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read().decode("utf-8-sig")
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: re-save it as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, OSError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {error})") from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    from cahp.data.tasks import read_rows

    if path.name.removesuffix(".gz").endswith(".tsv"):
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t")
        try:
            return list(reader)
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: not valid TSV ({error})") from None
    return read_rows(path).rows


def _hub_corpus(name: str, role: Role, column: str) -> TextCorpus:
    from cahp.data.tasks import hub_dataset

    path, _, config = name.partition(":")
    try:
        dataset = hub_dataset(path, config or None)
    except DataError as error:
        reason = str(error).splitlines()[0][:200]
        raise DataError(
            f"corpus {name!r} is not a local file and cannot be loaded from the hub ({reason}); offline, pass a "
            f"local .txt/.jsonl/.csv/.tsv file or use {DEFAULT_CORPUS!r}"
        ) from None
    split = next((s for s in HUB_SPLITS[role] if s in dataset), None)
    if split is None:
        raise DataError(f"hub corpus {name!r} has no {' or '.join(HUB_SPLITS[role])} split; it has {list(dataset)}")
    if column not in dataset[split].column_names:
        raise DataError(f"column {column!r} not in hub corpus {name!r}; columns: {dataset[split].column_names}")
    texts = dataset[split][column]
    if path.split("/")[-1].startswith("wikitext"):
        documents = ["\n\n".join(texts)]
        note = "WikiText rows joined with '\\n\\n' into one document (the usual WikiText perplexity protocol)"
    else:
        documents, note = _non_empty(texts), f"one document per row (column {column!r})"
    return TextCorpus(name, split, documents, f"hub {name}", [note])


# ---------------------------------------------------------------------------------------------------- blocks


def block_spans(
    num_tokens: int, context_length: int, stride: int, prefixed: bool = False
) -> list[tuple[int, int, int]]:
    """``(start, end, scored)`` of each sliding window over a stream of ``num_tokens`` tokens.

    Window ``i`` covers ``[start, end)``; its last ``scored`` tokens are targets that no earlier window scored
    (token 0 is never a target: nothing precedes it). Windows start every ``stride`` tokens and stop at the
    first window that reaches the end of the stream. ``prefixed``: every window will be preceded by a BOS token,
    so a window's first token can be a target too (``context_length`` then counts the stream tokens only).

    Raises:
        CahpError: ``context_length < 2`` or ``stride`` outside ``1..context_length``.
    """
    if context_length < (1 if prefixed else 2):
        raise CahpError(f"context_length must be at least 2 tokens, got {context_length + prefixed}")
    if not 1 <= stride <= context_length:
        raise CahpError(
            f"stride must be between 1 and the context length ({context_length}), got {stride}: a larger stride "
            "would skip tokens"
        )
    spans = []
    first = 0 if prefixed else 1  # the first token a window can score: after the BOS, its own first one
    scored_until = first  # tokens before this index are scored (or, token 0 without a BOS, never can be)
    for start in range(0, max(num_tokens - first, 1), stride):
        end = min(start + context_length, num_tokens)
        first_target = max(scored_until, start + first)
        if end - first_target > 0:
            spans.append((start, end, end - first_target))
            scored_until = end
        if end == num_tokens:
            break
    return spans


def make_blocks(
    tokenizer: Any,
    corpus: TextCorpus,
    context_length: int = 256,
    stride: int | None = None,
    max_blocks: int | None = None,
) -> LMBlocks:
    """Tokenize ``corpus``, join its documents with EOS and cut sliding-window blocks (see the module doc).

    Args:
        tokenizer: a tokenizer with an EOS token (documents are encoded without special tokens).
        corpus: the documents.
        context_length: tokens per block.
        stride: tokens between block starts (``None``: ``context_length``, non-overlapping blocks).
        max_blocks: keep only the first ``max_blocks`` blocks (the stream is tokenized only as far as they need).

    Raises:
        CahpError: a tokenizer without EOS, a bad geometry, or a corpus too short for one scored token.
    """
    stride = context_length if stride is None else stride
    block_spans(context_length, context_length, stride)  # checks the geometry before any tokenization
    if max_blocks is not None and max_blocks < 1:
        raise CahpError(f"max_blocks must be a positive number of blocks, got {max_blocks}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CahpError("the tokenizer has no EOS token to separate documents: set tokenizer.eos_token first")
    bos = adds_bos(tokenizer)
    window, step = (context_length - 1, min(stride, context_length - 1)) if bos else (context_length, stride)
    needed = None if max_blocks is None else window + (max_blocks - 1) * step + 1
    stream: list[int] = []
    chunk = 256
    for first in range(0, len(corpus.documents), chunk):
        encoded = tokenizer(corpus.documents[first : first + chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for ids in encoded:
            if stream:
                stream.append(eos)
            stream.extend(ids)
        if needed is not None and len(stream) >= needed:
            break
    spans = block_spans(len(stream), window, step, prefixed=bos)
    if max_blocks is not None:
        spans = spans[:max_blocks]
    if not spans:
        raise CahpError(f"corpus {corpus.name!r} has {len(stream)} token(s): too short for one scored token")
    prefix = [tokenizer.bos_token_id] if bos else []
    features = [{"input_ids": prefix + stream[s:e], "attention_mask": [1] * (len(prefix) + e - s)} for s, e, _ in spans]
    scored = np.array([n for _, _, n in spans], dtype=np.int64)
    return LMBlocks(EncodedSplit(features, scored), corpus.describe(), context_length, step, spans[-1][1], bos)


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token before every text it encodes (Gemma and Llama 3 do; SmolLM2 not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    encoded = tokenizer("a")["input_ids"]
    return bool(encoded) and encoded[0] == bos


def load_blocks(
    tokenizer: Any,
    source: str | Path = DEFAULT_CORPUS,
    role: Role = "calibration",
    *,
    context_length: int = 256,
    stride: int | None = None,
    max_blocks: int | None = None,
    column: str | None = None,
    txt_documents: Literal["paragraphs", "lines"] = "paragraphs",
    data_dir: str | Path | None = None,
) -> LMBlocks:
    """:func:`load_corpus` then :func:`make_blocks`, in one call."""
    corpus = load_corpus(source, role, column=column, txt_documents=txt_documents, data_dir=data_dir)
    return make_blocks(tokenizer, corpus, context_length, stride, max_blocks)
