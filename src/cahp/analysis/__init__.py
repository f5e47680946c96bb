"""What attention heads do: sinks, special-token heads, dormant heads, adjacent-layer redundancy.

:func:`analyze_heads` measures a model on a calibration set in one streaming, padding-aware sweep and returns a
:class:`HeadAnalysis`; :func:`analyze` is ``cahp analyze`` (load a model and a task, write the JSON described in
``docs/analysis.md``). The ``sink`` and ``redundancy`` head scorers read the same statistics.
"""

from typing import Any

_LAZY = {
    "HeadAnalysis": "cahp.analysis.heads",
    "HeadStatistics": "cahp.analysis.heads",
    "analyze_heads": "cahp.analysis.heads",
    "analyze": "cahp.analysis.run",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cahp.analysis' has no attribute {name!r}")
