"""lm-evaluation-harness on pruned folders, with cahp's local prompted tasks (``cahp.lm_eval_tasks``).

A tiny Llama causal LM (3 layers, 4 query / 2 key-value heads, a word-level tokenizer) is pruned unevenly (saved
with the ``cahp_`` config and its ``modeling_cahp.py``) and uniformly (saved as a stock Llama config). lm-eval's
``hf`` model reads each folder, with ``trust_remote_code=True``, and scores ``cahp_sst2`` over a small SST-2 file
written by the test: the per-example label-word log-likelihoods and the accuracy are cahp's own
(:func:`cahp.evaluation.prompted.evaluate_prompted`), and the uneven folder also runs in a process where cahp
cannot be imported (as the ``lm_eval`` command runs). The task files themselves are checked without lm-eval.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cahp.data.tasks import TextSplit
from cahp.errors import CahpError, DataError
from cahp.evaluation.prompted import (
    PROMPTS,
    default_prompt,
    encode_prompts,
    evaluate_prompted,
    label_log_probs,
)
from cahp.lm_eval_tasks import TASKS, jinja_template, path, write_tasks
from cahp.lm_eval_tasks.__main__ import main
from cahp.surgery import prune_heads
from cahp.surgery.autoload import save_pruned
from tests.unit.test_language_modeling import causal_lm, word_tokenizer

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

#: Words of the SST-2 prompt (its label words among them) and of the reviews.
WORDS = [f"w{i}" for i in range(60)] + ["Review", ":", "Sentiment", "(", "positive", "or", "negative", ")"]
EXAMPLES, LIMIT = 12, 8
#: Removals (original head numbers) per folder: uneven (groups: layers 0 and 1 keep one of their two groups, layer
#: 2 both), uneven with an attention-free layer 1, and uniform (one query head of each group in every layer: a
#: stock config).
PLANS = {
    "uneven": ({0: [2, 3], 1: [0, 1]}, "groups"),
    "empty-layer": ({0: [0, 1], 1: [0, 1, 2, 3]}, "groups"),
    "uniform": ({0: [1, 3], 1: [1, 3], 2: [1, 3]}, "uniform"),
}


def write_split(folder: Path, rows: list[dict[str, Any]], split: str = "validation") -> Path:
    """``rows`` as ``folder/<split>.jsonl.gz``, gzipped JSON lines: the form of the shared data."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{split}.jsonl.gz"
    with gzip.open(file, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return file


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two pruned folders, an SST-2 data folder of :data:`EXAMPLES` reviews, and the task folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = word_tokenizer(WORDS)
    folders = {}
    for name, (removals, mode) in PLANS.items():
        model = prune_heads(causal_lm("llama"), removals, gqa_mode=mode)
        folders[name] = save_pruned(model, root / name, stock=name == "uniform", tokenizer=tokenizer)
    rng = np.random.default_rng(0)
    rows = [
        {"text": " ".join(f"w{i}" for i in rng.integers(0, 60, int(rng.integers(3, 12)))), "label": index % 2}
        for index in range(EXAMPLES)
    ]
    write_split(root / "data" / "sst2", rows)
    tasks = path(root / "data", root / "tasks")
    return {"root": root, "folders": folders, "rows": rows, "tasks": tasks}


def cahp_scores(folder: Path, rows: list[dict[str, Any]]) -> tuple[np.ndarray, float]:
    """cahp's label-word log-probabilities ``[examples, 2]`` and accuracy for ``rows`` (``load_causal_lm``)."""
    from cahp.models import load_causal_lm

    model, tokenizer = load_causal_lm(folder)
    split = TextSplit("validation", [(row["text"],) for row in rows], np.array([row["label"] for row in rows]))
    prompt = default_prompt("sst2")
    scores = label_log_probs(model, tokenizer, encode_prompts(tokenizer, split, prompt, ("text",)), prompt)
    return scores, evaluate_prompted(model, tokenizer, split, prompt, ("text",))["accuracy"]


def evaluate(folder: Path, tasks: Path) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``folder`` (hf, ``trust_remote_code=True``) on ``cahp_sst2``, :data:`LIMIT`
    examples, samples logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "trust_remote_code": True, "dtype": "float32"},
        tasks=["cahp_sst2"],
        task_manager=TaskManager(include_path=str(tasks)),
        limit=LIMIT,
        batch_size=4,
        device="cpu",
        log_samples=True,
    )


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets`` caches the task's JSON file under ``tmp_path``, not the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path / "datasets"


# ---- lm-eval on pruned folders -----------------------------------------------------------------------------


@needs_lm_eval
@pytest.mark.parametrize("name", list(PLANS))
def test_lm_eval_scores_cahps_prompt_on_a_pruned_folder(name: str, setup: dict[str, Any], datasets_cache: Path) -> None:
    folder = setup["folders"][name]
    assert ("modeling_cahp.py" in os.listdir(folder)) == (name != "uniform")  # cahp_ config vs stock
    out = evaluate(folder, setup["tasks"])
    accuracy = out["results"]["cahp_sst2"]["acc,none"]
    assert math.isfinite(accuracy)
    assert out["n-samples"]["cahp_sst2"]["effective"] == LIMIT
    samples = sorted(out["samples"]["cahp_sst2"], key=lambda sample: sample["doc_id"])
    assert [sample["doc_id"] for sample in samples] == list(range(LIMIT))
    harness = np.array([[float(response[0]) for response in sample["filtered_resps"]] for sample in samples])
    scores, cahp_accuracy = cahp_scores(folder, setup["rows"][:LIMIT])
    np.testing.assert_allclose(harness, scores, atol=1e-4)
    assert accuracy == pytest.approx(cahp_accuracy)


