"""The command line: replaying runs with --config, flags over configs, help and defaults, light imports, exit
statuses and one-line errors, and the lazy top-level package."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cahp
from cahp.cli import build_parser, main
from cahp.commands import COMMANDS, command_modules
from cahp.commands.finetune import FINETUNE_FIELDS, finetune_config
from cahp.commands.options import Parser, UsageError
from cahp.commands.prune import PRUNE_FIELDS, prune_config
from cahp.errors import CahpError

REPO = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "transformers", "numpy", "scipy", "sklearn", "datasets", "cahp.scoring")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, with its deferred options added (prune's method settings)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.complete() if isinstance(sub, Parser) else sub for name, sub in action.choices.items()}


def _at(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return result.stdout.strip()


# ---- light imports ------------------------------------------------------------------------------------------------


def test_building_the_parser_and_help_import_nothing_heavy() -> None:
    code = (
        "import sys, cahp.cli\n"
        "parser = cahp.cli.build_parser()\n"
        "parser.format_help()\n"
        "for name in ('finetune', 'evaluate', 'bench', 'methods', 'prune'):\n"
        "    try:\n"
        "        parser.parse_args([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print(name + ':' + ','.join(m for m in " + repr(HEAVY_MODULES) + " if m in sys.modules))\n"
    )
    heavy = dict(line.split(":", 1) for line in _python(code).splitlines() if ":" in line and " " not in line)
    for name in ("finetune", "evaluate", "bench", "methods"):
        assert heavy[name] == "", f"building the parser and `cahp {name} --help` imported {heavy[name]}"
    # prune's method-setting options come from the method registry, which (like `cahp methods`) reads the method
    # cards: it imports numpy and the scorer package, never torch, transformers, datasets, scipy or sklearn
    registry = {"numpy", "cahp.scoring"}
    assert set(filter(None, heavy["prune"].split(","))) <= registry, f"`cahp prune --help` imported {heavy['prune']}"


def test_the_parser_and_cahp_methods_do_not_import_torch() -> None:
    _python("import sys, cahp.cli as c; c.build_parser(); assert 'torch' not in sys.modules, 'parser'")
    listing = _python(
        "import sys, contextlib, io\n"
        "from cahp.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['methods']) == 0\n"
        "assert 'cahp' in out.getvalue()\n"
        "print('torch' in sys.modules)\n"
    )
    assert listing == "False", "`cahp methods` imported torch"


def test_commands_live_in_one_package_the_library_never_imports() -> None:
    import ast

    names = {module.__name__.rsplit(".", 1)[1] for module in command_modules()}
    assert names == {"finetune", "evaluate", "prune", "export", "analyze", "bench", "demo", "listing"}
    assert set(COMMANDS) == set(_subparsers(build_parser())), "every subcommand (prune-lm too) runs something"
    source = REPO / "src" / "cahp"
    allowed = {source / "cli.py", source / "__main__.py"}
    for path in source.rglob("*.py"):
        if path in allowed or (source / "commands") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            imported: list[str] = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in imported:
                assert not name.startswith(("cahp.cli", "cahp.commands")), f"{path} imports {name}"


def test_import_cahp_is_light_and_every_export_resolves() -> None:
    heavy = _python(f"import sys, cahp; print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    assert heavy == "", f"`import cahp` imported {heavy}"
    assert set(cahp._LAZY_EXPORTS) <= set(cahp.__all__)
    for name in cahp.__all__:
        assert getattr(cahp, name) is not None, name
    assert cahp.load_pruned.__module__.startswith("cahp.surgery")
    assert {"prune", "PruneConfig", "load_pruned", "prune_heads", "head_mask", "get_method", "Budget"} <= set(
        cahp.__all__
    )
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = cahp.no_such_name


def test_version_matches_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cahp.__version__ == version
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"cahp {version}"
    result = subprocess.run([sys.executable, "-m", "cahp", "--version"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == f"cahp {version}"


# ---- help and defaults --------------------------------------------------------------------------------------------


def test_every_option_has_help_that_shows_its_default() -> None:
    for name, parser in _subparsers(build_parser()).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"cahp {name} {action.option_strings[0]} has no help"
            shown = formatter._get_help_string(action) or ""
            assert action.required or "(default:" in shown, f"cahp {name} {action.option_strings[0]}: {shown}"


def _shown_default(action: argparse.Action) -> str:
    """What the help says an option's default is (the text after ``(default: ``)."""
    return (action.help or "").rsplit("(default: ", 1)[1].removesuffix(")").replace("%%", "%")


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_every_config_option_has_its_default_in_one_place(command: str) -> None:
    """The parser has no default of its own (``None``: the config's applies) and its help shows the dataclass's."""
    from cahp.commands.options import shown_value
    from cahp.pipeline import PruneConfig
    from cahp.settings import REQUIRED
    from cahp.train.finetune import FinetuneConfig

    parser = _subparsers(build_parser())[command]
    fields = PRUNE_FIELDS if command == "prune" else FINETUNE_FIELDS
    defaults = PruneConfig(model="m") if command == "prune" else FinetuneConfig()
    causal_lm = PruneConfig(model="m", objective="causal-lm")
    actions = {a.dest: a for a in parser._actions if hasattr(a, "config_default")}
    assert set(actions) == set(fields), "every generated option is mapped to a config field, and only those"
    for dest, paths in fields.items():
        action = actions[dest]
        assert action.default is None, f"--{dest} must default to None (the config's default applies; replays)"
        assert getattr(parser.parse_args(["--out", "o"]), dest) is None
        shown = _shown_default(action)
        for path in paths:
            if dest == "model" and command == "prune":
                assert action.config_default is REQUIRED and "required" in shown
                continue
            expected = _at(causal_lm if path.startswith("lm.") else defaults, path)
            value = action.config_default
            assert (tuple(value) if isinstance(value, list) else value) == expected, f"--{dest} -> {path}"
            forms = {shown_value(expected), f"{expected:g}" if isinstance(expected, float) else shown_value(expected)}
            assert any(shown.startswith(form) for form in forms) or expected is None, f"--{dest}: {shown}"
        if command == "prune" and paths[0].startswith("recovery.") and not isinstance(expected, bool):
            assert f"causal-lm: {_at(causal_lm, path):g}" in shown, f"--{dest}: the causal-lm recipe beside it"
    if command == "prune":  # an option that sets lm's field too shows lm's default beside it
        assert f"causal-lm: {causal_lm.lm.calibration_batch_size}" in _shown_default(actions["calibration_batch_size"])


