"""The settings of the config dataclasses that are command-line options: default, help and how the option reads.

One :class:`FieldSpec` per option field, in one table per dataclass (:data:`TRAINING` for
:class:`~cahp.train.loop.TrainingConfig`, :data:`TASK`, :data:`RECOVERY_OBJECTIVE`, :data:`LM`, :data:`FINETUNE`,
:data:`PRUNE`). The dataclass declares the field with it (``epochs: float = TRAINING.field("epochs")``: the default,
with the rest as the field's ``metadata``), and :mod:`cahp.commands` generates the option from the same spec, the
way ``transformers.HfArgumentParser`` builds a parser from dataclass fields. So a default is written once, here.

The specs live in this module, not beside the dataclasses, because those modules import torch and ``cahp --help``
must not: this module imports the standard library only. Argument types are named (``"positive_int"``), not
imported: the command line resolves the names (:data:`cahp.commands.options.ARGUMENT_TYPES`); the library never
imports a command module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class _Required:
    """The type of :data:`REQUIRED`."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a field that has none (a required setting, e.g. ``PruneConfig.model``).
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class FieldSpec:
    """A config field that is a command-line option.

    Attributes:
        help: the option's help (without its default: the parser adds ``(default: ...)``).
        default: the field's default (:data:`REQUIRED`: none). Immutable values only (tuples, not lists).
        flags: the option's names; empty: ``--`` and the field name with dashes (``max_length``: ``--max-length``).
        type: the name of an argument type of :data:`cahp.commands.options.ARGUMENT_TYPES` (``None``: text, or
            yes/no for a ``bool`` default).
        metavar: the placeholder in the usage line (``None``: the type's, e.g. ``N``).
        choices: the values accepted.
        shown: what the help says the default is, when the value alone would not say it (``{default}``: the value).
    """

    help: str
    default: Any = REQUIRED
    flags: tuple[str, ...] = ()
    type: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    shown: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The field's ``metadata``: ``help`` and the option's other settings that are set."""
        entries = {name: getattr(self, name) for name in ("flags", "type", "metavar", "choices", "shown")}
        return {"help": self.help, **{name: value for name, value in entries.items() if value}}


class FieldSpecs(Mapping[str, FieldSpec]):
    """The option fields of one config dataclass, by field name."""

    def __init__(self, owner: str, specs: Mapping[str, FieldSpec]) -> None:
        self.owner = owner
        self._specs = dict(specs)

    def __getitem__(self, name: str) -> FieldSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def field(self, name: str) -> Any:
        """``dataclasses.field`` of the option field ``name``: its default and its spec as ``metadata``."""
        spec = self._specs[name]
        default = dataclasses.MISSING if spec.default is REQUIRED else spec.default
        return dataclasses.field(default=default, metadata=spec.metadata())

    def defaults(self) -> dict[str, Any]:
        """Every field's default, by name (required fields left out)."""
        return {name: spec.default for name, spec in self._specs.items() if spec.default is not REQUIRED}


#: :class:`~cahp.train.finetune.TaskOptions` (``cahp finetune``, ``prune``, ``evaluate`` and ``analyze``).
TASK = FieldSpecs(
    "TaskOptions",
    {
        "task": FieldSpec("sst5, sst2, mnli, a local folder or a hub dataset id", "sst5"),
        "data_dir": FieldSpec("folder holding <task>/<split>.jsonl.gz", None, shown="$CAHP_DATA_DIR, else the hub"),
        "protocol": FieldSpec(
            "MNLI: standard (hub train split) or offline (train on validation_matched minus 10%)",
            "auto",
            choices=("auto", "standard", "offline"),
        ),
        "text_columns": FieldSpec(
            "comma-separated text columns, e.g. premise,hypothesis", None, type="comma_list", shown="the task's"
        ),
        "label_column": FieldSpec("the column of the labels", "label"),
        "num_labels": FieldSpec(
            "number of classes, for integer labels", None, type="class_count", shown="the largest label + 1"
        ),
        "max_length": FieldSpec("tokens per example", 128, type="positive_int"),
    },
)

#: :class:`~cahp.train.loop.TrainingConfig` (``cahp finetune``'s training, ``cahp prune``'s recovery). Its defaults:
#: the CAHP reference recipe for BERT-base.
TRAINING = FieldSpecs(
    "TrainingConfig",
    {
        "epochs": FieldSpec("passes over the training split", 3.0, type="non_negative_float"),
        "learning_rate": FieldSpec(
            "peak learning rate", 2e-5, flags=("--learning-rate", "--lr"), type="positive_float"
        ),
        "batch_size": FieldSpec("examples per step", 32, type="positive_int"),
        "warmup_ratio": FieldSpec("share of steps of linear warm-up", 0.1, type="fraction_below_one"),
        "weight_decay": FieldSpec("AdamW weight decay", 0.01, type="non_negative_float"),
        "seed": FieldSpec("seeds the subset, the shuffling and the initialisation", 42, type="seed_value"),
        "checkpoint_every": FieldSpec("steps between resume checkpoints", 200, type="positive_int"),
        "group_by_length": FieldSpec(
            "train on batches of similar length (shuffled): less padding, faster on CPU", False
        ),
    },
)

