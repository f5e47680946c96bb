"""``cahp prune-lm``: prune the attention heads of a decoder LLM on its language-modelling objective, in one run
that measures the dense and the pruned model alike.

causal LM -> calibration blocks of a text corpus (:mod:`cahp.data.lm`) -> the method's keep-plan on the causal-LM
objective (:class:`cahp.engine.Engine`) -> the dense model's perplexity, zero-shot prompted accuracy and greedy
continuations -> physical removal (grouped-query aware) -> the same after pruning -> an optional recovery on the
LM loss of the calibration blocks (every weight, or LoRA adapters merged into the weights afterwards) -> the same
after recovery -> parameters, key-value cache bytes per token,
prefill latency and generation tokens/s at batch 1 and 8, dense vs pruned in one run -> the pruned model
(a stock config when every layer kept the same heads, so plain transformers loads it without cahp) and
``report.json``.

Each stage's result is cached in the run's staging folder (:class:`cahp.outputs.StagedOutput`), so an interrupted
run resumes where it stopped; the output folder appears only when everything is written.

Methods that compare classes (CAHP: ``needs_classes`` in the registry) cannot run on the LM objective, which has
none: the settings check refuses them, before anything is loaded or written, with one line naming the methods
that can. To use CAHP on a decoder,
fine-tune a classifier head and run ``cahp prune``.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cahp.calibration import CausalLanguageModeling, lm_calibration
from cahp.config import check_counts, check_text_lists, check_texts, config_from_dict
from cahp.data.lm import DEFAULT_CORPUS, LMBlocks, load_blocks
from cahp.engine import Engine, print_line
from cahp.errors import CahpError, ModelNotFoundError, PrunedModelError
from cahp.evaluation.accounting import count_parameters
from cahp.evaluation.generation import (
    CONTINUATION_PROMPTS,
    greedy_continuations,
    kv_cache_bytes_per_token,
    measure_generation,
)
from cahp.evaluation.perplexity import perplexity
from cahp.evaluation.prompted import default_prompt, evaluate_prompted
from cahp.methods.base import available_methods, method_info
from cahp.methods.plan import Budget, Constraints, HeadGrid, KeepPlan
from cahp.outputs import StagedOutput, atomic_write, check_output_target, write_json
from cahp.pipeline import StageCache, check_config
from cahp.surgery import heads_to_remove, kept_heads_by_layer, kept_kv_heads_by_layer, prune_heads
from cahp.surgery.autoload import save_pruned, stock_config_dict
from cahp.train.loop import SEEDS, TrainingConfig, is_seed, set_seed, train_model

#: Recovery on the LM loss of the calibration blocks; ``epochs=0`` (the default) is retraining-free.
DECODER_RECOVERY_DEFAULT = TrainingConfig(
    epochs=0.0, learning_rate=5e-5, batch_size=4, warmup_ratio=0.1, weight_decay=0.0, checkpoint_every=50
)

#: How a result names the offline default corpus (its perplexity is not WikiText's).
OFFLINE_CORPUS_NOTE = "offline stand-in for WikiText-2: other text, not comparable to WikiText perplexity"


@dataclass
class LMOptions:
    """The text a causal-LM run learns from and is measured on: ``cahp prune-lm``'s (flat in its config) and
    ``cahp bench``'s (the ``lm`` object of a grid whose ``objective`` is ``causal-lm``).

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
        sample_seed: the seed of that subset (``None``: the run's: ``cahp prune-lm``'s ``seed``, a bench grid's
            ``calibration_seed``).
    """

    corpus: str = DEFAULT_CORPUS
    corpus_column: str | None = None
    data_dir: str | None = None
    context_length: int = 256
    stride: int | None = None
    calibration_blocks: int = 32
    eval_blocks: int = 32
    calibration_batch_size: int = 4
    eval_batch_size: int = 8
    prompted: tuple[str, ...] = ("sst2",)
    prompted_split: str = "validation"
    prompted_examples: int | None = 200
    prompted_batch_size: int = 16
    sample_seed: int | None = None

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
        return self

    def load(self, tokenizer: Any, run_seed: int) -> LMData:
        """The calibration and evaluation blocks and the prompted tasks' examples (subset drawn with
        ``sample_seed``, else ``run_seed``)."""
        from cahp.data import load_task
        from cahp.train.finetune import subsample

        blocks = {
            role: load_blocks(
                tokenizer,
                self.corpus,
                role,  # type: ignore[arg-type]
                context_length=self.context_length,
                stride=self.stride,
                max_blocks=count,
                column=self.corpus_column,
                data_dir=self.data_dir,
            )
            for role, count in (("calibration", self.calibration_blocks), ("evaluation", self.eval_blocks))
        }
        seed = run_seed if self.sample_seed is None else self.sample_seed
        prompted = {}
        for name in self.prompted:
            task = load_task(name, self.data_dir)
            split = subsample(task.split(self.prompted_split), self.prompted_examples, seed)
            prompted[name] = (split, task.text_columns)
        return LMData(blocks["calibration"], blocks["evaluation"], prompted)


@dataclass
class LMData:
    """What :meth:`LMOptions.load` reads: blocks to learn from, blocks to measure perplexity on, and
    ``{task: (examples, text columns)}`` of the prompted tasks."""

    calibration: LMBlocks
    evaluation: LMBlocks
    prompted: dict[str, tuple[Any, list[str]]]


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


@dataclass(kw_only=True)
class DecoderPruneConfig(LMOptions):
    """Everything that defines a ``cahp prune-lm`` run (written to ``run_config.json``; ``--config`` replays it).

    Attributes:
        model: a causal LM: an alias (``smollm2-135m``), a folder or a hub id.
        method: a registered method that runs without classes (``cahp methods``; every one but CAHP).
        method_settings: that method's settings; ``seed`` defaults to :attr:`seed`.
        budget: ``"keep=K"`` or ``"sparsity=S"`` (share of query heads removed); made expressible under the
            constraints (whole key-value groups, or the same count per group) before selection.
        allow_empty_layers: let a layer lose every head.
        uniform_layers: keep the same number of heads in every layer (a stock-config export).
        gqa_mode: ``groups`` (whole key-value groups: shrinks the KV cache) or ``uniform`` (the same number of
            query heads in every group: the KV cache stays).
        seed: the method's seed (and the recovery's).
        corpus ... sample_seed: the text and the measurements (inherited from :class:`LMOptions`).
        recovery: the recovery on the LM loss of the calibration blocks (``epochs=0``: retraining-free).
        recovery_lora_rank: ``None``: the recovery trains every weight; a rank ``R``: it trains rank-``R`` LoRA
            adapters (scale ``alpha / R`` = 2) on every linear projection of the attention and MLP blocks, the
            rest frozen, and merges them into the weights before anything is measured or saved (needs ``peft``:
            ``pip install 'cahp[lora]'``; the saved model does not).
        continuation_prompts: prompts whose greedy continuations are shown before and after.
        continuation_tokens: the most tokens generated per continuation.
        generation_batch_sizes: batch sizes of the prefill and generation measurement.
        prompt_tokens: prompt length (tokens) of the prefill and generation measurement.
        new_tokens: tokens generated per prompt in the generation measurement.
        latency_repeats: timed repeats of each measurement.
    """

    model: str
    method: str = "fisher"
    method_settings: dict[str, Any] = field(default_factory=dict)
    budget: str = "sparsity=0.33"
    allow_empty_layers: bool = False
    uniform_layers: bool = False
    gqa_mode: str = "groups"
    seed: int = 42
    recovery: TrainingConfig = field(default_factory=lambda: copy.deepcopy(DECODER_RECOVERY_DEFAULT))
    recovery_lora_rank: int | None = None
    continuation_prompts: tuple[str, ...] = CONTINUATION_PROMPTS
    continuation_tokens: int = 16
    generation_batch_sizes: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 128
    new_tokens: int = 32
    latency_repeats: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DecoderPruneConfig:
        """The config of a ``run_config.json`` (its record keys ``command``, ``inputs`` are skipped)."""
        return config_from_dict(cls, raw, "prune-lm config")

    def validate(self) -> DecoderPruneConfig:
        """Check every setting's type and range (the method's own settings are checked by :func:`check_config`);
        returns self.

        Raises:
            CahpError: the first bad setting, named.
        """
        check_texts(self, ("model", "method"), optional=False)
        if not isinstance(self.method_settings, dict):
            raise CahpError(f"method_settings must be an object {{setting: value}}, got {self.method_settings!r}")
        if not isinstance(self.budget, str):
            raise CahpError(f"budget must be 'keep=K' or 'sparsity=S', got {self.budget!r}")
        for name in ("allow_empty_layers", "uniform_layers"):
            if not isinstance(getattr(self, name), bool):
                raise CahpError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.gqa_mode not in ("groups", "uniform"):
            raise CahpError(f"gqa_mode must be 'groups' or 'uniform', got {self.gqa_mode!r}")
        if not is_seed(self.seed):
            raise CahpError(f"seed must be a whole number in 0..{SEEDS - 1}, got {self.seed!r}")
        super().validate()  # the text and measurement settings
        check_counts(self, ("recovery_lora_rank",), optional=True)
        check_counts(self, ("continuation_tokens", "prompt_tokens", "new_tokens", "latency_repeats"), optional=False)
        check_text_lists(self, ("continuation_prompts",))
        sizes = self.generation_batch_sizes
        if not isinstance(sizes, tuple) or not sizes or not all(_is_count(size) for size in sizes):
            raise CahpError(f"generation_batch_sizes must list positive whole numbers, got {sizes!r}")
        if not isinstance(self.recovery, TrainingConfig):
            raise CahpError(f"recovery must be the recovery's training settings (an object), got {self.recovery!r}")
        self.recovery.validate()
        if self.recovery_lora_rank is not None and self.recovery.epochs == 0:
            raise CahpError(
                f"recovery_lora_rank {self.recovery_lora_rank} trains LoRA adapters in the recovery, which has 0 "
                "epochs: give --recovery-epochs above 0, or drop --recovery-lora-rank"
            )
        return self

    def parsed_budget(self) -> Budget:
        budget = Budget.parse(self.budget)
        if budget.is_auto:
            raise CahpError(
                "prune-lm needs a head count: give --budget keep=K or --budget sparsity=S (the methods that find "
                "their own count compare classes, which the language-modelling objective has none of)"
            )
        return budget

    def constraints(self) -> Constraints:
        return Constraints.from_options(self.allow_empty_layers, self.uniform_layers, self.gqa_mode)

    def settings(self) -> dict[str, Any]:
        """The method's settings with the run's seed."""
        return {"seed": self.seed, **self.method_settings}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---------------------------------------------------------------------------------------------------- loading


def load_causal_lm(name_or_path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM in fp32 eval mode: an alias, a folder (pruned ones too) or a hub id.

    A GGUF checkpoint (``smollm2-135m``) is de-quantized to fp32 on load; its quantization marker is dropped so
    that the (pruned) model saves like any other. A tokenizer without a pad token pads with EOS.

    Raises:
        ModelNotFoundError: a model that cannot be read, or a sequence classifier (use ``cahp prune``).
    """
    from transformers import AutoModelForCausalLM

    from cahp.models import (
        drop_gguf_quantizer,
        is_classifier_config,
        load_model_config,
        load_tokenizer,
        resolve_model,
    )
    from cahp.surgery import load_pruned

    source = resolve_model(name_or_path)
    config = load_model_config(source)
    if is_classifier_config(config):
        raise ModelNotFoundError(
            f"{source.location} is a sequence classifier, not a language model: prune it with `cahp prune`, or give "
            "prune-lm a causal LM (e.g. smollm2-135m)"
        )
    tokenizer = load_tokenizer(source)
    try:
        if getattr(config, "cahp_kept_heads", None) is not None:
            model = load_pruned(source.location, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=torch.float32, **source.pretrained_kwargs()
            )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load {source.location!r} as a causal language model: {error}") from error
    drop_gguf_quantizer(model)  # GGUF: the weights are already de-quantized fp32
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------- LoRA

