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


class DiskFullError(OutputError):
    """The disk filled up while a model was written; what was written is removed and the run stays resumable."""


class UnreadableWeightsError(ModelNotFoundError):
    """A model folder whose weight files cannot be read (cut short, garbage, a shard missing)."""


class PrunedRecordError(PrunedModelError):
    """A pruned folder whose ``cahp_kept_heads`` / ``cahp_kept_kv_heads`` record is malformed."""


class OldPrunedFolderError(PrunedModelError, RuntimeError):
    """A pruned folder of an earlier cahp version (stock ``model_type``) given to plain ``from_pretrained``.

    Also a ``RuntimeError``: transformers' own size-mismatch error, which it replaces, is one."""


#: ``errno`` values and message fragments that mean "the disk (or the quota) is full".
_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
_DISK_FULL_TEXTS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an ``OSError``, or a writer's own error wrapping one, such as safetensors') means that
    the disk or the user's quota is full."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    return any(fragment in text for fragment in _DISK_FULL_TEXTS)
