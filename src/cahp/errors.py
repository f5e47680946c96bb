"""Errors that cahp raises on bad input, and the one-line notices it prints. Each message says what was wrong
and what to do."""

from __future__ import annotations

import sys


class CahpError(Exception):
    """Base class of every error cahp raises on purpose (the CLI prints these as one line)."""


class UnsupportedArchitectureError(CahpError):
    """The model's ``config.model_type`` has no registered adapter (or is unknown to transformers)."""


class ModelNotFoundError(CahpError):
    """A model alias, hub id or folder that cannot be resolved or read."""


class DataError(CahpError):
    """A dataset that cannot be found or read, has missing columns, out-of-range labels or is empty."""


class ConfigError(CahpError, ValueError):
    """A setting outside its valid range (e.g. ``batch_size=0``), refused before any work starts."""


class OutputError(CahpError):
    """An output folder that cannot be used (not writable, a file, ...)."""


class OutputExistsError(OutputError):
    """An output folder that already holds results (use ``--overwrite`` or another folder)."""


class OutputLockedError(OutputError):
    """An output folder that another running process is writing to."""


class PruningError(CahpError):
    """A head-removal request that cannot be carried out (e.g. one that breaks a key-value group)."""


class PrunedModelError(CahpError):
    """A saved pruned-model folder whose weights do not match its recorded structure."""


def notice(message: str) -> None:
    """Print one line for the user on stderr, prefixed ``cahp:`` (warnings, recomputed caches, ...)."""
    print(f"cahp: {message}", file=sys.stderr, flush=True)
