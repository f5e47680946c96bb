"""Output folders that are never half-written, never shared by two runs, and never silently destroy earlier
results; and atomic writes of every cached file.

A run writes into a hidden staging folder beside its output folder (``.<name>.partial``) and renames it into
place only when everything is written. An interrupted run leaves only the staging folder, and the same command
with the same settings resumes from it. An existing output folder is refused unless ``overwrite=True``; it
is then replaced only at the very end, once the new results are complete.

While a run uses a staging folder it holds a lock file beside it (``.<name>.lock``: pid, host, command); a
second run to the same output folder is refused with a message naming the holder. A lock left by a process
that no longer runs on this host is taken over (with a notice). A staging folder that holds nothing but the run
record (a run that stopped before any work, e.g. on a refused setting) does not block a run with other settings:
it is taken over with a notice. One that holds work is refused with a message saying what differs: the model,
the data, or which settings.

Every file a run may read back (JSON stages, ``.npz`` statistics, checkpoints) is written to a temporary file
and renamed into place (:func:`atomic_write`), so a hard kill leaves either the old file or the new one (and,
at worst, a temporary ``.<stem>.<pid>.tmp<suffix>`` file, which a resumed run deletes and which never reaches the
output folder); a cache entry that cannot be read anyway (e.g. written by an older version) is treated as missing
by :func:`read_cache`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from cahp.errors import OutputError, OutputExistsError, OutputLockedError, notice

RUN_CONFIG_FILE = "run_config.json"
#: A lock file that cannot be parsed and is older than this is taken as left by a crash while it was written.
UNREADABLE_LOCK_GRACE_SECONDS = 10.0
#: What :func:`read_cache` appends to the name of a cache file it sets aside as unreadable.
UNREADABLE_SUFFIX = ".unreadable"

#: The name :func:`atomic_write` gives its temporary files: ``.<stem>.<pid>.tmp<suffix>``.
TEMPORARY_FILE_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp(\.[^.]*)?$")
#: The (flattened) run-record keys that name the model: its path as given, resolved, and its weights' fingerprint.
MODEL_KEYS = ("model", "inputs.model_path", "inputs.model")
_ABSENT = object()  # a key one of two records lacks

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------- atomic files


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`atomic_write` writes for ``path`` in this process: ``.<stem>.<pid>.tmp<suffix>``
    beside it (matched by :data:`TEMPORARY_FILE_NAME`)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def remove_temporary_files(folder: Path, only_dead: bool = True) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` (recursively) when its process was killed.

    Args:
        folder: the folder to clean (a staging folder).
        only_dead: keep the files of processes still running on this host (this process's included); ``False``
            deletes every one, for a folder nobody else writes (a finished run's staging folder, under its lock).

    Returns:
        The deleted files.
    """
    removed = []
    for path in sorted(folder.rglob(".*.tmp*")) if folder.is_dir() else []:
        match = TEMPORARY_FILE_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        if only_dead and (int(match["pid"]) == os.getpid() or _pid_is_running(int(match["pid"]))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def check_output_file(
    out: str | os.PathLike[str], overwrite: bool, suffix: str, readers: str, error: type[Exception]
) -> Path:
    """Refuse an output file path that is a folder, does not end in ``suffix``, exists without ``overwrite``, or
    sits under a file; returns it as a Path.

    Args:
        suffix: the file type's suffix (``.onnx``, ``.gguf``).
        readers: who looks for the suffix, for the message (``ONNX Runtime``, ``llama.cpp``).
        error: the exception raised (the exporter's own).

    Raises:
        error: what is wrong with ``out`` and what to do.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise error(f"--out {path} is a folder: give a file name such as {path / ('model' + suffix)}")
    if path.suffix != suffix:
        raise error(f"--out {path} should end in {suffix} ({readers} and other tools look for it)")
    if path.exists() and not overwrite:
        raise error(f"{path} exists: pass --overwrite to replace it, or choose another file")
    if path.parent.exists() and not path.parent.is_dir():
        raise error(f"{path.parent} is a file, not a folder: choose another --out")
    return path


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Write a file atomically: ``writer(temporary)`` writes a temporary file beside ``path`` that is then
    flushed to disk and renamed over ``path``. On any error the temporary file is removed and ``path`` is
    left as it was.

    The temporary file's name (:func:`temporary_path`) ends with ``path``'s suffix (``.npz`` stays ``.npz``),
    for writers that add or check one. A hard kill can leave it behind; :class:`StagedOutput` deletes such
    files when it resumes and before it commits.

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        writer(temporary)
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text))


def atomic_save_npz(path: str | os.PathLike[str], **arrays: npt.ArrayLike) -> Path:
    """``np.savez(path, **arrays)`` (uncompressed), written atomically."""
    named: dict[str, Any] = arrays  # np.savez's typing would match them against its allow_pickle flag

    def write(temporary: Path) -> None:
        with temporary.open("wb") as handle:
            np.savez(handle, **named)

    return atomic_write(path, write)


def read_cache(path: str | os.PathLike[str], loader: Callable[[Path], T], what: str) -> T | None:
    """Read a cached file, treating an unreadable one as missing.

    Args:
        path: the cache file.
        loader: reads it (e.g. ``StreamingMoments.load`` or ``lambda p: json.loads(p.read_text())``).
        what: what the file holds, for the notice (e.g. ``"signatures"``).

    Returns:
        ``loader(path)``, or ``None`` when the file does not exist or cannot be read. An unreadable file is
        moved aside to ``<name>.unreadable`` (replacing an earlier one) and one line
        ``cahp: cached <what> unreadable (...), recomputing`` is printed on stderr.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return loader(path)
    except Exception as error:  # truncated zip, bad JSON, wrong keys, old format ...: all mean "recompute"
        aside = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}")
        os.replace(path, aside)
        notice(f"cached {what} unreadable ({path}: {type(error).__name__}: {error}), recomputing")
        return None


