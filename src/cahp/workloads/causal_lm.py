"""The ``causal-lm`` workload: a decoder LLM pruned on its language-modelling objective.

Calibration: blocks of a text corpus (:mod:`cahp.data.lm`), the same for every seed. Quality: perplexity on the
evaluation blocks, the zero-shot accuracy of prompted tasks and greedy continuations. Recovery: the LM loss of the
calibration blocks, or distillation from the unpruned model (``kd``: its next-token distributions, computed beside
the student at every step; ``kd-relations``: plus causal q/k/v relations). Speed: the KV cache's bytes per token,
prefill latency and generation tokens/s, dense vs pruned on the CPU in one run. The pruned model is saved with a
stock config when every layer kept the same heads (plain transformers loads it), else with the ``cahp_`` config.

Methods that compare classes (CAHP: ``needs_classes``) cannot run on this objective, which has none: the settings
check refuses them before anything is loaded, naming the methods that can. To use CAHP on a decoder, fine-tune a
classifier head and prune it with the ``classification`` objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from cahp.calibration import Calibration, CausalLanguageModeling, lm_calibration
from cahp.config import check_counts, check_text_lists, check_texts
from cahp.data import load_task
from cahp.data.batching import EncodedSplit
from cahp.data.lm import DEFAULT_CORPUS, LMBlocks, TextCorpus, load_corpus, make_blocks
from cahp.errors import CahpError, PrunedModelError
from cahp.evaluation.generation import (
    CONTINUATION_PROMPTS,
    greedy_continuations,
    kv_cache_bytes_per_token,
    measure_generation,
)
from cahp.evaluation.perplexity import perplexity
from cahp.evaluation.prompted import default_prompt, evaluate_prompted
from cahp.methods.plan import Budget
from cahp.models import load_causal_lm, model_max_length
from cahp.settings import LM
from cahp.surgery.autoload import resolve_save_dtype, save_pruned, saved_dtype_record, stock_config_dict
from cahp.train.distill import LanguageModelDistillation, LossFn, objective_loss
from cahp.train.finetune import subsample
from cahp.train.loop import SEEDS, TrainingConfig, is_seed
from cahp.workloads import RECOVERY_RECIPES, register_workload
from cahp.workloads.base import Workload

#: How a result names the offline default corpus (its perplexity is not WikiText's).
OFFLINE_CORPUS_NOTE = "offline stand-in for WikiText-2: other text, not comparable to WikiText perplexity"

#: The recovery recipe of a causal-LM run whose config gives none (:data:`cahp.workloads.RECOVERY_RECIPES`).
RECOVERY_DEFAULT = TrainingConfig(**RECOVERY_RECIPES["causal-lm"])


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class LMOptions:
    """The text a causal-LM run learns from and is measured on: the ``lm`` object of a ``cahp prune`` config or of a
    ``cahp bench`` grid whose ``objective`` is ``causal-lm``.

    Attributes:
        corpus: ``mnli-premises`` (offline default), a local ``.txt/.jsonl/.csv/.tsv`` file (``.gz`` too) or a hub
            dataset ``path[:config]``, e.g. ``wikitext:wikitext-2-raw-v1``.
        corpus_column: the text column of a record file or hub dataset (default ``text``).
        data_dir: where the shared data lives (``mnli-premises``, prompted tasks); default ``$CAHP_DATA_DIR``.
        context_length, stride: block geometry (``stride`` ``None``: non-overlapping blocks).
        calibration_blocks: blocks of the calibration split the method (and the recovery) learn from.
        eval_blocks: blocks of the evaluation split for perplexity.
        calibration_batch_size: blocks per batch for methods that do not set their own.
        eval_batch_size: blocks per perplexity forward.
        prompted: zero-shot prompted tasks (built-in prompts: ``sst2``, ``sst5``, ``mnli``); empty: none.
        prompted_split: the split of each prompted task that is evaluated.
        prompted_examples: a seeded, stratified subset of that split (``None``: all of it).
        prompted_batch_size: prompts per forward.
        sample_seed: the seed of that subset (``None``: the run's: ``cahp prune``'s ``seed``, a bench grid's
            ``calibration_seed``).
        continuation_prompts: prompts whose greedy continuations are shown before and after pruning.
        continuation_tokens: the most tokens generated per continuation.
        generation_batch_sizes: batch sizes of the prefill and generation measurement.
        prompt_tokens: prompt length (tokens) of the prefill and generation measurement.
        new_tokens: tokens generated per prompt in the generation measurement.
    """

    corpus: str = LM.field("corpus")
    corpus_column: str | None = LM.field("corpus_column")
    data_dir: str | None = LM.field("data_dir")
    context_length: int = LM.field("context_length")
    stride: int | None = LM.field("stride")
    calibration_blocks: int = LM.field("calibration_blocks")
    eval_blocks: int = LM.field("eval_blocks")
    calibration_batch_size: int = LM.field("calibration_batch_size")
    eval_batch_size: int = LM.field("eval_batch_size")
    prompted: tuple[str, ...] = LM.field("prompted")
    prompted_split: str = LM.field("prompted_split")
    prompted_examples: int | None = LM.field("prompted_examples")
    prompted_batch_size: int = LM.field("prompted_batch_size")
    sample_seed: int | None = None
    continuation_prompts: tuple[str, ...] = CONTINUATION_PROMPTS
    continuation_tokens: int = LM.field("continuation_tokens")
    generation_batch_sizes: tuple[int, ...] = LM.field("generation_batch_sizes")
    prompt_tokens: int = LM.field("prompt_tokens")
    new_tokens: int = LM.field("new_tokens")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> LMOptions:
        """Check every setting; returns self.

        Raises:
            CahpError: the first bad setting, named.
        """
        check_texts(self, ("corpus", "prompted_split"), optional=False)
        check_texts(self, ("corpus_column", "data_dir"), optional=True)
        check_counts(self, ("stride", "prompted_examples"), optional=True)
        check_counts(
            self,
            (
                "context_length",
                "calibration_blocks",
                "eval_blocks",
                "calibration_batch_size",
                "eval_batch_size",
                "prompted_batch_size",
            ),
            optional=False,
        )
        if self.context_length < 2:
            raise CahpError(f"context_length must be at least 2 tokens, got {self.context_length}")
        if self.stride is not None and self.stride > self.context_length:
            raise CahpError(
                f"stride {self.stride} is longer than context_length {self.context_length}: it would skip tokens; "
                "give a stride of at most the context length"
            )
        check_text_lists(self, ("prompted",))
        for task in self.prompted:
            default_prompt(task)  # refuses a task without a built-in prompt, naming the ones there are
        if self.sample_seed is not None and not is_seed(self.sample_seed):
            raise CahpError(f"sample_seed must be a whole number in 0..{SEEDS - 1} or null, got {self.sample_seed!r}")
        check_counts(self, ("continuation_tokens", "prompt_tokens", "new_tokens"), optional=False)
        check_text_lists(self, ("continuation_prompts",))
        sizes = self.generation_batch_sizes
        if not isinstance(sizes, tuple) or not sizes or not all(is_count(size) for size in sizes):
            raise CahpError(f"generation_batch_sizes must list positive whole numbers, got {sizes!r}")
        return self

    def load(self, tokenizer: Any, run_seed: int) -> LMData:
        """The calibration and evaluation blocks and the prompted tasks' examples (subset drawn with
        ``sample_seed``, else ``run_seed``): :meth:`read` then :meth:`encode`."""
        return self.encode(tokenizer, self.read(run_seed))

    def read(self, run_seed: int) -> LMText:
        """The text, before any tokenizer (so that a missing corpus is said before a model is loaded).

        Raises:
            DataError: a corpus or task that cannot be read.
        """
        corpora = {
            role: load_corpus(self.corpus, role, column=self.corpus_column, data_dir=self.data_dir)
            for role in ("calibration", "evaluation")
        }
        seed = run_seed if self.sample_seed is None else self.sample_seed
        prompted = {}
        for name in self.prompted:
            task = load_task(name, self.data_dir)
            split = subsample(task.split(self.prompted_split), self.prompted_examples, seed)
            prompted[name] = (split, task.text_columns)
        return LMText(corpora, prompted)

    def encode(self, tokenizer: Any, text: LMText) -> LMData:
        """The blocks of :meth:`read`'s corpora and its prompted examples."""
        counts = {"calibration": self.calibration_blocks, "evaluation": self.eval_blocks}
        blocks = {
            role: make_blocks(tokenizer, corpus, self.context_length, self.stride, counts[role])
            for role, corpus in text.corpora.items()
        }
        return LMData(blocks["calibration"], blocks["evaluation"], text.prompted)

    def check_context_length(self, model: Any, tokenizer: Any) -> None:
        """Refuse a context length above what the model accepts.

        Raises:
            CahpError: ``context_length`` above the model's positions (or its tokenizer's limit).
        """
        limit = model_max_length(model.config, tokenizer)
        if limit is not None and self.context_length > limit:
            raise CahpError(
                f"--context-length {self.context_length} is longer than the model accepts ({limit} tokens): give "
                f"--context-length {limit} or less"
            )


