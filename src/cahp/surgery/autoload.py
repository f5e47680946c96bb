"""Pruned folders that load with plain ``from_pretrained``: saving them, and registering their classes.

:func:`save_pruned` writes a pruned model so that three loaders read it:

* with cahp imported: ``AutoModelForSequenceClassification.from_pretrained(folder)`` (any ``AutoModel...``
  class the family has, and ``transformers.pipeline``), through the classes :func:`register_auto_classes`
  registers (it runs when :mod:`cahp.surgery` is imported; ``import cahp`` arranges it once transformers is
  imported);
* without cahp: the same call with ``trust_remote_code=True``, through the ``modeling_cahp.py`` copied into the
  folder (:mod:`cahp.surgery.modeling_cahp`, which imports only torch and transformers) and ``auto_map``;
* :func:`cahp.surgery.load_pruned`.

The folder's ``config.json`` names ``model_type`` ``"cahp_<family>"`` (e.g. ``"cahp_bert"``), never the stock
one, so a transformers without these classes refuses the folder instead of building the unpruned shapes.
With ``stock=True`` a Llama-family (or ViT) model whose layers all kept the same number of heads is written as a
stock config instead (:func:`stock_config_dict`), loadable by any transformers without custom code.

Folders written by ``model.save_pretrained`` (earlier cahp versions) claim the stock ``model_type``; plain
``from_pretrained`` refuses them with a size-mismatch error, :func:`~cahp.surgery.load_pruned` reads them, and
:func:`upgrade_pruned_folder` rewrites their ``config.json`` in place (the weights stay as they are).
"""

from __future__ import annotations

import json
import shutil
from os import PathLike
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from cahp.adapters import ArchitectureAdapter, get_adapter, register_adapter, supported_model_types
from cahp.errors import PrunedModelError
from cahp.surgery import modeling_cahp
from cahp.surgery.modeling_cahp import LAYOUT_KEY, MODEL_TYPE_PREFIX, pruned_config_class, pruned_model_class
from cahp.surgery.removal import (
    KEPT_HEADS_KEY,
    KEPT_KV_HEADS_KEY,
    is_pruned,
    kept_heads_by_layer,
    kept_kv_heads_by_layer,
)

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

#: Families whose attention reads ``head_dim`` from the config instead of deriving it from the head count
#: (Llama-style decoders, and ViT in transformers 5): a uniform prune of them is again a stock model (see
#: docs/loading.md for why the others are not).
STOCK_CONFIG_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "vit")

MODELING_FILE = "modeling_cahp.py"
_registered: set[str] = set()


# ---- registration ------------------------------------------------------------------------------------------


def register_auto_classes() -> list[str]:
    """Register the pruned config and model classes of every family with an adapter (idempotent).

    Returns:
        The ``cahp_<family>`` model types registered with ``AutoConfig``, sorted.
    """
    for model_type in supported_model_types():
        if model_type in _registered or model_type.startswith(MODEL_TYPE_PREFIX) or model_type not in CONFIG_MAPPING:
            continue
        stock_config = CONFIG_MAPPING[model_type]
        config_class = pruned_config_class(stock_config)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        register_adapter(config_class.model_type, get_adapter(model_type))
        for auto_name, stock_model in _stock_model_classes(stock_config).items():
            getattr(transformers, auto_name).register(config_class, pruned_model_class(stock_model), exist_ok=True)
        _registered.add(model_type)
    return sorted(MODEL_TYPE_PREFIX + model_type for model_type in _registered)


def _stock_model_classes(stock_config: type[PretrainedConfig]) -> dict[str, type[PreTrainedModel]]:
    """``{auto class name: stock model class}`` for the auto classes of :data:`AUTO_MODEL_CLASSES` that
    know ``stock_config``."""
    classes = {}
    for auto_name in AUTO_MODEL_CLASSES:
        mapping = getattr(transformers, auto_name)._model_mapping
        try:
            found = mapping[stock_config]
        except (KeyError, ValueError, AttributeError):  # no such head for this family
            continue
        classes[auto_name] = found[0] if isinstance(found, list | tuple) else found
    return classes