#: LoRA's scale ``alpha / rank``: alpha is twice the rank.
LORA_ALPHA_PER_RANK = 2


def require_peft() -> Any:
    """The ``peft`` module.

    Raises:
        CahpError: peft is not installed (one line saying how to install it).
    """
    try:
        import peft
    except ImportError as error:
        raise CahpError(
            f"--recovery-lora-rank needs the peft package, which cannot be imported ({error}): "
            "pip install 'cahp[lora]', or recover without LoRA"
        ) from None
    return peft


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Names of the projections that get LoRA adapters: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) of
    the model but its output head, skipping projections that pruning left without rows or columns."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head and module.weight.numel() > 0
    ]


def add_lora(model: torch.nn.Module, rank: int) -> Any:
    """Wrap ``model`` in rank-``rank`` LoRA adapters on :func:`lora_target_modules` (scale 2, no dropout); only the
    adapters train. The adapters are injected into ``model``'s own modules; :func:`merge_lora` removes them.

    Returns:
        The peft model (call it like ``model``).
    """
    peft = require_peft()
    targets = lora_target_modules(model)
    if not targets:
        raise CahpError("the model has no linear projection to put LoRA adapters on; recover without LoRA")
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA_PER_RANK * rank,
        lora_dropout=0.0,
        target_modules=[f"{name}" for name in targets],
        bias="none",
    )
    return peft.get_peft_model(model, lora)


