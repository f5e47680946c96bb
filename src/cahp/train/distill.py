"""Recovery objectives: plain cross-entropy, or distillation from the unpruned model.

After pruning, the unpruned model is a free teacher. :class:`RecoveryObjective` says how recovery trains the
pruned student (``loss``):

``ce``
    Cross-entropy on the gold labels (the model's own ``loss``).
``kd``
    ``alpha * CE + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the logits.
    The teacher is frozen and deterministic, so its logits are computed ONCE for the whole training set
    (length-sorted batches, no gradient) and looked up by example index at every step: the teacher costs one
    inference pass per recovery, whatever the number of epochs, and an interrupted run that resumes recomputes
    exactly the same targets.
``kd-relations``
    ``kd`` plus self-attention relation distillation in the style of MiniLM v2: for every chosen layer (teacher
    layer ``i`` with student layer ``i``: pruning keeps the depth), the query, key and value vectors of the
    layer's CURRENT heads, concatenated, are split into ``relation_heads`` equal-ish chunks (independent of how
    many attention heads the student layer kept); each chunk gives a relation ``softmax(X X^T / sqrt(d))``
    ``[batch, relation_heads, seq, seq]`` over the real (unpadded) tokens, and the loss is the KL divergence from
    the teacher's relation to the student's, averaged over real query positions, chunks, the three kinds and the
    layers, weighted by ``relation_weight``. A layer that kept zero heads has no relations and is skipped; with
    grouped-query attention the key and value relations use the layer's key-value heads. ``hidden_weight > 0``
    adds the mean squared error between teacher and student hidden states over real tokens (every layer output;
    pruning heads never changes the hidden size). The teacher runs beside the student at every step here.

Every objective returns the scalar loss and its parts (``{"ce": ..., "kd": ..., "relations": ...}``), which the
training loop averages into its history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cahp.adapters import get_adapter
from cahp.data.batching import EncodedSplit, iter_batches
from cahp.errors import ConfigError
from cahp.runtime import model_device
from cahp.settings import RECOVERY_OBJECTIVE
from cahp.surgery import layer_geometries

RECOVERY_LOSSES = ("ce", "kd", "kd-relations")

#: ``loss_fn(student, batch on the student's device, example indices) -> (loss, {part: value})``
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], np.ndarray], tuple[torch.Tensor, dict[str, float]]]


def objective_loss(objective: Any, part: str | None = None) -> LossFn:
    """The training loop's ``loss_fn`` of a calibration objective (:class:`cahp.calibration.Objective`): the loss
    every method's scoring uses, ``objective.loss(model, batch)``, so that recovery and scoring share one loss
    convention. ``part``: also report the loss under that name in the history's loss parts."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], indices: np.ndarray) -> tuple[torch.Tensor, dict]:
        value = objective.loss(model, batch)
        return value, ({part: float(value.detach())} if part else {})

    return loss


