"""Collect per-head, per-class signature statistics from forward hooks, batch by batch, never storing maps.

For every batch, a hook on each layer's attention module reads the attention probabilities
``[batch, heads, L, L]``, crops each example to its real tokens (whichever side pads), resizes the crop to
``B x B`` and writes ``[batch, heads, B*B]`` into one buffer; the per-class streaming moments of all layers'
heads are then updated and the maps dropped. The classes are the calibration's example groups
(:meth:`cahp.calibration.Calibration.groups`), so the collector never reads a task's targets itself.

:func:`signature_sweep` is the one pass over the calibration set that everything shares:

- the batch order is ``"sorted"`` (by length, least padding: today's :func:`collect_signatures`) or
  ``"shuffled"`` (a seeded permutation sorted by length only within chunks of :data:`CHUNK_BATCHES` batches, or of
  the convergence window, so every window, and every prefix of windows, is a random sample of the calibration set);
- optional :class:`GradientConsumer` s (e.g. :class:`GateSalience`, the gradient salience of
  :mod:`cahp.scoring.salience`) name the batches they need a loss gradient on: those batches run once with
  autograd on (the hooks read detached maps), the others under ``inference_mode``;
- an optional :class:`Convergence` stops the sweep when a statistic of the moments (CAHP: the JM profiles)
  stops changing between consecutive windows of batches.

Distributed runs (``torchrun``): batch ``p`` of the sweep goes to process ``p % world_size``; the moments are
merged (:func:`cahp.distributed.merge_moments`) before every convergence check and before returning, and the
gradient sums and batch counts are summed over processes, so every process sees the same statistics and takes
the same decisions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp import distributed
from cahp.adapters import get_adapter
from cahp.data.batching import collate
from cahp.errors import CahpError
from cahp.runtime import model_device
from cahp.signatures.model_state import eager_attention, preserved_model
from cahp.signatures.resize import DEFAULT_SIZE, interpolation_matrices, resize_with_matrices
from cahp.signatures.stats import StreamingMoments
from cahp.surgery import head_mask

if TYPE_CHECKING:
    from cahp.calibration import Calibration

SweepOrder = Literal["sorted", "shuffled"]

#: Batches per chunk of a ``"shuffled"`` sweep: the examples are permuted with the seed, then sorted by
#: length within chunks of this many batches (less padding; the batch order inside a chunk is by length).
CHUNK_BATCHES = 8


# ---- batch order -------------------------------------------------------------------------------------------


def sweep_batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    order: SweepOrder = "sorted",
    seed: int = 0,
    chunk_batches: int = CHUNK_BATCHES,
) -> list[np.ndarray]:
    """The example indices of every batch of a sweep, in sweep order.

    Args:
        lengths: ``[examples]`` token count of every example.
        batch_size: examples per batch (the last batch may be smaller).
        order: ``"sorted"``: by length (stable), as :func:`cahp.data.batching.iter_batches` with
            ``sort_by_length`` orders them; ``"shuffled"``: a permutation drawn from ``seed``, sorted by length
            within chunks of :data:`CHUNK_BATCHES` batches, so the first ``n`` batches are (up to the last
            chunk's cut) a random sample of the examples.
        seed: the permutation of ``"shuffled"`` (unused by ``"sorted"``).
        chunk_batches: batches per length-sorted chunk of ``"shuffled"``. A convergence check should fall on chunk
            boundaries (its window a multiple of this): inside a chunk the batches go from short to long examples.

    Returns:
        One ``[batch]`` int array per batch.
    """
    if batch_size < 1:
        raise CahpError(f"batch_size must be a positive number of examples, got {batch_size}")
    lengths = np.asarray(lengths)
    if order == "sorted":
        flat = np.argsort(lengths, kind="stable")
    elif order == "shuffled":
        permutation = np.random.default_rng(seed).permutation(len(lengths))
        if chunk_batches < 1:
            raise CahpError(f"chunk_batches must be >= 1, got {chunk_batches}")
        chunk = batch_size * chunk_batches
        flat = np.concatenate(
            [
                part[np.argsort(lengths[part], kind="stable")]
                for part in (permutation[i : i + chunk] for i in range(0, len(permutation), chunk))
            ]
            or [np.zeros(0, dtype=np.int64)]
        )
    else:
        raise CahpError(f"the sweep order is 'sorted' or 'shuffled', got {order!r}")
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def choose_batches(num_batches: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random choice of ``max(1, ceil(fraction * num_batches))`` batch positions, sorted.

    Raises:
        CahpError: ``fraction`` outside ``(0, 1]`` or no batches.
    """
    if not 0.0 < fraction <= 1.0:
        raise CahpError(f"the salience fraction is the share of batches used, in (0, 1]; got {fraction}")
    if num_batches < 1:
        raise CahpError("there are no batches to choose from: give a calibration set with examples")
    used = max(1, math.ceil(fraction * num_batches))
    return np.sort(np.random.default_rng(seed).permutation(num_batches)[:used])


# ---- per-batch consumers -----------------------------------------------------------------------------------


class GradientConsumer(Protocol):
    """Something that needs the calibration loss's gradient on some batches of the sweep.

    The sweep asks :meth:`uses` for each batch position; on a batch that some consumer uses, it enters every
    such consumer's :meth:`attached` context, runs ONE forward with autograd on (the loss of the calibration
    objective; the signature hooks read detached maps) and hands the loss to each consumer's :meth:`consume`.
    """

    def uses(self, position: int) -> bool:
        """Whether batch ``position`` of the sweep (global numbering) needs the gradient."""
        ...

    def attached(self, model: PreTrainedModel) -> AbstractContextManager[Any]:
        """What to attach to the model while the gradient batch runs (e.g. head gates)."""
        ...

    def consume(self, loss: torch.Tensor, *, retain_graph: bool) -> None:
        """Take the gradient of ``loss`` (scalar); ``retain_graph`` when another consumer follows."""
        ...


class GateSalience:
    """Gradient salience on chosen batches: ``mean over batches |dL/dm|`` for head gates ``m = 1``.

    The estimator of :func:`cahp.scoring.salience.gradient_salience` (frozen weights, eval mode, gates through
    :func:`cahp.surgery.head_mask`) on other batches: those of a sweep (length-sorted within windows) at
    ``positions``, not the scorer's shuffled batches, so its values differ from the scorer's as another batch
    draw would.

    Args:
        positions: the sweep's batch positions (global numbering) whose gradient is taken, e.g.
            :func:`choose_batches`.
        layers, heads: the gate grid.
        device: where the gates live (the model's device).

    After the sweep: :meth:`result` (reduced over processes), ``seconds_`` (time in the backward passes).
    """

    def __init__(self, positions: Iterable[int], layers: int, heads: int, device: torch.device | str) -> None:
        self.positions = frozenset(int(p) for p in positions)
        self.gates = torch.ones(layers, heads, device=device, requires_grad=True)
        self.sums = torch.zeros(layers, heads, dtype=torch.float64, device=device)  # [layers, heads]
        self.batches = 0
        self.seconds_ = 0.0

    def uses(self, position: int) -> bool:
        return position in self.positions

    def attached(self, model: PreTrainedModel) -> AbstractContextManager[Any]:
        return head_mask(model, self.gates)

    def consume(self, loss: torch.Tensor, *, retain_graph: bool) -> None:
        start = time.perf_counter()
        (gradient,) = torch.autograd.grad(loss, self.gates, retain_graph=retain_graph)
        self.sums += gradient.abs().double()
        self.batches += 1
        self.seconds_ += time.perf_counter() - start

    def result(self, *, reduce: bool = True) -> np.ndarray:
        """``[layers, heads]`` float64 mean ``|dL/dm|`` over the used batches of every process.

        Args:
            reduce: sum the gradients and batch counts over processes (``False`` when every process swept every
                batch: an unsharded calibration).

        Raises:
            CahpError: no process saw a chosen batch.
        """
        count = torch.tensor([self.batches], dtype=torch.float64, device=self.sums.device)
        sums, count = (
            (distributed.all_reduce_sum(self.sums), distributed.all_reduce_sum(count)) if reduce else (self.sums, count)
        )
        batches = int(count.item())
        if batches == 0:
            raise CahpError("the salience saw no batch: choose positions among the batches of the sweep")
        return (sums / batches).cpu().numpy()


@dataclass
class Convergence:
    """Stop the sweep when a statistic of the moments stops changing.

    After every ``window`` batches (global count) the statistic (CAHP: the JM profiles ``[heads, P*D]``) is
    computed from the moments merged over processes; its relative change since the previous window is
    ``||S_t - S_{t-1}||_F / ||S_{t-1}||_F``. The sweep stops once a change is below ``tol`` and at least
    ``min_examples`` examples have been seen (``tol = 0`` never stops early).

    Attributes:
        history: ``[{"batches", "examples", "change"}]`` per window (change ``None`` at the first window or
            when the statistic is not finite).
        converged_at: ``{"batches", "examples"}`` where it stopped, or ``None``.
    """

    tol: float
    window: int
    min_examples: int
    statistic: Callable[[StreamingMoments], np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)
    converged_at: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not self.tol >= 0.0:
            raise CahpError(f"the convergence tolerance is a relative change >= 0, got {self.tol}")
        if self.window < 1:
            raise CahpError(f"the convergence window is a number of batches >= 1, got {self.window}")
        if self.min_examples < 0:
            raise CahpError(f"converge_min_examples must be >= 0, got {self.min_examples}")
        self._previous: np.ndarray | None = None

    def check(self, moments: StreamingMoments, batches: int, examples: int) -> bool:
        """Record the change at this window's end; whether the sweep may stop here."""
        current = np.asarray(self.statistic(moments), dtype=np.float64)
        change: float | None = None
        if self._previous is not None and np.isfinite(current).all() and np.isfinite(self._previous).all():
            scale = float(np.linalg.norm(self._previous))
            change = float(np.linalg.norm(current - self._previous)) / scale if scale > 0 else math.inf
        self._previous = current
        self.history.append({"batches": batches, "examples": examples, "change": change})
        stop = change is not None and change < self.tol and examples >= self.min_examples
        if stop:
            self.converged_at = {"batches": batches, "examples": examples}
        return stop


@dataclass
class SweepResult:
    """What a :func:`signature_sweep` saw.

    Attributes:
        moments: per-class moments, features ``[layers * heads, B * B]``, merged over processes.
        batches: batches of the sweep run (all processes), of ``total_batches``.
        examples: examples seen (all processes).
        total_batches: batches of the whole calibration set.
        indices: ``[examples]`` the calibration indices seen (all processes), in sweep order.
        seconds: wall time of the sweep.
    """

    moments: StreamingMoments
    batches: int
    examples: int
    total_batches: int
    indices: np.ndarray
    seconds: float


def signature_sweep(
    model: PreTrainedModel,
    calibration: Calibration,
    *,
    size: int = DEFAULT_SIZE,
    batch_size: int | None = None,
    order: SweepOrder = "sorted",
    seed: int = 0,
    batches: Sequence[np.ndarray] | None = None,
    consumers: Sequence[GradientConsumer] = (),
    convergence: Convergence | None = None,
    progress: bool = True,
) -> SweepResult:
    """One pass over the calibration batches: signatures for every batch, gradients where consumers ask.

    Args:
        model: an unpruned model with a registered adapter (weights frozen and restored; eval mode).
        calibration: the examples (classes: ``calibration.groups()``, at least two present) and the objective.
        size: side ``B`` of the resized maps (reference default 32).
        batch_size: examples per forward (``None``: the calibration's batch size).
        order: ``"sorted"`` or ``"shuffled"`` (see :func:`sweep_batches`; a convergence needs ``"shuffled"``).
        seed: the ``"shuffled"`` order.
        batches: an explicit order instead (``[batch]`` example indices per batch; ``order`` then only says
            whether a convergence may use it, ``batch_size`` and ``seed`` are unused).
        consumers: per-batch gradient consumers (e.g. :class:`GateSalience`).
        convergence: stop early when the statistics settle (checked every ``convergence.window`` batches; not
            before every consumer has had one of its batches).
        progress: show a progress bar.

    Raises:
        CahpError: fewer than two classes present (checked before any forward), a pruned model, a model that
            returns no attention maps, or a convergence asked on a ``"sorted"`` order (a prefix of it is the
            shortest examples, not a sample).
    """
    groups = check_two_classes(calibration)
    if convergence is not None and order != "shuffled":
        raise CahpError("stopping at convergence needs the 'shuffled' order (a sorted prefix is the shortest examples)")
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers(model), adapter.num_heads(model)
    device = model_device(model)
    if batches is None:
        # a converging sweep sorts by length within each window, so that every window is a random sample
        batches = sweep_batches(
            calibration.examples.lengths,
            batch_size or calibration.batch_size,
            order=order,
            seed=seed,
            chunk_batches=convergence.window if convergence is not None else CHUNK_BATCHES,
        )
    sharded = getattr(calibration, "sharded", True)  # unsharded: every process sees every batch, nothing to reduce
    reduce_moments = distributed.merge_moments if sharded else _identity
    moments = StreamingMoments(calibration.num_groups, device=device)
    collector = _MapCollector(layers, heads, size)
    handles = [
        module.register_forward_hook(collector.hook(i)) for i, module in enumerate(adapter.attention_modules(model))
    ]
    extra = {"output_attentions": True} if adapter.probs_need_output_attentions else {}
    window = convergence.window if convergence is not None else max(1, len(batches))
    examples_before = np.concatenate([[0], np.cumsum([len(indices) for indices in batches])])  # [batches + 1]
    start = time.perf_counter()
    seen_batches = seen_examples = 0
    try:
        with preserved_model(model), eager_attention(model), _config_output_attentions(model, bool(extra)):
            own = distributed.local_batch_count(len(batches)) if sharded else len(batches)
            bar = tqdm(total=own, desc="signatures", disable=not progress, leave=False)
            for window_start in range(0, len(batches), window):
                window_end = min(window_start + window, len(batches))
                for position in range(window_start, window_end):
                    if sharded and not distributed.owns_batch(position):
                        continue
                    indices = batches[position]
                    batch = collate(
                        calibration.tokenizer,
                        [calibration.examples.features[i] for i in indices],
                        calibration.examples.labels[indices],
                    )
                    collector.start_batch(batch["attention_mask"].to(device))
                    users = [consumer for consumer in consumers if consumer.uses(position)]
                    if users:
                        with ExitStack() as stack:
                            for consumer in users:
                                stack.enter_context(consumer.attached(model))
                            loss = calibration.loss(model, batch)
                            values = collector.finish_batch()
                            for i, consumer in enumerate(users):
                                consumer.consume(loss, retain_graph=i < len(users) - 1)
                    else:
                        with torch.inference_mode():
                            calibration.forward(model, batch, **extra)
                            values = collector.finish_batch()
                    _add_batch(moments, values, torch.as_tensor(groups[indices], device=device), calibration.num_groups)
                    bar.update()
                seen_batches = window_end
                seen_examples = int(examples_before[window_end])
                if convergence is None:
                    continue
                converged = convergence.check(reduce_moments(moments), seen_batches, seen_examples)
                # a consumer that has had none of its batches yet keeps the sweep going (a salience of 0 batches)
                if converged and all(any(c.uses(p) for p in range(window_end)) for c in consumers):
                    break
                convergence.converged_at = None
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
    return SweepResult(
        moments=reduce_moments(moments),
        batches=seen_batches,
        examples=seen_examples,
        total_batches=len(batches),
        indices=np.concatenate(batches[:seen_batches]) if seen_batches else np.zeros(0, dtype=np.int64),
        seconds=time.perf_counter() - start,
    )


def collect_signatures(
    model: PreTrainedModel,
    calibration: Calibration,
    *,
    size: int = DEFAULT_SIZE,
    batch_size: int | None = None,
    progress: bool = True,
) -> StreamingMoments:
    """Per-(class, head) streaming mean and variance of the padding-aware attention signatures.

    One :func:`signature_sweep` over every batch, sorted by length, without gradients.

    Args:
        model: an unpruned model with a registered adapter.
        calibration: the examples; their classes are ``calibration.groups()`` (``calibration.num_groups`` of
            them), and at least two must be present.
        size: side ``B`` of the resized maps (reference default 32).
        batch_size: examples per forward (``None``: the calibration's batch size); batches are sorted by length.
        progress: show a progress bar.

    Returns:
        Moments with groups = classes and features ``[layers * heads, B * B]`` (head index = layer * heads
        + head), merged over processes.

    Raises:
        CahpError: the calibration has fewer than two classes present (checked before any forward), or the
            model is pruned or returns no attention maps.
    """
    return signature_sweep(model, calibration, size=size, batch_size=batch_size, progress=progress).moments


# ---- internals -----------------------------------------------------------------------------------------------


class _MapCollector:
    """The hooks' shared state: one ``[batch, layers, heads, B*B]`` float32 buffer per batch, filled layer by
    layer with the resized (detached) maps; the interpolation matrices are built once per batch."""

    def __init__(self, layers: int, heads: int, size: int) -> None:
        self.layers, self.heads, self.size = layers, heads, size
        self.matrices: torch.Tensor | None = None  # [batch, B, L]
        self.buffer: torch.Tensor | None = None  # [batch, layers, heads, B*B]
        self.filled = [False] * layers

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        self.matrices = interpolation_matrices(attention_mask, self.size)
        self.buffer = torch.empty(
            attention_mask.shape[0], self.layers, self.heads, self.size * self.size, device=attention_mask.device
        )
        self.filled = [False] * self.layers

    def hook(self, layer: int) -> Callable[..., None]:
        def read_maps(module: torch.nn.Module, args: Any, output: Any) -> None:
            probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probabilities is None:
                raise CahpError(
                    f"layer {layer} returned no attention probabilities: the model must run with eager attention"
                )
            if probabilities.shape[1] != self.heads:
                raise CahpError("signatures need an unpruned model (every layer with all its heads)")
            assert self.buffer is not None and self.matrices is not None  # set by start_batch
            with torch.no_grad():
                self.buffer[:, layer] = resize_with_matrices(probabilities.detach().float(), self.matrices)
            self.filled[layer] = True

        return read_maps

    def finish_batch(self) -> torch.Tensor:
        """``[batch, layers * heads, B*B]`` float32 signatures of the batch just run."""
        if not all(self.filled):
            raise CahpError("not every layer reported its attention maps")
        assert self.buffer is not None
        values, self.buffer, self.matrices = self.buffer.flatten(1, 2), None, None
        return values


def _identity(moments: StreamingMoments) -> StreamingMoments:
    return moments


def _add_batch(moments: StreamingMoments, values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> None:
    """Fold ``values`` ``[batch, *features]`` of classes ``groups`` ``[batch]`` into ``moments``.

    The batch's per-class count, mean and sum of squared deviations from that mean come from two float64
    one-hot matrix products (deviations taken from the class mean first, as ``moments.add_batch`` does, so a
    nearly constant feature keeps its small variance) and are merged with Chan's formula
    (:meth:`StreamingMoments.merge`): the same statistics as ``moments.add_batch`` to float64 rounding, faster.
    """
    x = values.flatten(1).to(torch.float64)  # [batch, F]
    one_hot = torch.nn.functional.one_hot(groups, n_groups).to(torch.float64).T  # [classes, batch]
    count = torch.bincount(groups, minlength=n_groups)  # [classes]
    total = one_hot @ x
    mean = total / count.clamp(min=1)[:, None].to(torch.float64)
    deviation = x - mean[groups]
    m2 = one_hot @ (deviation * deviation)
    shape = (n_groups, *values.shape[1:])
    batch_moments = StreamingMoments(n_groups, device=x.device).load_state_dict(
        {"n_groups": n_groups, "count": count, "mean": mean.reshape(shape), "m2": m2.reshape(shape)}
    )
    moments.merge(batch_moments)


@contextmanager
def _config_output_attentions(model: PreTrainedModel, needed: bool) -> Iterator[None]:
    """Make ``output_attentions`` the config default while the sweep runs, when the attention modules return
    their probabilities only then (MPNet): the objective's loss forward then also feeds the hooks."""
    if not needed:
        yield
        return
    previous = getattr(model.config, "output_attentions", False)
    model.config.output_attentions = True
    try:
        yield
    finally:
        model.config.output_attentions = previous


def check_two_classes(calibration: Calibration) -> np.ndarray:
    """``[examples]`` class of every calibration example, after checking that CAHP can compare classes.

    Raises:
        CahpError: the objective defines fewer than two classes, or fewer than two are present.
    """
    if calibration.num_groups < 2:
        raise CahpError(
            f"CAHP compares classes: the calibration objective {calibration.objective.name!r} defines "
            f"{calibration.num_groups} class(es); give a calibration whose objective has at least two classes"
        )
    groups = np.asarray(calibration.groups())
    present = np.unique(groups)
    if len(present) < 2:
        raise CahpError(
            f"CAHP compares classes: the calibration split has only class {present[0]}; "
            "give a split with at least two classes"
        )
    return groups