@pytest.mark.parametrize(
    ("owner", "table"),
    [
        ("cahp.train.loop:TrainingConfig", "TRAINING"),
        ("cahp.train.finetune:TaskOptions", "TASK"),
        ("cahp.train.finetune:FinetuneConfig", "FINETUNE"),
        ("cahp.train.distill:RecoveryObjective", "RECOVERY_OBJECTIVE"),
        ("cahp.workloads.causal_lm:LMOptions", "LM"),
        ("cahp.pipeline:PruneConfig", "PRUNE"),
    ],
)
def test_the_dataclass_fields_carry_their_specs(owner: str, table: str) -> None:
    """Each option field is declared from its spec: the dataclass's default and metadata are the spec's."""
    import importlib

    import cahp.settings

    module, _, name = owner.partition(":")
    cls = getattr(importlib.import_module(module), name)
    specs = getattr(cahp.settings, table)
    assert specs.owner == name
    fields = {field.name: field for field in dataclasses.fields(cls)}
    assert set(specs) <= set(fields), f"specs of fields {name} does not have: {set(specs) - set(fields)}"
    for field_name, spec in specs.items():
        field = fields[field_name]
        assert dict(field.metadata) == spec.metadata() and field.metadata["help"], field_name
        expected = dataclasses.MISSING if spec.default is cahp.settings.REQUIRED else spec.default
        assert field.default == expected, field_name


