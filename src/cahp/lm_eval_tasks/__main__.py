"""``python -m cahp.lm_eval_tasks [--data-dir DIR] [--out FOLDER]``: write the task files, print their folder.

The folder is what ``lm_eval --include_path`` takes; the tasks written are named on stderr.
"""

from __future__ import annotations

import argparse
import sys

from cahp.errors import CahpError
from cahp.lm_eval_tasks import TASKS, path


def main(argv: list[str] | None = None) -> int:
    """Write the tasks whose data is found and print the folder (exit 1 with one line when none is)."""
    parser = argparse.ArgumentParser(prog="python -m cahp.lm_eval_tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding <task>/<split>.jsonl.gz (before $CAHP_DATA_DIR)")
    parser.add_argument("--out", help="folder for the task files (default $CAHP_HOME/lm_eval_tasks)")
    args = parser.parse_args(argv)
    try:
        folder = path(args.data_dir, args.out)
    except CahpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    written = sorted(file.stem for file in folder.glob("cahp_*.yaml") if file.stem in TASKS)
    print(f"lm-eval tasks {', '.join(written)} in {folder}", file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
