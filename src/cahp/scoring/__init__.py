"""Head scoring: interchangeable scorers behind one small interface, registered by a decorator.

``get_scorer(name, **settings).score(model, calibration)`` gives ``[layers, heads]`` scores (higher = keep);
``calibration`` is a :class:`cahp.calibration.Calibration` (examples, batching, objective). Built-in:
``random`` (control), ``magnitude``, ``entropy``, ``gradient`` (Michel et al.), ``hies``, ``attattr``
(Hao et al.), ``l0`` (Voita et al.), ``dsp`` (Li et al.), ``fisher`` (Kwon et al.), and two from head
behaviour (:mod:`cahp.analysis`): ``sink`` (sink and special-token heads go first) and ``redundancy`` (heads that
repeat a head of the previous layer go first).
Also here: the class-separability profiles used by CAHP.

The scorer interface is imported on first use, so ``import cahp.scoring`` stays light (NumPy only);
``BUILTIN_SCORERS`` (the head scorers cahp declares as entry points) is read from the registry without importing
them.
"""

from typing import Any

from cahp.scoring.separability import (
    bhattacharyya_distance,
    class_pairs,
    jeffries_matusita_distance,
    separability_profiles,
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
    if name == "BUILTIN_SCORERS":  # the head scorers among cahp's own entry points (pyproject.toml)
        from cahp.methods.base import available_methods, builtin_methods

        infos = available_methods()
        return tuple(method for method in builtin_methods() if method in infos and infos[method].kind == "scorer")
    if name in _LAZY:
        from cahp.scoring import base

        return getattr(base, name)
    raise AttributeError(f"module 'cahp.scoring' has no attribute {name!r}")