def test_constants_the_specs_repeat_agree_with_the_library() -> None:
    from cahp.data.lm import DEFAULT_CORPUS
    from cahp.settings import LM, RECOVERY_OBJECTIVE, TASK
    from cahp.train.distill import RECOVERY_LOSSES
    from cahp.train.finetune import PROTOCOLS

    assert LM["corpus"].default == DEFAULT_CORPUS
    assert RECOVERY_OBJECTIVE["loss"].choices == RECOVERY_LOSSES and TASK["protocol"].choices == PROTOCOLS


#: A few generated options as they must read: (command, flag) -> (dest, type, metavar, choices, help).
EXPECTED_OPTIONS: dict[tuple[str, str], tuple[str, str | None, str | None, list[str] | None, str]] = {
    ("finetune", "--lr"): ("learning_rate", "positive_float", "X", None, "peak learning rate (default: 2e-05)"),
    ("finetune", "--epochs"): ("epochs", "positive_float", "X", None, "passes over the training split (default: 3.0)"),
    ("finetune", "--group-by-length"): (
        "group_by_length",
        None,
        None,
        None,
        "train on batches of similar length (shuffled): less padding, faster on CPU (default: False)",
    ),
    ("prune", "--recovery-epochs"): (
        "recovery_epochs",
        "non_negative_float",
        "X",
        None,
        "passes over the training split (causal-lm: over the calibration blocks) (default: 3 (causal-lm: 0))",
    ),
    ("prune", "--recovery-batch-size"): (
        "batch_size",
        "positive_int",
        "N",
        None,
        "examples per step (default: 32 (causal-lm: 4))",
    ),
    ("prune", "--kd-alpha"): ("kd_alpha", "unit_interval", "F", None, "kd: weight of the label loss (default: 0.5)"),
    ("prune", "--protocol"): (
        "protocol",
        None,
        None,
        ["auto", "standard", "offline"],
        "MNLI: standard (hub train split) or offline (train on validation_matched minus 10%%) (default: auto)",
    ),
    ("prune", "--prompted"): (
        "prompted",
        "task_names",
        "A,B",
        None,
        "tasks (sst2, sst5, mnli) or none (default: sst2)",
    ),
    ("prune", "--budget"): (
        "budget",
        "budget_text",
        "{auto,keep=K,sparsity=S,flops=F,latency=L}",
        None,
        "the budget as text, e.g. to replay a run with --budget auto (default: auto, see --keep)",
    ),
    ("prune", "--model"): (
        "model",
        None,
        None,
        None,
        "the model: a fine-tuned classifier (classification) or a causal LM (causal-lm): folder, alias or hub id "
        "(default: the --config file's; required without one)",
    ),
}


@pytest.mark.parametrize(("command", "flag"), list(EXPECTED_OPTIONS))
def test_generated_options_read_as_committed(command: str, flag: str) -> None:
    from cahp.commands import options

    parser = _subparsers(build_parser())[command]
    action = next(a for a in parser._actions if flag in a.option_strings)
    dest, type_name, metavar, choices, help_text = EXPECTED_OPTIONS[command, flag]
    assert action.type is (None if type_name is None else options.ARGUMENT_TYPES[type_name])
    assert (action.dest, action.metavar, action.choices, action.help) == (dest, metavar, choices, help_text)


# ---- method settings as generated options ---------------------------------------------------------------------------