# ---- saving ------------------------------------------------------------------------------------------------


def save_pruned(
    model: PreTrainedModel, folder: str | PathLike[str], *, stock: bool = False, **save_kwargs: Any
) -> Path:
    """Save a (pruned) model so that plain ``from_pretrained`` loads it, with or without cahp.

    Args:
        model: any model with an adapter; pruned or not (an unpruned one is saved as it is).
        folder: where to write ``config.json``, the weights and ``modeling_cahp.py``.
        stock: write a stock config (no custom code) instead; needs a Llama-family or ViT model whose layers all
            kept the same, non-zero numbers of query and key-value heads.
        **save_kwargs: passed to ``model.save_pretrained`` (``safe_serialization``, ``max_shard_size``, ...).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        PrunedModelError: ``stock=True`` for a model that no stock config describes (the message says why).
    """
    folder = Path(folder)
    stock_dict = stock_config_dict(model) if stock else None  # checked before anything is written
    model.save_pretrained(folder, **save_kwargs)
    config_path = folder / "config.json"
    if stock_dict is not None:
        config_path.write_text(json.dumps(stock_dict, indent=2, sort_keys=True) + "\n")
    elif is_pruned(model):
        config_path.write_text(json.dumps(_pruned_config_dict(model.config.to_dict()), indent=2, sort_keys=True) + "\n")
        shutil.copyfile(modeling_cahp.__file__, folder / MODELING_FILE)
    return folder


def upgrade_pruned_folder(folder: str | PathLike[str]) -> Path:
    """Rewrite the ``config.json`` of a pruned folder that claims its stock ``model_type`` (written by
    ``save_pretrained`` in earlier cahp versions) so plain ``from_pretrained`` loads it; weights are untouched.

    Raises:
        PrunedModelError: the folder's config has no pruning record.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config_dict = json.loads(config_path.read_text())
    if KEPT_HEADS_KEY not in config_dict:
        raise PrunedModelError(f"{config_path} has no {KEPT_HEADS_KEY}: this folder holds no pruned model")
    config_path.write_text(json.dumps(_pruned_config_dict(config_dict), indent=2, sort_keys=True) + "\n")
    shutil.copyfile(modeling_cahp.__file__, folder / MODELING_FILE)
    return folder


def _pruned_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """``config_dict`` (of a pruned model, stock or ``cahp_`` model type) with the ``cahp_`` model type,
    ``cahp_layout`` and an ``auto_map`` pointing at ``modeling_cahp.py``."""
    stock_type = config_dict["model_type"].removeprefix(MODEL_TYPE_PREFIX)
    if stock_type not in CONFIG_MAPPING:
        raise PrunedModelError(
            f"model_type {stock_type!r} is unknown to transformers {transformers.__version__}; "
            "install a version that has it"
        )
    stock_config_class = CONFIG_MAPPING[stock_type]
    config = stock_config_class.from_dict({key: value for key, value in config_dict.items() if key != "model_type"})
    pruned = dict(config_dict)
    pruned["model_type"] = MODEL_TYPE_PREFIX + stock_type
    pruned["architectures"] = _stock_architectures(config_dict)
    pruned[LAYOUT_KEY] = layout_of(get_adapter(stock_type), config)
    pruned["auto_map"] = {
        "AutoConfig": f"{Path(MODELING_FILE).stem}.{pruned_config_class(stock_config_class).__name__}"
    }
    for auto_name, stock_model in _stock_model_classes(stock_config_class).items():
        pruned["auto_map"][auto_name] = f"{Path(MODELING_FILE).stem}.{pruned_model_class(stock_model).__name__}"
    return pruned


def _stock_architectures(config_dict: dict[str, Any]) -> list[str] | None:
    """``architectures`` naming the stock classes (a model loaded through ``Cahp...`` classes saves those)."""
    names = config_dict.get("architectures")
    return [name.removeprefix(modeling_cahp.CLASS_PREFIX) for name in names] if names else names


def layout_of(adapter: ArchitectureAdapter, config: PretrainedConfig) -> dict[str, Any]:
    """What ``modeling_cahp.py`` needs to know about a family's attention (JSON-serialisable)."""
    return {
        "layers": adapter.layers,
        "attention": adapter.attention,
        "projections": {path: list(kinds) for path, kinds in adapter.input_projections().items()},
        "output": adapter.output,
        "transposed": adapter.transposed,
        "head_dim": adapter.head_size(config),
        "query_heads": adapter.num_heads(config),
        "kv_heads": adapter.num_kv_heads(config),
        "head_count_attrs": list(adapter.head_count_attrs),
        "width_attrs": list(adapter.width_attrs),
        "kv_groups_attr": adapter.kv_groups_attr,
        "per_head_argument": list(adapter.per_head_argument) if adapter.per_head_argument else None,
        "probs_need_output_attentions": adapter.probs_need_output_attentions,
        "cache_arguments": list(adapter.cache_arguments),
    }


