"""The main job on the embedded default: CAHP on MiniLM-L6 fine-tuned for SST-5.

The demo fine-tunes once and prunes once (both cached in ``$CAHP_HOME/demo``; ``--refresh`` redoes them) and
uses lighter settings than the benchmarks so that the first README command finishes in minutes on two CPU
cores. It prints exactly which settings it used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cahp.models import cahp_home
from cahp.pipeline import PruneConfig, prune, summary
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune, is_finished_run

DEMO_MODEL = "minilm-l6"
DEMO_TASK = "sst5"
DEMO_MAX_LENGTH = 64
#: Lighter than the benchmark recipe (3 epochs, 128 tokens): 2 epochs, 64 tokens, a higher learning rate, and
#: batches grouped by length (SST-5's random batches are half padding).
DEMO_TRAINING = TrainingConfig(epochs=2.0, learning_rate=1e-4, batch_size=32, seed=42, group_by_length=True)
#: Signatures on a 2,000-example stratified calibration subset (reference: the whole training split), the
#: ``weights`` reconstruction (the prune default) on the same examples, and a 1-epoch recovery on the whole training
#: split (reference: 3 epochs at 2e-5), distilled from the unpruned model (``kd``, the prune default:
#: benchmarks/results/recovery.md); evaluated on the test split only. One epoch after the refit ended above one
#: epoch without it (benchmarks/results/reconstruction_demo.json) and above the two epochs without it that the demo
#: ran before (README), in half the recovery time.
DEMO_CALIBRATION_SIZE = 2000
DEMO_RECOVERY_EXAMPLES = None
DEMO_RECOVERY = TrainingConfig(epochs=1.0, learning_rate=5e-5, batch_size=32, seed=42, group_by_length=True)


def demo_folder() -> Path:
    return cahp_home() / "demo"


def demo_finetuned_path(data_dir: str | None = None) -> Path:
    """Fine-tune the demo classifier once into ``$CAHP_HOME/demo`` and return its folder."""
    folder = demo_folder() / f"{DEMO_MODEL}-{DEMO_TASK}"
    if is_finished_run(folder):
        print(f"using the cached fine-tuned {DEMO_MODEL} in {folder}")
        return folder
    print(f"[1/2] fine-tuning {DEMO_MODEL} on {DEMO_TASK} once (cached in {folder})")
    print(f"      demo settings: {json.dumps(DEMO_TRAINING.to_dict())}, max_length {DEMO_MAX_LENGTH}")
    config = FinetuneConfig(
        model=DEMO_MODEL,
        task=TaskOptions(DEMO_TASK, data_dir, max_length=DEMO_MAX_LENGTH),
        training=DEMO_TRAINING,
        eval_splits=("validation",),
    )
    finetune(config, folder, overwrite=True, command="cahp demo")
    return folder


def run_demo(data_dir: str | None = None, refresh: bool = False) -> dict[str, Any]:
    """Fine-tune (cached), prune with CAHP (cached), and print a short summary. Returns the report."""
    data_dir = data_dir or os.environ.get("CAHP_DATA_DIR")
    if refresh:
        shutil.rmtree(demo_folder(), ignore_errors=True)
    finetuned = demo_finetuned_path(data_dir)
    out = demo_folder() / f"{DEMO_MODEL}-{DEMO_TASK}-cahp"
    if (out / "report.json").is_file():
        print(f"using the cached pruning run in {out} (cahp demo --refresh redoes everything)")
        report = json.loads((out / "report.json").read_text())
    else:
        config = PruneConfig(
            model=str(finetuned),
            task=TaskOptions(DEMO_TASK, data_dir, max_length=DEMO_MAX_LENGTH),
            calibration_size=DEMO_CALIBRATION_SIZE,
            recovery=DEMO_RECOVERY,
            recovery_max_examples=DEMO_RECOVERY_EXAMPLES,
            eval_splits=("test",),
        )
        print(f"[2/2] pruning with CAHP (knee decides how many heads stay) into {out}")
        print(
            f"      demo settings: calibration {DEMO_CALIBRATION_SIZE} examples, recovery "
            f"({config.recovery_objective.label()}) on {DEMO_RECOVERY_EXAMPLES or 'all the training'} examples "
            f"{json.dumps(DEMO_RECOVERY.to_dict())}, max_length {DEMO_MAX_LENGTH}"
        )
        report = prune(config, out, overwrite=True, command="cahp demo")
    print()
    print(f"CAHP on {DEMO_MODEL} / {DEMO_TASK} (demo settings)")
    print(summary(report))
    print(f"pruned model: {out / 'model'}   report: {out / 'report.json'}   plots: {out / 'plots'}")
    return report