def test_a_method_setting_option_goes_to_its_method_only() -> None:
    parser = build_parser()
    common = ["prune", "--model", "m", "--out", "o", "--keep", "4"]
    fisher = prune_config(parser.parse_args([*common, "--method", "fisher", "--fisher-max-examples", "8"]))
    assert fisher.method_settings == {"max_examples": 8}
    with pytest.raises(UsageError, match=r"--fisher-max-examples is a setting of method fisher.*--method fisher"):
        prune_config(parser.parse_args([*common, "--method", "magnitude", "--fisher-max-examples", "8"]))
    with pytest.raises(UsageError, match="method fisher"):  # the default method is cahp
        prune_config(parser.parse_args(["prune", "--model", "m", "--out", "o", "--fisher-max-examples", "8"]))
    l0 = prune_config(
        parser.parse_args([*common, "--method", "l0", "--l0-steps", "40", "--method-setting", "penalty=0.5"])
    )
    assert l0.method_settings == {"steps": 40, "penalty": 0.5}
    entropy = prune_config(parser.parse_args([*common, "--method", "entropy", "--no-entropy-focused-is-important"]))
    assert entropy.method_settings == {"focused_is_important": False}
    cahp_run = prune_config(parser.parse_args(["prune", "--model", "m", "--out", "o", "--cahp-converge-tol", "0.01"]))
    assert cahp_run.method_settings == {"converge_tol": 0.01}, "a null default reads JSON"
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--method", "fisher", "--fisher-max-examples", "many"])


def test_a_plugin_method_with_a_card_gets_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cahp.methods.base as registry

    (tmp_path / "cahp_flagged_plugin.py").write_text(
        "from cahp.scoring import HeadScorer\n"
        "METHOD_CARD = {'class': 'Flagged', 'kind': 'scorer', 'settings': "
        "{'steps': 5, 'scale': 0.5, 'fast': True, 'mode': 'a', 'layers': [0], 'extra': None}}\n"
        "class Flagged(HeadScorer):\n"
        '    """A scorer with settings.\n\n    Args:\n        steps: how many steps, at most 100%.\n    """\n'
        "    def __init__(self, steps=5, scale=0.5, fast=True, mode='a', layers=(0,), extra=None):\n"
        "        super().__init__()\n"
    )
    info = tmp_path / "cahp_flagged_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cahp-flagged-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cahp.methods]\nflagged = cahp_flagged_plugin:Flagged\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_declared", None)
    monkeypatch.setattr(registry, "_cards", {})
    monkeypatch.setattr(registry, "_failed", set())

    parser = build_parser()
    prune_parser = _subparsers(parser)["prune"]
    assert "cahp_flagged_plugin" not in sys.modules, "its options come from its card"
    group = next(g for g in prune_parser._action_groups if g.title == "settings of flagged")
    flags = {a.option_strings[0]: a for a in group._group_actions}
    assert set(flags) == {f"--flagged-{name}" for name in ("steps", "scale", "fast", "mode", "layers", "extra")}
    assert flags["--flagged-steps"].help == "how many steps, at most 100%%. (default: 5)"
    args = [
        *["prune", "--model", "m", "--out", "o", "--method", "flagged", "--flagged-steps", "7", "--flagged-scale"],
        *["2", "--no-flagged-fast", "--flagged-mode", "b", "--flagged-layers", "[1, 2]", "--flagged-extra", "x"],
    ]
    config = prune_config(parser.parse_args(args))
    assert config.method_settings == {
        "steps": 7,
        "scale": 2.0,
        "fast": False,
        "mode": "b",
        "layers": [1, 2],
        "extra": "x",
    }
    assert "settings of flagged" in prune_parser.format_help()
    sys.modules.pop("cahp_flagged_plugin", None)


def test_no_flags_give_the_config_defaults() -> None:
    from cahp.pipeline import PruneConfig
    from cahp.train.finetune import FinetuneConfig

    parser = build_parser()
    assert prune_config(parser.parse_args(["prune", "--model", "m", "--out", "o"])) == PruneConfig(model="m")
    assert finetune_config(parser.parse_args(["finetune", "--out", "o"])) == FinetuneConfig()


# ---- replays ------------------------------------------------------------------------------------------------------