@dataclass
class LMText:
    """What :meth:`LMOptions.read` reads: ``{role: corpus}`` and ``{task: (examples, text columns)}``."""

    corpora: dict[str, TextCorpus]
    prompted: dict[str, tuple[Any, tuple[str, ...]]]


@dataclass
class LMData:
    """What :meth:`LMOptions.load` reads: blocks to learn from, blocks to measure perplexity on, and
    ``{task: (examples, text columns)}`` of the prompted tasks."""

    calibration: LMBlocks
    evaluation: LMBlocks
    prompted: dict[str, tuple[Any, tuple[str, ...]]]


def corpus_label(description: dict[str, Any]) -> str:
    """How results name a corpus split: ``"mnli-premises validation_mismatched (offline stand-in ...)"``."""
    label = f"{description.get('corpus')} {description.get('split')}"
    return f"{label} ({OFFLINE_CORPUS_NOTE})" if description.get("corpus") == DEFAULT_CORPUS else label


def measure_lm(model: Any, tokenizer: Any, data: LMData, options: LMOptions, progress: bool = False) -> dict[str, Any]:
    """``{"perplexity": ..., "prompted": {task: ...}}`` of a causal LM: perplexity on the evaluation blocks and the
    zero-shot results of each prompted task (its prompt recorded)."""
    result = {"perplexity": perplexity(model, tokenizer, data.evaluation, options.eval_batch_size, progress)}
    result["prompted"] = {
        name: evaluate_prompted(
            model,
            tokenizer,
            split,
            default_prompt(name),
            text_columns,
            batch_size=options.prompted_batch_size,
            progress=progress,
        )
        for name, (split, text_columns) in data.prompted.items()
    }
    return result


