"""Head scoring: interchangeable scorers behind one small interface, registered by a decorator.

``get_scorer(name, **settings).score(model, calibration)`` gives ``[layers, heads]`` scores (higher = keep);
``calibration`` is a :class:`cahp.calibration.Calibration` (examples, batching, objective). Built-in:
``random`` (control), ``magnitude``, ``entropy``, ``gradient`` (Michel et al.), ``hies``, ``attattr``
(Hao et al.), ``l0`` (Voita et al.), ``dsp`` (Li et al.), ``fisher`` (Kwon et al.), and two from head
behaviour (:mod:`cahp.analysis`): ``sink`` (sink and special-token heads go first) and ``redundancy`` (heads that
repeat a head of the previous layer go first).
Also here: the class-separability profiles used by CAHP.

The scorer interface is imported on first use, so ``import cahp.scoring`` stays light (NumPy only).
"""

from typing import Any

from cahp.scoring.separability import (
    bhattacharyya_distance,
    class_pairs,
    jeffries_matusita_distance,
    separability_profiles,
)

#: Names of the built-in scorers (for help texts; ``available_scorers()`` also lists third-party ones).
BUILTIN_SCORERS = (
    "random",
    "magnitude",
    "entropy",
    "gradient",
    "hies",
    "attattr",
    "l0",
    "dsp",
    "fisher",
    "sink",
    "redundancy",
)

_LAZY = ("HeadScorer", "available_scorers", "get_scorer", "register_scorer", "scorer_class")

__all__ = [
    "BUILTIN_SCORERS",
    "HeadScorer",
    "available_scorers",
    "bhattacharyya_distance",
    "class_pairs",
    "get_scorer",
    "jeffries_matusita_distance",
    "register_scorer",
    "scorer_class",
    "separability_profiles",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from cahp.scoring import base

        return getattr(base, name)
    raise AttributeError(f"module 'cahp.scoring' has no attribute {name!r}")