def _a_prune_config() -> Any:
    from cahp.pipeline import PruneConfig
    from cahp.train import TaskOptions, TrainingConfig

    return PruneConfig(
        model="some/model",
        task=TaskOptions(task="mnli", protocol="offline", text_columns=["premise", "hypothesis"], max_length=64),
        method="cahp",
        method_settings={"metric": "bhattacharyya", "salience": "gradient", "salience_settings": {"fraction": 0.5}},
        budget="keep=20",
        allow_empty_layers=True,
        uniform_layers=False,
        gqa_mode="uniform",
        seed=7,
        calibration_size=300,
        calibration_batch_size=16,
        recovery=TrainingConfig(epochs=1.0, learning_rate=3e-5, batch_size=8, seed=7, group_by_length=True),
        recovery_max_examples=200,
        eval_splits=("test",),
        eval_max_examples=50,
        latency_batch_size=4,
        latency_seq_len=32,
        latency_repeats=2,
    )


def _write_run_config(folder: Path, command: str, config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run_config.json"
    path.write_text(json.dumps({"command": command, **config.to_dict(), "inputs": {"model_path": "/x"}}))
    return path


def test_prune_replays_a_run_config_and_flags_override_it(tmp_path: Path) -> None:
    original = _a_prune_config()
    record = _write_run_config(tmp_path / "run", "prune", original)
    parser = build_parser()
    for source in (record, record.parent):  # the file, or the run's folder
        assert prune_config(parser.parse_args(["prune", "--config", str(source), "--out", "o"])) == original

    args = parser.parse_args(
        [
            *["prune", "--config", str(record), "--out", "o", "--recovery-epochs", "0", "--sparsity", "0.5"],
            *["--no-allow-empty-layers", "--metric", "jm", "--max-length", "32", "--seed", "3", "--eval-splits", "a,b"],
        ]
    )
    replay = prune_config(args)
    assert replay.recovery.epochs == 0 and replay.budget == "sparsity=0.5" and not replay.allow_empty_layers
    assert replay.method_settings == {**original.method_settings, "metric": "jm"}
    assert replay.task.max_length == 32 and replay.task.protocol == "offline"
    assert replay.seed == 3 and replay.recovery.seed == 3 and replay.eval_splits == ("a", "b")
    untouched = {"recovery", "budget", "allow_empty_layers", "method_settings", "task", "seed", "eval_splits"}
    for field in dataclasses.fields(original):
        if field.name not in untouched:
            assert getattr(replay, field.name) == getattr(original, field.name), field.name
    assert replay.recovery.learning_rate == 3e-5 and replay.recovery.group_by_length
    assert (
        prune_config(parser.parse_args(["prune", "--config", str(record), "--out", "o", "--budget", "auto"])).budget
        == "auto"
    )


def test_replay_with_another_method_or_salience_drops_the_old_settings(tmp_path: Path) -> None:
    record = _write_run_config(tmp_path / "run", "prune", _a_prune_config())
    parser = build_parser()
    common = ["prune", "--config", str(record), "--out", "o"]
    other_method = prune_config(parser.parse_args([*common, "--method", "random", "--keep", "5"]))
    assert other_method.method == "random" and other_method.method_settings == {}
    other_salience = prune_config(parser.parse_args([*common, "--salience", "fisher"]))
    assert other_salience.method_settings == {"metric": "bhattacharyya", "salience": "fisher"}
    both = prune_config(
        parser.parse_args([*common, "--salience", "fisher", "--method-setting", "salience_settings={}"])
    )
    assert both.method_settings["salience_settings"] == {}
    fraction = prune_config(parser.parse_args([*common, "--salience-fraction", "0.75"]))
    assert fraction.method_settings["salience_settings"] == {"fraction": 0.75}


def test_prune_replays_a_record_of_the_earlier_format(tmp_path: Path) -> None:
    record = tmp_path / "old.json"
    old = {
        "command": "prune",
        "model": "some/model",
        "method": "cahp",
        "cahp": {"metric": "jm", "salience": "gradient", "keep": 12, "seed": 5, "allow_empty_layers": False},
        "salience_fraction": 0.25,
        "scorer_settings": {},
    }
    record.write_text(json.dumps(old))
    config = prune_config(build_parser().parse_args(["prune", "--config", str(record), "--out", "o"]))
    assert config.budget == "keep=12" and config.seed == 5 and config.method_settings["metric"] == "jm"


def test_finetune_replays_a_run_config(tmp_path: Path) -> None:
    from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig

    original = FinetuneConfig(
        model="bert-tiny",
        task=TaskOptions(task="sst2", max_length=48),
        training=TrainingConfig(epochs=2.0, batch_size=4, seed=9),
        max_train_examples=100,
        eval_splits=("validation",),
    )
    record = _write_run_config(tmp_path / "ft", "finetune", original)
    parser = build_parser()
    assert finetune_config(parser.parse_args(["finetune", "--config", str(record), "--out", "o"])) == original
    replay = finetune_config(parser.parse_args(["finetune", "--config", str(record), "--out", "o", "--epochs", "1"]))
    assert replay == dataclasses.replace(original, training=dataclasses.replace(original.training, epochs=1.0))
    with pytest.raises(CahpError, match="cahp prune --config"):
        finetune_config(
            parser.parse_args(
                [
                    "finetune",
                    "--config",
                    str(_write_run_config(tmp_path / "p", "prune", _a_prune_config())),
                    "--out",
                    "o",
                ]
            )
        )


def test_method_settings_and_shortcuts_merge_without_naming_a_method() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            *["prune", "--model", "m", "--out", "o", "--method", "l0", "--sparsity", "0.5"],
            *[
                "--scorer-setting",
                "steps=400",
                "--method-setting",
                "anneal=false",
                "--method-setting",
                "name=fast mode",
            ],
        ]
    )
    assert prune_config(args).method_settings == {"steps": 400, "anneal": False, "name": "fast mode"}
    shortcut = prune_config(
        parser.parse_args(["prune", "--model", "m", "--out", "o", "--method", "random", "--metric", "jm"])
    )
    assert shortcut.method_settings == {"metric": "jm"}, "a shortcut goes to any method, which may refuse it"
    from cahp.pipeline import check_config

    with pytest.raises(CahpError, match="metric"):
        check_config(dataclasses.replace(shortcut, budget="keep=2"))