# ---------------------------------------------------------------------------------------------------- locking


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _describe_holder(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    command = f", command {holder['command']!r}" if holder.get("command") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{command}{since}"


class OutputLock:
    """An exclusive lock file (created with ``O_EXCL``) holding the owner's pid, host and command.

    Args:
        path: the lock file.
        what: what the lock protects, for messages (e.g. the output folder).
        command: the command line of this run, recorded for whoever finds the lock held.
    """

    def __init__(self, path: Path, what: str, command: str | None = None) -> None:
        self.path = path
        self.what = what
        self.command = command if command is not None else " ".join(sys.argv)
        self.held = False

    def acquire(self) -> OutputLock:
        """Take the lock, or take over a stale one; raise :class:`OutputLockedError` when it is held."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale(me)
                continue
            except OSError:  # a full disk while creating it: a cut-short file is not left to block the rerun
                if self.path.exists() and self._read_holder() is None:
                    self.path.unlink(missing_ok=True)
                raise
            try:
                with os.fdopen(descriptor, "w") as handle:
                    json.dump(me, handle)
            except OSError:  # a full disk: no half-written lock is left to block the rerun
                self.path.unlink(missing_ok=True)
                raise
            self.held = True
            atexit.register(self.release)  # a run that ends without releasing (an error) frees it on exit
            return self
        holder = self._read_holder() or {}
        raise OutputLockedError(
            f"{self.what} is in use by another run ({_describe_holder(holder)}); wait for it to finish or "
            f"choose another --out (if that run is gone, delete {self.path})"
        )

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _remove_if_stale(self, me: dict[str, Any]) -> None:
        """Delete the existing lock file if its holder is gone; raise if it is alive."""
        holder = self._read_holder()
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return  # released meanwhile: try again
            if age < UNREADABLE_LOCK_GRACE_SECONDS:
                raise OutputLockedError(
                    f"{self.what} is being locked by another run right now (lock file {self.path}); "
                    "wait for it or choose another --out"
                )
            notice(f"taking over the unreadable lock {self.path} (left by a crash)")
        elif holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
            pass  # left by an earlier, unreleased run in this same process (e.g. an interrupted API call)
        elif holder.get("host") == me["host"] and not _pid_is_running(int(holder.get("pid", -1))):
            notice(f"taking over the lock of {self.what} from {_describe_holder(holder)}, which is no longer running")
        else:
            raise OutputLockedError(
                f"{self.what} is in use by another run ({_describe_holder(holder)}); wait for it to finish or "
                f"choose another --out (if that run is gone, delete {self.path})"
            )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete the lock file if this object holds it (idempotent)."""
        if self.held:
            holder = self._read_holder()
            if holder is None or (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()):
                self.path.unlink(missing_ok=True)
            self.held = False
            atexit.unregister(self.release)


# ---------------------------------------------------------------------------------------------------- staging


def check_output_target(out: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse, without writing anything, an output folder a run could not (or must not) write: a path that is a
    file or lies under one, a parent without write permission, or a folder holding results (without
    ``overwrite``). Runs call it before any work; :meth:`StagedOutput.prepare` again under the lock.

    Raises:
        OutputError: the path cannot become a folder.
        OutputExistsError: the folder holds results and ``overwrite`` is false.
    """
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} is a file: choose a folder for --out (a new one, or one to replace)")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output folder {path} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {path} cannot be created: no permission to write in {ancestor}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {path} already holds results: pass --overwrite to replace them "
            "(only once the new run has finished) or choose another --out"
        )


def holds_only_run_record(staging: Path) -> bool:
    """Whether a staging folder holds no work: only its run record (or the record set aside as unreadable),
    empty folders and temporary files of killed writers."""
    kept = {RUN_CONFIG_FILE, f"{RUN_CONFIG_FILE}.unreadable"}
    for path in staging.rglob("*"):
        if path.is_dir() or TEMPORARY_FILE_NAME.match(path.name):
            continue
        if path.parent == staging and path.name in kept:
            continue
        return False
    return True


def _flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (lists and other values are leaves)."""
    if not isinstance(record, dict):
        return {prefix: record} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _short(value: Any, limit: int = 40) -> str:
    """A value for a message: JSON, cut to ``limit`` characters (``(none)`` for a key one record lacks)."""
    if value is _ABSENT:
        return "(none)"
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def describe_record_changes(earlier: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, str]:
    """Say how the run record of an unfinished run differs from a new one: the model (its path or its weights'
    fingerprint), the data (its fingerprints), or which settings (dotted keys, with both values).

    Args:
        earlier: the stored record (``None`` when missing or unreadable).
        now: the new record: the config fields plus ``"inputs"`` (``model_path``, ``model`` fingerprint,
            ``calibration`` fingerprint, ``data`` fingerprints per split).

    Returns:
        ``{"summary": ..., "details": ...}``: e.g. ``"another model"`` and ``"model weights: fingerprint
        1a2b3c4d, now 5e6f7a8b"``, or ``"other settings"`` and ``"recovery.epochs: 1, now 3"``.
    """
    if not isinstance(earlier, dict):
        return {"summary": "other settings", "details": "its settings record is missing or unreadable"}
    old, new = _flatten(earlier), _flatten(now)
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key, _ABSENT) != new.get(key, _ABSENT))
    if not changed:  # equal after flattening but not before (e.g. {} against a missing key)
        return {"summary": "other settings", "details": "the records differ in an empty field"}
    model = [key for key in changed if key in MODEL_KEYS]
    data = [key for key in changed if key == "inputs.calibration" or key.startswith("inputs.data")]
    settings = [key for key in changed if key not in model and key not in data]
    summary, details = [], []
    if model:
        summary.append("another model")
        if "inputs.model_path" in model or "model" in model:
            key = "inputs.model_path" if "inputs.model_path" in model else "model"
            details.append(f"model path: {old.get(key)}, now {new.get(key)}")
        if "inputs.model" in model:
            before, after = (str(record.get("inputs.model", "?"))[:12] for record in (old, new))
            details.append(f"model weights: fingerprint {before}, now {after}")
    if data:
        summary.append("other data")
        names = [key.removeprefix("inputs.data.").removeprefix("inputs.") for key in data]
        details.append(f"data fingerprints differ: {', '.join(names)}")
    if settings:
        summary.append("other settings")
        shown = [f"{key}: {_short(old.get(key, _ABSENT))}, now {_short(new.get(key, _ABSENT))}" for key in settings[:6]]
        more = f"; and {len(settings) - 6} more" if len(settings) > 6 else ""
        details.append("; ".join(shown) + more)
    return {"summary": " and ".join(summary), "details": "; ".join(details)}


