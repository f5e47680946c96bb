"""Physical removal of attention heads: slice the projection weights in place and fix the bookkeeping.

Which rows of the q/k/v projections and which columns of the output projection go is read from the adapter's
:class:`~cahp.adapters.HeadGeometry` (separate, fused ``[q | k | v]`` or fused per head; ``Conv1D`` or
``nn.Linear``); :func:`layer_geometries` gives it for every layer of a (pruned) model.

Head numbers always mean the ORIGINAL heads of the unpruned model, also on a model that was already pruned:
``prune_heads(model, {0: [1]})`` then ``prune_heads(model, {0: [1, 3]})`` leaves layer 0 without heads 1 and
3. Removing a head that is already gone is a no-op (so cumulative plans can be re-applied); a head number
outside ``[0, num_heads)`` is a :class:`~cahp.errors.PruningError`.

The structure is recorded in the model config, JSON-serialisable so ``save_pretrained`` writes it (and a model of
a stock class becomes its ``Cahp...`` subclass, whose ``save_pretrained`` writes a folder that loads with and
without cahp: :func:`cahp.surgery.autoload.adopt_pruned_classes`)::

    config.cahp_kept_heads    = {"0": [0, 2, 5], "1": [], ...}   # kept query heads per layer
    config.cahp_kept_kv_heads = {"0": [0, 1], ...}               # only for grouped-query attention

``config.num_attention_heads`` / ``num_key_value_heads`` keep their ORIGINAL values (the model class derives
the head size from them); :func:`cahp.surgery.persistence.load_pruned` rebuilds the smaller shapes from
the record.

A layer may lose every head. Its attention module is then switched to a head-less subclass whose forward
runs no projection and no attention matmul: it returns the output projection's bias (zeros without bias),
exactly what masking all its heads gives, and empty probabilities ``[batch, 0, query_len, key_len]``. The
q/k/v/o weights stay as zero-sized tensors so the state dict keeps its keys. (GPT-2 only: in training mode
the dropout after ``c_proj`` is skipped for such a layer.) In cached decoding it stores zero heads in the
cache it is given (under the adapter's ``cache_arguments``). Known limit: transformers' ``DynamicCache``
reports its length from layer 0 and counts an empty layer as length 0, so cached generation is wrong when
layer 0 itself has no heads (a full forward, as in classification, is not affected).

Grouped-query attention (Llama, Mistral, Qwen2), query head ``h`` reading key-value head
``h // (num_heads // num_kv_heads)``, has two modes:

* ``gqa_mode="groups"`` (default): the unit is a whole key-value group. A request must remove all of a
  group's remaining query heads or none of them; removed groups take their k/v projections with them.
  It is the default because it is the only mode that shrinks all four projections and the KV cache, so the
  saving per removed head is the same as in multi-head attention, and the pruned layer is again a regular
  GQA layer (same number of query heads per key-value head).
* ``gqa_mode="uniform"``: the same number of query heads is removed from every group and all key-value
  heads stay (``num_key_value_groups`` shrinks). Finer-grained, but k/v projections are not reduced.
  Removing every query head of a layer also drops its key-value heads.

A request the chosen mode cannot express raises :class:`~cahp.errors.PruningError` naming the groups.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from cahp.adapters import ArchitectureAdapter, HeadGeometry, get_adapter
from cahp.errors import PruningError
from cahp.surgery.modeling_cahp import cache  # functools.cache, typed as keeping the signature

GqaMode = Literal["groups", "uniform"]

KEPT_HEADS_KEY = "cahp_kept_heads"
KEPT_KV_HEADS_KEY = "cahp_kept_kv_heads"


# ---- the record --------------------------------------------------------------------------------------------


def kept_heads_by_layer(model: PreTrainedModel) -> dict[int, list[int]]:
    """Kept query heads per layer, in original numbering (every head for a model never pruned)."""
    adapter = get_adapter(model)
    return _read_record(model, KEPT_HEADS_KEY, adapter.num_heads(model), adapter.num_layers(model))


def kept_kv_heads_by_layer(model: PreTrainedModel) -> dict[int, list[int]]:
    """Kept key-value heads per layer, in original numbering (equal to the query heads without GQA)."""
    adapter = get_adapter(model)
    if not adapter.uses_gqa(model):
        return kept_heads_by_layer(model)
    return _read_record(model, KEPT_KV_HEADS_KEY, adapter.num_kv_heads(model), adapter.num_layers(model))


def is_pruned(model_or_config: PreTrainedModel | Any) -> bool:
    """Whether a model (or config) carries a pruning record."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, KEPT_HEADS_KEY, None) is not None


