"""The main job on the embedded default: MiniLM-L6 fine-tuned on SST-5 (once, then cached), evaluated.

The demo uses lighter settings than the benchmarks so that the first README command finishes in minutes on
two CPU cores; it prints exactly which settings it used.
"""

from __future__ import annotations

import json
import os

from cahp.evaluation.evaluate import evaluate
from cahp.models import cahp_home
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune, is_finished_run

DEMO_MODEL = "minilm-l6"
DEMO_TASK = "sst5"
#: Lighter than the benchmark recipe (3 epochs, 128 tokens): 2 epochs, 64 tokens, a higher learning rate.
DEMO_TRAINING = TrainingConfig(epochs=2.0, learning_rate=1e-4, batch_size=32, seed=42)
DEMO_MAX_LENGTH = 64


def demo_finetuned_path(data_dir: str | None = None) -> str:
    """Fine-tune the demo classifier once into ``$CAHP_HOME/demo`` and return its folder."""
    folder = cahp_home() / "demo" / f"{DEMO_MODEL}-{DEMO_TASK}"
    if not is_finished_run(folder):
        config = FinetuneConfig(
            model=DEMO_MODEL,
            task=TaskOptions(DEMO_TASK, data_dir, max_length=DEMO_MAX_LENGTH),
            training=DEMO_TRAINING,
            eval_splits=("validation",),
        )
        print(f"fine-tuning {DEMO_MODEL} on {DEMO_TASK} once (cached in {folder})")
        print(f"demo settings: {json.dumps(DEMO_TRAINING.to_dict())}, max_length {DEMO_MAX_LENGTH}")
        finetune(config, folder, overwrite=True, command="cahp demo")
    else:
        print(f"using the cached fine-tuned {DEMO_MODEL} in {folder}")
    return str(folder)


def run_demo(data_dir: str | None = None, refresh: bool = False) -> dict:
    """Run the demo and print a short summary. Returns the evaluation report."""
    data_dir = data_dir or os.environ.get("CAHP_DATA_DIR")
    if refresh:
        import shutil

        shutil.rmtree(cahp_home() / "demo", ignore_errors=True)
    model_dir = demo_finetuned_path(data_dir)
    report = evaluate(model_dir, TaskOptions(DEMO_TASK, data_dir, max_length=DEMO_MAX_LENGTH), ["test"])
    test = report["results"]["test"]
    print(
        f"{DEMO_MODEL} fine-tuned on {DEMO_TASK}: test accuracy {test['accuracy']:.4f}, "
        f"macro-F1 {test['macro_f1']:.4f} ({test['examples']} examples)"
    )
    return report
