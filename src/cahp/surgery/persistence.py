"""Saving and reloading pruned models.

Save a pruned model with :func:`cahp.surgery.autoload.save_pruned`: its folder names ``model_type``
``"cahp_<family>"`` and carries ``modeling_cahp.py``, so plain ``AutoModel...from_pretrained(folder)`` loads it
with cahp imported, and with ``trust_remote_code=True`` without cahp (see ``docs/loading.md``).

``model.save_pretrained(folder)`` alone (what earlier versions did) writes the smaller weights and the pruning
record (``cahp_kept_heads``, ``cahp_kept_kv_heads``) under the STOCK ``model_type``; a plain
``from_pretrained`` then builds the original shapes and refuses the weights (size-mismatch error).
:func:`load_pruned` reads both kinds of folder, and unpruned ones::

    from cahp.surgery import load_pruned
    model = load_pruned("runs/minilm-pruned")          # any from_pretrained keyword: dtype, device_map, ...

For a stock-``model_type`` pruned folder it runs the ordinary ``from_pretrained`` of ``config.architectures[0]``
through a throw-away subclass whose ``__init__`` shrinks the freshly built (meta-device) model to the recorded
structure BEFORE any weight is read, so transformers' own loading (key renames, shards, dtype, device map)
applies unchanged; the model is handed back as an instance of the original class. A ``cahp_`` folder loads
through its ``Cahp...`` class, which shrinks itself the same way. Any missing, unexpected or mis-shaped weight
is a :class:`~cahp.errors.PrunedModelError`; a malformed pruning record a :class:`~cahp.errors.PrunedRecordError`,
and weight files that cannot be read (cut short, garbage, a shard missing) an
:class:`~cahp.errors.UnreadableWeightsError` (:func:`check_weights_readable`, for pruned and dense folders alike).

Importing this module registers the ``Cahp...`` classes with transformers' Auto classes.
"""

from __future__ import annotations

import copy
import json
from os import PathLike
from pathlib import Path
from typing import Any, cast

import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from cahp.adapters import get_adapter
from cahp.errors import (
    CahpError,
    ModelNotFoundError,
    PrunedModelError,
    PrunedRecordError,
    PruningError,
    UnreadableWeightsError,
)
from cahp.surgery.autoload import register_auto_classes
from cahp.surgery.modeling_cahp import (  # cache: functools.cache, typed as keeping the signature
    CLASS_PREFIX,
    MODEL_TYPE_PREFIX,
    cache,
    pruned_model_class,
    record_problem,
)
from cahp.surgery.removal import KEPT_HEADS_KEY, KEPT_KV_HEADS_KEY, _check_structure, apply_kept_heads, is_pruned

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"


