"""The stage cache of a run: each stage's JSON result is written once to the run's staging folder, with its
seconds, so that an interrupted run resumes where it stopped (:class:`cahp.outputs.StagedOutput` owns the folder).

Under several processes (:mod:`cahp.distributed`) the main process alone reads and writes the cache: a stage
every process computes together (:meth:`StageCache.shared`, collectives inside) is resumed when the main
process's cache holds it, and its value is every process's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cahp import distributed
from cahp.outputs import read_cache, write_json


class StageCache:
    """Run a stage once: its JSON result is cached in the staging folder, with its seconds (``folder`` ``None``:
    no cache, every stage is computed; a non-main process, or a bench cell, whose file is its cache)."""

    def __init__(self, folder: Path | None, progress: bool):
        self.folder = folder
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    def json(self, name: str, compute: Callable[[], Any]) -> Any:
        """The stage's value: from the cache, else computed (and cached)."""
        cached = read_cache(self.folder / f"{name}.json", _read_stage, f"stage {name}") if self.folder else None
        if cached is not None:
            self.seconds[name] = cached["seconds"]
            self.cached.append(name)
            return cached["value"]
        start = time.perf_counter()
        value = compute()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.folder is not None:
            write_json(self.folder / f"{name}.json", {"seconds": self.seconds[name], "value": value})
        return value

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        """A stage every process computes together (collectives inside): the main process's cache decides
        whether it is resumed, and its value is every process's. :meth:`json` in a single process."""
        if not distributed.is_distributed():
            return self.json(name, compute)
        cached = read_cache(self.folder / f"{name}.json", _read_stage, f"stage {name}") if self.folder else None
        cached = distributed.broadcast_object(cached)
        if cached is not None:
            self.seconds[name] = cached["seconds"]
            self.cached.append(name)
            return cached["value"]
        start = time.perf_counter()
        value = distributed.broadcast_object(compute())
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.folder is not None:
            write_json(self.folder / f"{name}.json", {"seconds": self.seconds[name], "value": value})
        return value

    def forget(self, name: str) -> None:
        """Drop a cached stage (its file and record), so that the next :meth:`json` / :meth:`shared` computes it."""
        if self.folder is not None:
            (self.folder / f"{name}.json").unlink(missing_ok=True)
        self.cached = [stage for stage in self.cached if stage != name]
        self.seconds.pop(name, None)

    def file(self, name: str) -> Path | None:
        """Where a stage keeps a file of its own (a training checkpoint); ``None`` without a cache folder."""
        return self.folder / name if self.folder is not None else None

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)


def _read_stage(path: Path) -> dict[str, Any]:
    """A cached stage: ``{"seconds": ..., "value": ...}`` (a file without both keys is unreadable)."""
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not {"seconds", "value"} <= set(record):
        raise ValueError("not a stage record")
    return record
