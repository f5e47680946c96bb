"""The calibration object: the examples a method learns from, how they are batched, and the objective.

No method knows what kind of task it runs on. It asks the :class:`Calibration` for batches
(:meth:`Calibration.batches`), for the loss of a batch (:meth:`Calibration.loss`), and, when it needs
class-conditional statistics (CAHP's signatures), for each example's group (:meth:`Calibration.groups`).

An :class:`Objective` is the task-specific part. :class:`SequenceClassification` (cross-entropy on the
model's logits, the labels in the batch) is built in; a causal-LM or a distillation objective plugs in by
implementing the same four members, without touching any method.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cahp.data.batching import EncodedSplit, iter_batches, num_batches
from cahp.errors import CahpError


@runtime_checkable
class Objective(Protocol):
    """What a calibration optimises and how examples fall into groups.

    Attributes:
        name: short name recorded in reports (``"sequence-classification"``).
        num_groups: number of example groups for class-conditional statistics (classes), or 0 when the
            objective has none (methods that need groups then refuse the calibration).
    """

    name: str
    num_groups: int

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
    """

    examples: EncodedSplit
    tokenizer: Any
    objective: Objective
    batch_size: int = 32
    description: dict[str, Any] = field(default_factory=dict)
    progress: bool = False

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
        """``[examples]`` group (class) of every example, in example order."""
        return np.asarray(self.examples.labels)

    def batches(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        sort_by_length: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Padded batches (CPU tensors, targets included); see :func:`cahp.data.batching.iter_batches`."""
        for _, batch in self.indexed_batches(
            batch_size, shuffle=shuffle, seed=seed, epoch=epoch, sort_by_length=sort_by_length
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
    ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Like :meth:`batches`, each batch with its ``[batch]`` example indices (to look up :meth:`groups`)."""
        yield from iter_batches(
            self.tokenizer,
            self.examples,
            batch_size or self.batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            sort_by_length=sort_by_length,
        )

    def num_batches(self, batch_size: int | None = None) -> int:
        return num_batches(self.examples, batch_size or self.batch_size)

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
        return Calibration(examples, self.tokenizer, self.objective, self.batch_size, dict(self.description))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
