"""Reconstruction after head removal, with no gradient step: re-fit each layer's output projection so that the
pruned layer's attention output matches the unpruned layer's (``--reconstruct none|bias|scale|weights``).

For every layer ``l``, bottom up, the step accumulates over the calibration batches (the ``Calibration`` the method
was fitted on; padding excluded through the batch's ``attention_mask``), in float64 and without keeping any
activation in memory, the statistics of the UNPRUNED layer's concatenated head contexts ``c`` ``[D]`` (``D`` = heads *
head_dim, the input of its output projection):

* ``G = sum_t c_t c_t^T`` ``[D, D]``, ``s = sum_t c_t`` ``[D]`` and the token count ``n``.

The inputs are the PRUNED model's own (layers below ``l`` already reconstructed), kept on disk one layer at a
time (:class:`LayerInputs`, a temporary folder removed at the end, also on error): one capture pass of the pruned
model records, for each batch, every layer's call arguments except the hidden states (masks, position embeddings and
ids, MPNet's unsliced position bias; caches dropped; the objects that layers share are stored once) and layer 0's
input hidden states ``[batch, seq, hidden]``. For layer ``l``, the pruned layer runs on each stored input until a
forward pre-hook on its attention module takes that module's arguments and calls the unpruned layer's attention
module with them; its context is read at the input of its output projection (or is the attention module's output
where the projection sits outside it: BERT). Once fitted, the pruned layer runs on each stored input and its output
replaces it: layer ``l + 1``'s input. A kept head's context is the same in both layers on the same input, so the
pruned layer's output is ``W_o[:, K] c_K + b_o`` and the target ``Y = W_o c + b_o``: every fit and every error below
is a function of ``(G, s, n)`` alone. The sums are all-reduced across processes
(:func:`cahp.distributed.all_reduce_sums`), so ``torchrun`` equals one process.

Modes (``K``: the kept heads' columns, ``R``: the removed ones, ``mu = s / n``):

* ``bias`` (FLAP): ``b <- b + W_o[:, R] mu_R``: the removed heads' mean output. Needs an output-projection bias:
  refused before any work for a model without one (:func:`check_reconstruction`).
* ``scale`` (Kwon's mask tuning): one scalar ``a_h`` per kept head, ``W_o[:, K_h] <- a_h W_o[:, K_h]``, least
  squares of the layer output against ``Y`` regularised toward 1: ``(A + lam I) a = t + lam 1``.
* ``weights`` (Kprune-style ridge refit): ``(G_KK + lam I) W^T = G_K: W_o^T + lam W_o[:, K]^T``, with the
  Gram matrices centred (an unpenalised intercept, folded into the bias) where the projection has a bias, and
  uncentred otherwise.

``lam = RIDGE * mean(diag)`` of the matrix solved. A solve whose matrix is not positive definite, whose condition
number exceeds :data:`MAX_CONDITION`, or whose result would raise the layer's error, leaves the layer unchanged,
and the record says so. The record holds, per layer, the relative error ``sum ||Y_hat - Y||^2 / sum ||Y||^2`` on
the calibration tokens before and after.

Cost (recorded as ``layer_calls`` and ``forward_passes``): the capture pass runs the pruned model up to its last
layer; each layer then runs once up to its attention module, plus the unpruned attention module (statistics), and,
except the last, once more whole (to advance the inputs). Counting every layer call as a whole layer that is
``(3 L - 2) / L`` forward passes (under 3), really about 2 passes of the pruned model plus the attention modules of
one unpruned pass. The solves are ``D x D``. Memory holds one batch's activations; the disk holds one layer's input
hidden states and the layers' arguments for the whole calibration set.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Cache, PreTrainedModel

from cahp import distributed
from cahp.adapters import get_adapter
from cahp.calibration import Calibration
from cahp.errors import CahpError
from cahp.run import PostSurgeryStep
from cahp.surgery.reconstruct import can_store_output_bias, output_bias, output_weight, write_output_projection
from cahp.surgery.removal import kept_heads_by_layer, layer_geometries

#: ``--reconstruct`` values; ``none`` adds no step to the run.
MODES: tuple[str, ...] = ("none", "bias", "scale", "weights")
#: Ridge strength relative to the mean diagonal of the solved matrix (chosen before any result, RECONSTRUCTION.md).
RIDGE = 1e-3
#: A regularised matrix with a larger condition number is a fallback (no change to the layer).
MAX_CONDITION = 1e12


class ReconstructionError(CahpError):
    """A reconstruction the model cannot take (e.g. ``bias`` without an output-projection bias)."""


@dataclass
class LayerStatistics:
    """Sums over the calibration tokens of one unpruned layer's contexts (padding excluded).

    Attributes:
        gram: ``[D, D]`` float64, ``sum_t c_t c_t^T``.
        total: ``[D]`` float64, ``sum_t c_t``.
        count: number of tokens.
    """

    gram: torch.Tensor
    total: torch.Tensor
    count: float

    @property
    def mean(self) -> torch.Tensor:
        """``[D]`` mean context (zeros without tokens)."""
        return self.total / max(self.count, 1.0)


def check_reconstruction(model: PreTrainedModel, mode: str) -> None:
    """Refuse, before any work, a mode the model cannot take.

    Raises:
        ReconstructionError: an unknown mode, or ``bias`` on a model whose output projections have no bias.
    """
    if mode not in MODES:
        raise ReconstructionError(f"--reconstruct must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "bias" and not can_store_output_bias(model):
        raise ReconstructionError(
            f"--reconstruct bias needs a bias on every output projection, and this {get_adapter(model).family} model "
            "has none (a stock config cannot store one without adding q/k/v biases too, so the folder would not load "
            "without cahp); use --reconstruct weights (fitted without an intercept here) or scale"
        )


def reconstruction_step(mode: str, sample_seed: int) -> PostSurgeryStep:
    """A :data:`cahp.run.PostSurgeryStep` reconstructing with ``mode`` on ``workload.calibration(sample_seed)``."""

    def step(dense: nn.Module, pruned: nn.Module, workload: Any) -> dict[str, Any]:
        return reconstruct(dense, pruned, workload.calibration(sample_seed), mode)  # type: ignore[arg-type]

    return step


def post_surgery_steps(reconstruct: str, sample_seed: int) -> tuple[tuple[str, PostSurgeryStep], ...]:
    """A run's :attr:`cahp.run.RunSettings.post_surgery`: ``reconstruction`` on ``workload.calibration(sample_seed)``
    (the method's), or nothing for ``none`` (the run is then exactly the one without the step)."""
    if reconstruct == "none":
        return ()
    return (("reconstruction", reconstruction_step(reconstruct, sample_seed)),)


class _Stop(Exception):
    """Raised by a forward pre-hook: the forward need not go further (the capture pass at the last layer, a
    statistics call at the layer's attention module)."""


@dataclass(frozen=True)
class _LayerCall:
    """One layer's call arguments without its hidden states.

    Attributes:
        args: the positional arguments after the hidden states (all of them where those came by keyword).
        kwargs: the keyword arguments, ``hidden_states`` left out.
        keyword: the hidden states came as ``hidden_states=`` (else as the first positional argument).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    keyword: bool

    def with_hidden(self, hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the call on ``hidden`` ``[batch, seq, hidden]``."""
        if self.keyword:
            return self.args, {**self.kwargs, "hidden_states": hidden}
        return (hidden, *self.args), self.kwargs


class LayerInputs:
    """Each of this process's calibration batches' input to one layer of the pruned model, on disk, advanced one
    layer at a time (module docs).

    ``folder`` holds per batch ``i``: ``calls-i.pt``, written once by :meth:`capture`, with the batch's attention
    mask ``[batch, seq]`` (``None`` without one) and every layer's :class:`_LayerCall` (an argument that several
    layers get as the same object is pickled once and loads as one object); and ``hidden-i.pt``, the current
    layer's input hidden states ``[batch, seq, hidden]``, replaced by :meth:`advance`.

    Attributes:
        layers: the pruned model's layer modules.
        batches: batches stored.
        layer_calls: layer-module calls per stage: ``capture`` (whole layers run by the capture pass),
            ``statistics`` (layers run up to their attention module, :func:`layer_statistics`), ``advance`` (whole
            layers).
    """

    def __init__(self, model: PreTrainedModel, folder: Path) -> None:
        adapter = get_adapter(model)
        self.layers = adapter.layer_modules(model)
        self.batches = 0
        self.layer_calls = {"capture": 0, "statistics": 0, "advance": 0}
        self._model = model
        self._folder = folder
        self._cache_arguments = adapter.cache_arguments

    @torch.no_grad()
    def capture(self, calibration: Calibration) -> None:
        """Run the model once on every batch (this process's share), stopping at the last layer's pre-hook, and
        store each batch's layer arguments and layer 0's hidden states.

        Caches are dropped (an argument that is a :class:`transformers.Cache`, or is named in the adapter's
        ``cache_arguments``, becomes ``None``; ``use_cache`` is left out): the layers are called again, once each.

        Raises:
            ReconstructionError: the forward did not call every layer.
        """
        calls: dict[int, _LayerCall] = {}
        state: dict[str, torch.Tensor] = {}
        last = len(self.layers) - 1

        def record(layer: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keyword = "hidden_states" in kwargs
            hidden, rest = (kwargs["hidden_states"], args) if keyword else (args[0], args[1:])
            kept = {
                name: None if name in self._cache_arguments or isinstance(value, Cache) else value
                for name, value in kwargs.items()
                if name not in ("hidden_states", "use_cache")
            }
            calls[layer] = _LayerCall(tuple(None if isinstance(v, Cache) else v for v in rest), kept, keyword)
            if layer == 0:
                state["hidden"] = hidden
            if layer == last:
                raise _Stop

        hooks = [
            module.register_forward_pre_hook(partial(record, layer), with_kwargs=True, prepend=True)
            for layer, module in enumerate(self.layers)
        ]
        try:
            for batch in calibration.batches():
                calls.clear()
                with contextlib.suppress(_Stop):
                    calibration.forward(self._model, batch)
                missing = [layer for layer in range(len(self.layers)) if layer not in calls]
                if missing:
                    raise ReconstructionError(f"reconstruction: the model's forward did not call its layers {missing}")
                torch.save(
                    {"mask": batch.get("attention_mask"), "calls": [calls[layer] for layer in range(len(self.layers))]},
                    self._path("calls", self.batches),
                )
                self._save_hidden(self.batches, state["hidden"])
                self.batches += 1
                self.layer_calls["capture"] += last
        finally:
            for hook in hooks:
                hook.remove()

    def inputs(self, layer: int) -> Iterator[tuple[int, torch.Tensor | None, tuple[Any, ...], dict[str, Any]]]:
        """``(batch index, attention mask [batch, seq] or None, args, kwargs)`` of layer ``layer``'s call on each
        stored batch; the hidden states must be that layer's (:meth:`advance` up to it)."""
        for index in range(self.batches):
            stored = torch.load(self._path("calls", index), weights_only=False)
            hidden = torch.load(self._path("hidden", index), weights_only=True)
            args, kwargs = stored["calls"][layer].with_hidden(hidden)
            yield index, stored["mask"], args, kwargs

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Replace each batch's hidden states, layer ``layer``'s input, with that layer's output: layer
        ``layer + 1``'s input (a layer returns the hidden states or a tuple that starts with them)."""
        module = self.layers[layer]
        for index, _, args, kwargs in self.inputs(layer):
            output = module(*args, **kwargs)
            self._save_hidden(index, output[0] if isinstance(output, tuple) else output)
            self.layer_calls["advance"] += 1

    def forward_passes(self) -> float:
        """The layer calls so far as forward passes over the stored batches (each call counted as a whole layer)."""
        calls = sum(self.layer_calls.values())
        return calls / (len(self.layers) * self.batches) if self.batches else 0.0

    def _path(self, kind: str, index: int) -> Path:
        return self._folder / f"{kind}-{index}.pt"

    def _save_hidden(self, index: int, hidden: torch.Tensor) -> None:
        torch.save(hidden.clone(), self._path("hidden", index))  # a clone: a view would save its whole storage


@torch.no_grad()
def layer_statistics(dense: PreTrainedModel, inputs: LayerInputs, layer: int) -> LayerStatistics:
    """``(G, s, n)`` of the unpruned layer ``layer``'s contexts on the pruned model's inputs to that layer (``inputs``,
    advanced to ``layer``), summed over this process's calibration batches and all-reduced across processes.

    Raises:
        ReconstructionError: the pruned layer did not call its attention module, or the unpruned one did not call
            its output projection.
    """
    adapter = get_adapter(dense)
    pruned_layer = inputs.layers[layer]
    pruned_attention = pruned_layer.get_submodule(adapter.attention)
    dense_attention = adapter.attention_modules(dense)[layer]
    dense_output = adapter.output_projections(dense)[layer]
    width = layer_geometries(dense)[layer].query_heads * adapter.head_size(dense)
    device = next(dense.parameters()).device
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state: dict[str, Any] = {}

    def read_context(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state["context"] = args[0] if args else kwargs["input"]

    def run_dense(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal gram, total, count
        state.pop("context", None)
        outputs = dense_attention(*args, **kwargs)
        context = state.get("context") if adapter.output_inside_attention() else outputs[0]
        if context is None:
            raise ReconstructionError("reconstruction: the unpruned layer's output projection was not called")
        context = context.to(torch.float64).reshape(-1, context.shape[-1])  # [batch * seq, D]
        mask = state.get("mask")
        if mask is not None:
            if mask.numel() != context.shape[0]:
                raise ReconstructionError(
                    f"reconstruction: an attention mask of {tuple(mask.shape)} for {context.shape[0]} context tokens"
                )
            context = context[mask.reshape(-1).to(context.device) != 0]
        gram += context.t() @ context
        total += context.sum(0)
        count += context.shape[0]
        raise _Stop

    run = pruned_attention.register_forward_pre_hook(run_dense, with_kwargs=True, prepend=True)
    read = dense_output.register_forward_pre_hook(read_context, with_kwargs=True)
    try:
        for _, mask, args, kwargs in inputs.inputs(layer):
            state["mask"] = mask
            try:
                pruned_layer(*args, **kwargs)
            except _Stop:
                inputs.layer_calls["statistics"] += 1
                continue
            raise ReconstructionError(f"reconstruction: layer {layer} of the pruned model did not call its attention")
    finally:
        run.remove()
        read.remove()
    gram, total, count = distributed.all_reduce_sums(gram, total, count)
    return LayerStatistics(gram, total, float(count))


def relative_error(
    stats: LayerStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fitted: torch.Tensor,
    fitted_bias: torch.Tensor | None,
) -> float:
    """``sum ||Y_hat - Y||^2 / sum ||Y||^2`` over the calibration tokens, from the statistics alone.

    Args:
        weight, bias: the unpruned output projection ``[out, D]``, ``[out]`` (``Y = weight c + bias``).
        fitted, fitted_bias: the pruned one written at full width ``[out, D]`` (zeros on removed columns),
            ``[out]`` (``None``: no bias).
    """
    gram, total, count = stats.gram, stats.total, stats.count
    zero = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    b = zero if bias is None else bias
    delta = (zero if fitted_bias is None else fitted_bias) - b
    diff = fitted - weight
    error = (diff @ gram * diff).sum() + 2 * delta @ (diff @ total) + count * delta @ delta
    energy = (weight @ gram * weight).sum() + 2 * b @ (weight @ total) + count * b @ b
    return float(error / energy) if float(energy) > 0 else 0.0


def _solve(matrix: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """``matrix^-1 rhs`` for a symmetric ``matrix`` ``[k, k]``, or ``(None, why)`` where it is ill-conditioned."""
    if matrix.numel() == 0:
        return rhs, ""
    eigenvalues = torch.linalg.eigvalsh(matrix)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if not math.isfinite(largest) or smallest <= 0:
        return None, "ill-conditioned: not positive definite"
    if largest / smallest > MAX_CONDITION:
        return None, f"ill-conditioned: condition number {largest / smallest:.3g}"
    return torch.linalg.solve(matrix, rhs), ""


def fit_layer(
    stats: LayerStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept_columns: torch.Tensor,
    head_dim: int,
    pruned_weight: torch.Tensor,
    pruned_bias: torch.Tensor | None,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The new pruned output projection of one layer, and its record.

    Args:
        stats: the unpruned layer's context statistics (``D`` wide).
        weight, bias: the unpruned output projection ``[out, D]``, ``[out]`` or ``None``.
        kept_columns: ``[k * head_dim]`` the kept heads' columns among the ``D``, head-major, in the pruned
            projection's order.
        head_dim: columns per head.
        pruned_weight, pruned_bias: the pruned output projection now ``[out, k * head_dim]``, ``[out]`` or ``None``.
        mode: ``bias``, ``scale`` or ``weights``.

    Returns:
        ``(new weight [out, k * head_dim], new bias [out] or None (unchanged), record)``.
    """
    out, width = weight.shape
    removed = torch.ones(width, dtype=torch.bool, device=weight.device)
    removed[kept_columns] = False

    def full(kept_weight: torch.Tensor) -> torch.Tensor:
        matrix = torch.zeros(out, width, dtype=torch.float64, device=weight.device)
        matrix[:, kept_columns] = kept_weight
        return matrix

    before = relative_error(stats, weight, bias, full(pruned_weight), pruned_bias)
    record: dict[str, Any] = {"kept_columns": int(kept_columns.numel()), "error_before": before}
    new_weight, new_bias, note = pruned_weight, None, ""
    mean = stats.mean
    if stats.count == 0:
        note = "no calibration tokens: unchanged"
    elif mode == "bias":
        if pruned_bias is None:
            note = "no output-projection bias: unchanged"
        else:
            new_bias = pruned_bias + weight[:, removed] @ mean[removed]
    elif mode == "scale":
        heads = kept_columns.numel() // head_dim
        if heads == 0:
            note = "no kept heads: nothing to scale"
        else:
            blocks = [kept_columns[h * head_dim : (h + 1) * head_dim] for h in range(heads)]
            parts = [pruned_weight[:, h * head_dim : (h + 1) * head_dim] for h in range(heads)]  # [out, head_dim]
            offset = (bias if bias is not None else 0) - (pruned_bias if pruned_bias is not None else 0)
            gram, total = stats.gram, stats.total
            system = torch.zeros(heads, heads, dtype=torch.float64, device=weight.device)
            target = torch.zeros(heads, dtype=torch.float64, device=weight.device)
            for i in range(heads):
                for j in range(heads):
                    system[i, j] = (parts[i].t() @ parts[j] * gram[blocks[i]][:, blocks[j]]).sum()
                target[i] = (parts[i].t() @ weight * gram[blocks[i]]).sum()
                if isinstance(offset, torch.Tensor):
                    target[i] += offset @ (parts[i] @ total[blocks[i]])
            lam = RIDGE * float(system.diagonal().mean())
            eye = torch.eye(heads, dtype=torch.float64, device=weight.device)
            scales, note = _solve(system + lam * eye, target + lam)
            if scales is not None:
                new_weight = torch.cat([part * scale for part, scale in zip(parts, scales, strict=True)], dim=1)
                record["scales"] = [round(float(scale), 4) for scale in scales]
    elif mode == "weights":
        intercept = pruned_bias is not None
        gram = stats.gram - stats.count * torch.outer(mean, mean) if intercept else stats.gram
        block = gram[kept_columns][:, kept_columns]  # [k, k]
        if block.numel():
            lam = RIDGE * float(block.diagonal().mean())
            rhs = gram[kept_columns] @ weight.t() + lam * pruned_weight.t()  # [k, out]
            solved, note = _solve(
                block + lam * torch.eye(block.shape[0], dtype=torch.float64, device=block.device), rhs
            )
            if solved is not None:
                new_weight = solved.t()
        elif not intercept:
            note = "no kept heads and no bias: nothing to fit"
        if intercept and not note:
            dense_bias = bias if bias is not None else torch.zeros(out, dtype=torch.float64, device=weight.device)
            new_bias = dense_bias + weight @ mean - new_weight @ mean[kept_columns]
        record["intercept"] = intercept
    else:
        raise ReconstructionError(f"unknown reconstruction mode {mode!r}")
    after = relative_error(stats, weight, bias, full(new_weight), new_bias if new_bias is not None else pruned_bias)
    if not note and not (math.isfinite(after) and after <= before * (1 + 1e-9) + 1e-12):
        note = f"fallback: the fit would raise the error to {after:.4g}"
    if note and not note.startswith("no "):
        new_weight, new_bias, after = pruned_weight, None, before
        record["fallback"] = True
    record["error_after"] = after
    if note:
        record["note"] = note
    return new_weight, new_bias, record


@torch.no_grad()
def reconstruct(dense: PreTrainedModel, pruned: PreTrainedModel, calibration: Calibration, mode: str) -> dict[str, Any]:
    """Reconstruct ``pruned`` in place, layer by layer, bottom up, toward ``dense`` (module docs); the record.

    Args:
        dense: the unpruned model (not modified; it may itself be a pruned model that is pruned further).
        pruned: ``dense`` with heads removed (:func:`cahp.surgery.prune_heads`), same device.
        calibration: the batches the statistics are summed over (sharded across processes).
        mode: ``bias``, ``scale`` or ``weights`` (``none``: nothing is done).

    Returns:
        ``{"mode", "tokens", "batches", "fallbacks", "seconds", "layer_calls", "forward_passes", "layers": [{"layer",
        "kept_heads", "error_before", "error_after", ...}]}`` (errors: relative MSE of the attention output on the
        calibration tokens; ``layer_calls`` and ``forward_passes``: this process's cost, :class:`LayerInputs`).
    """
    check_reconstruction(pruned, mode)
    if mode == "none":
        return {"mode": "none"}
    start = time.perf_counter()
    adapter = get_adapter(pruned)
    head_dim = adapter.head_size(pruned)
    dense_kept, pruned_kept = kept_heads_by_layer(dense), kept_heads_by_layer(pruned)
    dense_geometries = layer_geometries(dense)
    projections = adapter.output_projections(pruned)
    modes = {module: module.training for module in (dense, pruned)}
    dense.eval()
    pruned.eval()
    layers: list[dict[str, Any]] = []
    tokens = 0.0
    try:
        with tempfile.TemporaryDirectory(prefix="cahp-reconstruction-") as folder:
            inputs = LayerInputs(pruned, Path(folder))
            inputs.capture(calibration)
            for layer, projection in enumerate(projections):
                heads = [dense_kept[layer].index(head) for head in pruned_kept[layer]]
                entry: dict[str, Any] = {"layer": layer, "kept_heads": len(heads)}
                if not dense_kept[layer]:
                    layers.append({**entry, "note": "the unpruned layer has no heads"})
                else:
                    stats = layer_statistics(dense, inputs, layer)
                    tokens = stats.count
                    dense_projection = adapter.output_projections(dense)[layer]
                    device = stats.gram.device
                    kept_columns = dense_geometries[layer].output_columns(heads, device=device)
                    new_weight, new_bias, record = fit_layer(
                        stats,
                        output_weight(dense_projection, adapter.transposed).to(device),
                        _on(output_bias(dense_projection), device),
                        kept_columns,
                        head_dim,
                        output_weight(projection, adapter.transposed).to(device),
                        _on(output_bias(projection), device),
                        mode,
                    )
                    write_output_projection(projection, new_weight, new_bias, adapter.transposed)
                    record.pop("kept_columns")
                    record["error_before"] = _round(record["error_before"])
                    record["error_after"] = _round(record["error_after"])
                    layers.append({**entry, **record})
                if layer + 1 < len(projections):
                    inputs.advance(layer)
    finally:
        for module, training in modes.items():
            module.train(training)
    return {
        "mode": mode,
        "tokens": int(tokens),
        "batches": calibration.num_batches(),
        "fallbacks": sum(1 for entry in layers if entry.get("fallback")),
        "seconds": round(time.perf_counter() - start, 2),
        "layer_calls": dict(inputs.layer_calls),
        "forward_passes": round(inputs.forward_passes(), 2),
        "layers": layers,
    }


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _round(value: float) -> float:
    return float(f"{value:.6g}")
