"""Loading code for a folder of a model whose attention heads cahp removed; needs only torch and transformers.

cahp copies this file, unchanged, into every pruned folder it saves (as ``modeling_cahp.py``) and points
``config.json``'s ``auto_map`` at it, so the folder loads without cahp::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

With cahp imported the same classes are registered with ``AutoConfig`` / ``AutoModel...``, so the plain
``from_pretrained(folder)`` (and ``transformers.pipeline``) uses them without ``trust_remote_code``.

A ``Cahp...`` model's ``save_pretrained`` writes such a folder itself (:func:`finish_pruned_folder`): cahp gives a
stock model that class when it prunes it, so ``prune_heads(model, ...)`` then ``model.save_pretrained(folder)``
writes what ``cahp.surgery.autoload.save_pruned`` writes.

The classes are thin subclasses of the stock ones, made on first use by name (PEP 562 ``__getattr__``):
``CahpBertConfig`` is ``BertConfig`` with ``model_type = "cahp_bert"`` (so a pruned folder never claims a stock
``model_type`` that would build the unpruned shapes), and ``CahpBertForSequenceClassification`` is
``BertForSequenceClassification`` whose ``__init__`` shrinks the freshly built (meta-device) model to the
recorded structure before the weights are read. The structure comes from ``config.json``:

* ``cahp_kept_heads`` ``{"layer": [original query heads kept]}`` and, with grouped-query attention,
  ``cahp_kept_kv_heads`` ``{"layer": [original key-value heads kept]}``;
* ``cahp_layout``: where a layer keeps its attention (paths relative to one layer of ``model.base_model``),
  the original head counts and ``head_dim``, and which attributes hold head counts and widths.

Kept heads sit in original order in the saved weights; a layer keeping ``Q`` query and ``KV`` key-value heads
has q/k/v projections with ``Q * head_dim`` / ``KV * head_dim`` outputs (one fused projection: their sum) and an
output projection with ``Q * head_dim`` inputs. A layer that kept no head runs no attention: its attention
module returns the output projection's bias (zeros without bias).
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import transformers
from torch import nn

CLASS_PREFIX = "Cahp"
MODEL_TYPE_PREFIX = "cahp_"
KEPT_HEADS_KEY = "cahp_kept_heads"
KEPT_KV_HEADS_KEY = "cahp_kept_kv_heads"
LAYOUT_KEY = "cahp_layout"
MODELING_FILE = "modeling_cahp.py"

if TYPE_CHECKING:  # functools.cache, typed as keeping the signature (its Hashable arguments refuse `type[...]`)
    _Function = TypeVar("_Function")

    def cache(function: _Function, /) -> _Function: ...
else:
    from functools import cache

#: The ``AutoModel...`` classes registered (and written to ``auto_map``) for every family that has them.
AUTO_MODEL_CLASSES: tuple[str, ...] = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForImageClassification",
)


# ---- classes -----------------------------------------------------------------------------------------------


@cache
def pruned_config_class(stock: type[transformers.PretrainedConfig]) -> type[transformers.PretrainedConfig]:
    """``stock`` config class with ``model_type`` ``"cahp_<stock model_type>"``, named ``Cahp<StockName>``.

    The stock model type's checkpoint key renames (transformers 5 ``conversion_mapping``: legacy key names in
    the file, e.g. ViT's ``vit.encoder.layer.0.attention.attention.query``) are registered for it too.
    """
    _share_checkpoint_conversions(stock.model_type, MODEL_TYPE_PREFIX + stock.model_type)
    return type(
        CLASS_PREFIX + stock.__name__,
        (stock,),
        {
            "model_type": MODEL_TYPE_PREFIX + stock.model_type,
            "__module__": __name__,
            "__doc__": f"{stock.__name__} of a model whose attention heads were pruned by cahp.",
        },
    )


def _share_checkpoint_conversions(stock_key: str, pruned_key: str) -> None:
    """Register transformers' checkpoint key renames of ``stock_key`` (a model type or class name) for
    ``pruned_key`` too."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # a transformers without key renames
        return
    conversions = conversion_mapping.get_checkpoint_conversion_mapping(stock_key)
    if conversions is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(pruned_key, conversions, overwrite=True)