#: :class:`~cahp.train.distill.RecoveryObjective` (``cahp prune``'s recovery).
RECOVERY_OBJECTIVE = FieldSpecs(
    "RecoveryObjective",
    {
        "loss": FieldSpec(
            "ce: the task's own loss (cross-entropy on the labels; causal-lm: on the next tokens); kd: plus "
            "distillation of the unpruned model's logits; kd-relations: plus its q/k/v self-attention relations "
            "(causal on causal-lm) (docs/recovery.md)",
            "ce",
            flags=("--recovery-loss",),
            choices=("ce", "kd", "kd-relations"),
        ),
        "temperature": FieldSpec("kd: softening temperature", 2.0, flags=("--kd-temperature",), type="positive_float"),
        "alpha": FieldSpec("kd: weight of the label loss", 0.5, flags=("--kd-alpha",), type="unit_interval"),
        "relation_heads": FieldSpec("kd-relations: relation heads per layer", 8, type="positive_int"),
        "relation_layers": FieldSpec("kd-relations: all, last, or layer numbers like 4,5", "all"),
        "relation_weight": FieldSpec("kd-relations: its weight", 1.0, type="non_negative_float"),
        "hidden_weight": FieldSpec(
            "kd-relations: weight of hidden-state matching (0: off)", 0.0, type="non_negative_float"
        ),
    },
)

#: :class:`~cahp.workloads.causal_lm.LMOptions` (``cahp prune --objective causal-lm``).
LM = FieldSpecs(
    "LMOptions",
    {
        "corpus": FieldSpec(
            "mnli-premises (offline stand-in for WikiText), a .txt/.jsonl/.csv/.tsv file (.gz too), or a hub "
            "dataset like wikitext:wikitext-2-raw-v1",
            "mnli-premises",
        ),
        "corpus_column": FieldSpec("text column of a record file or hub dataset", None, shown="text"),
        "data_dir": FieldSpec(TASK["data_dir"].help, None, shown=TASK["data_dir"].shown),
        "context_length": FieldSpec("tokens per block", 256, type="positive_int"),
        "stride": FieldSpec("tokens between blocks", None, type="positive_int", shown="the context length"),
        "calibration_blocks": FieldSpec("calibration blocks (and recovery data)", 32, type="positive_int"),
        "eval_blocks": FieldSpec("perplexity blocks", 32, type="positive_int"),
        "calibration_batch_size": FieldSpec(
            "blocks per batch, for methods that do not set their own", 4, type="positive_int"
        ),
        "eval_batch_size": FieldSpec("blocks per perplexity forward", 8, type="positive_int"),
        "prompted": FieldSpec("tasks (sst2, sst5, mnli) or none", ("sst2",), type="task_names", metavar="A,B"),
        "prompted_split": FieldSpec("the split evaluated", "validation"),
        "prompted_examples": FieldSpec("a seeded stratified subset of the split", 200, type="positive_int"),
        "prompted_batch_size": FieldSpec("prompts per forward", 16, type="positive_int"),
        "continuation_tokens": FieldSpec("tokens of each greedy continuation", 16, type="positive_int"),
        "generation_batch_sizes": FieldSpec(
            "batch sizes of the prefill and generation timing", (1, 8), type="batch_sizes", metavar="A,B"
        ),
        "prompt_tokens": FieldSpec("prompt tokens, prefill and generation", 128, type="positive_int"),
        "new_tokens": FieldSpec("tokens generated per prompt, timing", 32, type="positive_int"),
    },
)

#: :class:`~cahp.train.finetune.FinetuneConfig`'s own option fields (with :data:`TASK` and :data:`TRAINING`).
FINETUNE = FieldSpecs(
    "FinetuneConfig",
    {
        "model": FieldSpec("alias (`cahp models`), local folder or hub id", "minilm-l6"),
        "max_train_examples": FieldSpec(
            "train on a seeded stratified subset of the training split",
            None,
            type="positive_int",
            shown="the whole split",
        ),
        "eval_splits": FieldSpec(
            "splits evaluated after training, comma-separated", ("validation", "test"), type="comma_list"
        ),
    },
)

