"""The model card of a pruned folder, built from a real ``cahp prune`` report on a tiny model."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cahp.pipeline import PruneConfig, prune
from cahp.reporting.model_card import render_model_card, write_model_card
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune
from tests.conftest import tiny_bert_folder, tiny_task_folder

COMMAND = "cahp prune --model runs/ft --task runs/task --method magnitude --keep 5 --out runs/pruned"

SECTIONS = (
    "## Base model",
    "## Task",
    "## Method, budget and settings",
    "## Kept heads per layer",
    "## Accuracy",
    "## Size and speed",
    "## Command",
    "## How to load it",
)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A ``cahp prune`` output folder (magnitude scorer, 5 of 12 heads, one recovery epoch) and its report."""
    root = tmp_path_factory.mktemp("model_card")
    model = tiny_bert_folder(root / "tiny", layers=3, heads=4)
    task = TaskOptions(str(tiny_task_folder(root / "task", examples=60)), max_length=16)
    training = TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8)
    finetune(FinetuneConfig(model=str(model), task=task, training=training), root / "ft", progress=False)
    config = PruneConfig(
        model=str(root / "ft"),
        task=task,
        method="magnitude",
        budget="keep=5",
        recovery=TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8),
        latency_repeats=2,
        latency_seq_len=16,
        latency_batch_size=4,
    )
    report = prune(config, root / "out", progress=False, command=COMMAND)
    return root / "out", report


