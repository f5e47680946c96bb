"""The training loop shared by fine-tuning and post-pruning recovery: AdamW, linear schedule with warm-up,
seeded shuffling, a progress bar, and checkpoints that let an interrupted run resume where it stopped.

A resumed run reports the same per-epoch training loss as an uninterrupted one (the running sums are
checkpointed), and each history row says how many of its steps this run did (``steps_this_run``).

Under several processes (``torchrun`` / ``accelerate launch``, :mod:`cahp.distributed`) the loop is data parallel
with plain ``torch.distributed`` collectives (no ``DistributedDataParallel`` wrapper, so loss functions and hooks
see the model itself): every process walks the same global batch sequence, takes its contiguous share of each
batch's rows, weighs its mean loss by that share, and the gradients are summed over processes before clipping
and the optimiser step. One step therefore sees the same global batch as one process, and (without dropout) the
weights follow the one-process run up to float summation order. Only the main process writes checkpoints and
evaluates; it reads a checkpoint to resume and hands it to the others."""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cahp import distributed
from cahp.data.batching import EncodedSplit, iter_batches, num_batches
from cahp.errors import ConfigError
from cahp.evaluation.metrics import evaluate_split
from cahp.outputs import atomic_write, read_cache
from cahp.runtime import model_device
from cahp.settings import TRAINING
from cahp.train.distill import LossFn


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainingConfig:
    """Optimisation settings (defaults: the CAHP reference recipe for BERT-base).

    ``epochs`` may be fractional; ``0`` trains nothing (post-pruning recovery uses it for "no recovery";
    fine-tuning refuses it). Every setting is checked on construction (:meth:`validate`).

    Raises:
        ConfigError: a setting outside its range, naming it.
    """

    epochs: float = TRAINING.field("epochs")
    learning_rate: float = TRAINING.field("learning_rate")
    batch_size: int = TRAINING.field("batch_size")
    warmup_ratio: float = TRAINING.field("warmup_ratio")
    weight_decay: float = TRAINING.field("weight_decay")
    max_grad_norm: float = 1.0
    seed: int = TRAINING.field("seed")
    eval_batch_size: int = 64
    checkpoint_every: int = TRAINING.field("checkpoint_every")
    #: sort each window of shuffled batches by length (less padding, same data per epoch; see iter_batches)
    group_by_length: bool = TRAINING.field("group_by_length")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainingConfig:
        """Check every setting; returns self.

        Raises:
            ConfigError: listing each setting out of range (``epochs >= 0``, ``batch_size >= 1``,
                ``learning_rate > 0``, ``0 <= warmup_ratio < 1``, ``checkpoint_every >= 1``, ...).
        """
        problems = []
        if not _is_number(self.epochs) or self.epochs < 0:
            problems.append(f"epochs must be a number >= 0 (0: no training), got {self.epochs!r}")
        for name in ("batch_size", "eval_batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not _is_whole(value) or value < 1:
                problems.append(f"{name} must be a whole number >= 1, got {value!r}")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0:
            problems.append(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not is_seed(self.seed):
            problems.append(f"seed must be a whole number in 0..{SEEDS - 1}, got {self.seed!r}")
        if problems:
            raise ConfigError("invalid training settings: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Seeds are whole numbers below this (NumPy's legacy seeding takes 32 bits).
SEEDS = 2**32


def is_seed(value: Any) -> bool:
    """Whether ``value`` can seed Python, NumPy and torch: a whole number in ``0 .. SEEDS - 1``."""
    return _is_whole(value) and 0 <= value < SEEDS


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_norm_or_bias = parameter.ndim < 2 or "norm" in name.lower()
        (no_decay if is_norm_or_bias else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _read_checkpoint(path: Path, location: Any) -> dict[str, Any]:
    """A training checkpoint written by :func:`train_model` (a file without its keys is unreadable)."""
    state = torch.load(path, map_location=location, weights_only=False)
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "step", "history"} <= set(state):
        raise ValueError("not a training checkpoint")
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def train_model(
    model: torch.nn.Module,
    tokenizer: Any,
    train_data: EncodedSplit,
    config: TrainingConfig,
    *,
    validation: EncodedSplit | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    desc: str = "fine-tune",
    progress: bool = True,
    loss_fn: LossFn | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place and return the history (one row per epoch, with validation metrics).

    ``epochs`` may be fractional (e.g. 0.5 trains on half an epoch's batches); ``0`` trains nothing and
    returns an empty history. When ``checkpoint_path`` is given, the full training state is saved there every
    ``checkpoint_every`` steps and at every epoch end, and a run that finds a checkpoint there continues
    from it.

    Each history row holds ``epoch``, ``step`` (total so far), ``train_loss`` (mean over all of the epoch's
    steps, also those done before a resume), ``train_loss_steps`` (how many) and ``steps_this_run`` (how many
    of them this call did: 0 for rows restored from the checkpoint), plus ``validation`` metrics.

    ``loss_fn`` replaces the model's own loss (``model(**batch).loss``): it is called with the model, the batch on
    the model's device and the batch's example indices, and returns the loss and its named parts, whose epoch
    means go to the history row as ``loss_parts`` (:mod:`cahp.train.distill`).
    """
    config.validate()
    if len(train_data) == 0:
        raise ConfigError("no training examples: the train split (or its subset) is empty")
    if config.epochs == 0:
        return []
    device = model_device(model)
    steps_per_epoch = num_batches(train_data, config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = _optimizer(model, config)
    scheduler = _linear_schedule(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    step, history = 0, []
    running_loss, running_count = 0.0, 0  # over the current epoch's steps, checkpointed
    running_parts: dict[str, float] = {}  # sums of the loss_fn's parts over the epoch's steps, checkpointed
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    parallel = distributed.is_distributed()
    state = None
    if checkpoint is not None and checkpoint.is_file() and distributed.is_main():
        location = "cpu" if parallel else device
        # a checkpoint cut short by a kill (or damaged) is set aside and the training starts over
        state = read_cache(checkpoint, lambda path: _read_checkpoint(path, location), "training checkpoint")
    if parallel:
        distributed.sync_parameters(model)  # every process starts from the main process's weights
        state = distributed.broadcast_object(state)  # and resumes from its checkpoint
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], [{**row, "steps_this_run": 0} for row in state["history"]]
        running_loss, running_count = state.get("running_loss", 0.0), state.get("running_count", 0)
        running_parts = state.get("running_parts", {})
    steps_this_epoch = 0

    def save() -> None:
        if checkpoint is not None and distributed.is_main():
            _save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "history": history,
                    "running_loss": running_loss,
                    "running_count": running_count,
                    "running_parts": running_parts,
                },
            )

    model.train()
    progress = progress and distributed.is_main()
    trainable: list[torch.Tensor] = [parameter for parameter in model.parameters() if parameter.requires_grad]
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        if skip == 0:
            torch.manual_seed(config.seed + epoch)  # dropout stream of each epoch, reproducible on resume
        for indices, batch in iter_batches(
            tokenizer,
            train_data,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            group_by_length=config.group_by_length,
            skip_batches=skip,
        ):
            if parallel:
                loss_value, parts = _parallel_backward(model, batch, indices, loss_fn, trainable, device)
            else:
                batch = {k: v.to(device) for k, v in batch.items()}
                if loss_fn is None:
                    loss, parts = model(**batch).loss, {}
                else:
                    loss, parts = loss_fn(model, batch, indices)
                loss.backward()
                loss_value = loss.item()
            for name, value in parts.items():
                running_parts[name] = running_parts.get(name, 0.0) + value
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_epoch += 1
            running_loss += loss_value
            running_count += 1
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{running_loss / running_count:.4f}")
            if step >= total_steps or step % steps_per_epoch == 0:
                break
            if step % config.checkpoint_every == 0:
                save()
        row: dict[str, Any] = {"epoch": round(step / steps_per_epoch, 3), "step": step}
        row["train_loss"] = round(running_loss / max(1, running_count), 5)
        row["train_loss_steps"] = running_count
        row["steps_this_run"] = steps_this_epoch
        if running_parts:
            row["loss_parts"] = {name: round(total / max(1, running_count), 5) for name, total in running_parts.items()}
        running_loss, running_count, steps_this_epoch, running_parts = 0.0, 0, 0, {}
        if validation is not None and len(validation) and distributed.is_main():
            row["validation"] = evaluate_split(
                model, tokenizer, validation, config.eval_batch_size, progress, "validate"
            )
            model.train()
        history.append(row)
        if distributed.is_main():  # one line per epoch, not one per process
            bar.write(
                f"{desc}: epoch {row['epoch']:g} loss {row['train_loss']:.4f}"
                + (f" validation accuracy {row['validation']['accuracy']:.4f}" if "validation" in row else "")
            )
        save()
    bar.close()
    model.eval()
    return history


def _parallel_backward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    indices: np.ndarray,
    loss_fn: LossFn | None,
    trainable: list[torch.Tensor],
    device: torch.device,
) -> tuple[float, dict[str, float]]:
    """One data-parallel backward pass over a GLOBAL batch: this process's rows, its mean loss weighted by its
    share of the rows, gradients summed over processes (= the gradient of the global batch's mean loss).

    Returns:
        The global batch's loss and its named parts (share-weighted sums over processes, the same everywhere).
    """
    rows = distributed.local_rows(len(indices))
    share = (rows.stop - rows.start) / len(indices)
    loss_value, parts = 0.0, {}
    if share > 0:
        local = {key: value[rows].to(device) for key, value in batch.items()}
        if loss_fn is None:
            loss = model(**local).loss
        else:
            loss, local_parts = loss_fn(model, local, indices[rows])
            parts = {name: value * share for name, value in local_parts.items()}
        (loss * share).backward()
        loss_value = loss.item() * share
    distributed.all_reduce_gradients(trainable)  # a process without rows contributes zeros
    gathered = distributed.all_gather_object((loss_value, parts))
    total_parts: dict[str, float] = {}
    for _, process_parts in gathered:
        for name, value in process_parts.items():
            total_parts[name] = total_parts.get(name, 0.0) + value
    return sum(value for value, _ in gathered), total_parts