@cache
def pruned_model_class(stock: type[transformers.PreTrainedModel]) -> type[transformers.PreTrainedModel]:
    """``stock`` model class whose ``__init__`` shrinks the model to the config's pruning record (sharing the
    checkpoint key renames registered for ``stock``'s class name)."""
    _share_checkpoint_conversions(stock.__name__, CLASS_PREFIX + stock.__name__)

    def __init__(self: transformers.PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
        stock.__init__(self, config, *args, **kwargs)
        shrink_to_record(self, config)

    def save_pretrained(self: transformers.PreTrainedModel, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """``stock.save_pretrained``, then the folder made a pruned folder (:func:`finish_pruned_folder`)."""
        saved = super(pruned, self).save_pretrained(save_directory, *args, **kwargs)
        names = getattr(self.config, "architectures", None)
        if names:  # save_pretrained records this class's name; the config keeps naming the stock class
            self.config.architectures = [name.removeprefix(CLASS_PREFIX) for name in names]
        if kwargs.get("is_main_process", True) and getattr(self.config, KEPT_HEADS_KEY, None) is not None:
            finish_pruned_folder(save_directory)
        return saved

    pruned: type[transformers.PreTrainedModel] = type(
        CLASS_PREFIX + stock.__name__,
        (stock,),
        {
            "__init__": __init__,
            "save_pretrained": save_pretrained,
            "config_class": pruned_config_class(cast(type[transformers.PretrainedConfig], stock.config_class)),
            "__module__": __name__,
            "__doc__": f"{stock.__name__} with the attention heads recorded in config.{KEPT_HEADS_KEY}.",
        },
    )
    _register_base_model(pruned, stock)
    return pruned


def _register_base_model(pruned: type[transformers.PreTrainedModel], stock: type[transformers.PreTrainedModel]) -> None:
    """Let ``AutoModel.from_config(pruned config)`` build the pruned base model: task models such as Llama's
    ``...ForSequenceClassification`` build their base model that way, also when loaded as remote code."""
    # both classes have a config class (transformers types it as optional); the mapping's values are model classes
    # here (transformers types them as tokenizer pairs too)
    stock_config = cast(type[transformers.PretrainedConfig], stock.config_class)
    pruned_config = cast(type[transformers.PretrainedConfig], pruned.config_class)
    try:
        stock_base = cast(type[transformers.PreTrainedModel], transformers.AutoModel._model_mapping[stock_config])
    except (KeyError, ValueError):
        return
    if pruned_config not in transformers.AutoModel._model_mapping:
        base = pruned if stock_base is stock else pruned_model_class(stock_base)
        transformers.AutoModel.register(pruned_config, base, exist_ok=True)


def __getattr__(name: str) -> type:
    """``Cahp<Name>`` for any config or model class ``<Name>`` that transformers provides."""
    stock = getattr(transformers, name.removeprefix(CLASS_PREFIX), None) if name.startswith(CLASS_PREFIX) else None
    if isinstance(stock, type) and issubclass(stock, transformers.PretrainedConfig):
        return pruned_config_class(stock)
    if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel):
        return pruned_model_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the folder -------------------------------------------------------------------------------------------


def stock_model_classes(stock_config: type[transformers.PretrainedConfig]) -> dict[str, type]:
    """``{auto class name: stock model class}`` for the auto classes of :data:`AUTO_MODEL_CLASSES` that know
    ``stock_config``."""
    classes = {}
    for auto_name in AUTO_MODEL_CLASSES:
        mapping = getattr(transformers, auto_name)._model_mapping
        try:
            found = mapping[stock_config]
        except (KeyError, ValueError, AttributeError):  # no such head for this family
            continue
        classes[auto_name] = found[0] if isinstance(found, list | tuple) else found
    return classes


def pruned_folder_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """``config_dict`` (of a pruned model; stock or ``cahp_`` model type) as a pruned folder's ``config.json``:
    the ``cahp_`` model type, the stock class names in ``architectures`` and an ``auto_map`` pointing every
    applicable Auto class at ``modeling_cahp.py``. ``cahp_layout`` is taken as it is.

    Raises:
        KeyError: the stock model type is unknown to this transformers.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    stock_type = config_dict["model_type"].removeprefix(MODEL_TYPE_PREFIX)
    stock_config = CONFIG_MAPPING[stock_type]
    module = MODELING_FILE.removesuffix(".py")
    pruned = dict(config_dict)
    pruned["model_type"] = MODEL_TYPE_PREFIX + stock_type
    names = config_dict.get("architectures")
    pruned["architectures"] = [name.removeprefix(CLASS_PREFIX) for name in names] if names else names
    pruned["auto_map"] = {"AutoConfig": f"{module}.{CLASS_PREFIX}{stock_config.__name__}"}
    for auto_name, stock_model in stock_model_classes(stock_config).items():
        pruned["auto_map"][auto_name] = f"{module}.{CLASS_PREFIX}{stock_model.__name__}"
    return pruned


def finish_pruned_folder(folder: str | os.PathLike[str]) -> None:
    """Make a folder that ``save_pretrained`` just wrote for a pruned model load with and without cahp: its
    ``config.json`` as :func:`pruned_folder_config` says, and a copy of this file beside it. A config without
    ``cahp_layout`` (not written by cahp) is left as it is."""
    config_path = os.path.join(folder, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config_dict = json.load(handle)
    if LAYOUT_KEY not in config_dict or KEPT_HEADS_KEY not in config_dict:
        return
    text = json.dumps(pruned_folder_config(config_dict), indent=2, sort_keys=True) + "\n"
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(text)
    target = os.path.join(folder, MODELING_FILE)
    if not (os.path.exists(target) and os.path.samefile(__file__, target)):
        shutil.copyfile(__file__, target)


def record_problem(record: Any, key: str, heads: int, layers: int) -> str | None:
    """What is wrong with a pruning record ``config.<key>`` (``{"layer": [original head numbers]}``) of a model
    with ``layers`` layers of ``heads`` heads, or ``None`` when it is well formed."""
    if not isinstance(record, dict):
        return f"config.{key} must map layers to lists of head numbers, not {type(record).__name__}"
    for layer, entry in record.items():
        if not (isinstance(layer, str) and layer.isdigit() and int(layer) < layers):
            return f"config.{key} names layer {layer!r}, but the model has layers 0..{layers - 1}"
        if not isinstance(entry, list):
            return f"config.{key}[{layer!r}] must be a list of head numbers, not {entry!r:.60}"
        numbers = []
        for head in entry:
            try:
                if isinstance(head, bool):
                    raise TypeError
                numbers.append(operator.index(head))
            except TypeError:
                return f"config.{key}[{layer!r}] must hold whole head numbers, got {head!r:.30}"
        outside = sorted({number for number in numbers if not 0 <= number < heads})
        if outside:
            return f"config.{key}[{layer!r}] names heads {outside}, but heads are numbered 0..{heads - 1}"
        if len(set(numbers)) != len(numbers):
            return f"config.{key}[{layer!r}] names a head twice ({entry})"
    return None


# ---- shrinking a freshly built model -----------------------------------------------------------------------


def shrink_to_record(model: transformers.PreTrainedModel, config: Any) -> None:
    """Resize every pruned layer of ``model`` (just built with the ORIGINAL shapes) to the recorded heads.

    New parameters are the leading slices of the old ones (on the meta device while ``from_pretrained`` builds
    the model, so they cost nothing); loading then fills them from the file.

    Raises:
        ValueError: the config has no pruning record or layout, or the record is malformed (:func:`record_problem`).
    """
    layout, kept = getattr(config, LAYOUT_KEY, None), getattr(config, KEPT_HEADS_KEY, None)
    if not isinstance(layout, dict) or kept is None:
        raise ValueError(
            f"config.{KEPT_HEADS_KEY} and config.{LAYOUT_KEY} are needed to build a pruned model; this config has "
            f"{type(kept).__name__} and {type(layout).__name__}. Load the folder cahp saved, unchanged."
        )
    kept_kv = getattr(config, KEPT_KV_HEADS_KEY, None) or kept
    layers = cast(nn.ModuleList, model.base_model.get_submodule(layout["layers"]))
    problem = record_problem(kept, KEPT_HEADS_KEY, layout["query_heads"], len(layers)) or (
        record_problem(kept_kv, KEPT_KV_HEADS_KEY, layout["kv_heads"], len(layers)) if kept_kv is not kept else None
    )
    if problem:
        raise ValueError(
            f"{problem}: the pruning record is malformed; restore the folder's config.json as cahp saved it"
        )
    in_axis = 0 if layout["transposed"] else 1
    for index, layer in enumerate(layers):
        query_heads = list(kept.get(str(index), range(layout["query_heads"])))
        kv_heads = len(kept_kv.get(str(index), range(layout["kv_heads"])))
        width = cast(torch.Tensor, layer.get_submodule(layout["output"]).weight).shape[in_axis]
        if width == layout["query_heads"] * layout["head_dim"] and (query_heads, kv_heads) != (
            list(range(layout["query_heads"])),
            layout["kv_heads"],
        ):  # still the original shapes (a base model built by a pruned class is already shrunk)
            _shrink_layer(layer, layout, query_heads, kv_heads)


def _shrink_layer(layer: nn.Module, layout: dict[str, Any], query_heads: list[int], kv_heads: int) -> None:
    """Give one layer ``len(query_heads)`` query and ``kv_heads`` key-value heads (original numbers
    ``query_heads``: MPNet's shared position bias is sliced to them)."""
    head_dim, queries = layout["head_dim"], len(query_heads)
    width = {"query": queries * head_dim, "key": kv_heads * head_dim, "value": kv_heads * head_dim}
    for path, kinds in layout["projections"].items():
        _resize(layer.get_submodule(path), layout["transposed"], outputs=sum(width[kind] for kind in kinds))
    _resize(layer.get_submodule(layout["output"]), layout["transposed"], inputs=width["query"])
    attention = layer.get_submodule(layout["attention"])
    for name in layout["head_count_attrs"]:
        setattr(attention, name, queries)
    for name in layout["width_attrs"]:
        setattr(attention, name, width["query"])
    if layout["kv_groups_attr"] and kv_heads:
        setattr(attention, layout["kv_groups_attr"], queries // kv_heads)
    if layout["per_head_argument"]:
        name, position = layout["per_head_argument"]
        attention._cahp_per_head_argument = (name, position, tuple(query_heads))  # type: ignore[assignment]
        attention.register_forward_pre_hook(_select_kept_heads_of_argument, with_kwargs=True)
    if not queries:
        inner = (
            layout["output"][len(layout["attention"]) + 1 :]
            if layout["output"].startswith(layout["attention"] + ".")
            else None
        )
        attention._cahp_headless = (  # type: ignore[assignment]
            inner,
            head_dim,
            layout["probs_need_output_attentions"],
            layout["cache_arguments"],
        )
        attention.__class__ = _headless_class(type(attention))


@torch.no_grad()
def _resize(projection: nn.Module, transposed: bool, *, outputs: int | None = None, inputs: int | None = None) -> None:
    """Keep the first ``outputs`` output / ``inputs`` input features of a ``nn.Linear`` (weight ``[out, in]``)
    or a transposed ``Conv1D`` (weight ``[in, out]``); the bias follows the outputs."""
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    original = weight = cast(torch.Tensor, projection.weight)
    if outputs is not None:
        weight = weight.narrow(out_axis, 0, outputs)
        bias: torch.Tensor | None = getattr(projection, "bias", None)
        if bias is not None:
            projection.bias = nn.Parameter(bias[:outputs].clone(), bias.requires_grad)
    if inputs is not None:
        weight = weight.narrow(in_axis, 0, inputs)
    projection.weight = nn.Parameter(weight.clone(), original.requires_grad)
    # nn.Module types its attributes as Tensor | Module; these are the layer's int sizes
    if transposed:
        projection.nx, projection.nf = weight.shape  # type: ignore[assignment]
    else:
        projection.out_features, projection.in_features = weight.shape  # type: ignore[assignment]


def _select_kept_heads_of_argument(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: slice a ``[batch, original_heads, q, k]`` argument to the layer's kept heads."""
    name, position, kept = cast(tuple[str, int, tuple[int, ...]], module._cahp_per_head_argument)
    if kwargs.get(name) is not None:
        kwargs[name] = kwargs[name][:, list(kept)]
    elif len(args) > position and args[position] is not None:
        args = (*args[:position], args[position][:, list(kept)], *args[position + 1 :])
    return args, kwargs


@cache
def _headless_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Subclass of an attention class whose forward does no work (``isinstance`` checks keep working)."""
    doc = f"{cls.__name__} with every head removed: returns the output-projection bias and no attention."
    return type(f"Headless{cls.__name__}", (cls,), {"forward": _headless_forward, "__doc__": doc})


def _headless_forward(self: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """Forward of a layer without heads, with the original return structure.

    Returns ``(output, probs)`` (``(output,)`` where the module returns probabilities only on request):
    output ``[batch, seq, 0]`` (context, projected by the caller) or ``[batch, seq, hidden]`` (bias of the
    inner output projection), probs ``[batch, 0, seq, key_len]``.
    """
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    inner_output, head_dim, probs_on_request, cache_arguments = cast(
        tuple[str | None, int, bool, tuple[str, ...]], self._cahp_headless
    )
    batch, query_len = hidden_states.shape[0], hidden_states.shape[-2]
    key_len = query_len
    cache_object = next((kwargs[name] for name in cache_arguments if kwargs.get(name) is not None), None)
    if cache_object is not None and getattr(self, "layer_idx", None) is not None:  # record zero heads
        cache_object = getattr(cache_object, "self_attention_cache", cache_object)
        empty = hidden_states.new_zeros(batch, 0, query_len, head_dim)
        key_len = cache_object.update(empty, empty, self.layer_idx)[0].shape[-2]
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
