"""Run configurations as JSON: build a (nested) config dataclass from a dict, naming every bad key.

``config_from_dict(PruneConfig, json.load(f))`` is how ``--config run_config.json`` replays a run; the same
reader serves ``cahp finetune --config`` and ``cahp bench``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from cahp.errors import CahpError

T = TypeVar("T")

#: Keys a run writes into ``run_config.json`` next to the config itself (not settings of the run).
RECORD_KEYS = ("command", "cahp_version", "inputs")


def config_from_dict(cls: type[T], raw: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``raw``; nested dataclass fields are built from nested dicts.

    Raises:
        CahpError: ``raw`` is not an object, has keys ``cls`` does not know (the message lists the known
            ones), or a value the dataclass refuses.
    """
    if not isinstance(raw, dict):
        raise CahpError(f"{where} must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields) - set(RECORD_KEYS))
    if unknown:
        raise CahpError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        nested = _dataclass_in(hints.get(name))
        if nested is not None and value is not None:
            inner = f"{where}.{name}"
            try:
                values[name] = config_from_dict(nested, value, inner)
            except CahpError as error:  # a nested object's own check: say which object it was
                message = str(error)
                named = message if message.startswith(inner) else f"{inner}: {message}"
                raise type(error)(named) from error  # the same kind of error (ConfigError stays ConfigError)
        elif _is_tuple(hints.get(name)) and isinstance(value, list):
            values[name] = tuple(value)
        else:
            values[name] = value
    missing = [f.name for f in fields.values() if f.name not in values and _required(f)]
    if missing:
        raise CahpError(f"{where}: missing key(s) {missing}")
    try:
        return cls(**values)
    except TypeError as error:
        raise CahpError(f"{where}: {error}") from error


def check_counts(owner: Any, names: tuple[str, ...], *, optional: bool, where: str = "") -> None:
    """Refuse any of ``owner``'s attributes ``names`` that is not a positive whole number (``None`` passes when
    ``optional``: the whole split)."""
    for name in names:
        value = getattr(owner, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            what = (
                "a positive number of examples (or None / null for the whole split)"
                if optional
                else ("a positive whole number")
            )
            raise CahpError(f"{where}{name} must be {what}, got {value!r}")


def check_texts(owner: Any, names: tuple[str, ...], *, optional: bool) -> None:
    """Refuse any of ``owner``'s attributes ``names`` that is not a non-empty text (``None`` passes when
    ``optional``)."""
    for name in names:
        value = getattr(owner, name)
        if optional and value is None:
            continue
        if not isinstance(value, str) or not value:
            raise CahpError(f"{name} must be a non-empty text{' or null' if optional else ''}, got {value!r}")


def check_text_lists(owner: Any, names: tuple[str, ...]) -> None:
    """Refuse any of ``owner``'s attributes ``names`` that is not a list (tuple) of texts."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise CahpError(f"{name} must be a list of texts, got {value!r}")


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CahpError(f"config file {file} not found")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CahpError(f"config file {file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise CahpError(f"config file {file} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _dataclass_in(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    for argument in typing.get_args(annotation):  # Optional[Config]
        if dataclasses.is_dataclass(argument):
            return argument  # type: ignore[return-value]
    return None


def _is_tuple(annotation: Any) -> bool:
    return annotation is tuple or typing.get_origin(annotation) is tuple


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