_WITHOUT_CAHP = r"""
import importlib.abc, json, sys
class BlockCahp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cahp" or name.startswith("cahp."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, BlockCahp())
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
    tasks=["cahp_sst2"], task_manager=TaskManager(include_path=tasks), limit=limit, batch_size=4, device="cpu")
assert "cahp" not in sys.modules
print(json.dumps({"acc": out["results"]["cahp_sst2"]["acc,none"], "n": out["n-samples"]["cahp_sst2"]["effective"]}))
"""


@needs_lm_eval
def test_an_uneven_folder_runs_in_lm_eval_without_cahp(setup: dict[str, Any], tmp_path: Path) -> None:
    env = os.environ | {
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    arguments = [str(setup["folders"]["uneven"]), str(setup["tasks"]), str(LIMIT)]
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CAHP, *arguments], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    _, cahp_accuracy = cahp_scores(setup["folders"]["uneven"], setup["rows"][:LIMIT])
    assert got == {"acc": pytest.approx(cahp_accuracy), "n": LIMIT}


# ---- the task files ----------------------------------------------------------------------------------------


def test_the_task_files_carry_cahps_prompts_and_the_data_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
    data = write_split(tmp_path / "data" / "sst2", [{"text": "w1", "label": 0}]).resolve()
    write_split(tmp_path / "data" / "mnli", [{"premise": "w1", "hypothesis": "w2", "label": 2}], "validation_matched")
    (tmp_path / "data" / "sst5" / "validation.csv").parent.mkdir()
    (tmp_path / "data" / "sst5" / "validation.csv").write_text("text,label\nw1,4\n")
    assert write_tasks(tmp_path / "tasks", tmp_path / "data") == ["cahp_sst2", "cahp_sst5", "cahp_mnli"]
    config = yaml.safe_load((tmp_path / "tasks" / "cahp_sst2.yaml").read_text())
    assert config["dataset_path"] == "json"
    assert yaml.safe_load((tmp_path / "tasks" / "cahp_sst5.yaml").read_text())["dataset_path"] == "csv"
    assert config["dataset_kwargs"] == {"data_files": {"validation": str(data)}}
    assert config["validation_split"] == "validation"
    assert config["doc_to_text"] == "Review: {{text}}\nSentiment (positive or negative):"
    assert (config["doc_to_choice"], config["target_delimiter"]) == ([" negative", " positive"], "")
    mnli = yaml.safe_load((tmp_path / "tasks" / "cahp_mnli.yaml").read_text())
    assert mnli["doc_to_text"] == PROMPTS["mnli"].template.replace("{premise}", "{{premise}}").replace(
        "{hypothesis}", "{{hypothesis}}"
    )
    assert mnli["doc_to_choice"] == [" yes", " maybe", " no"]
    assert sorted(TASKS) == ["cahp_mnli", "cahp_sst2", "cahp_sst5"]


def test_files_of_data_no_longer_found_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
    write_split(tmp_path / "both" / "sst2", [{"text": "w1", "label": 0}])
    write_split(tmp_path / "both" / "sst5", [{"text": "w1", "label": 4}])
    write_split(tmp_path / "one" / "sst5", [{"text": "w1", "label": 4}])
    write_tasks(tmp_path / "tasks", tmp_path / "both")
    assert write_tasks(tmp_path / "tasks", tmp_path / "one") == ["cahp_sst5"]
    assert sorted(file.name for file in (tmp_path / "tasks").iterdir()) == ["cahp_sst5.yaml"]


def test_the_data_folder_comes_from_cahp_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_split(tmp_path / "data" / "sst2", [{"text": "w1", "label": 0}])
    monkeypatch.setenv("CAHP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAHP_HOME", str(tmp_path / "home"))
    assert main([]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "home" / "lm_eval_tasks")
    assert "cahp_sst2" in captured.err
    assert (tmp_path / "home" / "lm_eval_tasks" / "cahp_sst2.yaml").is_file()


def test_no_data_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"no data for cahp's lm-eval tasks .*looked in: .*empty"):
        path(tmp_path / "empty", tmp_path / "tasks")
    assert main(["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "tasks")]) == 1
    assert capsys.readouterr().err.startswith("error: no data for cahp's lm-eval tasks")


def test_prompt_templates_become_jinja() -> None:
    assert jinja_template("Premise: {premise}\nHypothesis: {hypothesis}") == (
        "Premise: {{premise}}\nHypothesis: {{hypothesis}}"
    )
    for bad in ("{text!r}", "{text:>5}", "a {{literal}} {text}"):
        with pytest.raises(CahpError, match="only plain"):
            jinja_template(bad)
