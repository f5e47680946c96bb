"""Output folders: refused when they exist, resumed when unfinished, replaced only at the end; temporary files
of killed writers removed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cahp.errors import OutputExistsError
from cahp.outputs import (
    RUN_CONFIG_FILE,
    TEMPORARY_FILE_NAME,
    StagedOutput,
    describe_record_changes,
    remove_temporary_files,
    temporary_path,
)


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


def _dead_pid() -> int:
    """The pid of a process that has exited (a killed run's)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _record(lr: float = 1.0, fingerprint: str = "aaaa1111", train: str = "d1", model_path: str = "/m") -> dict:
    """A run record as prune writes it: config fields plus the inputs' fingerprints."""
    return {
        "command": "prune",
        "model": "runs/m",
        "recovery": {"epochs": 1, "learning_rate": lr},
        "inputs": {"model_path": model_path, "model": fingerprint, "calibration": "c1", "data": {"train": train}},
    }


def test_a_run_that_wrote_only_its_settings_is_taken_over_by_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    failed = StagedOutput(out, _record(lr=1.0)).prepare()
    (failed.path / "stages" / "methods").mkdir(parents=True)  # folders made before the refused setting
    (failed.path / "stages" / f".plan.{_dead_pid()}.tmp.json").write_text("{")  # and a half-written file
    failed.lock.held = False  # killed: its lock file stays, naming a process that no longer runs
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "cahp prune"}))
    capsys.readouterr()

    corrected = StagedOutput(out, _record(lr=2.0)).prepare()
    err = capsys.readouterr().err
    assert not corrected.resumed
    assert "wrote nothing but its settings (recovery.learning_rate: 1.0, now 2.0); starting over" in err
    assert [line for line in err.splitlines() if "wrote nothing" in line] and err.count("wrote nothing") == 1
    assert [p.name for p in corrected.path.iterdir()] == [RUN_CONFIG_FILE]
    assert json.loads((corrected.path / RUN_CONFIG_FILE).read_text())["recovery"]["learning_rate"] == 2.0
    corrected.release()
    assert not lock.exists()


def test_a_run_with_work_and_other_inputs_says_what_differs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = StagedOutput(out, _record()).prepare()
    (first.path / "stages").mkdir()
    (first.path / "stages" / "accuracy_before.json").write_text("0.5")  # real work
    first.release()

    with pytest.raises(OutputExistsError) as weights:
        StagedOutput(out, _record(fingerprint="bbbb2222")).prepare()
    assert "an unfinished run with another model is in" in str(weights.value)
    assert "model weights: fingerprint aaaa1111, now bbbb2222" in str(weights.value)
    assert "other settings" not in str(weights.value)
    with pytest.raises(OutputExistsError, match=r"model path: /m, now /elsewhere/m"):
        StagedOutput(out, _record(model_path="/elsewhere/m")).prepare()
    with pytest.raises(OutputExistsError) as data:
        StagedOutput(out, _record(train="d2")).prepare()
    assert "with other data is in" in str(data.value) and "data fingerprints differ: train" in str(data.value)
    with pytest.raises(OutputExistsError) as settings:
        StagedOutput(out, _record(lr=3.0)).prepare()
    assert "with other settings is in" in str(settings.value)
    assert "recovery.learning_rate: 1.0, now 3.0" in str(settings.value) and "\n" not in str(settings.value)
    assert (first.path / "stages" / "accuracy_before.json").read_text() == "0.5", "the work is kept"


def test_describe_record_changes_lists_model_data_and_settings_together() -> None:
    changes = describe_record_changes(_record(), {**_record(fingerprint="ffff", train="d9"), "seed": 3})
    assert changes["summary"] == "another model and other data and other settings"
    assert "fingerprint aaaa1111, now ffff" in changes["details"] and "train" in changes["details"]
    assert "seed: (none), now 3" in changes["details"]
    assert describe_record_changes(None, _record())["details"] == "its settings record is missing or unreadable"


def test_temporary_files_of_a_killed_writer_never_reach_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = StagedOutput(out, {"a": 1}).prepare()
    methods = killed.path / "stages" / "methods"
    methods.mkdir(parents=True)
    leftover = methods / f".cahp__0123abcd.{_dead_pid()}.tmp.pkl"  # what a SIGKILL inside a pickle write leaves
    leftover.write_bytes(b"half a pickle")
    (methods / "cahp__0123abcd.pkl").write_bytes(b"a whole pickle")
    killed.release()

    resumed = StagedOutput(out, {"a": 1}).prepare()
    assert resumed.resumed and not leftover.exists(), "a resumed run deletes the dead writer's temporary file"
    late = resumed.path / f".report.{_dead_pid()}.tmp.json"  # e.g. left by a worker killed during this run
    late.write_text("{")
    resumed.commit()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [RUN_CONFIG_FILE, "stages/methods/cahp__0123abcd.pkl"]


def test_remove_temporary_files_keeps_live_writers_and_other_files(tmp_path: Path) -> None:
    mine = temporary_path(tmp_path / "stats.npz")
    assert TEMPORARY_FILE_NAME.match(mine.name) and mine.suffix == ".npz"
    mine.write_bytes(b"being written")
    dead = tmp_path / f".stats.{_dead_pid()}.tmp.npz"
    dead.write_bytes(b"x")
    other = tmp_path / ".hidden.tmp"  # not a name atomic_write makes
    other.write_text("keep")
    assert remove_temporary_files(tmp_path) == [dead]
    assert mine.exists() and other.exists()
    assert remove_temporary_files(tmp_path, only_dead=False) == [mine] and other.exists()
