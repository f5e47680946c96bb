"""The shipped MiniLM-L6 on a handful of real SST-5 examples, through the command line as a user runs it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from cahp.cli import main
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_sst5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("shared benchmark data (../shared/data) not found")
    folder = tmp_path_factory.mktemp("sst5-small")
    for split, count in (("train", 60), ("validation", 20), ("test", 20)):
        with gzip.open(data / "sst5" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as handle:
            rows = [json.loads(line) for _, line in zip(range(count), handle, strict=False)]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def test_finetune_prune_evaluate_reload(small_sst5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--task", str(small_sst5), "--max-length", "32", "--num-labels", "5"]
    finetuned = tmp_path / "ft"
    assert main(["finetune", "--model", "minilm-l6", "--out", str(finetuned), "--epochs", "1", *common]) == 0
    assert "test: accuracy" in capsys.readouterr().out

    pruned = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "--model",
            str(finetuned),
            "--out",
            str(pruned),
            "--keep",
            "24",
            "--recovery-epochs",
            "0.5",
            "--calibration-size",
            "40",
            *common,
        ]
    )
    output = capsys.readouterr().out
    assert code == 0 and "heads kept:" in output and "speedup" in output
    report = json.loads((pruned / "report.json").read_text())
    assert 24 <= report["heads"]["kept"] < 72 and report["heads"]["total"] == 72
    assert report["parameters"]["pruned"] < report["parameters"]["dense"]
    assert report["flops_per_sequence"]["pruned_attention"] < report["flops_per_sequence"]["dense_attention"]

    assert main(["evaluate", "--model", str(pruned / "model"), "--split", "test", "--json", *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["results"]["test"]["accuracy"] == pytest.approx(
        report["accuracy"]["after_recovery"]["test"]["accuracy"]
    )
    assert evaluated["parameters"] == report["parameters"]["pruned"]


def test_masking_equals_removal_on_minilm() -> None:
    from cahp.models import load_classifier
    from cahp.surgery import head_mask, prune_heads

    model, tokenizer = load_classifier("minilm-l6", num_labels=5)
    batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    removed = {0: [0, 3, 11], 2: list(range(12)), 5: [7]}
    gates = torch.ones(6, 12)
    for layer, heads in removed.items():
        gates[layer, heads] = 0
    with torch.no_grad(), head_mask(model, gates):
        masked = model(**batch).logits
    prune_heads(model, removed)
    with torch.no_grad():
        pruned = model(**batch).logits
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
