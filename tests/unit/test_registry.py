"""The method registry: built-ins are cahp's own entry points, listed from their cards without importing torch; every
card agrees with its class; a plugin with a card is listed without being imported."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import cahp.methods.base as registry
from cahp.methods.base import (
    CARD_NAME,
    available_methods,
    builtin_methods,
    declared_entry_points,
    get_method,
    info_of_class,
    method_class,
    method_info,
    read_method_card,
    setting_help,
)

SOURCE = Path(__file__).resolve().parents[2] / "src" / "cahp"


def test_listing_methods_and_reading_their_info_imports_no_torch() -> None:
    code = (
        "import cahp.methods.base as b; b.available_methods(); [b.method_info(n) for n in b.available_methods()]; "
        "import sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('cahp'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_built_ins_are_cahps_own_entry_points() -> None:
    builtins = builtin_methods()
    assert {"cahp", "cahp-consensus", "random", "gradient", "fisher"} <= set(builtins)
    assert set(builtins) <= set(available_methods())


@pytest.mark.parametrize("name", builtin_methods())
def test_every_built_in_card_agrees_with_its_class(name: str) -> None:
    """The card (read without importing) and the imported class give the same info: they cannot drift."""
    entry = declared_entry_points()[name]
    card = read_method_card(entry.value)
    assert card is not None, f"{entry.value} has no readable {CARD_NAME}"
    cls = method_class(name)
    assert cls.name == name, "the class registers itself under its entry point's name"
    assert replace(card, name=name) == info_of_class(name, cls)
    assert (
        card.defaults == info_of_class(name, cls).defaults
        and card.setting_help == info_of_class(name, cls).setting_help
    )


def test_every_module_with_a_card_is_declared() -> None:
    """A built-in written but not added to pyproject.toml's entry points would never be listed."""
    declared = {entry.value.split(":")[0] for entry in declared_entry_points().values()}
    with_cards = {
        ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)
        for path in SOURCE.rglob("*.py")
        if f"\n{CARD_NAME} = " in path.read_text(encoding="utf-8")
    }
    assert with_cards and with_cards <= declared, f"not declared in pyproject.toml: {sorted(with_cards - declared)}"


def test_info_carries_defaults_and_help() -> None:
    info = method_info("fisher")
    assert info.kind == "scorer" and info.settings == ("batch_size", "max_examples", "seed")
    assert info.defaults == {"batch_size": 1, "max_examples": 256, "seed": 0}
    assert "per-example" in info.setting_help["batch_size"]
    cahp = method_info("cahp")
    assert cahp.finds_own_budget and cahp.needs_classes and cahp.kind == "method"
    assert cahp.setting_help["perplexity"] == cahp.setting_help["tsne_iterations"], "a, b: text gives both"


def test_setting_help_reads_the_args_section() -> None:
    docstring = (
        "One line.\n\nArgs:\n    alpha: the weight\n        of the first term.\n    a, b: both.\n"
        "    **rest: passed on.\n\nLearned state: ``x_``.\n"
    )
    assert setting_help(docstring) == {
        "alpha": "the weight of the first term.",
        "a": "both.",
        "b": "both.",
        "rest": "passed on.",
    }
    assert setting_help("No arguments.") == {}


def test_a_plugin_with_a_card_is_listed_without_being_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cahp_carded_plugin.py").write_text(
        "import numpy as np\n"
        "from cahp.scoring import HeadScorer\n"
        "METHOD_CARD = {'class': 'Carded', 'kind': 'scorer', 'deterministic': True, 'settings': {'seed': 0}}\n"
        "class Carded(HeadScorer):\n"
        '    """A scorer listed from its card."""\n'
        "    deterministic = True\n"
        "    def _score(self, model, calibration):\n"
        "        return np.zeros((1, 1))\n"
    )
    info = tmp_path / "cahp_carded_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cahp-carded-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cahp.methods]\ncarded = cahp_carded_plugin:Carded\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_declared", None)
    monkeypatch.setattr(registry, "_cards", {})
    monkeypatch.setattr(registry, "_failed", set())
    monkeypatch.setattr(registry, "_SCORERS", dict(registry._SCORERS))
    listed = method_info("carded")
    assert "cahp_carded_plugin" not in sys.modules, "listed from its card"
    assert listed.description == "A scorer listed from its card." and listed.deterministic
    assert "carded" not in builtin_methods()
    method = get_method("carded")
    assert "cahp_carded_plugin" in sys.modules and method.name == "carded" and method.deterministic
    assert info_of_class("carded", method_class("carded")) == listed
    sys.modules.pop("cahp_carded_plugin", None)
