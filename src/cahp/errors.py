"""Errors that cahp raises on bad input. Each message says what was wrong and what to do."""

from __future__ import annotations


class CahpError(Exception):
    """Base class of every error cahp raises on purpose (the CLI prints these as one line)."""


class UnsupportedArchitectureError(CahpError):
    """The model's ``config.model_type`` has no registered adapter."""


class ModelNotFoundError(CahpError):
    """A model alias, hub id or folder that cannot be resolved or read."""


class DataError(CahpError):
    """A dataset that cannot be found, has missing columns, out-of-range labels or is empty."""


class OutputExistsError(CahpError):
    """An output folder that already holds results (use ``--overwrite`` or another folder)."""


class PruningError(CahpError):
    """A head-removal request that cannot be carried out (e.g. one that breaks a key-value group)."""


class PrunedModelError(CahpError):
    """A saved pruned-model folder whose weights do not match its recorded structure."""