@pytest.fixture
def card_folder(pruned_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A private copy of the run folder (so each test writes its own card)."""
    return Path(shutil.copytree(pruned_run[0], tmp_path / "run")) / "model"


def front_matter(card: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, "the card must open with a --- metadata block"
    return yaml.safe_load(match.group(1))


def table_rows(card: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading`` (header and rule rows dropped)."""
    section = card.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_card_has_every_section_and_parsing_metadata(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    path = write_model_card(report, card_folder, COMMAND)
    card = path.read_text()
    assert path == card_folder / "README.md"
    positions = [card.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions), "sections in the documented order"
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers"
    assert {"cahp", "pruning", "custom_code"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["metrics"] == ["accuracy", "f1"]
    assert "base_model" not in metadata and "datasets" not in metadata, "local folders are no Hub ids"
    assert f"```bash\n{COMMAND}\n```" in card
    assert f"`{report['selection']['budget']}`" in card and "`magnitude`" in card
    assert report["recovery"]["objective"]["loss"] == "kd"
    assert "Recovery objective: `kd` (kd (T=2, alpha=0.5))." in card


def test_card_names_the_kept_heads_the_config_records(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    card = write_model_card(report, card_folder, COMMAND).read_text()
    recorded = json.loads((card_folder / "config.json").read_text())["cahp_kept_heads"]
    rows = table_rows(card, "## Kept heads per layer")
    in_card = {layer: [int(h) for h in heads.split(", ")] if heads != "none" else [] for layer, _, heads in rows}
    assert in_card == {layer: list(heads) for layer, heads in recorded.items()} == report["kept_heads_by_layer"]
    assert [kept for _, kept, _ in rows] == [f"{len(h)} of 4" for h in recorded.values()]
    assert sum(map(len, in_card.values())) == report["heads"]["kept"] == 5


def test_card_numbers_equal_the_report(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    card = write_model_card(report, card_folder, COMMAND).read_text()
    accuracy = report["accuracy"]
    rows = table_rows(card, "## Accuracy")
    assert [(split, metric) for split, metric, *_ in rows] == [
        (split, metric) for split in ("validation", "test") for metric in ("accuracy", "macro_f1")
    ]
    for split, metric, examples, *values in rows:
        assert int(examples) == accuracy["before_pruning"][split]["examples"]
        expected = [accuracy[stage][split][metric] for stage in ("before_pruning", "after_pruning", "after_recovery")]
        assert [float(value) for value in values] == pytest.approx(expected, abs=5e-5)

    size = {row[0]: row[1:] for row in table_rows(card, "## Size and speed")}
    parameters, flops = report["parameters"], report["flops_per_sequence"]
    assert [int(cell.replace(",", "")) for cell in size["parameters"][:2]] == [
        parameters["dense"],
        parameters["pruned"],
    ]
    assert [int(cell.replace(",", "")) for cell in size["FLOPs per sequence of 16 tokens"][:2]] == [
        flops["dense_total"],
        flops["pruned_total"],
    ]
    latency = report["latency"]
    assert [float(cell) for cell in size["median latency (ms per batch)"][:2]] == pytest.approx(
        [latency["dense"]["median_seconds"] * 1000, latency["pruned"]["median_seconds"] * 1000], abs=5e-4
    )
    assert f"Measured speedup {latency['measured_speedup']}x, FLOPs-ideal {latency['flops_ideal_speedup']}x" in card
    settings = {row[0]: row[1] for row in table_rows(card, "## Method, budget and settings")}
    assert settings["heads requested"] == str(report["heads"]["requested"])
    assert settings["heads kept"].startswith(f"{report['heads']['kept']} of {report['heads']['total']}")


def test_picture_is_copied_into_the_folder(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    card = write_model_card(report, card_folder, COMMAND).read_text()
    assert "](kept_heads.png)" in card, "the picture is linked inside the folder, not ../plots"
    plots = card_folder.parent / "plots" / "kept_heads.png"
    assert (card_folder / "kept_heads.png").read_bytes() == plots.read_bytes()
    shutil.rmtree(card_folder.parent / "plots")
    (card_folder / "kept_heads.png").unlink()
    write_model_card(report, card_folder, COMMAND)
    assert (card_folder / "kept_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "drawn from the report"


def test_command_falls_back_to_the_report_then_to_python(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    assert f"```bash\n{COMMAND}\n```" in render_model_card(report, card_folder, None), "the report records it"
    without = {**report, "command": None}
    card = render_model_card(without, card_folder, None)
    assert "```bash" not in card and "cahp.pipeline.prune" in card


def test_metadata_names_hub_ids_of_alias_and_built_in_task(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    report = copy.deepcopy(report)
    report["model"] = "minilm-l6"
    report["task"]["task"] = "sst5"
    metadata = front_matter(render_model_card(report, card_folder, COMMAND))
    assert metadata["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["datasets"] == ["SetFit/sst5"]


def test_base_model_follows_the_run_records(pruned_run: tuple[Path, dict], card_folder: Path, tmp_path: Path) -> None:
    _, report = pruned_run
    finetuned = tmp_path / "ft"
    finetuned.mkdir()
    record = {"command": "finetune", "model": "mpnet-base", "task": {"task": "sst5", "protocol": "standard"}}
    (finetuned / "run_config.json").write_text(json.dumps(record))
    card = render_model_card({**report, "model": str(finetuned)}, card_folder, COMMAND)
    assert front_matter(card)["base_model"] == "sentence-transformers/all-mpnet-base-v2"
    assert "- pruned from: `ft` (fine-tuned on sst5, standard protocol)\n- which was made from: `mpnet-base`" in card
    assert str(tmp_path) not in card, "a local folder is named by its own name, never by its path"


def test_stock_folder_loads_without_remote_code(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    (card_folder / "modeling_cahp.py").unlink()  # what save_pruned(stock=True) leaves
    card = render_model_card(report, card_folder, COMMAND)
    assert "trust_remote_code" not in card and "custom_code" not in front_matter(card)["tags"]


def test_loading_snippets_in_the_card_load_the_model(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    from cahp.surgery import load_pruned

    _, report = pruned_run
    card = write_model_card(report, card_folder, COMMAND).read_text()
    snippets = re.findall(r"```python\n(.*?)```", card.split("## How to load it", 1)[1], flags=re.DOTALL)
    assert len(snippets) == 2 and "trust_remote_code=True" in snippets[1]
    reference = load_pruned(card_folder).eval()
    ids = torch.tensor([[101, 2204, 2466, 102], [101, 6659, 2189, 102]])
    for snippet in snippets:
        namespace: dict[str, Any] = {}
        exec(snippet.replace("path/to/this/folder", str(card_folder)), namespace)
        model = namespace["model"].eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_run_without_recovery_and_a_layer_without_heads(pruned_run: tuple[Path, dict], card_folder: Path) -> None:
    _, report = pruned_run
    report = copy.deepcopy(report)
    report["config"]["recovery"]["epochs"] = 0
    report["kept_heads_by_layer"]["2"] = []
    card = render_model_card(report, card_folder, COMMAND)
    assert "No recovery fine-tune" in card and "Recovery objective" not in card
    assert {row[0]: row[1] for row in table_rows(card, "## Method, budget and settings")}["recovery"].startswith("none")
    assert table_rows(card, "## Kept heads per layer")[2] == ["2", "0 of 4", "none"]