# ---- refusals before any work -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        ["finetune", "--batch-size", "0"],
        ["finetune", "--max-length", "0"],
        ["finetune", "--max-length", "-5"],
        ["finetune", "--epochs", "0"],
        ["finetune", "--epochs", "-1"],
        ["finetune", "--epochs", "nan"],
        ["finetune", "--text-columns", "premise,,hypothesis"],
        ["prune", "--model", "m", "--keep", "0"],
        ["prune", "--model", "m", "--sparsity", "1"],
        ["prune", "--model", "m", "--sparsity", "0"],
        ["prune", "--model", "m", "--keep", "3", "--sparsity", "0.5"],
        ["prune", "--model", "m", "--budget", "keep=0"],
        ["prune", "--model", "m", "--recovery-epochs", "-1"],
        ["prune", "--model", "m", "--calibration-size", "0"],
        ["prune"],  # neither --model nor --config
    ],
)
def test_bad_arguments_are_one_line_usage_errors_and_write_nothing(
    arguments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    try:
        code = main([*arguments, "--out", str(out)])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(error_lines) == 1 and error_lines[0].startswith(f"cahp {arguments[0]}: error:"), err
    assert err.count("\n") == 1, f"one line, no usage block: {err}"
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_zero_batch_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "m", "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size: must be a whole number of at least 1" in capsys.readouterr().err


def test_finetune_config_file_values_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cahp.train import FinetuneConfig

    record = _write_run_config(tmp_path / "ft", "finetune", FinetuneConfig())
    raw = json.loads(record.read_text())
    raw["training"]["epochs"] = 0
    record.write_text(json.dumps(raw))
    assert main(["finetune", "--config", str(record), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cahp: error: ConfigError:") and "epochs" in err and err.count("\n") == 1
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"model": "m", "trainingg": {}}))
    assert main(["finetune", "--config", str(bad_key), "--out", str(tmp_path / "out")]) == 1
    assert "trainingg" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["finetune"], ["prune", "--model", "m"]])