def describe_lora(peft_model: Any) -> dict[str, Any]:
    """Rank, alpha, adapted projections and trainable parameters of a LoRA-wrapped model."""
    config = next(iter(peft_model.peft_config.values()))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "target_modules": len(config.target_modules),
        "trainable_parameters": trainable,
        "merged": True,
    }


def merge_lora(peft_model: Any) -> torch.nn.Module:
    """Add each adapter's ``B @ A * scale`` into its projection's weight and drop the adapters; returns the
    plain model (the one :func:`add_lora` wrapped), which saves and loads without peft."""
    return peft_model.merge_and_unload()


def corpus_label(description: dict[str, Any]) -> str:
    """How results name a corpus split: ``"mnli-premises validation_mismatched (offline stand-in ...)"``."""
    label = f"{description.get('corpus')} {description.get('split')}"
    return f"{label} ({OFFLINE_CORPUS_NOTE})" if description.get("corpus") == DEFAULT_CORPUS else label


# ---------------------------------------------------------------------------------------------------- the flow


def check_decoder_config(config: DecoderPruneConfig) -> tuple[Budget, Constraints]:
    """Refuse a bad setting before anything is loaded or written: every field, the method and its settings (the
    same checks as ``cahp prune``), a budget without a head count. Returns the budget and constraints."""
    budget = config.parsed_budget()
    check_config(config)  # type: ignore[arg-type]  # reads only the fields both configs share
    if method_info(config.method).needs_classes:
        alternatives = [name for name in available_methods() if not method_info(name).needs_classes]
        raise CahpError(
            f"method {config.method!r} compares classes, and the causal-LM objective has none; choose one of "
            f"{', '.join(alternatives)}, or fine-tune a classifier head and run `cahp prune`"
        )
    if config.recovery_lora_rank is not None:
        require_peft()
    return budget, config.constraints()


