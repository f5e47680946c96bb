"""The training loop shared by fine-tuning and post-pruning recovery: AdamW, linear schedule with warm-up,
seeded shuffling, a progress bar, and checkpoints that let an interrupted run resume where it stopped."""

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

from cahp.data.batching import EncodedSplit, iter_batches, num_batches
from cahp.evaluation.metrics import evaluate_split, model_device


@dataclass
class TrainingConfig:
    """Optimisation settings (defaults: the CAHP reference recipe for BERT-base)."""

    epochs: float = 3.0
    learning_rate: float = 2e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_batch_size: int = 64
    checkpoint_every: int = 200
    #: sort each window of shuffled batches by length (less padding, same data per epoch; see iter_batches)
    group_by_length: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
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


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


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
) -> list[dict[str, Any]]:
    """Train ``model`` in place and return the history (one row per epoch, with validation metrics).

    ``epochs`` may be fractional (e.g. 0.5 trains on half an epoch's batches). When ``checkpoint_path`` is
    given, the full training state is saved there every ``checkpoint_every`` steps and at every epoch end,
    and a run that finds a checkpoint there continues from it.
    """
    if len(train_data) == 0:
        raise ValueError("no training examples")
    device = model_device(model)
    steps_per_epoch = num_batches(train_data, config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = _optimizer(model, config)
    scheduler = _linear_schedule(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    step, history = 0, []
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]

    def save() -> None:
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "history": history,
                },
            )

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    running_loss, running_count = 0.0, 0
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        if skip == 0:
            torch.manual_seed(config.seed + epoch)  # dropout stream of each epoch, reproducible on resume
        for _, batch in iter_batches(
            tokenizer,
            train_data,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            group_by_length=config.group_by_length,
            skip_batches=skip,
        ):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running_loss += loss.item()
            running_count += 1
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{running_loss / running_count:.4f}")
            if step >= total_steps or step % steps_per_epoch == 0:
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save()
        row: dict[str, Any] = {"epoch": round(step / steps_per_epoch, 3), "step": step}
        row["train_loss"] = round(running_loss / max(1, running_count), 5)
        running_loss, running_count = 0.0, 0
        if validation is not None and len(validation):
            row["validation"] = evaluate_split(
                model, tokenizer, validation, config.eval_batch_size, progress, "validate"
            )
            model.train()
        history.append(row)
        bar.write(
            f"{desc}: epoch {row['epoch']:g} loss {row['train_loss']:.4f}"
            + (f" validation accuracy {row['validation']['accuracy']:.4f}" if "validation" in row else "")
        )
        save()
    bar.close()
    model.eval()
    return history