def load_pruned(path: str | PathLike[str], **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load a folder written by ``save_pretrained``, pruned or not, in eval mode.

    Args:
        path: folder (or hub id) with ``config.json`` and the weights.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``attn_implementation``,
            ``device_map``, ``config``, ...); ``ignore_mismatched_sizes`` and ``output_loading_info`` are
            not accepted for pruned folders.

    Raises:
        PrunedModelError: the weights do not match the structure recorded in ``config.json``.
        PrunedRecordError: the record of kept heads in ``config.json`` is malformed.
        UnreadableWeightsError: a weight file is cut short, garbage or missing (pruned or not).
        ModelNotFoundError: ``config.architectures`` names a class this transformers does not have.
    """
    config = from_pretrained_kwargs.get("config") or AutoConfig.from_pretrained(path)
    model_class = _model_class(config)
    check_weights_readable(path)
    if not is_pruned(config):
        try:
            return model_class.from_pretrained(path, **from_pretrained_kwargs)
        except SafetensorError as error:  # what the header check cannot see
            raise _unreadable(path, error) from error
    check_record(config, where=path)
    # a folder of save_pruned (model_type "cahp_..."): its classes shrink themselves; an older folder (stock
    # model_type, written by save_pretrained): a throw-away subclass shrinks the stock class
    is_pruned_type = config.model_type.startswith(MODEL_TYPE_PREFIX)
    loading_class = pruned_model_class(model_class) if is_pruned_type else _shrinking_subclass(model_class)
    for refused in ("ignore_mismatched_sizes", "output_loading_info"):
        if from_pretrained_kwargs.pop(refused, False):
            raise PrunedModelError(f"load_pruned checks every weight of a pruned folder; drop {refused}=True")
    try:
        model, info = cast(  # output_loading_info=True: (model, loading info)
            tuple[PreTrainedModel, dict[str, Any]],
            loading_class.from_pretrained(
                path, ignore_mismatched_sizes=True, output_loading_info=True, **from_pretrained_kwargs
            ),
        )
    except PruningError as error:
        raise PrunedRecordError(f"{path}: config.json records a structure the model cannot have: {error}") from error
    except (OSError, SafetensorError) as error:  # no weight file, or one cut short
        raise PrunedModelError(
            f"{path}: the weights of this pruned model cannot be read ({type(error).__name__}: {error}); the folder "
            "is incomplete: copy it again, or save the pruned model again with model.save_pretrained(folder)"
        ) from error
    if not is_pruned_type:
        model.__class__ = pruned_model_class(model_class)  # saves as a pruned folder of this version
    problems = [
        f"{key}: shape in file {list(found)} vs recorded structure {list(wanted)}"
        for key, found, wanted in info.get("mismatched_keys", [])
    ]
    problems += [f"{key}: missing from the file" for key in sorted(info.get("missing_keys", []))]
    problems += [f"{key}: in the file but not in the model" for key in sorted(info.get("unexpected_keys", []))]
    problems += list(info.get("error_msgs", []))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PrunedModelError(
            f"{path}: the weights do not match the pruned structure recorded in config.json "
            f"({KEPT_HEADS_KEY}): {shown}. The folder was changed after save_pretrained or mixes files of "
            "two models; save the pruned model again with model.save_pretrained(folder)."
        )
    return model


def check_weights_readable(folder: str | PathLike[str]) -> None:
    """Refuse, with one line, a model folder whose safetensors weights cannot be read: a file cut short (a copy or
    a save that did not finish), one that is no safetensors file, or a shard its index names but the folder lacks.
    Only the headers are read (cheap, whatever the model's size); a hub id or a folder without safetensors
    files passes.

    Raises:
        UnreadableWeightsError: which file is unreadable, and what to do.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    files = sorted(folder.glob("*.safetensors"))
    index = folder / SAFETENSORS_INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise _unreadable(folder, error, index) from error
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise _unreadable(folder, FileNotFoundError(f"shards {', '.join(missing)} are missing"), index)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (OSError, SafetensorError, ValueError) as error:
            raise _unreadable(folder, error, file) from error


def _unreadable(folder: Any, error: BaseException, file: Path | None = None) -> UnreadableWeightsError:
    what = f"{file.name} in {folder}" if file is not None else f"the weights in {folder}"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UnreadableWeightsError(
        f"{what} cannot be read ({type(error).__name__}: {reason}): the file is cut short or damaged, e.g. by a copy "
        "or a save that did not finish; copy the folder again, or save the model again"
    )


def check_record(config: PretrainedConfig, where: Any = "the model") -> None:
    """Refuse, with one line, a pruning record (``cahp_kept_heads``, ``cahp_kept_kv_heads``) that is not a map
    from the model's layers to distinct head numbers within its head counts.

    Raises:
        PrunedRecordError: what is wrong, and what to do.
    """
    try:
        adapter = get_adapter(config)
        heads, kv_heads = adapter.num_heads(config), adapter.num_kv_heads(config)
        layers = int(config.num_hidden_layers)
    except (CahpError, AttributeError, TypeError, ValueError):
        return  # the loader says what is wrong with such a config
    problem = record_problem(getattr(config, KEPT_HEADS_KEY), KEPT_HEADS_KEY, heads, layers)
    kv_record = getattr(config, KEPT_KV_HEADS_KEY, None)
    if problem is None and kv_record is not None:
        problem = record_problem(kv_record, KEPT_KV_HEADS_KEY, kv_heads, layers)
    if problem is not None:
        raise PrunedRecordError(
            f"{where}: {problem}; the record of kept heads in config.json is malformed (edited or cut), not the "
            "weights: restore config.json as cahp saved it, or save the pruned model again"
        )
    if adapter.uses_gqa(config):  # every kept key-value head with the same, non-zero number of its query heads
        kept = getattr(config, KEPT_HEADS_KEY)
        for layer in range(layers):
            query = sorted(kept.get(str(layer), range(heads)))
            kv = sorted((kv_record or {}).get(str(layer), range(kv_heads)))
            try:
                _check_structure(layer, query, kv, list(range(heads)), list(range(kv_heads)), heads, kv_heads)
            except PruningError as error:
                raise PrunedRecordError(
                    f"{where}: config.json records a structure the model cannot have: {error}; restore config.json "
                    "as cahp saved it, or save the pruned model again"
                ) from None


def _model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        # a model class: transformers types the mapping's values as (slow, fast) tokenizer pairs too
        return cast(type[PreTrainedModel], AutoModel._model_mapping[type(config)])
    model_class = getattr(transformers, architectures[0].removeprefix(CLASS_PREFIX), None)
    if model_class is None:
        raise ModelNotFoundError(
            f"config.architectures names {architectures[0]!r}, which transformers {transformers.__version__} "
            "does not provide; install a version that has it or load the model yourself and call prune_heads"
        )
    return model_class


@cache
def _shrinking_subclass(model_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``model_class`` whose ``__init__`` applies the pruning record of its config right after building."""

    def __init__(self: PreTrainedModel, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        record: dict[str, Any] = {key: getattr(config, key, None) for key in (KEPT_HEADS_KEY, KEPT_KV_HEADS_KEY)}
        pristine = copy.deepcopy(config)  # the record describes the result of surgery, not its input
        for key, value in record.items():
            if value is not None:
                delattr(pristine, key)
        model_class.__init__(self, pristine, *args, **kwargs)
        kept_kv = record[KEPT_KV_HEADS_KEY]
        apply_kept_heads(
            self,
            {int(layer): heads for layer, heads in record[KEPT_HEADS_KEY].items()},
            {int(layer): heads for layer, heads in kept_kv.items()} if kept_kv else None,
        )

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": __name__})


register_auto_classes()  # so that plain from_pretrained reads folders written by save_pruned
