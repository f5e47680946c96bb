"""One run for every workload and caller: ``cahp prune``, a one-cell ``cahp bench`` grid and the Python API give
the same heads and figures for a tiny classifier and a tiny causal LM; LoRA recovery of a classifier saves a folder
that loads without peft; a third-party workload (image classification with ViT) runs through ``cahp prune``
unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from cahp.bench import BenchConfig, run_bench
from cahp.cli import main
from cahp.pipeline import PruneConfig, prune
from cahp.train import TaskOptions, TrainingConfig
from cahp.train.distill import RecoveryObjective
from cahp.workloads.causal_lm import LMOptions
from tests.conftest import tiny_bert_folder, tiny_task_folder

RECOVERY = {"epochs": 1.0, "learning_rate": 1e-3, "batch_size": 8, "seed": 0, "warmup_ratio": 0.0}


def _figures(quality: dict[str, Any]) -> dict[str, Any]:
    """The figures of an evaluation, without its timings."""
    return {
        split: {key: value for key, value in result.items() if "second" not in key} for split, result in quality.items()
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flow")
    return tiny_bert_folder(root / "model", layers=3, heads=4, num_labels=3), tiny_task_folder(root / "task", 40)


def test_prune_bench_and_the_api_agree_on_a_classifier(classifier: tuple[Path, Path], tmp_path: Path) -> None:
    model, task = classifier
    options = TaskOptions(str(task), max_length=16)
    api = prune(
        PruneConfig(
            model=str(model),
            task=options,
            method="fisher",
            budget="keep=6",
            seed=0,
            recovery=TrainingConfig(**RECOVERY),
            recovery_objective=RecoveryObjective(loss="kd"),
            recovery_max_examples=24,
            latency_repeats=1,
            latency_seq_len=16,
            latency_batch_size=2,
        ),
        tmp_path / "api",
        progress=False,
    )
    argv = [
        *("prune", "--model", str(model), "--task", str(task), "--max-length", "16", "--out", str(tmp_path / "cli")),
        *("--method", "fisher", "--keep", "6", "--seed", "0", "--recovery-loss", "kd", "--recovery-max-examples", "24"),
        *("--recovery-epochs", "1", "--recovery-learning-rate", "1e-3", "--batch-size", "8", "--warmup-ratio", "0"),
        *("--latency-repeats", "1", "--latency-seq-len", "16", "--latency-batch-size", "2"),
    ]
    assert main(argv) == 0
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    bench = BenchConfig(
        model=str(model),
        out=str(tmp_path / "bench"),
        task=options,
        methods=["fisher"],
        budgets=[0.5],
        seeds=[0],
        calibration_size=None,
        calibration_seed=0,
        recovery=TrainingConfig(**RECOVERY),
        recovery_objective=RecoveryObjective(loss="kd"),
        recovery_max_examples=24,
    )
    run_bench(bench, progress=False)
    cell = json.loads((tmp_path / "bench" / "cells" / "fisher__seed0__0.5.json").read_text())

    assert api["kept_heads_by_layer"] == cli["kept_heads_by_layer"] == cell["kept_heads_by_layer"]
    for stage in ("after_pruning", "after_recovery"):
        expected = _figures(api["accuracy"][stage])
        assert _figures(cli["accuracy"][stage]) == expected, stage
        assert _figures(cell["accuracy"][stage]) == expected, stage
    assert [row["train_loss"] for row in cell["recovery_history"]] == [
        row["train_loss"] for row in api["recovery_history"]
    ]
    assert api["accuracy"]["after_recovery"] != api["accuracy"]["after_pruning"], "the recovery trained"


@pytest.fixture(scope="module")
def causal_lm_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.unit.test_decoder import tiny_tokenizer
    from tests.unit.test_language_modeling import causal_lm, random_corpus

    root = tmp_path_factory.mktemp("flow-lm")
    causal_lm("llama").save_pretrained(root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    (root / "corpus.txt").write_text("\n\n".join(random_corpus(documents=40).documents) + "\n")
    return root / "llama", root / "corpus.txt"


LM_TEXT = {"context_length": 16, "calibration_blocks": 6, "eval_blocks": 6, "prompted": (), "continuation_tokens": 3}


@pytest.mark.parametrize("loss", ["kd", "kd-relations"])
def test_prune_bench_and_the_api_agree_on_a_causal_lm_distilled(
    loss: str, causal_lm_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    model, corpus = causal_lm_folder
    recovery = {
        "epochs": 2.0,
        "learning_rate": 1e-2,
        "batch_size": 2,
        "seed": 0,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
    }
    lm = LMOptions(corpus=str(corpus), **LM_TEXT, prompt_tokens=8, new_tokens=2, generation_batch_sizes=(1,))
    api = prune(
        PruneConfig(
            model=str(model),
            objective="causal-lm",
            lm=lm,
            method="magnitude",
            budget="keep=6",
            seed=0,
            recovery=TrainingConfig(**recovery),
            recovery_objective=RecoveryObjective(loss=loss),
            latency_repeats=1,
        ),
        tmp_path / "api",
        progress=False,
    )
    argv = [
        *("prune", "--objective", "causal-lm", "--model", str(model), "--corpus", str(corpus)),
        *("--context-length", "16", "--calibration-blocks", "6", "--eval-blocks", "6", "--prompted", "none"),
        *("--continuation-tokens", "3", "--prompt-tokens", "8", "--new-tokens", "2", "--generation-batch-sizes", "1"),
        *("--method", "magnitude", "--keep", "6", "--seed", "0", "--recovery-loss", loss, "--latency-repeats", "1"),
        *("--recovery-epochs", "2", "--recovery-learning-rate", "1e-2", "--batch-size", "2", "--warmup-ratio", "0"),
        *("--out", str(tmp_path / "cli")),
    ]
    assert main(argv) == 0
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    bench = BenchConfig(
        model=str(model),
        out=str(tmp_path / "bench"),
        objective="causal-lm",
        lm=lm,
        methods=["magnitude"],
        budgets=[0.5],
        seeds=[0],
        recovery=TrainingConfig(**recovery),
        recovery_objective=RecoveryObjective(loss=loss),
    )
    run_bench(bench, progress=False)
    cell = json.loads((tmp_path / "bench" / "cells" / "magnitude__seed0__0.5.json").read_text())

    assert api["kept_heads_by_layer"] == cli["kept_heads_by_layer"] == cell["kept_heads_by_layer"]
    assert api["recovery"]["objective"] == f"causal-lm {RecoveryObjective(loss=loss).label()}"
    assert api["recovery"]["teacher_forwards"] > 0, "the teacher ran beside the student"
    recovered = api["perplexity"]["after"]
    assert cli["perplexity"]["after"] == recovered
    assert cell["quality"]["after_recovery"]["perplexity"]["perplexity"] == pytest.approx(recovered, rel=1e-6)
    assert recovered < api["perplexity"]["pruned"], "distillation from the unpruned model lowers the perplexity"
    parts = api["recovery"]["history"][-1]["loss_parts"]
    assert {"lm", "kd"} <= set(parts) and (("relations" in parts) == (loss == "kd-relations"))


def test_lora_recovery_of_a_classifier_saves_a_folder_that_loads_without_peft(
    classifier: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    model, task = classifier
    config = PruneConfig(
        model=str(model),
        task=TaskOptions(str(task), max_length=16),
        method="magnitude",
        budget="keep=6",
        recovery=TrainingConfig(epochs=2.0, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0),
        recovery_objective=RecoveryObjective(loss="ce"),
        recovery_lora_rank=4,
        latency_repeats=1,
        latency_seq_len=16,
        latency_batch_size=2,
    )
    report = prune(config, tmp_path / "run", progress=False)
    lora = report["recovery"]["lora"]
    assert (lora["rank"], lora["merged"]) == (4, True) and lora["trainable_parameters"] > 0
    assert "LoRA rank 4 merged" in __import__("cahp.pipeline").pipeline.summary(report)
    folder = tmp_path / "run" / "model"
    assert not (folder / "adapter_config.json").exists() and "lora" not in (folder / "config.json").read_text()
    from cahp.models import load_classifier

    reloaded, tokenizer = load_classifier(str(folder))
    assert not any("lora" in name for name in reloaded.state_dict())
    inputs = dict(tokenizer(["good plot", "awful music scene"], return_tensors="pt", padding=True))
    torch.save(inputs, tmp_path / "inputs.pt")
    job = {"folder": str(folder), "inputs": str(tmp_path / "inputs.pt"), "output": str(tmp_path / "logits.pt")}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PEFT_OR_CAHP, json.dumps(job)],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = reloaded(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)


#: Loads a pruned classifier folder where neither peft nor cahp can be imported (its own modeling file).
_WITHOUT_PEFT_OR_CAHP = r"""
import json, sys
sys.modules["peft"] = None
sys.modules["cahp"] = None
import torch, transformers
job = json.loads(sys.argv[1])
model = transformers.AutoModelForSequenceClassification.from_pretrained(job["folder"], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(**torch.load(job["inputs"])).logits, job["output"])
"""


# ---- a third-party workload: image classification with ViT ------------------------------------------------------


class _Pixels:
    """The image workload's collator: stacks ``pixel_values`` (what text tokenizers' ``pad`` does for token ids)."""

    def pad(self, features: list[dict[str, Any]], padding: bool = True, return_tensors: str = "pt") -> dict[str, Any]:
        return {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])}


def _images(count: int, seed: int) -> Any:
    """Images whose class is the brightest colour channel, so that a tiny ViT can learn them."""
    from cahp.data.batching import EncodedSplit

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=generator)
    images = torch.rand(count, 3, 16, 16, generator=generator) * 0.5
    images[torch.arange(count), labels] += 0.5
    return EncodedSplit([{"pixel_values": image} for image in images], labels.numpy())


def _register_image_workload() -> type:
    from cahp.calibration import Calibration, SequenceClassification
    from cahp.evaluation.metrics import evaluate_split
    from cahp.workloads import register_workload
    from cahp.workloads.base import Workload

    @register_workload
    class ImageClassification(Workload):
        """A tiny ViT classifying colours (its own data, collator and metric)."""

        name = "toy-images"
        has_classes = True
        description = "a ViT image classifier on coloured squares"
        default_recovery: ClassVar[Any] = TrainingConfig(epochs=1.0, learning_rate=1e-3, batch_size=8)

        def __init__(self, config: Any, progress: bool = False) -> None:
            super().__init__(config, progress)
            from transformers import ViTForImageClassification

            self.model = ViTForImageClassification.from_pretrained(config.model).eval()
            self.tokenizer = _Pixels()
            self.examples = config.workload_settings.get("examples", 24)

        def calibration(self, sample_seed: int) -> Calibration:
            return Calibration(_images(self.examples, sample_seed), self.tokenizer, SequenceClassification(3), 8)

        def evaluate(self, model: torch.nn.Module, progress: bool = False, extras: bool = True) -> dict[str, Any]:
            return {"test": evaluate_split(model, self.tokenizer, _images(30, 99), 16, False)}

        def recovery_data(self) -> Any:
            return _images(self.examples, 7)

        def report(self, outcome: Any) -> dict[str, Any]:
            return {"quality": outcome.quality}

        def save(self, model: torch.nn.Module, folder: Path) -> dict[str, Any]:
            from cahp.surgery.autoload import save_pruned

            save_pruned(model, folder)
            return {"folder": folder.name, "format": "cahp"}

    return ImageClassification


def test_a_registered_third_party_workload_runs_through_cahp_prune(tmp_path: Path) -> None:
    from tests.unit.tiny_models import build_model

    _register_image_workload()
    build_model("vit").save_pretrained(tmp_path / "vit")
    argv = [
        *("prune", "--objective", "toy-images", "--model", str(tmp_path / "vit"), "--out", str(tmp_path / "out")),
        *("--method", "fisher", "--keep", "6", "--recovery-loss", "ce", "--latency-repeats", "1"),
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["objective"] == "toy-images" and report["heads"]["kept"] >= 6
    quality = report["quality"]
    assert {"before", "pruned", "recovered"} <= set(quality) and quality["recovered"]["test"]["examples"] == 30
    assert len(report["recovery"]["history"]) == 1, "the workload's recipe: one epoch"
    from cahp.surgery import kept_heads_by_layer, load_pruned

    reloaded = load_pruned(str(tmp_path / "out" / "model"))
    kept = {str(layer): heads for layer, heads in kept_heads_by_layer(reloaded).items()}
    assert kept == report["kept_heads_by_layer"]
    images = _images(4, 5)
    batch = _Pixels().pad(images.features)
    with torch.no_grad():
        logits = reloaded(**batch).logits
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
