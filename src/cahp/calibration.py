"""The calibration object: the examples a method learns from, how they are batched, and the objective.

No method knows what kind of task it runs on. It asks the :class:`Calibration` for batches
(:meth:`Calibration.batches`), for the loss of a batch (:meth:`Calibration.loss`), and, when it needs
class-conditional statistics (CAHP's signatures), for each example's group (:meth:`Calibration.groups`).

An :class:`Objective` is the task-specific part. :class:`SequenceClassification` (cross-entropy on the
model's logits, the labels in the batch) and :class:`CausalLanguageModeling` (next-token cross-entropy on
language-modelling blocks, :mod:`cahp.data.lm`) are built in; a distillation objective plugs in by implementing
the same four members, without touching any method.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from cahp import distributed
from cahp.data.batching import EncodedSplit, collate, num_batches
from cahp.errors import CahpError

if TYPE_CHECKING:
    from cahp.data.lm import LMBlocks


@runtime_checkable
class Objective(Protocol):
    """What a calibration optimises and how examples fall into groups.

    Attributes:
        name: short name recorded in reports (``"sequence-classification"``).
        num_groups: number of example groups for class-conditional statistics (classes), or 0 when the
            objective has none (methods that need groups then refuse the calibration).
    """

    @property
    def name(self) -> str: ...  # read-only members: frozen dataclasses and properties provide them

    @property
    def num_groups(self) -> int: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of ``model`` on one batch (already on the model's device)."""
        ...

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward arguments of a batch (targets dropped), for methods that only run the model."""
        ...


#: Optional member of an :class:`Objective`, used by attribution methods (``attattr``):
#: ``target_probability(model, batch, **extra) -> Tensor [batch]``, the probability the model gives each
#: example's target (``extra`` goes to the forward, e.g. ``output_attentions=True``). An objective without
#: it still serves every method that only needs :meth:`Objective.loss` or the forward.
TARGET_PROBABILITY = "target_probability"


@dataclass(frozen=True)
class SequenceClassification:
    """Cross-entropy of a ``*ForSequenceClassification`` model; groups are the gold classes."""

    num_labels: int
    name: str = "sequence-classification"

    @property
    def num_groups(self) -> int:
        return self.num_labels

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value for key, value in batch.items() if key != "labels"}

    def target_probability(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        """``[batch]`` softmax probability of each example's gold class (fp32 softmax of the logits)."""
        logits = model(**self.model_inputs(batch), **extra).logits
        return logits.float().softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)


