"""Output folders: refused when they exist, resumed when unfinished, replaced only at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from cahp.errors import OutputExistsError
from cahp.outputs import StagedOutput


def test_existing_output_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        StagedOutput(out, {"a": 1}).prepare()
    assert (out / "metrics.json").read_text() == "{}"


def test_overwrite_replaces_only_at_commit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staged = StagedOutput(out, {"a": 1}, overwrite=True).prepare()
    (staged.path / "new.txt").write_text("new")
    assert (out / "old.txt").exists()  # an interrupted run would leave the old results in place
    staged.commit()
    assert not (out / "old.txt").exists() and (out / "new.txt").read_text() == "new"
    assert not staged.path.exists()


def test_unfinished_run_resumes_with_same_settings_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = StagedOutput(out, {"lr": 1}).prepare()
    (first.path / "checkpoint.pt").write_text("state")
    assert not out.exists()
    again = StagedOutput(out, {"lr": 1}).prepare()
    assert again.resumed and (again.path / "checkpoint.pt").exists()
    with pytest.raises(OutputExistsError, match="unfinished run with other settings"):
        StagedOutput(out, {"lr": 2}).prepare()
    fresh = StagedOutput(out, {"lr": 2}, overwrite=True).prepare()
    assert not fresh.resumed and not (fresh.path / "checkpoint.pt").exists()