#: :class:`~cahp.pipeline.PruneConfig`'s own option fields (with :data:`TASK`, :data:`RECOVERY_OBJECTIVE`, :data:`LM`
#: and the recovery's :data:`TRAINING`).
PRUNE = FieldSpecs(
    "PruneConfig",
    {
        "model": FieldSpec(
            "the model: a fine-tuned classifier (classification) or a causal LM (causal-lm): folder, alias or hub id",
            shown="the --config file's; required without one",
        ),
        "objective": FieldSpec(
            "the workload: classification (a fine-tuned classifier on --task), causal-lm (a decoder LLM on its "
            "language-modelling loss over --corpus), or a registered third-party workload",
            "classification",
            shown="{default}; `cahp prune-lm` is `cahp prune --objective causal-lm`",
        ),
        "method": FieldSpec(
            "any registered method (`cahp methods` lists them); replaying a run with another method drops "
            "the run's method settings",
            "cahp",
        ),
        "budget": FieldSpec(
            "the budget as text, e.g. to replay a run with --budget auto",
            "auto",
            type="budget_text",
            metavar="{auto,keep=K,sparsity=S,flops=F,latency=L}",
            shown="{default}, see --keep",
        ),
        "allow_empty_layers": FieldSpec("a layer may lose every head", False),
        "uniform_layers": FieldSpec("keep the same number of heads in every layer", False),
        "gqa_mode": FieldSpec(
            "grouped-query attention: remove whole key-value groups, or the same number of query heads in every group",
            "groups",
            choices=("groups", "uniform"),
        ),
        "reconstruct": FieldSpec(
            "after surgery, re-fit each layer's output projection to the unpruned layer's attention output on the "
            "calibration data, no gradient step (docs/reconstruction.md): the removed heads' mean into the bias, one "
            "scale per kept head, or a ridge refit of the kept heads' weights (the default: it lost the least "
            "accuracy of the four in benchmarks/results/reconstruction.md); none skips the step",
            "weights",
            choices=("none", "bias", "scale", "weights"),
        ),
        "seed": FieldSpec("seeds the method, the calibration subset and the recovery fine-tune", 42, type="seed_value"),
        "calibration_size": FieldSpec(
            "examples of the calibration split (a seeded class-stratified subset)",
            None,
            type="positive_int",
            shown="the whole split",
        ),
        "calibration_batch_size": FieldSpec(
            "calibration examples per batch, for methods that do not set their own", 32, type="positive_int"
        ),
        "recovery_lora_rank": FieldSpec(
            "train rank-R LoRA adapters on the attention and MLP projections instead, merged before saving "
            "(needs pip install 'cahp[lora]')",
            None,
            type="positive_int",
            metavar="R",
            shown="none: every weight trains",
        ),
        "recovery_max_examples": FieldSpec(
            "recover on a seeded stratified subset of the training split",
            None,
            type="positive_int",
            shown="the whole split",
        ),
        "eval_splits": FieldSpec(
            "splits evaluated before pruning, after pruning and after recovery, comma-separated",
            ("validation", "test"),
            type="comma_list",
        ),
        "eval_max_examples": FieldSpec(
            "evaluate on a seeded stratified subset of each split", None, type="positive_int", shown="the whole split"
        ),
        "latency_batch_size": FieldSpec("batch of the latency measurement", 32, type="positive_int"),
        "latency_seq_len": FieldSpec("tokens per sequence, latency", 128, type="positive_int"),
        "latency_repeats": FieldSpec("timed repeats of every speed measurement", 10, type="positive_int"),
        "save_dtype": FieldSpec(
            "the dtype the pruned model's weights are saved in, recorded in its config.json so that from_pretrained "
            "loads it in that dtype; the run's own evaluation and measurements do not change. auto: the dtype the "
            "model came in (its config's, else its weight files'); a quantized GGUF model (smollm2-135m) has none: "
            "float32, what it was de-quantized to (docs/loading.md)",
            "auto",
            flags=("--dtype",),
            choices=("auto", "float32", "float16", "bfloat16"),
        ),
    },
)

#: ``PruneConfig.recovery_objective`` when a config gives none (:data:`RECOVERY_OBJECTIVE`'s defaults otherwise):
#: ``kd``, level with ``kd-relations`` and ahead of ``ce`` in ``benchmarks/results/recovery.md``.
PRUNE_RECOVERY_OBJECTIVE: dict[str, Any] = {"loss": "kd"}

__all__ = [
    "FINETUNE",
    "LM",
    "PRUNE",
    "PRUNE_RECOVERY_OBJECTIVE",
    "RECOVERY_OBJECTIVE",
    "REQUIRED",
    "TASK",
    "TRAINING",
    "FieldSpec",
    "FieldSpecs",
]
