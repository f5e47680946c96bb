"""lm-evaluation-harness tasks for cahp's zero-shot prompted classification, over the local data.

``lm_eval`` reads a task from a YAML file in an ``--include_path`` folder. :func:`path` writes one file per task
whose data it finds (``$CAHP_DATA_DIR``, or ``data_dir=``) into a folder and returns it::

    lm_eval --model hf --model_args pretrained=runs/smollm2-uneven/model,trust_remote_code=True \\
        --include_path "$(python -m cahp.lm_eval_tasks)" --tasks cahp_sst2 --limit 200

The files are written, not shipped, because each names the absolute path of its data file (lm-eval's ``json``
dataset with ``data_files``), and because their prompts are built from :data:`cahp.evaluation.prompted.PROMPTS`,
so lm-eval scores exactly what ``cahp prune --objective causal-lm --prompted ...`` scores: the same template
(rendered with Jinja), the same label words, each class scored by the log-probability of its label word after the
prompt (lm-eval's ``multiple_choice`` sums over the word's tokens: cahp's ``multi_token="sum"``, which equals the
default ``"first"`` when every label word is one token, as for SmolLM2), no chat template, no few-shot examples.
The metric is accuracy (lm-eval's ``f1`` is binary only). The tasks (:data:`TASKS`) read the split cahp's
prompted evaluation reads by default: SST-2 and SST-5 ``validation``, MNLI ``validation_matched``.
"""

from __future__ import annotations

import functools
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cahp.errors import CahpError, DataError


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval task over one local split.

    Attributes:
        task: cahp's task (its folder in the data directory, and its prompt in ``PROMPTS``).
        split: the split file read (``<split>.jsonl.gz`` or another form :func:`cahp.data.tasks.find_split_file`
            finds).
    """

    task: str
    split: str


#: lm-eval task name -> what it reads.
TASKS: dict[str, LocalTask] = {
    "cahp_sst2": LocalTask("sst2", "validation"),
    "cahp_sst5": LocalTask("sst5", "validation"),
    "cahp_mnli": LocalTask("mnli", "validation_matched"),
}


def jinja_template(template: str) -> str:
    """A ``str.format`` prompt template (``{text}``) as the Jinja template lm-eval renders (``{{text}}``).

    Raises:
        CahpError: the template holds braces other than plain ``{field}`` placeholders.
    """
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if "{" in literal or "}" in literal or spec or conversion:
            raise CahpError(
                f"prompt template {template!r}: only plain {{field}} placeholders can be written for lm-eval"
            )
        parts.append(literal if field is None else f"{literal}{{{{{field}}}}}")
    return "".join(parts)


def task_config(name: str, data_file: Path) -> dict[str, Any]:
    """The lm-eval task config of ``name`` (a key of :data:`TASKS`) reading ``data_file`` (JSON lines or CSV,
    gzipped or not: the ``datasets`` builder of that name reads it)."""
    from cahp.evaluation.prompted import default_prompt

    local = TASKS[name]
    prompt = default_prompt(local.task)
    return {
        "task": name,
        "dataset_path": "csv" if ".csv" in data_file.suffixes else "json",
        "dataset_kwargs": {"data_files": {local.split: str(data_file)}},
        "validation_split": local.split,
        "output_type": "multiple_choice",
        "doc_to_text": jinja_template(prompt.template),
        "doc_to_choice": list(prompt.label_words),
        "target_delimiter": "",  # the label words carry their leading space, as in cahp
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "cahp_task": local.task, "split": local.split},
    }


class _Dumper(yaml.SafeDumper):
    """The safe YAML dumper, writing strings that span lines as ``|`` blocks."""


def _literal_block(dumper: Any, text: str) -> Any:
    """YAML of a string: a ``|`` block when it spans lines (a prompt reads as written), else the default."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _literal_block)


def write_tasks(folder: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Write the YAML file of every task in :data:`TASKS` whose data is found into ``folder``.

    A task's data is ``<dir>/<task>/<split>.jsonl.gz`` (or ``.jsonl``, ``.json``, ``.csv``, gzipped or not) in
    the first of ``data_dir`` and ``$CAHP_DATA_DIR`` that has it. Earlier ``cahp_*.yaml`` files in ``folder`` that
    this call does not write are removed, so the folder always matches the data it names.

    Returns:
        The task names written.

    Raises:
        DataError: no task's data was found (the message says where it looked).
    """
    from cahp.data.tasks import data_dirs, find_split_file
    from cahp.outputs import atomic_write

    folder = Path(folder).expanduser()
    dirs = data_dirs(data_dir)
    found: dict[str, Path] = {}
    for name, local in TASKS.items():
        files = (find_split_file(directory / local.task, local.split) for directory in dirs)
        data_file = next((file for file in files if file is not None), None)
        if data_file is not None:
            found[name] = data_file.resolve()
    if not found:
        where = ", ".join(str(directory) for directory in dirs) or "nowhere (no data_dir and no $CAHP_DATA_DIR)"
        wanted = ", ".join(f"{local.task}/{local.split}.jsonl.gz" for local in TASKS.values())
        raise DataError(f"no data for cahp's lm-eval tasks ({wanted}); looked in: {where}. Set CAHP_DATA_DIR")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("cahp_*.yaml"):
        if stale.stem not in found:
            stale.unlink()
    for name, data_file in found.items():
        text = yaml.dump(task_config(name, data_file), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
        atomic_write(folder / f"{name}.yaml", functools.partial(Path.write_text, data=text, encoding="utf-8"))
    return list(found)


def path(data_dir: str | os.PathLike[str] | None = None, folder: str | os.PathLike[str] | None = None) -> Path:
    """The folder to give ``lm_eval --include_path``, with the task files of the data found written into it.

    Args:
        data_dir: where the data is looked for first (before ``$CAHP_DATA_DIR``).
        folder: where the files go; default ``$CAHP_HOME/lm_eval_tasks`` (``~/.cache/cahp/lm_eval_tasks``).

    Raises:
        DataError: no task's data was found.
    """
    from cahp.models import cahp_home

    target = Path(folder).expanduser() if folder is not None else cahp_home() / "lm_eval_tasks"
    write_tasks(target, data_dir)
    return target