def layer_geometries(model: PreTrainedModel) -> list[HeadGeometry]:
    """Per layer, which rows/columns of its projections belong to which of its CURRENT heads (the adapter's
    geometry for the kept head counts; head ``p`` of layer ``i`` is ``kept_heads_by_layer(model)[i][p]``)."""
    adapter = get_adapter(model)
    kept_q, kept_kv = kept_heads_by_layer(model), kept_kv_heads_by_layer(model)
    return [adapter.geometry(model, len(kept_q[layer]), len(kept_kv[layer])) for layer in sorted(kept_q)]


def _read_record(model: PreTrainedModel, key: str, heads: int, layers: int) -> dict[int, list[int]]:
    """``config.<key>`` as ``{layer: sorted heads}`` (every head of a layer it does not name)."""
    record = getattr(model.config, key, None) or {}
    if not isinstance(record, dict):
        raise PruningError(f"config.{key} must map layers to lists of head numbers, got {record!r:.80}")
    return {
        layer: sorted(head_numbers(record.get(str(layer), range(heads)), f"config.{key}[{str(layer)!r}]"))
        for layer in range(layers)
    }


def head_numbers(entry: Any, where: str) -> set[int]:
    """The head numbers of ``entry`` (a list of whole numbers; NumPy integers too).

    Raises:
        PruningError: ``entry`` is not a list, or holds something that is not a whole number (``1.7``,
            ``"2"``, ``True``): never rounded to a head.
    """
    if isinstance(entry, str | bytes | dict) or not isinstance(entry, Iterable):
        raise PruningError(f"{where} must be a list of head numbers, got {entry!r:.80}")
    numbers = set()
    for head in entry:
        try:
            if isinstance(head, bool):
                raise TypeError
            numbers.add(operator.index(head))
        except TypeError:
            raise PruningError(f"{where} must hold whole head numbers, got {head!r} in {entry!r:.80}") from None
    return numbers


# ---- public entry points -----------------------------------------------------------------------------------