class StagedOutput:
    """The staging folder of one run, its lock, its resume check, and the final atomic swap.

    Use it as a context manager, which prepares it on entry and releases the lock on exit (also on error)::

        with StagedOutput(out, run_config, overwrite) as staged:
            ...write into staged.path...
            staged.commit()

    or call :meth:`prepare`, then :meth:`commit` (which releases the lock) and :meth:`release` on error.

    Args:
        out: the output folder the user asked for.
        run_config: the settings of the run (JSON-ready). An unfinished run resumes only if equal.
        overwrite: replace an existing output folder at the end instead of refusing to start.
        command: the command line, recorded in the lock file (default: ``sys.argv``).
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        run_config: dict[str, Any],
        overwrite: bool = False,
        command: str | None = None,
    ):
        self.out = Path(out).expanduser().resolve()
        self.run_config = json.loads(json.dumps(run_config, default=str))
        self.overwrite = overwrite
        self.staging = self.out.parent / f".{self.out.name}.partial"
        self.lock = OutputLock(self.out.parent / f".{self.out.name}.lock", f"output folder {self.out}", command)
        self.resumed = False

    def prepare(self) -> StagedOutput:
        """Lock, check the output folder and create (or reopen, to resume) the staging folder.

        Raises:
            OutputLockedError: another running process uses this output folder.
            OutputExistsError: the output folder holds results (without ``overwrite``), or an unfinished run
                with other settings (model, data or settings: the message says which) left work in the staging
                folder. One that left nothing but its run record is discarded instead, with a notice.
        """
        if self.lock.held:
            return self
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except (FileExistsError, NotADirectoryError) as error:
            raise OutputError(f"cannot create {self.out}: {error.strerror} ({error.filename})") from None
        except PermissionError as error:
            raise OutputError(
                f"cannot write beside {self.out}: {error.strerror} ({error.filename}); choose a writable --out"
            ) from None
        try:
            self._prepare_locked()
        except BaseException:
            self.lock.release()
            raise
        return self

    def _prepare_locked(self) -> None:
        check_output_target(self.out, self.overwrite)
        config_file = self.staging / RUN_CONFIG_FILE
        if self.staging.exists():
            remove_temporary_files(self.staging)  # half-written files of a killed run: never results
            earlier = read_cache(config_file, lambda p: json.loads(p.read_text()), "run settings")
            if earlier == self.run_config:
                self.resumed = True
            elif self.overwrite:
                shutil.rmtree(self.staging)
            elif holds_only_run_record(self.staging):
                changes = describe_record_changes(earlier, self.run_config)
                notice(
                    f"the unfinished run in {self.staging} wrote nothing but its settings ({changes['details']}); "
                    "starting over with the new ones"
                )
                shutil.rmtree(self.staging)
            else:
                changes = describe_record_changes(earlier, self.run_config)
                raise OutputExistsError(
                    f"an unfinished run with {changes['summary']} is in {self.staging} ({changes['details']}): "
                    "rerun it exactly as before to resume it, or pass --overwrite to discard it"
                )
        self.staging.mkdir(parents=True, exist_ok=True)
        write_json(config_file, self.run_config)

    @property
    def path(self) -> Path:
        """Where the run writes its files until :meth:`commit`."""
        return self.staging

    def commit(self) -> Path:
        """Move the finished staging folder into place (replacing an old output only now); release the lock.

        Temporary files left by killed writers (:func:`atomic_write`) and cache files set aside as unreadable
        (:func:`read_cache`, recomputed since) are deleted first: the run is finished and holds the lock, so no
        file in the staging folder is still being written.
        """
        try:
            remove_temporary_files(self.staging, only_dead=False)
            for aside in self.staging.rglob(f"*{UNREADABLE_SUFFIX}"):
                aside.unlink()
            trash = self.out.parent / f".{self.out.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            if self.out.exists():
                os.replace(self.out, trash)
            os.replace(self.staging, self.out)
            if trash.exists():
                shutil.rmtree(trash)
        finally:
            self.release()
        return self.out

    def release(self) -> None:
        """Release the lock without committing (the staging folder stays, to resume). Idempotent."""
        self.lock.release()

    def __enter__(self) -> StagedOutput:
        return self.prepare()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
