"""The model card (``README.md``) of a pruned model folder: a view of ``cahp prune``'s report, nothing recomputed.

The card opens with the metadata block the Hugging Face Hub reads (``library_name``, ``tags``, ``base_model``,
``datasets``, ``metrics``, ``pipeline_tag``), then says what the model is and how it was made: the base model,
the task, the method with its budget and settings, the kept heads per layer (a table and the picture, copied
into the folder so it stands alone when shared), accuracy before pruning / after pruning / after recovery, the
recovery objective, parameters, FLOPs and the measured speedup, the exact command, and how to load the folder
with and without cahp.

``library_name`` is ``transformers``: the folder loads with ``from_pretrained`` (with ``trust_remote_code=True``
where cahp is not installed), so that is the snippet the Hub should show.

The card is meant to be published with the folder, so it names no local path: models by alias, Hub id or, for a
local folder, the folder's own name and what its ``run_config.json`` records (:func:`model_lineage`), data by
task, protocol and Hub id, and the command with every local path replaced by such a name
(:func:`shareable_command`). ``report.json`` and ``run_config.json`` beside the folder keep the real paths.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from cahp.errors import is_disk_full
from cahp.outputs import atomic_write
from cahp.surgery.autoload import disk_full_error, shareable_name

CARD_FILE = "README.md"
KEPT_HEADS_IMAGE = "kept_heads.png"

#: Hub ids of the built-in model aliases (``cahp models``), for ``base_model``.
ALIAS_HUB_IDS: dict[str, str] = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet-base": "sentence-transformers/all-mpnet-base-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}

#: ``pipeline_tag`` by the suffix of the saved architecture's class name.
_PIPELINE_TAGS: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "text-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "text-generation"),
)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

STAGES: tuple[tuple[str, str], ...] = (
    ("before_pruning", "before pruning"),
    ("after_pruning", "after pruning"),
    ("after_recovery", "after recovery"),
)


def write_model_card(report: dict[str, Any], folder: Path, command: str | None = None) -> Path:
    """Write ``folder/README.md`` (and ``folder/kept_heads.png``) for the pruned model saved in ``folder``.

    Call it after the model is saved in ``folder`` (the card reads ``config.json`` for the pipeline tag and
    looks for ``modeling_cahp.py`` to say how to load without cahp) and after the plots are drawn: the picture
    ``../plots/kept_heads.png`` is copied; without it the picture is drawn from the report.

    Args:
        report: the report of :func:`cahp.pipeline.prune` (``report.json``).
        folder: the pruned model's folder.
        command: the exact command line that made the model; ``None``: the report's ``command``.

    Returns:
        The card's path.
    """
    folder = Path(folder)
    text = render_model_card(report, folder, command)
    try:
        _place_kept_heads_image(report, folder)
        return atomic_write(folder / CARD_FILE, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(folder, len(text.encode()) + 2**20) from error
        raise


def render_model_card(report: dict[str, Any], folder: Path, command: str | None = None) -> str:
    """The card's Markdown (see :func:`write_model_card`), without writing anything."""
    folder = Path(folder)
    saved = _saved_config(folder)
    custom_code = (folder / "modeling_cahp.py").is_file()
    causal_lm = report.get("objective") == "causal-lm"
    sections = [
        _front_matter(report, saved, custom_code),
        _title(report),
        _base_model_section(report),
        _corpus_section(report) if causal_lm else _task_section(report),
        _method_section(report),
        _kept_heads_section(report),
        _quality_section(report) if causal_lm else _accuracy_section(report),
        _generation_section(report) if causal_lm else _size_and_speed_section(report),
        _command_section(shareable_command(command if command is not None else report.get("command"), report)),
        _loading_section(custom_code, causal_lm),
    ]
    return "\n\n".join(section.strip("\n") for section in sections) + "\n"


# ---- metadata ----------------------------------------------------------------------------------------------------