# ---- stock configs -----------------------------------------------------------------------------------------


def stock_config_dict(model: PreTrainedModel) -> dict[str, Any]:
    """The stock ``config.json`` content that describes a uniformly pruned Llama-family (or ViT) model as it is.

    After surgery a layer's kept heads are its first ``Q`` query / ``KV`` key-value heads, in original order,
    with query head ``p`` reading key-value head ``p // (Q // KV)``: exactly a stock layer with
    ``num_attention_heads = Q``, ``num_key_value_heads = KV`` and the original ``head_dim`` (written
    explicitly, since it no longer equals ``hidden_size // num_attention_heads``). The pruning record is
    dropped; the heads are renumbered ``0..Q-1``.

    Raises:
        PrunedModelError: the family derives its head size from the head count, or the layers kept different
            numbers of heads, or some layer kept none.
    """
    config = model.config
    stock_type = config.model_type.removeprefix(MODEL_TYPE_PREFIX)
    if stock_type not in STOCK_CONFIG_MODEL_TYPES:
        raise PrunedModelError(
            f"model_type {stock_type!r} cannot be saved as a stock config: its attention derives the head size "
            f"from hidden_size / num_attention_heads, so fewer heads in the config means other shapes. Only "
            f"{', '.join(STOCK_CONFIG_MODEL_TYPES)} can; save with stock=False (loads with trust_remote_code=True)"
        )
    adapter = get_adapter(model)
    counts = {
        (len(query), len(kv))
        for query, kv in zip(kept_heads_by_layer(model).values(), kept_kv_heads_by_layer(model).values(), strict=True)
    }
    if len(counts) != 1 or (0, 0) in counts:
        raise PrunedModelError(
            "a stock config has one number of query and key-value heads for every layer, but the layers kept "
            f"(query, key-value) heads {sorted(counts)}; prune every layer alike (and keep at least one head per "
            "layer), or save with stock=False"
        )
    ((query_heads, kv_heads),) = counts
    config_dict = config.to_dict()
    config_dict.pop(KEPT_HEADS_KEY, None)
    config_dict.pop(KEPT_KV_HEADS_KEY, None)
    config_dict.pop(LAYOUT_KEY, None)
    config_dict.pop("auto_map", None)
    config_dict["model_type"] = stock_type
    config_dict["architectures"] = _stock_architectures(config_dict)
    config_dict["head_dim"] = adapter.head_size(model)
    config_dict["num_attention_heads"] = query_heads
    if adapter.num_kv_heads_key is not None:
        config_dict[adapter.num_kv_heads_key] = kv_heads
    return config_dict