def heads_to_remove(
    model: PreTrainedModel, kept_heads_by_layer: Mapping[int, Iterable[int]], gqa_mode: GqaMode = "groups"
) -> dict[int, list[int]]:
    """The removal request that keeps ``kept_heads_by_layer`` (original head numbers), made feasible.

    For grouped-query attention in ``groups`` mode a key-value group stays whole when any of its query heads
    is kept; otherwise the request is the exact complement.
    """
    adapter = get_adapter(model)
    heads = adapter.num_heads(model)
    kept = {layer: set(hs) for layer, hs in kept_heads_by_layer.items()}
    if adapter.uses_gqa(model) and gqa_mode == "groups":
        group = heads // adapter.num_kv_heads(model)
        kept = {
            layer: {g * group + i for g in {h // group for h in hs} for i in range(group)} for layer, hs in kept.items()
        }
    return {layer: sorted(set(range(heads)) - hs) for layer, hs in kept.items()}


def prune_heads(
    model: PreTrainedModel,
    heads_to_remove_by_layer: Mapping[int, Iterable[int]],
    *,
    gqa_mode: GqaMode = "groups",
) -> PreTrainedModel:
    """Remove attention heads in place and return ``model``.

    Args:
        model: a model whose ``config.model_type`` has an adapter; may already be pruned.
        heads_to_remove_by_layer: ``{layer: [head, ...]}`` in ORIGINAL head numbers; already-removed heads
            are ignored, layers not mentioned are untouched.
        gqa_mode: ``"groups"`` or ``"uniform"``, only used for grouped-query attention (see module docs).

    Raises:
        PruningError: a layer or head number out of range, or a GQA request the mode cannot carry out.
    """
    if gqa_mode not in ("groups", "uniform"):
        raise PruningError(f"gqa_mode must be 'groups' or 'uniform', got {gqa_mode!r}")
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers(model), adapter.num_heads(model)
    kept_q, kept_kv = kept_heads_by_layer(model), kept_kv_heads_by_layer(model)
    new_q, new_kv = dict(kept_q), dict(kept_kv)
    for raw_layer, raw_heads in heads_to_remove_by_layer.items():
        layer = int(raw_layer)
        if not 0 <= layer < layers:
            raise PruningError(f"layer {layer} does not exist: the model has layers 0..{layers - 1}")
        removed = head_numbers(raw_heads, f"layer {layer}'s heads to remove")
        outside = sorted(h for h in removed if not 0 <= h < heads)
        if outside:
            raise PruningError(
                f"layer {layer}: head numbers {outside} do not exist; heads are numbered 0..{heads - 1} "
                "in the ORIGINAL model, also after pruning"
            )
        new_q[layer] = [h for h in kept_q[layer] if h not in removed]
        if adapter.uses_gqa(model):
            new_kv[layer] = _kept_kv_after(adapter, model, layer, kept_q[layer], new_q[layer], kept_kv[layer], gqa_mode)
        else:
            new_kv[layer] = list(new_q[layer])
    return apply_kept_heads(model, new_q, new_kv)


def apply_kept_heads(
    model: PreTrainedModel,
    kept_heads: Mapping[int, Iterable[int]],
    kept_kv_heads: Mapping[int, Iterable[int]] | None = None,
) -> PreTrainedModel:
    """Shrink ``model`` to exactly the given kept heads (original numbers; a subset of what it has now).

    This is the low-level operation behind :func:`prune_heads` and loading; it checks that the structure is
    one the model can run (for GQA: every kept key-value head keeps the same number of its query heads, and
    no query head keeps a removed key-value head) but applies no gqa_mode policy.
    """
    adapter = get_adapter(model)
    gqa = adapter.uses_gqa(model)
    heads, kv_heads = adapter.num_heads(model), adapter.num_kv_heads(model)
    current_q, current_kv = kept_heads_by_layer(model), kept_kv_heads_by_layer(model)
    target_q = {
        layer: sorted(head_numbers(kept_heads.get(layer, current_q[layer]), f"layer {layer}'s kept heads"))
        for layer in current_q
    }
    if gqa:
        kv_source = kept_kv_heads or {}
        target_kv = {
            layer: sorted(
                head_numbers(kv_source.get(layer, current_kv[layer]), f"layer {layer}'s kept key-value heads")
            )
            for layer in current_kv
        }
    else:
        target_kv = {layer: list(q) for layer, q in target_q.items()}
    for layer in current_q:
        _check_structure(layer, target_q[layer], target_kv[layer], current_q[layer], current_kv[layer], heads, kv_heads)
    for layer, module in enumerate(adapter.layer_modules(model)):
        if target_q[layer] != current_q[layer] or target_kv[layer] != current_kv[layer]:
            geometry = adapter.geometry(model, len(current_q[layer]), len(current_kv[layer]))
            _resize_layer(
                adapter,
                module,
                geometry,
                [current_q[layer].index(h) for h in target_q[layer]],
                [current_kv[layer].index(g) for g in target_kv[layer]],
                target_q[layer],
            )
    setattr(model.config, KEPT_HEADS_KEY, {str(layer): q for layer, q in target_q.items()})
    if gqa:
        setattr(model.config, KEPT_KV_HEADS_KEY, {str(layer): kv for layer, kv in target_kv.items()})
    from cahp.surgery.autoload import adopt_pruned_classes  # autoload imports this module

    return adopt_pruned_classes(model)


# ---- GQA policy --------------------------------------------------------------------------------------------


def _kept_kv_after(
    adapter: ArchitectureAdapter,
    model: PreTrainedModel,
    layer: int,
    before_q: list[int],
    after_q: list[int],
    before_kv: list[int],
    gqa_mode: GqaMode,
) -> list[int]:
    """Key-value heads a layer keeps after a request, or PruningError if the mode cannot express it."""
    group_size = adapter.num_heads(model) // adapter.num_kv_heads(model)
    before = {g: [h for h in before_q if h // group_size == g] for g in before_kv}
    after = {g: [h for h in after_q if h // group_size == g] for g in before_kv}
    if gqa_mode == "groups":
        broken = [g for g in before_kv if after[g] and after[g] != before[g]]
        if broken:
            detail = "; ".join(f"group {g} keeps {after[g]} of {before[g]}" for g in broken)
            raise PruningError(
                f"layer {layer}: gqa_mode='groups' removes whole key-value groups, but the request splits "
                f"groups {broken} ({detail}). Remove all remaining query heads of a group or none of them "
                f"(query head h belongs to group h // {group_size}), or use gqa_mode='uniform'."
            )
        return [g for g in before_kv if after[g]]
    counts = {g: len(after[g]) for g in before_kv}
    if not any(counts.values()):
        return []
    if len(set(counts.values())) > 1:
        raise PruningError(
            f"layer {layer}: gqa_mode='uniform' keeps every key-value head and needs the same number of "
            f"query heads left in each group, but the request leaves {counts} (group: query heads left). "
            "Remove the same number of heads from every group, or use gqa_mode='groups' to drop whole groups."
        )
    return list(before_kv)


def _check_structure(
    layer: int,
    q: list[int],
    kv: list[int],
    current_q: list[int],
    current_kv: list[int],
    heads: int,
    kv_heads: int,
) -> None:
    if not set(q) <= set(current_q) or not set(kv) <= set(current_kv):
        raise PruningError(
            f"layer {layer}: cannot keep heads {sorted(set(q) - set(current_q))} / key-value heads "
            f"{sorted(set(kv) - set(current_kv))} that were already removed; surgery only removes heads"
        )
    group_size = heads // kv_heads
    per_group = {g: sum(1 for h in q if h // group_size == g) for g in kv}
    orphans = sorted(h for h in q if h // group_size not in per_group)
    if orphans or len(set(per_group.values())) > 1 or (kv and not q) or 0 in per_group.values():
        raise PruningError(
            f"layer {layer}: kept query heads {q} and key-value heads {kv} do not form a valid attention "
            f"layer (every kept key-value head needs the same, non-zero number of its {group_size} query "
            "heads, and every kept query head needs its key-value head)"
        )


# ---- weight slicing ----------------------------------------------------------------------------------------


def _resize_layer(
    adapter: ArchitectureAdapter,
    layer: nn.Module,
    geometry: HeadGeometry,
    q_positions: list[int],
    kv_positions: list[int],
    kept_q: list[int],
) -> None:
    """Keep the query / key-value heads at CURRENT ``q_positions`` / ``kv_positions`` of one layer, whose
    rows and columns ``geometry`` (the layer as it is now) locates; ``kept_q`` are their original numbers."""
    output = layer.get_submodule(adapter.output)
    device = cast(torch.Tensor, output.weight).device
    for path, kinds in adapter.input_projections().items():
        _keep_outputs(layer.get_submodule(path), geometry.kept_rows(kinds, q_positions, kv_positions, device), geometry)
    _keep_inputs(output, geometry.output_columns(q_positions, device), geometry)

    attention = layer.get_submodule(adapter.attention)
    for name in adapter.head_count_attrs:
        setattr(attention, name, len(q_positions))
    for name in adapter.width_attrs:
        setattr(attention, name, len(q_positions) * geometry.head_dim)
    if adapter.kv_groups_attr is not None and kv_positions:
        setattr(attention, adapter.kv_groups_attr, len(q_positions) // len(kv_positions))
    if adapter.per_head_argument is not None:
        _slice_shared_argument(attention, kept_q, adapter.per_head_argument)
    if not q_positions:
        _make_headless(attention, adapter, geometry.head_dim)


@torch.no_grad()
def _keep_outputs(projection: nn.Module, index: torch.Tensor, geometry: HeadGeometry) -> None:
    """Keep output features ``index`` of a ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (``[in, out]``)."""
    _replace_parameter(
        projection, "weight", cast(torch.Tensor, projection.weight).index_select(geometry.out_axis, index)
    )
    bias: torch.Tensor | None = getattr(projection, "bias", None)
    if bias is not None:
        _replace_parameter(projection, "bias", bias.index_select(0, index))
    setattr(projection, "nf" if geometry.transposed else "out_features", int(index.numel()))


@torch.no_grad()
def _keep_inputs(projection: nn.Module, index: torch.Tensor, geometry: HeadGeometry) -> None:
    """Keep input features ``index`` of a ``nn.Linear`` or ``Conv1D``; the bias is untouched."""
    _replace_parameter(
        projection, "weight", cast(torch.Tensor, projection.weight).index_select(geometry.in_axis, index)
    )
    setattr(projection, "nx" if geometry.transposed else "in_features", int(index.numel()))


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


# ---- the shared per-head argument (MPNet position bias) ----------------------------------------------------


def _slice_shared_argument(attention: nn.Module, kept_q: list[int], argument: tuple[str, int]) -> None:
    """Make ``attention`` select its kept heads from a ``[batch, original_heads, q, k]`` argument.

    The kept heads are a plain attribute (not a buffer) so that models built on the meta device by
    ``from_pretrained`` keep them; the hook is installed once and reads them at every call.
    """
    first_time = not hasattr(attention, "_cahp_per_head_argument")
    attention._cahp_per_head_argument = (*argument, tuple(kept_q))  # type: ignore[assignment]  # a plain attribute
    if first_time:
        attention.register_forward_pre_hook(_select_kept_heads_of_argument, with_kwargs=True)


def _select_kept_heads_of_argument(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    name, position, kept = cast(tuple[str, int, tuple[int, ...]], module._cahp_per_head_argument)
    if kwargs.get(name) is not None:
        kwargs[name] = kwargs[name][:, list(kept)]
    elif len(args) > position and args[position] is not None:
        args = (*args[:position], args[position][:, list(kept)], *args[position + 1 :])
    return args, kwargs


# ---- layers without heads ----------------------------------------------------------------------------------


def _make_headless(attention: nn.Module, adapter: ArchitectureAdapter, head_dim: int) -> None:
    inner_output = adapter.output[len(adapter.attention) + 1 :] if adapter.output_inside_attention() else None
    attention._cahp_headless = (  # type: ignore[assignment]  # a plain attribute, not a Tensor or Module
        inner_output,
        head_dim,
        adapter.probs_need_output_attentions,
        adapter.cache_arguments,
    )
    attention.__class__ = _headless_class(type(attention))


@cache
def _headless_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the attention class whose forward does no work (isinstance checks keep working)."""
    doc = f"{cls.__name__} with every head removed: returns the output-projection bias and no attention."
    return type(f"Headless{cls.__name__}", (cls,), {"forward": _headless_forward, "__doc__": doc})


def _headless_forward(self: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """Forward of a layer without heads; same return structure as the original attention module.

    Returns ``(output, probs)``: output ``[batch, seq, 0]`` (context; the caller projects it) or
    ``[batch, seq, hidden]`` (bias of the inner output projection), and probs ``[batch, 0, seq, key_len]``.
    """
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    inner_output, head_dim, probs_on_request, cache_arguments = cast(
        tuple[str | None, int, bool, tuple[str, ...]], self._cahp_headless
    )
    batch, query_len = hidden_states.shape[0], hidden_states.shape[-2]
    cache = next((kwargs[name] for name in cache_arguments if kwargs.get(name) is not None), None)
    key_len = _append_nothing_to_cache(self, cache, hidden_states, head_dim)
    probs = hidden_states.new_zeros(batch, 0, query_len, key_len)
    if inner_output is None:
        output = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    else:
        projection = self.get_submodule(inner_output)
        width = projection.out_features if isinstance(projection, nn.Linear) else projection.nf
        output = hidden_states.new_zeros(*hidden_states.shape[:-1], width)
        if getattr(projection, "bias", None) is not None:
            output = output + projection.bias
    if probs_on_request and not kwargs.get("output_attentions", False):
        return (output,)
    return output, probs


def _append_nothing_to_cache(module: nn.Module, cache: Any, hidden_states: torch.Tensor, head_dim: int) -> Any:
    """Keep a generation cache consistent: store zero heads for this layer; returns the key length (an int,
    or a symbolic size while exporting: not converted, so the sequence length stays dynamic)."""
    query_len = hidden_states.shape[-2]
    if cache is None or getattr(module, "layer_idx", None) is None:
        return query_len
    cache = getattr(cache, "self_attention_cache", cache)
    empty = hidden_states.new_zeros(hidden_states.shape[0], 0, query_len, head_dim)
    keys, _ = cache.update(empty, empty, module.layer_idx)
    return keys.shape[-2]