def causal_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, L]`` positions counted over real tokens only (0 at each example's first real token; padding
    gets 0), so that a left-padded example sees the positions a right-padded one does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def scored_target_mask(attention_mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``[batch, L - 1]``: True where the logits at position ``t`` predict a scored target at ``t + 1``.

    The targets of example ``b`` are its LAST ``scored[b]`` real tokens (:mod:`cahp.data.lm`); real tokens must
    be contiguous (padding on the left or on the right).

    Args:
        attention_mask: ``[batch, L]``, nonzero = real token.
        scored: ``[batch]`` scored target tokens per example.

    Raises:
        CahpError: an example scores more tokens than it has real tokens after its first.
    """
    real = attention_mask != 0
    real_count = real.sum(1)
    invalid = (scored > real_count - 1) | (scored < 0)
    if bool(invalid.any()):
        bad = int(invalid.nonzero()[0, 0])
        raise CahpError(
            f"example {bad} of the batch scores {int(scored[bad])} target tokens but has {int(real_count[bad])} real "
            "tokens (at most one fewer can be scored): labels must be the scored-token counts of "
            "cahp.data.lm.make_blocks"
        )
    rank_from_end = real.flip(1).long().cumsum(1).flip(1)  # [batch, L]: 1 at the last real token
    is_target = real & (rank_from_end <= scored[:, None])
    return is_target[:, 1:]


@dataclass(frozen=True)
class CausalLanguageModeling:
    """Next-token cross-entropy of a ``*ForCausalLM`` model on language-modelling blocks; no groups.

    A batch holds ``input_ids`` / ``attention_mask`` ``[batch, L]`` and ``labels`` ``[batch]``: the number of
    scored target tokens at the end of each block (:func:`cahp.data.lm.make_blocks`). The loss is the mean
    cross-entropy over every scored, non-padding target token of the batch (each token weighs the same, not
    each block). Padding may be on either side: with ``position_ids`` (default) the forward gets positions
    counted over real tokens (:func:`causal_position_ids`), so a left-padded block gives the same logits as a
    right-padded one.

    ``num_groups`` is 0: there are no classes, so CAHP (class-conditional signatures) refuses this objective.

    ``target_probability`` (for attribution methods such as attattr) is the geometric mean of the
    probabilities of each block's scored next tokens, ``exp(-mean NLL of the block)``: one number per block
    that every scored token moves alike (an arithmetic mean would be dominated by the easy, near-certain
    tokens).

    Attributes:
        name: ``"causal-lm"``.
        position_ids: pass ``position_ids`` from the attention mask (models that take them: Llama, Mistral,
            Qwen2, GPT-2, GPT-NeoX).
    """

    name: str = "causal-lm"
    position_ids: bool = True

    @property
    def num_groups(self) -> int:
        return 0

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        if self.position_ids and "attention_mask" in inputs:
            inputs["position_ids"] = causal_position_ids(inputs["attention_mask"])
        return inputs

    def example_nll(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL ``[batch]`` (fp32, differentiable) and scored-token count ``[batch]`` per example.

        Raises:
            CahpError: the batch has no ``labels`` (scored-token counts) or counts that do not fit the blocks.
        """
        if "labels" not in batch:
            raise CahpError(
                "a causal-LM batch needs labels = scored target tokens per block; build the examples with "
                "cahp.data.lm.make_blocks"
            )
        logits = model(**self.model_inputs(batch), **extra).logits  # [batch, L, vocab]
        mask = scored_target_mask(batch["attention_mask"], batch["labels"])  # [batch, L-1]
        rows, columns = mask.nonzero(as_tuple=True)
        nll = F.cross_entropy(logits[rows, columns].float(), batch["input_ids"][rows, columns + 1], reduction="none")
        totals = torch.zeros(mask.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        return totals, mask.sum(1)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        totals, counts = self.example_nll(model, batch)
        return totals.sum() / counts.sum().clamp(min=1)

    def target_probability(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        """``[batch]`` geometric mean probability of each block's scored next tokens, ``exp(-NLL / tokens)``."""
        totals, counts = self.example_nll(model, batch, **extra)
        return torch.exp(-totals / counts.clamp(min=1))


@dataclass
class Calibration:
    """Calibration examples + batching + objective, handed to every method's ``fit``.

    Attributes:
        examples: the tokenized examples and their labels (``examples.labels`` are the groups).
        tokenizer: pads each batch.
        objective: what the loss is (:class:`SequenceClassification` by default when built by the engine).
        batch_size: examples per batch for methods that do not set their own.
        description: where the examples come from (split, size, seed), recorded in reports.
        progress: methods show progress bars for their long steps.
        sharded: under several processes (:mod:`cahp.distributed`), :meth:`indexed_batches` yields only this
            process's share of the global batch sequence (batch ``i`` to process ``i % world_size``), so that
            statistics summed over batches and then reduced across processes equal the one-process sums;
            ``False`` (:meth:`whole`): every process sees every batch. Ignored in a single process.
    """

    examples: EncodedSplit
    tokenizer: Any
    objective: Objective
    batch_size: int = 32
    description: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    sharded: bool = True

    def __post_init__(self) -> None:
        if len(self.examples) == 0:
            raise CahpError("the calibration set is empty: give a calibration split with examples")
        if self.batch_size <= 0:
            raise CahpError(f"the calibration batch size must be a positive number, got {self.batch_size}")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_groups(self) -> int:
        return self.objective.num_groups

    def groups(self) -> np.ndarray:
        """``[examples]`` group (class) of every example, in example order.

        Raises:
            CahpError: the objective has no groups (``num_groups`` 0, e.g. ``causal-lm``).
        """
        if self.num_groups == 0:
            raise CahpError(
                f"calibration objective {self.objective.name!r} has no example groups (classes); methods that "
                "compare classes need a classification calibration"
            )
        return np.asarray(self.examples.labels)

    def batches(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sort_by_length: bool = False,
        limit: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Padded batches (CPU tensors, targets included): this process's share when sharded (see
        :meth:`indexed_batches`)."""
        for _, batch in self.indexed_batches(
            batch_size, shuffle=shuffle, seed=seed, epoch=epoch, sort_by_length=sort_by_length, limit=limit
        ):
            yield batch

    def indexed_batches(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sort_by_length: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Padded batches, each with its ``[batch]`` example indices (to look up :meth:`groups`).

        The global batch sequence is the one of :func:`cahp.data.batching.iter_batches` (``shuffle``: a
        permutation drawn from ``(seed, epoch)`` alone; ``sort_by_length``: stable sort by length), cut after
        its first ``limit`` batches (``None``: all). Under several processes a sharded calibration yields only
        batches ``i`` with ``i % world_size == rank`` of that sequence (a process may get none); only those are
        padded.
        """
        indices = self.batch_indices(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, sort_by_length=sort_by_length)
        for index, chosen in enumerate(indices[:limit]):
            if self.sharded and not distributed.owns_batch(index):
                continue
            features = [self.examples.features[i] for i in chosen]
            yield chosen, collate(self.tokenizer, features, self.examples.labels[chosen])

    def batch_indices(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sort_by_length: bool = False,
    ) -> list[np.ndarray]:
        """The global batch sequence: ``[batch]`` example indices of every batch, the same in every process."""
        size = batch_size or self.batch_size
        order = np.arange(len(self.examples))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.examples))
        elif sort_by_length:
            order = np.argsort(self.examples.lengths, kind="stable")
        return [order[start : start + size] for start in range(0, len(order), size)]

    def num_batches(self, batch_size: int | None = None) -> int:
        """Batches of the global sequence (every process's together)."""
        return num_batches(self.examples, batch_size or self.batch_size)

    def local_num_batches(self, batch_size: int | None = None, limit: int | None = None) -> int:
        """Batches this process gets from :meth:`indexed_batches` (for progress bars)."""
        total = self.num_batches(batch_size) if limit is None else min(limit, self.num_batches(batch_size))
        return distributed.local_batch_count(total) if self.sharded else total

    def whole(self) -> Calibration:
        """This calibration unsharded: every process sees every batch (for steps that split each batch's rows
        across processes, :func:`local_share`, or that every process computes in full)."""
        return replace(self, sharded=False)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's scalar loss; ``batch`` is moved to the model's device first."""
        return self.objective.loss(model, to_device(batch, _device_of(model)))

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> Any:
        """Run ``model`` on a batch's inputs (no targets), e.g. to read attention maps through hooks."""
        inputs = to_device(self.objective.model_inputs(batch), _device_of(model))
        return model(**inputs, **extra)

    def target_probability(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        """``[batch]`` probability the model gives each example's target (the objective's, see
        :data:`TARGET_PROBABILITY`); ``batch`` is moved to the model's device first.

        Raises:
            CahpError: the objective does not define target probabilities.
        """
        member = getattr(self.objective, TARGET_PROBABILITY, None)
        if member is None:
            raise CahpError(
                f"objective {self.objective.name!r} defines no target probabilities, which attribution methods "
                "need; use a method that only needs the loss, or add target_probability to the objective"
            )
        return member(model, to_device(batch, _device_of(model)), **extra)

    def subset(self, max_examples: int | None, seed: int) -> Calibration:
        """At most ``max_examples`` examples: a seeded random subset in original order (all when ``None``)."""
        if max_examples is None or max_examples >= len(self):
            return self
        if max_examples <= 0:
            raise CahpError(f"max_examples must be a positive number of examples, got {max_examples}")
        chosen = np.sort(np.random.default_rng(seed).permutation(len(self))[:max_examples])
        examples = EncodedSplit([self.examples.features[i] for i in chosen], self.examples.labels[chosen])
        return replace(self, examples=examples, description=dict(self.description))


def lm_calibration(blocks: LMBlocks, tokenizer: Any, batch_size: int = 8, progress: bool = False) -> Calibration:
    """A causal-LM calibration over language-modelling blocks (:func:`cahp.data.lm.make_blocks`); its
    description names the corpus, split and block geometry."""
    return Calibration(
        blocks.examples,
        tokenizer,
        CausalLanguageModeling(),
        batch_size,
        description=blocks.describe(),
        progress=progress,
    )


def local_share(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, float]:
    """This process's rows of one GLOBAL batch (:func:`cahp.distributed.local_rows`) and their share of it.

    A step that weighs its mean loss by the share and sums gradients over processes gets the gradient of the
    one-process mean loss over the whole batch (exact for a loss that is a mean over examples).

    Returns:
        ``(rows, share)``: the sliced batch (``None`` when this process has no row, possible when the batch has
        fewer rows than processes) and ``rows / batch rows`` (1.0 in a single process).
    """
    size = int(next(iter(batch.values())).shape[0])
    rows = distributed.local_rows(size)
    count = rows.stop - rows.start
    if count == size:
        return batch, 1.0
    if count == 0:
        return None, 0.0
    return {key: value[rows] for key, value in batch.items()}, count / size


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
