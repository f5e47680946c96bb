"""The head-scorer interface, its decorator and look-ups, and the helpers every scorer shares.

A scorer follows scikit-learn's shape: ``__init__`` only stores settings (``seed`` among them), and
:meth:`HeadScorer.score` does the work on ``(model, calibration)``, sets ``scores_`` ``[layers, heads]``
(higher = keep, finite, original head numbering) and returns it. A scorer never knows what task it runs on:
it asks the :class:`~cahp.calibration.Calibration` for batches, for the loss of a batch
(``calibration.loss(model, batch)``) or for a forward without targets (``calibration.forward(model, batch)``).

Scoring never changes a model: weights are only read, and the ``requires_grad`` flags, the train/eval mode of
every module and the attention implementation are restored afterwards.
:class:`~cahp.scoring.random.RandomScorer` is both the control baseline and the spec of this contract.

Adding a scorer is one file (plus, for a built-in or a plugin package, its ``cahp.methods`` entry point: the
registry, :mod:`cahp.methods.base`, lists it from the module's ``METHOD_CARD`` without importing it)::

    METHOD_CARD = {"class": "MyScorer", "kind": "scorer", "settings": {"max_examples": 256, "seed": 0}}


    @register_scorer("mine")
    class MyScorer(HeadScorer):
        '''One line that ``cahp methods`` shows.

        Args:
            max_examples: at most this many calibration examples.
            seed: picks the subset.
        '''

        def __init__(self, *, max_examples: int | None = 256, seed: int = 0) -> None:
            super().__init__(seed=seed)
            self.max_examples = max_examples

        def _score(self, model, calibration) -> np.ndarray:
            examples = calibration.subset(self.max_examples, self.seed)
            for batch in examples.batches(shuffle=True, seed=self.seed):
                loss = examples.loss(model, batch)
                ...
            return scores  # [layers, heads]

Helpers for scorers: :func:`head_grid`, :func:`captured_attention`, :func:`minmax` and :func:`preserved_model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import CahpError
from cahp.methods import base as registry
from cahp.signatures.model_state import eager_attention, preserved_model
from cahp.surgery import is_pruned

if TYPE_CHECKING:
    from cahp.calibration import Calibration


class HeadScorer:
    """Base class: scores every attention head of an unpruned model.

    Class attributes:
        name: the registry name (set by :func:`register_scorer`).
        kind: ``"scorer"``: what the registry lists it as (it becomes a method through global top-K).
        deterministic: for a given calibration set the scores do not depend on ``seed`` at all (not through
            a subset, a batch order or a batch composition either), so one seed is enough in a benchmark.
        budget_aware: the scores depend on the number of heads to keep (setting ``keep``).

    Learned state: ``scores_`` ``[layers, heads]`` float64.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "scorer"
    deterministic: ClassVar[bool] = False
    budget_aware: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def get_settings(self) -> dict[str, Any]:
        """The constructor arguments as stored (JSON-ready for the built-in scorers)."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    def score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        """Score every head of ``model`` on the calibration set.

        Args:
            model: an unpruned model with a registered adapter (left exactly as it was given).
            calibration: the examples, their batching and the objective (the loss).

        Returns:
            ``scores_``: ``[layers, heads]`` float64, higher = keep.

        Raises:
            CahpError: a pruned model, or a scorer that produced a wrong shape or non-finite scores.
        """
        adapter = get_adapter(model)
        expected = (adapter.num_layers(model), adapter.num_heads(model))
        if is_pruned(model):
            raise CahpError(f"scorer {self.name!r} needs an unpruned model; score the model before pruning it")
        with preserved_model(model):
            scores = np.asarray(self._score(model, calibration), dtype=np.float64)
        if scores.shape != expected:
            raise CahpError(f"scorer {self.name!r} returned shape {list(scores.shape)}, expected {list(expected)}")
        if not np.all(np.isfinite(scores)):
            raise CahpError(f"scorer {self.name!r} returned non-finite scores")
        self.scores_ = scores
        return scores

    def _score(self, model: PreTrainedModel, calibration: Calibration) -> np.ndarray:
        """The method itself: ``[layers, heads]``. Runs with every parameter frozen and the model in eval mode."""
        raise NotImplementedError


# ---- registry: the one of cahp.methods.base, which lists head scorers as methods ---------------------------------

#: The registry's head-scorer classes registered in this process (the same dict as ``cahp.methods.base._SCORERS``).
_SCORERS = registry._SCORERS
Scorer = TypeVar("Scorer", bound=type[HeadScorer])


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Class decorator: register a :class:`HeadScorer` subclass under ``name`` (later registrations win)."""

    def register(cls: Scorer) -> Scorer:
        if not (isinstance(cls, type) and issubclass(cls, HeadScorer)):
            raise TypeError(f"@register_scorer({name!r}) needs a HeadScorer subclass, got {cls!r}")
        registry.register_class(name, cls)
        return cls

    return register


def available_scorers() -> list[str]:
    """Every head scorer's name, sorted (built-in, third-party and registered in this process)."""
    return [name for name, info in registry.available_methods().items() if info.kind == "scorer"]


def scorer_class(name: str) -> type[HeadScorer]:
    """The class registered under ``name``, imported.

    Raises:
        CahpError: no scorer has that name (the message lists the available ones).
    """
    info = registry.available_methods().get(name)
    if info is None or info.kind != "scorer":
        raise CahpError(f"unknown head scorer {name!r}; available: {', '.join(available_scorers())}")
    return registry.method_class(name)


def get_scorer(name: str, **settings: Any) -> HeadScorer:
    """A new scorer ``name`` built with ``settings`` (unknown settings raise :class:`CahpError`)."""
    cls = scorer_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise CahpError(f"scorer {name!r} has no setting(s) {unknown}; its settings are {sorted(accepted)}")
    return cls(**settings)


# ---- helpers shared by the scorers --------------------------------------------------------------------------


def head_grid(model: PreTrainedModel) -> tuple[int, int]:
    """``(layers, heads)`` of the original model."""
    adapter = get_adapter(model)
    return adapter.num_layers(model), adapter.num_heads(model)


@contextmanager
def captured_attention(model: PreTrainedModel) -> Iterator[tuple[list[torch.Tensor | None], dict[str, Any]]]:
    """Record every layer's attention probabilities ``[batch, heads, query, key]`` during forwards.

    Yields ``(probabilities, forward_kwargs)``: ``probabilities[layer]`` holds the last forward's map of
    that layer (the very tensor the layer multiplied with its values, so gradients can be taken w.r.t. it);
    pass ``forward_kwargs`` to the forward (``calibration.forward(model, batch, **forward_kwargs)``; MPNet
    needs ``output_attentions=True``).
    """
    adapter = get_adapter(model)
    probabilities: list[torch.Tensor | None] = [None] * adapter.num_layers(model)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) > 1 and output[1] is not None):
                raise CahpError(f"layer {layer} returned no attention probabilities (eager attention needed)")
            probabilities[layer] = output[1]

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(adapter.attention_modules(model))]
    extra = {"output_attentions": True} if adapter.probs_need_output_attentions else {}
    try:
        with eager_attention(model):
            yield probabilities, extra
    finally:
        for handle in handles:
            handle.remove()


def minmax(values: np.ndarray) -> np.ndarray:
    """Global min-max scaling to ``[0, 1]``; all-equal values become 1."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    return np.ones_like(values) if not high > low else (values - low) / (high - low)