def lm_loss_fn(objective: CausalLanguageModeling | None = None) -> Any:
    """A ``train_model`` loss: the mean next-token cross-entropy of the scored tokens of a batch of blocks."""
    objective = objective or CausalLanguageModeling()

    def loss(model: Any, batch: dict[str, torch.Tensor], indices: Any) -> tuple[torch.Tensor, dict[str, float]]:
        value = objective.loss(model, batch)
        return value, {"lm": float(value.detach())}

    return loss


def prune_lm(
    config: DecoderPruneConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Prune a causal LM's heads with ``config.method`` on its LM objective and write the model and ``report.json``.

    Every setting is checked before any work, and nothing is written on a refusal.

    Returns:
        The report (also written to ``out/report.json``); :func:`summary` prints it.
    """
    budget, constraints = check_decoder_config(config)
    check_output_target(out, overwrite)
    set_seed(config.seed)
    model, tokenizer = load_causal_lm(config.model)
    grid = HeadGrid.of(model)
    budget.heads(grid.total)  # keep=K above the head count is refused now
    say = print_line if progress else None
    data = config.load(tokenizer, config.seed)
    calibration = lm_calibration(data.calibration, tokenizer, config.calibration_batch_size, progress)
    engine = Engine(model, calibration, say=say)
    if torch.cuda.is_available():
        model.cuda()
    inputs = {"model_path": str(config.model), **engine.fingerprints}
    record = {"command": "prune-lm", **config.to_dict(), "inputs": inputs}
    with StagedOutput(out, record, overwrite, command=command) as staged:
        (staged.path / "stages").mkdir(exist_ok=True)
        stages = StageCache(staged.path / "stages", progress)
        engine.cache_dir = stages.folder / "methods"
        if staged.resumed:
            stages.say(f"resuming the unfinished run in {staged.path}")
        stages.say(
            f"{config.model}: {grid.layers} layers x {grid.heads} query / {grid.kv_heads} key-value heads; "
            f"planning {config.method} at {budget.label()} ({config.gqa_mode} mode)"
        )
        plan_dict = stages.json(
            "plan", lambda: engine.plan(config.method, config.settings(), budget, constraints).to_dict()
        )
        plan = KeepPlan.from_dict(plan_dict)

        def quality() -> dict[str, Any]:
            result = measure_lm(model, tokenizer, data, config, progress)
            result["continuations"] = greedy_continuations(
                model, tokenizer, config.continuation_prompts, config.continuation_tokens
            )
            return result

        stages.say("evaluating the dense model")
        dense_quality = stages.json("quality_dense", quality)
        dense = copy.deepcopy(model)
        prune_heads(model, heads_to_remove(model, plan.kept_heads_by_layer, config.gqa_mode), gqa_mode=config.gqa_mode)
        kept, kept_kv = kept_heads_by_layer(model), kept_kv_heads_by_layer(model)
        kept_total = sum(len(heads) for heads in kept.values())
        stages.say(f"removed {grid.total - kept_total} of {grid.total} query heads; evaluating the pruned model")
        pruned_quality = stages.json("quality_pruned", quality)

        recovery_record: dict[str, Any] = {"epochs": config.recovery.epochs}
        recovered_quality = None
        if config.recovery.epochs > 0:
            checkpoint = stages.folder / "recovery_checkpoint.pt"
            merged = stages.folder / "recovery_merged.pt"  # LoRA: the recovered weights, adapters merged

            def recover() -> dict[str, Any]:
                start = time.perf_counter()
                rank = config.recovery_lora_rank
                trained = model if rank is None else add_lora(model, rank)
                history = train_model(
                    trained,
                    tokenizer,
                    data.calibration.examples,
                    config.recovery,
                    checkpoint_path=checkpoint,
                    desc="recovery" if rank is None else f"recovery (LoRA rank {rank})",
                    progress=progress,
                    loss_fn=lm_loss_fn(),
                )
                record: dict[str, Any] = {"history": history}
                if rank is not None:
                    record["lora"] = describe_lora(trained)
                    merge_lora(trained)  # the LoRA layers become plain projections of `model` again
                    # a resumed run restores the merged weights from their own file: the training checkpoint
                    # (LoRA keys, optimiser) stays as it is, so a run killed before the stage is recorded
                    # retrains from it to the same end and merges again
                    atomic_write(merged, lambda path: torch.save({"model": model.state_dict()}, path))
                model.eval()
                return {**record, "seconds": round(time.perf_counter() - start, 2)}

            recovery_record.update(stages.json("recovery_run", recover))
            recovered = merged if config.recovery_lora_rank is not None else checkpoint
            if recovered.is_file():
                model.load_state_dict(torch.load(recovered, weights_only=False)["model"])
            model.eval()
            recovery_record.update(objective="causal-lm", data=corpus_label(data.calibration.describe()))
            recovery_record["blocks"] = len(data.calibration)
            recovered_quality = stages.json("quality_recovered", quality)

        stages.say("measuring the KV cache, prefill and generation (dense vs pruned, one run)")
        dense.cpu()
        model.cpu()
        kv_dense, kv_pruned = kv_cache_bytes_per_token(dense), kv_cache_bytes_per_token(model)
        generation = measure_generation(
            {"dense": dense, "pruned": model},
            batch_sizes=config.generation_batch_sizes,
            prompt_tokens=config.prompt_tokens,
            new_tokens=config.new_tokens,
            repeats=config.latency_repeats,
            pad_token_id=int(tokenizer.pad_token_id),
        )
        export = _save_model(model, tokenizer, staged.path / "model")
        after = recovered_quality if recovered_quality is not None else pruned_quality
        evaluation_corpus = data.evaluation.describe()
        report = {
            "model": config.model,
            "method": config.method,
            "objective": "causal-lm",
            "corpus": {
                "evaluation": {**evaluation_corpus, "label": corpus_label(evaluation_corpus)},
                "calibration": {
                    **calibration.description,
                    "label": corpus_label(data.calibration.describe()),
                    "fingerprint": engine.fingerprints["calibration"],
                },
            },
            "heads": {
                "layers": grid.layers,
                "heads_per_layer": grid.heads,
                "kv_heads_per_layer": grid.kv_heads,
                "total": grid.total,
                "requested": plan.heads_requested,
                "kept": kept_total,
                "kv_total": grid.layers * grid.kv_heads,
                "kv_kept": sum(len(heads) for heads in kept_kv.values()),
                "gqa_mode": config.gqa_mode,
                "uniform_layers": config.uniform_layers,
            },
            "kept_heads_by_layer": {str(layer): heads for layer, heads in sorted(kept.items())},
            "kept_kv_heads_by_layer": {str(layer): heads for layer, heads in sorted(kept_kv.items())},
            "plan": plan.to_dict(),
            "quality": {"dense": dense_quality, "pruned": pruned_quality, "recovered": recovered_quality},
            "after": "recovered" if recovered_quality is not None else "pruned",
            "perplexity": {
                "dense": dense_quality["perplexity"]["perplexity"],
                "pruned": pruned_quality["perplexity"]["perplexity"],
                "after": after["perplexity"]["perplexity"],
            },
            "recovery": recovery_record,
            "parameters": {"dense": count_parameters(dense), "pruned": count_parameters(model)},
            "kv_cache": {
                "dense": kv_dense,
                "pruned": kv_pruned,
                "ratio": kv_pruned["bytes_per_token"] / kv_dense["bytes_per_token"],
                "kv_heads_ratio": kv_pruned["kv_heads"] / kv_dense["kv_heads"],
            },
            "generation": {"device": "cpu", **generation},
            "export": export,
            "stage_seconds": stages.seconds,
            "stages_cached": stages.cached,
            "config": config.to_dict(),
            "inputs": inputs,
            "command": command,
        }
        write_json(staged.path / "report.json", report)
        (stages.folder / "recovery_checkpoint.pt").unlink(missing_ok=True)
        staged.commit()
        return report


def _save_model(model: Any, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Save the pruned model: a stock config when one describes it (every layer kept the same query and
    key-value heads; loads without cahp), else the ``cahp_`` config (loads with cahp or trust_remote_code)."""
    try:
        stock_config_dict(model)
        stock = True
        why = "every layer kept the same query and key-value heads: a stock config, loadable without cahp"
    except PrunedModelError as error:
        stock = False
        why = f"cahp_ config (loads with cahp imported, or trust_remote_code=True): {str(error).splitlines()[0]}"
    save_pruned(model, folder, stock=stock)
    tokenizer.save_pretrained(folder)
    return {"folder": folder.name, "format": "stock" if stock else "cahp", "why": why}


# ---------------------------------------------------------------------------------------------------- summary


def summary(report: dict[str, Any]) -> str:
    """Lines for the terminal: heads and KV heads kept, perplexity, prompted accuracy, KV cache, speed,
    parameters, and the greedy continuations before and after."""
    heads, quality, after = report["heads"], report["quality"], report["after"]
    ppl = quality["dense"]["perplexity"]
    lines = [
        f"heads kept: {heads['kept']} of {heads['total']} query heads, {heads['kv_kept']} of {heads['kv_total']} "
        f"key-value heads ({report['method']}, {Budget.from_dict(report['plan']['budget']).label()}, "
        f"{heads['gqa_mode']} mode{', uniform layers' if heads['uniform_layers'] else ''})",
        f"perplexity on {ppl['blocks']} blocks of {ppl['context_length']} tokens of "
        f"{report['corpus']['evaluation']['label']}: dense {report['perplexity']['dense']:.2f}, pruned "
        f"{report['perplexity']['pruned']:.2f}"
        + (f", recovered {report['perplexity']['after']:.2f}" if after == "recovered" else " (no recovery)")
        + (f" (LoRA rank {report['recovery']['lora']['rank']}, merged)" if "lora" in report["recovery"] else ""),
    ]
    for task, dense_result in quality["dense"]["prompted"].items():
        final = quality[after]["prompted"][task]
        lines.append(
            f"{task} zero-shot ({dense_result['examples']} examples, prompt {dense_result['prompt']!r}): accuracy "
            f"{dense_result['accuracy']:.4f} -> {final['accuracy']:.4f}, macro-F1 {dense_result['macro_f1']:.4f} -> "
            f"{final['macro_f1']:.4f}"
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
            f"{row['pruned']['prefill_seconds'] * 1e3:.0f} ms ({generation['prompt_tokens']} tokens), generation "
            f"{row['dense']['tokens_per_second']:.1f} -> {row['pruned']['tokens_per_second']:.1f} tokens/s "
            f"(CPU, {generation['torch_threads']} thread(s))"
        )
    for before, final in zip(quality["dense"]["continuations"], quality[after]["continuations"], strict=True):
        lines.append(f"{before['prompt']!r}: dense {before['continuation']!r} | {after} {final['continuation']!r}")
    lines.append(f"saved as a {report['export']['format']} config ({report['export']['why']})")
    return "\n".join(lines)