def lm_loss_fn(objective: CausalLanguageModeling | None = None) -> LossFn:
    """The LM recovery's loss: the calibration objective's (mean next-token cross-entropy of the scored tokens),
    reported as the ``lm`` part."""
    return objective_loss(objective or CausalLanguageModeling(), part="lm")


@register_workload
class CausalLMWorkload(Workload):
    """A decoder LLM on its language-modelling objective: perplexity, zero-shot accuracy, KV cache, generation."""

    name = "causal-lm"
    has_classes = False
    description = "a decoder LLM on its language-modelling objective: perplexity, KV cache, generation speed"
    default_recovery = RECOVERY_DEFAULT

    def __init__(self, config: Any, progress: bool = False) -> None:
        super().__init__(config, progress)
        self.options: LMOptions = config.lm if config.lm is not None else LMOptions()
        text = self.options.read(config.sample_seed)  # a missing corpus is said before the model is loaded
        self.model, self.tokenizer = load_causal_lm(config.model)
        self.options.check_context_length(self.model, self.tokenizer)
        self.data = self.options.encode(self.tokenizer, text)

    @classmethod
    def check_config(cls, config: Any) -> None:
        objective = config.recovery_objective
        if objective.uses_teacher and objective.hidden_weight:
            raise CahpError(
                "hidden_weight is not available on the causal-lm objective: its kd-relations distils logits and "
                "causal q/k/v relations; drop --hidden-weight"
            )

    def calibration(self, sample_seed: int) -> Calibration:
        """The calibration blocks (the same for every seed: the corpus is read in order)."""
        return lm_calibration(self.data.calibration, self.tokenizer, self.options.calibration_batch_size, self.progress)

    def evaluate(self, model: torch.nn.Module, progress: bool = False, extras: bool = True) -> dict[str, Any]:
        """Perplexity and zero-shot prompted accuracy; ``extras``: greedy continuations too."""
        result = measure_lm(model, self.tokenizer, self.data, self.options, progress)
        if extras:
            result["continuations"] = greedy_continuations(
                model, self.tokenizer, self.options.continuation_prompts, self.options.continuation_tokens
            )
        return result

    def recovery_data(self) -> EncodedSplit:
        return self.data.calibration.examples

    def recovery_loss(self, teacher: torch.nn.Module) -> LossFn:
        """The LM loss of the blocks (``ce``), or distillation from ``teacher`` (``kd``, ``kd-relations``)."""
        objective = self.config.recovery_objective
        if objective.uses_teacher:
            return LanguageModelDistillation(objective, teacher)
        return lm_loss_fn()

    def measure(self, dense: PreTrainedModel, pruned: PreTrainedModel) -> dict[str, Any]:
        """KV cache bytes per token, prefill latency and generation tokens/s, dense vs pruned in one run."""
        kv_dense, kv_pruned = kv_cache_bytes_per_token(dense), kv_cache_bytes_per_token(pruned)
        generation = measure_generation(
            {"dense": dense, "pruned": pruned},
            batch_sizes=self.options.generation_batch_sizes,
            prompt_tokens=self.options.prompt_tokens,
            new_tokens=self.options.new_tokens,
            repeats=self.config.latency_repeats,
            pad_token_id=int(self.tokenizer.pad_token_id),
        )
        return {
            "kv_cache": {
                "dense": kv_dense,
                "pruned": kv_pruned,
                "ratio": kv_pruned["bytes_per_token"] / kv_dense["bytes_per_token"],
                "kv_heads_ratio": kv_pruned["kv_heads"] / kv_dense["kv_heads"],
            },
            "generation": {"device": "cpu", **generation},
        }

    def describe(self) -> dict[str, Any]:
        return {
            "task": "causal-lm",
            "calibration_split": corpus_label(self.data.calibration.describe()),
            "evaluation": {**self.data.evaluation.describe(), "label": corpus_label(self.data.evaluation.describe())},
            "calibration": self.data.calibration.describe(),
            "prompted": {name: len(split) for name, (split, _) in self.data.prompted.items()},
        }

    def report(self, outcome: Any) -> dict[str, Any]:
        quality = outcome.quality
        after = "recovered" if quality["recovered"] is not None else "pruned"
        evaluation = self.data.evaluation.describe()
        recovery: dict[str, Any] = {"epochs": self.config.recovery.epochs, **outcome.recovery_run}
        if self.config.recovery.epochs > 0:
            loss = self.config.recovery_objective
            recovery["objective"] = "causal-lm" if not loss.uses_teacher else f"causal-lm {loss.label()}"
            recovery["data"] = corpus_label(self.data.calibration.describe())
            recovery["blocks"] = len(self.data.calibration)
        return {
            "objective": "causal-lm",
            "corpus": {
                "evaluation": {**evaluation, "label": corpus_label(evaluation)},
                "calibration": {
                    **outcome.calibration.description,
                    "label": corpus_label(self.data.calibration.describe()),
                    "fingerprint": outcome.fingerprints["calibration"],
                },
            },
            "kept_kv_heads_by_layer": {
                str(layer): heads for layer, heads in sorted(outcome.kept_kv_heads_by_layer.items())
            },
            "quality": {"dense": quality["before"], "pruned": quality["pruned"], "recovered": quality["recovered"]},
            "after": after,
            "perplexity": {
                "dense": quality["before"]["perplexity"]["perplexity"],
                "pruned": quality["pruned"]["perplexity"]["perplexity"],
                "after": quality[after]["perplexity"]["perplexity"],
            },
            "recovery": recovery,
            **outcome.measurement,
        }

    @staticmethod
    def summary(report: dict[str, Any]) -> str:
        """Lines for the terminal: heads and KV heads kept, perplexity, prompted accuracy, KV cache, speed,
        parameters, and the greedy continuations before and after."""
        heads, quality, after = report["heads"], report["quality"], report["after"]
        ppl = quality["dense"]["perplexity"]
        plan = report["plan"]
        budget = Budget.from_dict(plan["budget"])
        asked = budget.heads(heads["total"]) if budget.mode in ("keep", "sparsity") else None
        requested = plan["heads_requested"]
        uniform = ", uniform layers" if heads["uniform_layers"] else ""
        rounded = (
            f"{asked} heads rounded to {requested}, what the constraints express"
            if asked is not None and asked != requested
            else f"{requested} heads"
        )
        lines = [
            f"heads kept: {heads['kept']} of {heads['total']} query heads, {heads['kv_kept']} of {heads['kv_total']} "
            f"key-value heads ({report['method']}, budget {budget.label()}: {rounded}; guardrail added "
            f"{len(plan['guardrail_heads'])}; {heads['gqa_mode']} mode{uniform})",
            f"perplexity on {ppl['blocks']} blocks of {ppl['context_length']} tokens of "
            f"{report['corpus']['evaluation']['label']}: dense {report['perplexity']['dense']:.2f}, pruned "
            f"{report['perplexity']['pruned']:.2f}"
            + (f", recovered {report['perplexity']['after']:.2f}" if after == "recovered" else " (no recovery)")
            + (f" (LoRA rank {report['recovery']['lora']['rank']}, merged)" if "lora" in report["recovery"] else ""),
        ]
        for task, dense_result in quality["dense"]["prompted"].items():
            final = quality[after]["prompted"][task]
            lines.append(
                f"{task} zero-shot ({dense_result['examples']} examples, prompt {dense_result['prompt']!r}): "
                f"accuracy {dense_result['accuracy']:.4f} -> {final['accuracy']:.4f}, macro-F1 "
                f"{dense_result['macro_f1']:.4f} -> {final['macro_f1']:.4f}"
            )
        kv = report["kv_cache"]
        lines.append(
            f"KV cache: {kv['dense']['bytes_per_token']:,} -> {kv['pruned']['bytes_per_token']:,} bytes/token "
            f"({kv['ratio']:.3f}x); parameters {report['parameters']['dense'] / 1e6:.1f}M -> "
            f"{report['parameters']['pruned'] / 1e6:.1f}M"
        )
        generation = report["generation"]
        for batch, row in generation["by_batch"].items():
            lines.append(
                f"batch {batch}: prefill {row['dense']['prefill_seconds'] * 1e3:.0f} -> "
                f"{row['pruned']['prefill_seconds'] * 1e3:.0f} ms ({generation['prompt_tokens']} tokens; "
                f"{_ratio_text(row, 'prefill_ratio')}), generation {row['dense']['tokens_per_second']:.1f} -> "
                f"{row['pruned']['tokens_per_second']:.1f} tokens/s ({_ratio_text(row, 'tokens_per_second_ratio')}; "
                f"CPU, {generation['torch_threads']} thread(s), {_repeats_text(generation['repeats'])})"
            )
        for before, final in zip(quality["dense"]["continuations"], quality[after]["continuations"], strict=True):
            lines.append(f"{before['prompt']!r}: dense {before['continuation']!r} | {after} {final['continuation']!r}")
        export = report["export"]
        weights = f" in {export['dtype']}, {export['size_mb']} MB" if export.get("dtype") else ""
        lines.append(f"saved as a {export['format']} config{weights} ({export['why']})")
        return "\n".join(lines)

    def save(self, model: PreTrainedModel, folder: Path) -> dict[str, Any]:
        """Save the pruned model: a stock config when one describes it (every layer kept the same query and
        key-value heads; loads without cahp), else the ``cahp_`` config (loads with cahp or trust_remote_code);
        its weights in the config's ``save_dtype`` (``auto``: the dtype the model came in,
        :func:`~cahp.surgery.autoload.resolve_save_dtype`), ``model`` itself staying float32. The record says the
        format, the dtype and the folder's size."""
        saved = resolve_save_dtype(getattr(self.config, "save_dtype", "auto"), self.config.model)
        try:
            stock_config_dict(model)
            stock = True
            why = "every layer kept the same query and key-value heads: a stock config, loadable without cahp"
        except PrunedModelError as error:
            stock = False
            why = f"loads with cahp imported, or trust_remote_code=True: {str(error).splitlines()[0]}"
        save_pruned(
            model, folder, stock=stock, tokenizer=self.tokenizer, name_or_path=self.shared_name(), dtype=saved.dtype
        )
        return {
            "folder": folder.name,
            "format": "stock" if stock else "cahp",
            "why": why,
            **saved_dtype_record(folder, saved),
        }


def _ratio_text(row: dict[str, Any], key: str) -> str:
    """``1.02x [0.95, 1.10]``: a median ratio and its range over the repeats (a record without one: the ratio)."""
    spread = row.get(f"{key}_range")
    text = f"{row[key]:.2f}x"
    return f"{text} [{spread[0]:.2f}, {spread[1]:.2f}]" if spread and spread[0] != spread[1] else text


def _repeats_text(repeats: int) -> str:
    return "one sample: a noisy single measurement" if repeats == 1 else f"median and range of {repeats} repeats"