@dataclass
class RecoveryObjective:
    """What recovery optimises (module docs).

    Attributes:
        loss: ``ce``, ``kd`` or ``kd-relations``.
        temperature: softening temperature ``T`` of the logit distillation.
        alpha: weight of the cross-entropy on gold labels; ``1 - alpha`` goes to the teacher's soft targets.
        relation_heads: relation heads per layer and kind (capped, per layer, at the smaller of the teacher's
            and the student's q/k/v width).
        relation_layers: ``"all"``, ``"last"``, or comma-separated layer numbers (``"3,5"``).
        relation_weight: weight of the relation term (``kd-relations``).
        hidden_weight: weight of the hidden-state mean squared error (``kd-relations``; 0 = off).
    """

    loss: str = RECOVERY_OBJECTIVE.field("loss")
    temperature: float = RECOVERY_OBJECTIVE.field("temperature")
    alpha: float = RECOVERY_OBJECTIVE.field("alpha")
    relation_heads: int = RECOVERY_OBJECTIVE.field("relation_heads")
    relation_layers: str = RECOVERY_OBJECTIVE.field("relation_layers")
    relation_weight: float = RECOVERY_OBJECTIVE.field("relation_weight")
    hidden_weight: float = RECOVERY_OBJECTIVE.field("hidden_weight")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> RecoveryObjective:
        """Check every setting; returns self.

        Raises:
            ConfigError: listing each setting out of range, by name.
        """
        problems = []
        if self.loss not in RECOVERY_LOSSES:
            problems.append(f"loss must be one of {', '.join(RECOVERY_LOSSES)}, got {self.loss!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if not _is_number(self.alpha) or not 0 <= self.alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.relation_heads, int) or isinstance(self.relation_heads, bool) or self.relation_heads < 1:
            problems.append(f"relation_heads must be a whole number >= 1, got {self.relation_heads!r}")
        for name in ("relation_weight", "hidden_weight"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        try:
            self.layers(1_000_000)
        except ConfigError as error:
            problems.append(str(error))
        if problems:
            raise ConfigError("invalid recovery objective: " + "; ".join(problems))
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.loss != "ce"

    def layers(self, num_layers: int) -> list[int]:
        """The layers whose relations are distilled, for a model of ``num_layers`` layers."""
        spec = self.relation_layers
        if spec == "all":
            return list(range(num_layers))
        if spec == "last":
            return [num_layers - 1]
        try:
            chosen = sorted({int(part) for part in str(spec).split(",")})
        except ValueError:
            raise ConfigError(
                f"relation_layers must be 'all', 'last' or comma-separated layer numbers, got {spec!r}"
            ) from None
        if not chosen or any(not 0 <= layer < num_layers for layer in chosen):
            raise ConfigError(f"relation_layers {spec!r}: the model has layers 0..{num_layers - 1}")
        return chosen

    def label(self) -> str:
        """Short description for summaries (``kd (T=2, alpha=0.5)``)."""
        if self.loss == "ce":
            return "ce"
        text = f"{self.loss} (T={self.temperature:g}, alpha={self.alpha:g}"
        if self.loss == "kd-relations":
            text += f", {self.relation_heads} relation heads on layers {self.relation_layers}"
            text += f", weight {self.relation_weight:g}"
            if self.hidden_weight:
                text += f", hidden {self.hidden_weight:g}"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---- the losses --------------------------------------------------------------------------------------------


def logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over examples (``[batch, classes]``)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def relation_log_probs(
    vectors: torch.Tensor, attention_mask: torch.Tensor, relation_heads: int, causal: bool = False
) -> torch.Tensor:
    """Log relations of one kind of vectors: ``[batch, seq, width]`` -> ``[batch, relation_heads, seq, seq]``.

    ``vectors`` is split along ``width`` into ``relation_heads`` chunks (sizes differ by at most one); chunk ``r``
    gives ``log_softmax(X_r X_r^T / sqrt(width_r))`` over the real keys (``attention_mask`` ``[batch, seq]``);
    ``causal``: over the real keys at or before each query only (a decoder's tokens never see later ones).
    """
    vectors = vectors.float()
    key_mask = attention_mask[:, None, :].bool()  # [batch, 1, seq]
    if causal:
        seq = vectors.shape[1]
        earlier = torch.ones(seq, seq, dtype=torch.bool, device=vectors.device).tril()  # [query, key]
        key_mask = key_mask & earlier[None]  # [batch, seq, seq]
    relations = []
    for chunk in torch.tensor_split(vectors, relation_heads, dim=-1):
        scores = chunk @ chunk.transpose(-1, -2) / math.sqrt(chunk.shape[-1])
        relations.append(scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min).log_softmax(-1))
    return torch.stack(relations, dim=1)


def relation_distillation(
    student_vectors: torch.Tensor,
    teacher_vectors: torch.Tensor,
    attention_mask: torch.Tensor | None,
    relation_heads: int,
    causal: bool = False,
) -> torch.Tensor:
    """KL(teacher relation || student relation), mean over real query positions and relation heads.

    Args:
        student_vectors, teacher_vectors: ``[batch, seq, width]`` of one kind (q, k or v); widths may differ.
        attention_mask: ``[batch, seq]``, 1 for real tokens; ``None``: every position is real (image models).
        relation_heads: chunks per vector, capped at the smaller width.
        causal: each query relates to itself and earlier real tokens only (decoders).
    """
    heads = max(1, min(relation_heads, student_vectors.shape[-1], teacher_vectors.shape[-1]))
    mask = _real_positions(attention_mask, student_vectors)
    student = relation_log_probs(student_vectors, mask, heads, causal)
    teacher = relation_log_probs(teacher_vectors, mask, heads, causal)
    pointwise = teacher.exp() * (teacher - student)  # [batch, heads, query, key]
    keys = mask[:, None, None, :]
    if causal:
        seq = mask.shape[1]
        keys = keys & torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()[None, None]
    pointwise = pointwise.masked_fill(~keys, 0.0)
    per_query = pointwise.sum(-1)  # [batch, heads, query]
    real_queries = mask[:, None, :].expand_as(per_query)
    return per_query[real_queries].mean()


def hidden_state_distillation(
    student_states: tuple[torch.Tensor, ...],
    teacher_states: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Mean squared error over real tokens (``attention_mask`` ``None``: every position), averaged over the layer
    outputs (embeddings excluded)."""
    mask = _real_positions(attention_mask, student_states[0])
    losses = [
        F.mse_loss(student[mask].float(), teacher[mask].float())
        for student, teacher in zip(student_states[1:], teacher_states[1:], strict=True)
    ]
    return torch.stack(losses).mean()


# ---- capturing q/k/v -----------------------------------------------------------------------------------------


class ProjectionRecorder:
    """Records, during one forward, the q/k/v vectors of the CURRENT heads of chosen layers.

    ``with recorder: model(...)`` then ``recorder.vectors[layer][kind]`` is ``[batch, seq, width]`` (``width`` =
    current heads of that kind x head size). A layer without heads records nothing (its projections never run).
    """

    def __init__(self, model: nn.Module, layers: list[int]):
        self.model = model
        self.layers = layers
        self.vectors: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ProjectionRecorder:
        self.vectors = {}
        if not self.layers:
            return self
        model = cast(PreTrainedModel, self.model)  # a transformers model (a LoRA wrapper's base model)
        adapter = get_adapter(model)
        modules = adapter.layer_modules(model)
        geometries = layer_geometries(model)
        for layer in self.layers:
            geometry = geometries[layer]
            if geometry.query_heads == 0:
                continue
            for path, kinds in adapter.input_projections().items():
                projection = modules[layer].get_submodule(path)
                self._handles.append(projection.register_forward_hook(self._hook(layer, kinds, geometry)))
        return self

    def _hook(self, layer: int, kinds: tuple[str, ...], geometry: Any) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            for kind in kinds:
                rows = geometry.rows(kind, device=output.device)
                self.vectors.setdefault(layer, {})[kind] = output.index_select(-1, rows)

        return record

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---- the objective at training time ----------------------------------------------------------------------------


class Distillation:
    """The ``kd`` / ``kd-relations`` loss of one recovery run: call it as the training loop's ``loss_fn``.

    Attributes:
        teacher_seconds: wall time spent in the teacher (the logit pass, or the per-step forwards).
        teacher_forwards: teacher batches run.
    """

    def __init__(self, objective: RecoveryObjective, teacher: nn.Module):
        objective.validate()
        if not objective.uses_teacher:
            raise ConfigError("loss 'ce' needs no teacher: train without a loss_fn")
        self.objective = objective
        self.teacher = teacher.eval()  # runs under no_grad only: no gradient reaches it
        self.teacher_logits: torch.Tensor | None = None  # [examples, classes], kd only
        self.teacher_seconds = 0.0
        self.teacher_forwards = 0
        #: what :meth:`prepare` cost (``kd``'s logit pass), shared by every recovery that uses this loss
        self.setup_costs: dict[str, Any] = {}
        self._layers: list[int] | None = None

    def prepare(self, tokenizer: Any, data: EncodedSplit, batch_size: int, progress: bool = False) -> None:
        """``kd``: compute the teacher's logits for every training example once (deterministic batches); records
        what that cost in :attr:`setup_costs`."""
        if self.objective.loss == "kd":
            self._teacher_logits(tokenizer, data, batch_size, progress)
        self.setup_costs = self.costs()

    def _teacher_logits(self, tokenizer: Any, data: EncodedSplit, batch_size: int, progress: bool) -> None:
        """``[examples, classes]`` logits of the teacher in length-sorted batches, kept in :attr:`teacher_logits`."""
        device = model_device(self.teacher)
        start = time.perf_counter()
        logits: torch.Tensor | None = None
        batches = iter_batches(tokenizer, data, batch_size, sort_by_length=True)
        with torch.no_grad():
            for indices, batch in tqdm(batches, desc="teacher logits", disable=not progress, leave=False):
                inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
                out = self.teacher(**inputs).logits.float().cpu()
                if logits is None:
                    logits = torch.empty(len(data), out.shape[-1])
                logits[torch.as_tensor(indices)] = out
                self.teacher_forwards += 1
        self.teacher_logits = logits
        self.teacher_seconds += time.perf_counter() - start

    def __call__(
        self, student: nn.Module, batch: dict[str, torch.Tensor], indices: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, float]]:
        objective = self.objective
        relations = objective.loss == "kd-relations"
        hidden = relations and objective.hidden_weight > 0
        if self._layers is None:
            base = cast(PreTrainedModel, unwrapped(student))
            self._layers = objective.layers(len(get_adapter(base).layer_modules(base)))
        layers = self._layers if relations else []
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        extra = {"output_hidden_states": True} if hidden else {}

        teacher_out, teacher_vectors = None, {}
        if objective.loss == "kd" and self.teacher_logits is not None:
            teacher_logits = self.teacher_logits[torch.as_tensor(indices)].to(batch["input_ids"].device)
        else:
            start = time.perf_counter()
            with torch.no_grad(), ProjectionRecorder(self.teacher, layers) as recorder:
                teacher_out = self.teacher(**inputs, **extra)
            teacher_vectors = recorder.vectors
            teacher_logits = teacher_out.logits
            self.teacher_seconds += time.perf_counter() - start
            self.teacher_forwards += 1

        with ProjectionRecorder(unwrapped(student), layers) as recorder:
            out = student(**batch, **extra)
        ce = out.loss
        kd = logit_distillation(out.logits, teacher_logits, objective.temperature)
        loss = objective.alpha * ce + (1 - objective.alpha) * kd
        parts = {"ce": ce.item(), "kd": kd.item()}
        mask = batch.get("attention_mask")  # None for image models: every position is real
        if relations:
            terms = [
                relation_distillation(vectors[kind], teacher_vectors[layer][kind], mask, objective.relation_heads)
                for layer, vectors in recorder.vectors.items()
                for kind in vectors
            ]
            if terms:  # every chosen layer may have lost its heads
                relation = torch.stack(terms).mean()
                loss = loss + objective.relation_weight * relation
                parts["relations"] = relation.item()
        if hidden:
            assert teacher_out is not None
            states = hidden_state_distillation(out.hidden_states, teacher_out.hidden_states, mask)
            loss = loss + objective.hidden_weight * states
            parts["hidden"] = states.item()
        return loss, parts

    def costs(self) -> dict[str, Any]:
        """What the teacher cost: seconds and batches (recorded in reports)."""
        return {"teacher_seconds": round(self.teacher_seconds, 2), "teacher_forwards": self.teacher_forwards}


class LanguageModelDistillation:
    """The ``kd`` / ``kd-relations`` loss of a causal LM's recovery: call it as the training loop's ``loss_fn``.

    ``alpha * LM + (1 - alpha) * T^2 * KL`` over the scored next-token positions of each block (the targets of
    :class:`cahp.calibration.CausalLanguageModeling`); ``kd-relations`` adds the causal relations of the chosen
    layers' query, key and value projections (each token relates to itself and earlier tokens; the projections
    are taken before the rotary embedding, which rotates queries and keys alike in teacher and student). The
    teacher runs beside the student at every step: storing its logits over a vocabulary of tens of thousands of
    tokens for every position would cost far more memory than a forward pass costs time.
    """

    def __init__(self, objective: RecoveryObjective, teacher: nn.Module):
        from cahp.calibration import CausalLanguageModeling

        objective.validate()
        if not objective.uses_teacher:
            raise ConfigError("loss 'ce' needs no teacher: train without distillation")
        self.objective = objective
        self.teacher = teacher.eval()
        self.lm = CausalLanguageModeling()
        self.teacher_seconds = 0.0
        self.teacher_forwards = 0
        self._layers: list[int] | None = None

    def __call__(
        self, student: nn.Module, batch: dict[str, torch.Tensor], indices: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from cahp.calibration import scored_target_mask

        objective = self.objective
        relations = objective.loss == "kd-relations"
        if self._layers is None:
            base = cast(PreTrainedModel, unwrapped(student))
            self._layers = objective.layers(len(get_adapter(base).layer_modules(base)))
        layers = self._layers if relations else []
        inputs = self.lm.model_inputs(batch)
        scored = scored_target_mask(batch["attention_mask"], batch["labels"])  # [batch, L - 1]
        targets = batch["input_ids"][:, 1:][scored]  # [scored tokens]
        start = time.perf_counter()
        with torch.no_grad(), ProjectionRecorder(self.teacher, layers) as teacher_recorder:
            teacher_logits = self.teacher(**inputs).logits[:, :-1][scored]  # [scored tokens, vocab]
        self.teacher_seconds += time.perf_counter() - start
        self.teacher_forwards += 1
        with ProjectionRecorder(unwrapped(student), layers) as recorder:
            student_logits = student(**inputs).logits[:, :-1][scored]
        lm_loss = F.cross_entropy(student_logits.float(), targets)
        kd = logit_distillation(student_logits, teacher_logits, objective.temperature)
        loss = objective.alpha * lm_loss + (1 - objective.alpha) * kd
        parts = {"lm": lm_loss.item(), "kd": kd.item()}
        if relations:
            terms = [
                relation_distillation(
                    vectors[kind],
                    teacher_recorder.vectors[layer][kind],
                    batch["attention_mask"],
                    objective.relation_heads,
                    causal=True,
                )
                for layer, vectors in recorder.vectors.items()
                for kind in vectors
            ]
            if terms:
                relation = torch.stack(terms).mean()
                loss = loss + objective.relation_weight * relation
                parts["relations"] = relation.item()
        return loss, parts

    def costs(self) -> dict[str, Any]:
        """What the teacher cost: seconds and batches (recorded in reports)."""
        return {"teacher_seconds": round(self.teacher_seconds, 2), "teacher_forwards": self.teacher_forwards}


def unwrapped(model: nn.Module) -> nn.Module:
    """The model itself inside a LoRA (peft) wrapper, whose adapter and projections cahp reads; else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _real_positions(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool mask of real positions; all of ``like``'s ``[batch, seq, ...]`` positions when ``None``."""
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return attention_mask.bool()


def build_recovery_loss(
    objective: RecoveryObjective,
    teacher: nn.Module,
    tokenizer: Any,
    data: EncodedSplit,
    batch_size: int,
    progress: bool = False,
) -> Distillation | None:
    """The training loop's ``loss_fn`` for ``objective`` (``None`` for ``ce``: the model's own loss), prepared on
    ``data`` (``kd``: the teacher's logits, computed here in batches of ``batch_size``)."""
    if not objective.uses_teacher:
        return None
    distillation = Distillation(objective, teacher)
    distillation.prepare(tokenizer, data, batch_size, progress)
    return distillation