def hub_model_id(name: str) -> str | None:
    """The Hub id of a model name: an alias's, or the name itself when it looks like ``owner/name`` and is not a
    local folder; ``None`` for local folders."""
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    if _HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    return None


def model_lineage(model: str) -> list[str]:
    """``model``, then what it was made from, as far as the folders' ``run_config.json`` records tell
    (``cahp finetune`` and ``cahp prune`` write one): e.g. ``["runs/ft", "minilm-l6"]``."""
    lineage = [model]
    while len(lineage) < 8:  # a chain of runs is short; this also stops a record that names itself
        record = Path(lineage[-1]).expanduser() / "run_config.json"
        try:
            parent = json.loads(record.read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            break
        if not isinstance(parent, str) or not parent or parent in lineage:
            break
        lineage.append(parent)
    return lineage


def recorded_task(model: str) -> str | None:
    """The task a local model folder was made on, as its ``run_config.json`` records it (``None`` if it does not)."""
    try:
        task = json.loads((Path(model).expanduser() / "run_config.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(task, dict):
        name = task.get("task") or task.get("name")
        protocol = task.get("protocol")
        if isinstance(name, str) and name:
            return shareable_name(name) + (f", {protocol} protocol" if isinstance(protocol, str) else "")
        return None
    return shareable_name(task) if isinstance(task, str) and task else None


def shareable_command(command: str | None, report: dict[str, Any]) -> str | None:
    """``command`` with every local path replaced by a name that says something elsewhere: the model by
    :func:`shareable_name`, any other path by its last part (``/home/me/runs/ft`` -> ``ft``)."""
    if not command:
        return command
    try:
        tokens = shlex.split(command)
    except ValueError:  # unbalanced quotes: replace what can be found
        tokens = command.split()
    model = str(report.get("model", ""))

    def named(token: str) -> str:
        if "=" in token and token.startswith("-"):
            flag, value = token.split("=", 1)
            return f"{flag}={named(value)}"
        if token == model or (model and _same_path(token, model)):
            return shareable_name(model) or token
        return shareable_name(token) if _looks_local(token) else token

    return shlex.join(named(token) for token in tokens)


def _looks_local(token: str) -> bool:
    home = str(Path.home())
    return token.startswith(("/", "~")) or (len(home) > 1 and home in token)


def _same_path(first: str, second: str) -> bool:
    try:
        return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def base_model_id(report: dict[str, Any]) -> str | None:
    """The first Hub id along :func:`model_lineage` of the pruned model, for the ``base_model`` metadata."""
    return next((found for name in model_lineage(report["model"]) if (found := hub_model_id(name))), None)


def dataset_id(task: dict[str, Any]) -> str | None:
    """The Hub id of the task's data: a built-in task's, or a source that looks like a Hub id."""
    from cahp.data.tasks import TASKS

    if task.get("task") in TASKS:
        return TASKS[task["task"]].hub_path
    source = str(task.get("source", ""))
    return source if _HUB_ID.fullmatch(source) and not Path(source).exists() else None


def _saved_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _pipeline_tag(saved: dict[str, Any]) -> str:
    for architecture in saved.get("architectures") or []:
        for suffix, tag in _PIPELINE_TAGS:
            if architecture.endswith(suffix):
                return tag
    return "text-classification"  # cahp prune prunes sequence classifiers


def _front_matter(report: dict[str, Any], saved: dict[str, Any], custom_code: bool) -> str:
    import yaml

    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["cahp", "pruning", "attention-head-pruning", f"method-{report['method']}"]
        + (["custom_code"] if custom_code else []),
    }
    base = base_model_id(report)
    if base is not None:
        metadata["base_model"] = base
    dataset = dataset_id(report["task"]) if "task" in report else None
    if dataset is not None:
        metadata["datasets"] = [dataset]
    metadata["metrics"] = ["perplexity"] if report.get("objective") == "causal-lm" else ["accuracy", "f1"]
    metadata["pipeline_tag"] = _pipeline_tag(saved)
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---"


# ---- sections ----------------------------------------------------------------------------------------------------


def _title(report: dict[str, Any]) -> str:
    heads, name = report["heads"], shareable_name(report["model"]) or report["model"]
    removed = heads["total"] - heads["kept"]
    return (
        f"# {name}, {removed} of {heads['total']} attention heads removed ({report['method']})\n\n"
        f"A copy of `{name}` with {heads['kept']} of its {heads['total']} attention heads kept, chosen "
        f"by the `{report['method']}` method of [cahp](https://pypi.org/project/cahp/) and physically removed "
        "(smaller projection matrices, not masks)"
        + (
            ", then recovered by a short fine-tune."
            if report.get("config", {}).get("recovery", {}).get("epochs")
            else "."
        )
    )


def _base_model_section(report: dict[str, Any]) -> str:
    lineage = model_lineage(report["model"])
    lines = ["## Base model", ""]
    for index, model in enumerate(lineage):
        task = recorded_task(model)
        made_on = f" (fine-tuned on {task})" if task else ""
        lines.append(f"- {'pruned from' if index == 0 else 'which was made from'}: `{shareable_name(model)}`{made_on}")
    base = base_model_id(report)
    lines.append(f"- on the Hub: [{base}](https://huggingface.co/{base})" if base else "- on the Hub: not known")
    return "\n".join(lines)


def _task_section(report: dict[str, Any]) -> str:
    task = report["task"]
    sizes = ", ".join(f"{split} {count}" for split, count in task.get("split_sizes", {}).items())
    labels = ", ".join(f"`{name}`" for name in task.get("label_names", []))
    dataset = dataset_id(task)
    data = (
        f"[{dataset}](https://huggingface.co/datasets/{dataset})"
        if dataset
        else f"`{shareable_name(task.get('source'))}`"
    )
    lines = [
        "## Task",
        "",
        f"- task: `{shareable_name(task.get('task'))}` ({task.get('protocol', 'standard')} protocol), data: {data}",
        f"- labels ({task.get('num_labels')}): {labels}",
        f"- examples per split: {sizes}",
    ]
    lines += [f"- note: {note}" for note in task.get("notes", [])]
    return "\n".join(lines)


def _method_section(report: dict[str, Any]) -> str:
    plan, heads, config = report.get("plan", {}), report["heads"], report.get("config", {})
    calibration, recovery = report.get("calibration", {}), report.get("recovery", {})
    training = config.get("recovery", {})
    settings = json.dumps(plan.get("settings", config.get("method_settings", {})), sort_keys=True)
    how = f" ({report['selection']['how']})" if report["selection"].get("how") else ""
    constraints = json.dumps(plan.get("constraints", {}), sort_keys=True)
    lines = [
        "## Method, budget and settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | `{report['method']}`{how} |",
        f"| budget | `{report['selection']['budget']}` |",
        f"| heads requested | {heads['requested']} |",
        f"| heads kept | {heads['kept']} of {heads['total']} ({heads['layers']} layers x {heads['heads_per_layer']}) |",
        f"| heads added by the per-layer guardrail | {len(report['selection'].get('guardrail_heads', []))} |",
        f"| constraints | `{constraints}` |",
        f"| method settings | `{settings}` |",
        f"| calibration | {_calibration_text(calibration)} |",
        f"| recovery | {_recovery_text(recovery, training)} |",
        f"| seed | {config.get('seed')} |",
    ]
    return "\n".join(lines)


def _calibration_text(calibration: dict[str, Any]) -> str:
    if "blocks" in calibration:  # a causal LM's: blocks of a corpus split
        corpus = shareable_name(str(calibration.get("corpus")))
        length, split = calibration.get("context_length"), calibration.get("split")
        return f"{calibration['blocks']} blocks of {length} tokens of `{corpus}` ({split})"
    return f"{calibration.get('examples')} examples of the `{calibration.get('split')}` split"


def _recovery_text(recovery: dict[str, Any], training: dict[str, Any]) -> str:
    epochs = training.get("epochs", 0)
    if not recovery or not epochs:
        return "none (the figures after recovery are those after pruning)"
    objective = recovery["objective"]
    label = objective if isinstance(objective, str) else objective_label(objective)
    data = f"{recovery['blocks']} blocks" if "blocks" in recovery else f"{recovery.get('examples')} examples"
    lora = f", LoRA rank {recovery['lora']['rank']} (merged)" if "lora" in recovery else ""
    return (
        f"{label}{lora}, {data} x {epochs:g} epochs, learning rate {training.get('learning_rate')}, batch size "
        f"{training.get('batch_size')}"
    )


def objective_label(objective: dict[str, Any]) -> str:
    """The recovery objective as the summary names it (``kd (T=2, alpha=0.5)``); its loss alone for a record
    this version cannot read."""
    from cahp.errors import CahpError
    from cahp.train.distill import RecoveryObjective

    try:
        return RecoveryObjective(**objective).label()
    except (TypeError, ValueError, CahpError):
        return str(objective.get("loss"))


def _kept_heads_section(report: dict[str, Any]) -> str:
    heads_per_layer = report["heads"]["heads_per_layer"]
    lines = [
        "## Kept heads per layer",
        "",
        "Head numbers are the original model's (0-based); the folder's `config.json` records them as "
        "`cahp_kept_heads`.",
        "",
        "| layer | kept | heads kept |",
        "|---|---|---|",
    ]
    for layer, kept in sorted(report["kept_heads_by_layer"].items(), key=lambda item: int(item[0])):
        names = ", ".join(str(head) for head in kept) or "none"
        lines.append(f"| {layer} | {len(kept)} of {heads_per_layer} | {names} |")
    lines += ["", f"![kept (filled) and removed heads, layers x heads]({KEPT_HEADS_IMAGE})"]
    return "\n".join(lines)


def _accuracy_section(report: dict[str, Any]) -> str:
    accuracy = report["accuracy"]
    lines = [
        "## Accuracy",
        "",
        "| split | metric | examples | " + " | ".join(label for _, label in STAGES) + " |",
        "|---|---|---|---|---|---|",
    ]
    for split, before in accuracy["before_pruning"].items():
        for metric in ("accuracy", "macro_f1"):
            values = " | ".join(f"{accuracy[stage][split][metric]:.4f}" for stage, _ in STAGES)
            lines.append(f"| {split} | {metric} | {before['examples']} | {values} |")
    objective = report.get("recovery", {}).get("objective")
    if not report.get("config", {}).get("recovery", {}).get("epochs"):
        lines += ["", "No recovery fine-tune: the accuracy after recovery is the accuracy after pruning."]
    elif objective is not None:
        lines += ["", f"Recovery objective: `{objective['loss']}` ({objective_label(objective)})."]
    return "\n".join(lines)


def _size_and_speed_section(report: dict[str, Any]) -> str:
    parameters, flops, latency = report["parameters"], report["flops_per_sequence"], report["latency"]
    dense_ms, pruned_ms = (latency[name]["median_seconds"] * 1000 for name in ("dense", "pruned"))
    share = latency["measured_speedup"] / latency["flops_ideal_speedup"]
    lines = [
        "## Size and speed",
        "",
        "| | dense | pruned | pruned / dense |",
        "|---|---|---|---|",
        f"| parameters | {parameters['dense']:,} | {parameters['pruned']:,} | "
        f"{parameters['pruned'] / parameters['dense']:.3f} |",
        f"| FLOPs per sequence of {flops['seq_len']} tokens | {flops['dense_total']:,} | {flops['pruned_total']:,} | "
        f"{flops['pruned_total'] / flops['dense_total']:.3f} |",
        f"| attention FLOPs per sequence | {flops['dense_attention']:,} | {flops['pruned_attention']:,} | "
        f"{flops['pruned_attention'] / max(flops['dense_attention'], 1):.3f} |",
        f"| median latency (ms per batch) | {dense_ms:.3f} | {pruned_ms:.3f} | {pruned_ms / dense_ms:.3f} |",
        "",
        f"Measured speedup {latency['measured_speedup']}x, FLOPs-ideal {latency['flops_ideal_speedup']}x "
        f"({share:.2f} of ideal): batch {latency['batch_size']} x {latency['seq_len']} tokens on "
        f"{latency['device']} with {latency['torch_threads']} PyTorch thread(s), median of "
        f"{latency['pruned'].get('repeats')} runs.",
    ]
    return "\n".join(lines)


def _corpus_section(report: dict[str, Any]) -> str:
    corpus = report.get("corpus", {})
    evaluation, calibration = corpus.get("evaluation", {}), corpus.get("calibration", {})
    lines = [
        "## Objective and data",
        "",
        "- objective: causal language modelling (next-token loss)",
        f"- calibration: {_calibration_text(calibration)}",
        f"- perplexity measured on: {evaluation.get('blocks')} blocks of {evaluation.get('context_length')} tokens "
        f"of `{shareable_name(str(evaluation.get('corpus')))}` ({evaluation.get('split')})",
    ]
    if "offline stand-in" in str(evaluation.get("label", "")):
        lines.append("- note: an offline stand-in for WikiText-2; its perplexity is not comparable to WikiText's")
    return "\n".join(lines)


def _quality_section(report: dict[str, Any]) -> str:
    quality, after = report["quality"], report.get("after", "pruned")
    stages = [
        (key, label)
        for key, label in (("dense", "before pruning"), ("pruned", "after pruning"), ("recovered", "after recovery"))
        if quality.get(key) is not None
    ]
    lines = [
        "## Quality",
        "",
        "| metric | " + " | ".join(label for _, label in stages) + " |",
        "|---" * (len(stages) + 1) + "|",
        "| perplexity | " + " | ".join(f"{quality[key]['perplexity']['perplexity']:.2f}" for key, _ in stages) + " |",
    ]
    for task, result in quality["dense"].get("prompted", {}).items():
        values = " | ".join(f"{quality[key]['prompted'][task]['accuracy']:.4f}" for key, _ in stages)
        lines.append(f"| {task} zero-shot accuracy ({result.get('examples')} examples) | {values} |")
    continuations = quality["dense"].get("continuations") or []
    if continuations:
        lines += ["", "Greedy continuations, dense and " + after + ":", ""]
        for dense, final in zip(continuations, quality[after].get("continuations", []), strict=False):
            lines.append(f"- `{dense['prompt']}`: dense `{dense['continuation']}`, {after} `{final['continuation']}`")
    return "\n".join(lines)


def _generation_section(report: dict[str, Any]) -> str:
    parameters, kv, generation = report["parameters"], report["kv_cache"], report["generation"]
    lines = [
        "## Size and speed",
        "",
        "| | dense | pruned | pruned / dense |",
        "|---|---|---|---|",
        f"| parameters | {parameters['dense']:,} | {parameters['pruned']:,} | "
        f"{parameters['pruned'] / parameters['dense']:.3f} |",
        f"| KV cache, bytes per token | {kv['dense']['bytes_per_token']:,} | {kv['pruned']['bytes_per_token']:,} | "
        f"{kv['ratio']:.3f} |",
    ]
    for batch, measured in generation.get("by_batch", {}).items():
        dense, pruned = measured["dense"], measured["pruned"]
        spread = measured.get("tokens_per_second_ratio_range")
        shown = f" [{spread[0]:.3f}, {spread[1]:.3f}]" if spread else ""
        lines.append(
            f"| generation, batch {batch} (tokens/s) | {dense['tokens_per_second']:.1f} | "
            f"{pruned['tokens_per_second']:.1f} | {pruned['tokens_per_second'] / dense['tokens_per_second']:.3f}"
            f"{shown} |"
        )
    repeats = generation.get("repeats")
    lines += [
        "",
        f"Measured on {generation.get('device', 'cpu')} with {generation.get('torch_threads')} PyTorch thread(s): "
        f"{generation.get('prompt_tokens')}-token prompts, {generation.get('new_tokens')} new tokens, "
        + (
            "one timed run (a single, noisy sample)."
            if repeats == 1
            else f"medians of {repeats} timed repeats; in brackets the lowest and highest ratio of one repeat."
        ),
    ]
    export = report.get("export", {})
    if export.get("dtype"):
        lines += ["", f"Weights saved in {export['dtype']} ({export.get('size_mb')} MB): {export.get('dtype_why')}."]
    return "\n".join(lines)


def _command_section(command: str | None) -> str:
    if not command:
        return (
            "## Command\n\nRun from Python (`cahp.pipeline.prune`), not the command line; the run's settings are "
            "in its `run_config.json` (`cahp prune --config RUN_FOLDER --out NEW_FOLDER` replays it)."
        )
    return f"## Command\n\n```bash\n{command}\n```"


def _loading_section(custom_code: bool, causal_lm: bool = False) -> str:
    if causal_lm:
        return _causal_lm_loading_section(custom_code)
    remote = ", trust_remote_code=True" if custom_code else ""
    tokenizer = (
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=False)  # a stock '
        "tokenizer: no custom code"
        if custom_code
        else 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
    )
    without = (
        "the folder carries `modeling_cahp.py` (torch and transformers only) and an `auto_map`, so it loads "
        "without cahp when you trust that code:"
        if custom_code
        else "its `config.json` is a stock configuration, so any transformers loads it:"
    )
    return f"""## How to load it

With cahp installed (`pip install cahp`), plain `from_pretrained` works once cahp is imported:

```python
import cahp  # registers the pruned model classes
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")  # or the Hub repo id
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
classify = pipeline("text-classification", model="path/to/this/folder")
```

Without cahp: {without}

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder"{remote})
{tokenizer}
```

{_tokenizer_note(custom_code)}`cahp.surgery.load_pruned("path/to/this/folder")` loads it too, and
`cahp export --model path/to/this/folder --format onnx --out model.onnx` writes an ONNX Runtime graph."""


def _causal_lm_loading_section(custom_code: bool) -> str:
    remote = ", trust_remote_code=True" if custom_code else ""
    how = (
        "Its layers kept different numbers of heads, so it has cahp's config: with cahp installed, plain "
        "`from_pretrained` works once cahp is imported; without cahp, the folder's `modeling_cahp.py` (torch and "
        "transformers only) loads it when you trust that code:"
        if custom_code
        else "Every layer kept the same heads, so its `config.json` is a stock configuration: any transformers loads "
        "it, with or without cahp:"
    )
    return f"""## How to load it

{how}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{remote})
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{", trust_remote_code=False" if custom_code else ""})
```

{_tokenizer_note(custom_code)}`cahp.models.load_causal_lm("path/to/this/folder")` loads it too."""


def _tokenizer_note(custom_code: bool) -> str:
    if not custom_code:
        return ""
    return (
        "The tokenizer is a stock one. `AutoTokenizer` reads `config.json` first and, without cahp, asks whether to "
        "run the model's code; `trust_remote_code=False` answers no and loads the tokenizer without it.\n\n"
    )


# ---- the picture ---------------------------------------------------------------------------------------------------


def _place_kept_heads_image(report: dict[str, Any], folder: Path) -> Path:
    """``folder/kept_heads.png``: a copy of the run's ``plots/kept_heads.png``, else drawn from the report."""
    target = folder / KEPT_HEADS_IMAGE
    drawn = folder.parent / "plots" / KEPT_HEADS_IMAGE
    if drawn.is_file():
        atomic_write(target, lambda temporary: shutil.copyfile(drawn, temporary))
        return target
    from cahp.reporting.plots import plot_kept_heads

    title = f"{Path(report['model']).name} ({report['task'].get('task')})"
    return plot_kept_heads(report["kept_heads_by_layer"], report["heads"]["heads_per_layer"], target, title)
