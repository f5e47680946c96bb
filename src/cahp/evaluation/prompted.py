"""Zero-shot prompted classification with a decoder LLM: no classifier head, no fine-tuning.

Each example becomes a prompt (a template with ``{text}``, or ``{premise}`` / ``{hypothesis}`` for pairs; the
template's fields are the task's text columns, and ``{text}`` is always the first one). The model's next-token
distribution after the prompt's last real token is read, and each class scores the log-probability of its
label word (``" positive"`` / ``" negative"`` for SST-2). The prediction is the best-scoring class; accuracy and
macro-F1 follow, and the result records the prompt, the label words and their token ids.

A label word that is several tokens:

* ``multi_token="first"`` (default): its first token stands for it (one forward per batch). The first tokens
  of the label words must differ.
* ``multi_token="sum"``: the summed log-probability of all its tokens after the prompt (one forward per class
  and batch), i.e. ``log P(word | prompt)``.

Prompts are encoded without special tokens except a leading BOS when the tokenizer adds one (Llama), so no EOS
or separator follows the answer cue; a prompt longer than ``max_length`` keeps its LAST ``max_length`` tokens
(the cue survives, the text's start is cut). Padding may be on either side: the last real token is found from
the attention mask and positions are counted over real tokens.

The defaults (:data:`PROMPTS`) are plain completion prompts (no chat template), the same for every model.
"""

from __future__ import annotations

import string
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from cahp.calibration import CausalLanguageModeling, causal_position_ids, to_device
from cahp.data.batching import EncodedSplit, iter_batches, num_batches
from cahp.data.tasks import TextSplit
from cahp.errors import CahpError
from cahp.evaluation.metrics import classification_metrics
from cahp.runtime import model_device


@dataclass(frozen=True)
class Prompt:
    """A prompt template and one label word per class (index = class id).

    Attributes:
        template: text with ``{field}`` placeholders (``{text}``, ``{premise}``, ``{hypothesis}``, or any text
            column name); it should end where the label word would follow (no trailing space: label words
            carry their leading space).
        label_words: the word of each class, in class-id order, with its leading space (``" positive"``).
        multi_token: ``"first"`` or ``"sum"`` (see the module doc).
    """

    template: str
    label_words: tuple[str, ...]
    multi_token: Literal["first", "sum"] = "first"

    def __post_init__(self) -> None:
        if self.multi_token not in ("first", "sum"):
            raise CahpError(f"multi_token must be 'first' or 'sum', got {self.multi_token!r}")
        if len(self.label_words) < 2:
            raise CahpError(f"a prompt needs at least two label words (one per class), got {list(self.label_words)}")
        if not self.fields:
            raise CahpError(f"prompt template {self.template!r} has no {{field}} for the example's text")

    @property
    def fields(self) -> tuple[str, ...]:
        """The template's placeholders, in order of appearance."""
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.template) if name)

    def render(self, texts: Sequence[str], text_columns: Sequence[str]) -> str:
        """The prompt of one example: ``texts[i]`` fills ``{text_columns[i]}`` (and ``{text}`` takes ``texts[0]``).

        Raises:
            CahpError: the template names a field the example does not have.
        """
        values = dict(zip(text_columns, texts, strict=False))
        values.setdefault("text", texts[0])
        missing = [name for name in self.fields if name not in values]
        if missing:
            raise CahpError(
                f"prompt template field(s) {missing} are not text columns of the task ({list(text_columns)}); "
                "use {text} or the column names in the template"
            )
        return self.template.format(**values)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label_words": list(self.label_words)}


#: Default prompts of the built-in tasks; label words follow each task's class ids.
PROMPTS: dict[str, Prompt] = {
    "sst2": Prompt("Review: {text}\nSentiment (positive or negative):", (" negative", " positive")),
    "sst5": Prompt(
        "Review: {text}\nSentiment (terrible, bad, okay, good or great):",
        (" terrible", " bad", " okay", " good", " great"),
    ),
    "mnli": Prompt(
        "Premise: {premise}\nHypothesis: {hypothesis}\n"
        "Does the premise entail the hypothesis? Answer yes, maybe or no.\nAnswer:",
        (" yes", " maybe", " no"),  # entailment, neutral, contradiction
    ),
}


def default_prompt(task: str) -> Prompt:
    """The built-in prompt of ``task`` (``sst2``, ``sst5``, ``mnli``).

    Raises:
        CahpError: no default prompt for that task.
    """
    if task.lower() not in PROMPTS:
        raise CahpError(
            f"no default prompt for task {task!r} (defaults: {', '.join(PROMPTS)}); give a Prompt(template, "
            "label_words) with one label word per class"
        )
    return PROMPTS[task.lower()]


