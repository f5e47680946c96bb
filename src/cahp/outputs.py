"""Output folders that are never half-written and never silently destroy earlier results.

A run writes into a hidden staging folder beside its output folder (``.<name>.partial``) and renames it into
place only when everything is written. An interrupted run leaves only the staging folder, and the same command
with the same settings resumes from it. An existing output folder is refused unless ``overwrite=True``; it
is then replaced only at the very end, once the new results are complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cahp.errors import OutputExistsError

RUN_CONFIG_FILE = "run_config.json"


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temporary, path)


class StagedOutput:
    """The staging folder of one run, its resume check, and the final atomic swap.

    Args:
        out: the output folder the user asked for.
        run_config: the settings of the run (JSON-ready). An unfinished run resumes only if equal.
        overwrite: replace an existing output folder at the end instead of refusing to start.
    """

    def __init__(self, out: str | os.PathLike[str], run_config: dict[str, Any], overwrite: bool = False):
        self.out = Path(out).expanduser().resolve()
        self.run_config = json.loads(json.dumps(run_config, default=str))
        self.overwrite = overwrite
        self.staging = self.out.parent / f".{self.out.name}.partial"
        self.resumed = False

    def prepare(self) -> StagedOutput:
        """Check the output folder and create (or reopen, to resume) the staging folder."""
        if self.out.exists() and any(self.out.iterdir()) and not self.overwrite:
            raise OutputExistsError(
                f"output folder {self.out} already holds results: pass --overwrite to replace them "
                "(only once the new run has finished) or choose another --out"
            )
        config_file = self.staging / RUN_CONFIG_FILE
        if self.staging.exists():
            earlier = json.loads(config_file.read_text()) if config_file.is_file() else None
            if earlier == self.run_config:
                self.resumed = True
            elif self.overwrite:
                shutil.rmtree(self.staging)
            else:
                raise OutputExistsError(
                    f"an unfinished run with other settings is in {self.staging}: rerun it with the same "
                    "settings to resume it, or pass --overwrite to discard it"
                )
        self.staging.mkdir(parents=True, exist_ok=True)
        write_json(config_file, self.run_config)
        return self

    @property
    def path(self) -> Path:
        """Where the run writes its files until :meth:`commit`."""
        return self.staging

    def commit(self) -> Path:
        """Move the finished staging folder into place (replacing an old output only now)."""
        trash = self.out.parent / f".{self.out.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        if self.out.exists():
            os.replace(self.out, trash)
        os.replace(self.staging, self.out)
        if trash.exists():
            shutil.rmtree(trash)
        return self.out