def test_out_that_is_a_file_is_refused_in_one_line(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "below"):
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(blocker) in err and "file" in err
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ---- exit statuses ------------------------------------------------------------------------------------------------


def _replace_command(monkeypatch: pytest.MonkeyPatch, name: str, run: Callable[[argparse.Namespace], int]) -> None:
    command_modules()  # every command registered
    monkeypatch.setitem(COMMANDS, name, dataclasses.replace(COMMANDS[name], run=run))


def _raises(error: BaseException) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise error

    return run


def test_errors_exit_1_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _replace_command(monkeypatch, "models", _raises(CahpError("the reason; what to do")))
    assert main(["models"]) == 1
    assert capsys.readouterr().err == "cahp: error: CahpError: the reason; what to do\n"
    _replace_command(
        monkeypatch, "models", _raises(PermissionError(13, "Permission denied", "/read-only/.out.partial"))
    )
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/read-only/.out.partial" in err and "Permission denied" in err
    _replace_command(monkeypatch, "models", _raises(BrokenPipeError(32, "Broken pipe")))
    assert main(["models"]) == 141 and capsys.readouterr().err == "", "a closed pipe (`| head`) is no error"


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_usage_errors_are_printed_by_the_first_process_only(
    rank: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    _replace_command(monkeypatch, "models", _raises(UsageError("a bad argument")))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == ("" if rank == "1" else "cahp models: error: a bad argument\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    if rank == "1":
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("cahp prune: error:"), err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_an_argparse_error_is_one_line_from_rank_0_and_exit_2_everywhere(rank: str) -> None:
    environment = {**os.environ, "RANK": rank}
    result = subprocess.run(
        [sys.executable, "-m", "cahp", "prune", "--bogus"], capture_output=True, text=True, cwd=REPO, env=environment
    )
    assert result.returncode == 2 and result.stdout == ""
    if rank == "1":
        assert result.stderr == ""
    else:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("cahp prune: error:"), result.stderr


def test_a_missing_model_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "nothing-here"), "--task", "sst5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cahp: error: ModelNotFoundError") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "says_resume"), [("evaluate", False), ("finetune", True), ("prune", True), ("bench", True)]
)
def test_interrupt_says_resume_only_for_resumable_commands(
    name: str, says_resume: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _replace_command(monkeypatch, name, _raises(KeyboardInterrupt()))
    arguments = {"evaluate": ["--model", "m"], "bench": ["--config", "c.json"]}.get(
        name, ["--model", "m", "--out", "o"]
    )
    assert main([name, *arguments]) == 130
    assert ("resume" in capsys.readouterr().err) is says_resume


def test_methods_lists_every_registered_method(capsys: pytest.CaptureFixture[str]) -> None:
    from cahp.methods import available_methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, info in available_methods().items():
        line = next((i for i, text in enumerate(lines) if text.split(" ", 1)[0] == name), None)
        assert line is not None, f"{name} is not listed"
        assert info.description.replace("``", "") in lines[line]
        assert ("finds its own budget" in lines[line + 1]) is info.finds_own_budget
    assert "cahp" in available_methods() and "random" in available_methods()


# ---- cahp analyze: --out refused before anything is loaded ---------------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model (its config or its weights) fail the test."""
    import cahp.models

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before --out was checked")

    for name in ("load_classifier", "load_model_config", "resolve_model"):
        monkeypatch.setattr(cahp.models, name, refuse)


@pytest.mark.usefixtures("nothing_loads")
def test_analyze_refuses_a_bad_out_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "analysis.json"
    existing.write_text("{}")
    analyze = ["analyze", "--model", "m", "--task", "sst5", "--quiet", "--out"]
    assert main([*analyze, str(existing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and existing.read_text() == "{}"

    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert main([*analyze, str(blocker / "analysis.json")]) == 1
    assert capsys.readouterr().err.count("\n") == 1

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    assert main([*analyze, str(read_only / "analysis.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no permission to write" in err and str(read_only) in err
    assert list(read_only.iterdir()) == [] and blocker.read_text() == "keep me"