def label_token_ids(tokenizer: Any, prompt: Prompt) -> list[list[int]]:
    """The token ids of each label word (no special tokens).

    Raises:
        CahpError: a label word that encodes to no token or to the unknown token, or (``multi_token="first"``)
            two label words that start with the same token.
    """
    encoded = [list(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in prompt.label_words]
    empty = [word for word, ids in zip(prompt.label_words, encoded, strict=True) if not ids]
    if empty:
        raise CahpError(f"label word(s) {empty} encode to no token: choose other label words")
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = [word for word, ids in zip(prompt.label_words, encoded, strict=True) if unk is not None and unk in ids]
    if unknown:
        raise CahpError(f"label word(s) {unknown} are unknown to the tokenizer (they encode to its unknown token)")
    if prompt.multi_token == "first":
        firsts = [ids[0] for ids in encoded]
        if len(set(firsts)) != len(firsts):
            raise CahpError(
                f"label words {list(prompt.label_words)} share a first token ({firsts}): choose words that start "
                "differently, or use multi_token='sum'"
            )
    return encoded


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer puts a BOS before a text by itself (Llama), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def encode_prompts(
    tokenizer: Any, split: TextSplit, prompt: Prompt, text_columns: Sequence[str], max_length: int = 256
) -> EncodedSplit:
    """Tokenized prompts of every example (labels kept); over-long prompts keep their last ``max_length`` tokens."""
    if max_length < 2:
        raise CahpError(f"max_length must be at least 2 tokens, got {max_length}")
    prefix = _bos_prefix(tokenizer)
    texts = [prompt.render(example, text_columns) for example in split.texts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    features = []
    for ids in encoded:
        ids = [*prefix, *ids][-max_length:]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return EncodedSplit(features, np.asarray(split.labels, dtype=np.int64))


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch]`` position of each example's last real token (padding on either side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


@torch.inference_mode()
def label_log_probs(
    model: torch.nn.Module,
    tokenizer: Any,
    data: EncodedSplit,
    prompt: Prompt,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """``[examples, classes]`` log-probability of each label word after each prompt (``multi_token`` rules)."""
    word_ids = label_token_ids(tokenizer, prompt)
    device = model_device(model)
    was_training = model.training
    model.eval()
    scores = np.zeros((len(data), len(word_ids)), dtype=np.float64)
    passes = 1 if prompt.multi_token == "first" else len(word_ids)
    bar = tqdm(total=passes * num_batches(data, batch_size), desc="prompted", disable=not progress, leave=False)
    try:
        if prompt.multi_token == "first":
            firsts = torch.tensor([ids[0] for ids in word_ids], device=device)
            for indices, batch in iter_batches(tokenizer, data, batch_size, sort_by_length=True):
                mask = batch["attention_mask"].to(device)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=causal_position_ids(mask)
                ).logits
                last = logits[torch.arange(len(indices), device=device), last_real_index(mask)].float()
                scores[indices] = last.log_softmax(-1)[:, firsts].double().cpu().numpy()
                bar.update()
        else:
            objective = CausalLanguageModeling()
            for label, ids in enumerate(word_ids):
                extended = EncodedSplit(
                    [{"input_ids": [*f["input_ids"], *ids], "attention_mask": [1] * (len(f["input_ids"]) + len(ids))}
                     for f in data.features],
                    np.full(len(data), len(ids), dtype=np.int64),
                )  # fmt: skip
                for indices, batch in iter_batches(tokenizer, extended, batch_size, sort_by_length=True):
                    totals, _ = objective.example_nll(model, to_device(batch, device))
                    scores[indices, label] = -totals.double().cpu().numpy()
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    return scores


def evaluate_prompted(
    model: torch.nn.Module,
    tokenizer: Any,
    split: TextSplit,
    prompt: Prompt,
    text_columns: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy and macro-F1 of a causal LM on a labelled split.

    Args:
        model: a ``*ForCausalLM`` (returns ``logits`` ``[batch, L, vocab]``).
        tokenizer: encodes the prompts and label words, pads the batches (either side).
        split: the labelled examples (class ids ``0 .. len(prompt.label_words) - 1``).
        prompt: template and label words (:func:`default_prompt` for the built-in tasks).
        text_columns: the names of ``split.texts``' columns (the task's ``text_columns``), which the template's
            fields refer to.
        batch_size: prompts per forward.
        max_length: longest prompt in tokens (longer ones keep their end).
        progress: show a progress bar.

    Returns:
        ``{"accuracy", "macro_f1", "examples", "split", "source", "prompt", "label_words", "label_token_ids",
        "multi_token", "predicted_counts", "label_word_mass", "seconds"}``; ``label_word_mass`` is the mean
        next-token probability the label words' first tokens take together (how well the prompt steers the
        model to answer with a label word; ``multi_token="first"`` only, else ``None``).

    Raises:
        CahpError: a label outside the label words, a template field the split lacks, clashing label words.
    """
    classes = len(prompt.label_words)
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= classes):
        raise CahpError(
            f"{split.where()} has labels outside 0..{classes - 1}, but the prompt has {classes} label words: give "
            "one label word per class"
        )
    start = time.perf_counter()
    data = encode_prompts(tokenizer, split, prompt, text_columns, max_length)
    scores = label_log_probs(model, tokenizer, data, prompt, batch_size, progress)
    predictions = scores.argmax(-1)
    result: dict[str, Any] = classification_metrics(np.asarray(split.labels), predictions)
    result.update(
        examples=len(split),
        split=split.name,
        source=split.source,
        prompt=prompt.template,
        label_words=list(prompt.label_words),
        label_token_ids=label_token_ids(tokenizer, prompt),
        multi_token=prompt.multi_token,
        predicted_counts=np.bincount(predictions, minlength=classes).tolist(),
        label_word_mass=float(np.exp(scores).sum(-1).mean()) if prompt.multi_token == "first" and len(split) else None,
        seconds=round(time.perf_counter() - start, 3),
    )
    return result
