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

A model pruned by :func:`~cahp.surgery.prune_heads` gets the ``Cahp...`` subclass of its stock class (and a
``cahp_layout`` in its config), whose ``save_pretrained`` writes the same folder, so the transformers habit
``prune_heads(model, ...); model.save_pretrained(folder)`` gives a folder that loads like the others.

Folders written by ``model.save_pretrained`` in earlier cahp versions claim the stock ``model_type``; plain
``from_pretrained`` refuses them (:class:`~cahp.errors.OldPrunedFolderError`, pointing here, once cahp is
imported), :func:`~cahp.surgery.load_pruned` reads them, and :func:`upgrade_pruned_folder` rewrites their
``config.json`` in place (the weights stay as they are).

Every folder :func:`save_pruned` writes is shareable as it is: it is written to a hidden ``.<name>.saving`` folder
beside it first (a full disk leaves no half-written model, :class:`~cahp.errors.DiskFullError`), and no file in it
names a local path (:func:`make_shareable`).

``save_pruned(..., dtype=torch.bfloat16)`` writes the weights in another floating dtype without changing the model in
memory, and ``config.json`` records it (``from_pretrained`` loads the folder in that dtype); :func:`resolve_save_dtype`
says which dtype ``cahp prune --dtype auto`` means for a model (the one it came in).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from cahp.adapters import ArchitectureAdapter, get_adapter, register_adapter, supported_model_types
from cahp.errors import CahpError, DiskFullError, OldPrunedFolderError, PrunedModelError, is_disk_full
from cahp.models import ModelSource, load_model_config, resolve_model
from cahp.surgery import modeling_cahp
from cahp.surgery.modeling_cahp import (
    AUTO_MODEL_CLASSES,
    CLASS_PREFIX,
    LAYOUT_KEY,
    MODEL_TYPE_PREFIX,
    MODELING_FILE,
    pruned_config_class,
    pruned_folder_config,
    pruned_model_class,
    stock_model_classes,
)
from cahp.surgery.removal import (
    KEPT_HEADS_KEY,
    KEPT_KV_HEADS_KEY,
    is_pruned,
    kept_heads_by_layer,
    kept_kv_heads_by_layer,
)

__all__ = [
    "AUTO_MODEL_CLASSES",
    "MODELING_FILE",
    "SAVE_DTYPES",
    "STOCK_CONFIG_MODEL_TYPES",
    "SaveDtype",
    "adopt_pruned_classes",
    "cast_for_saving",
    "folder_bytes",
    "layout_of",
    "make_shareable",
    "register_auto_classes",
    "resolve_save_dtype",
    "save_pruned",
    "saved_dtype_record",
    "shareable_name",
    "source_dtype",
    "stock_config_dict",
    "upgrade_pruned_folder",
]

#: Families whose attention reads ``head_dim`` from the config instead of deriving it from the head count
#: (Llama-style decoders, and ViT in transformers 5): a uniform prune of them is again a stock model (see
#: docs/loading.md for why the others are not).
STOCK_CONFIG_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma3_text", "vit")

#: Files of a saved folder that hold settings (not a vocabulary), checked for local paths by :func:`make_shareable`.
SETTINGS_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)
#: Weight files ``save_pretrained`` writes (an earlier save's are replaced, not mixed with the new ones).
_WEIGHT_PATTERNS: tuple[str, ...] = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*")
_registered: set[str] = set()
_hint_installed: list[bool] = []


# ---- registration ------------------------------------------------------------------------------------------


def register_auto_classes() -> list[str]:
    """Register the pruned config and model classes of every family with an adapter (idempotent), and make plain
    ``from_pretrained`` of an earlier version's pruned folder say how to convert it (:class:`OldPrunedFolderError`).

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
        for auto_name, stock_model in stock_model_classes(stock_config).items():
            getattr(transformers, auto_name).register(config_class, pruned_model_class(stock_model), exist_ok=True)
        _registered.add(model_type)
    _install_old_folder_hint()
    return sorted(MODEL_TYPE_PREFIX + model_type for model_type in _registered)


def adopt_pruned_classes(model: PreTrainedModel) -> PreTrainedModel:
    """Give a model that was just pruned what makes its ``save_pretrained`` write a pruned folder: ``cahp_layout``
    in its config and, for a model of a stock transformers class, the ``Cahp...`` subclass of that class (same
    behaviour; ``isinstance`` holds). A model of any other class (a user's subclass, remote code) keeps it:
    save it with :func:`save_pruned`."""
    stock_type = model.config.model_type.removeprefix(MODEL_TYPE_PREFIX)
    setattr(model.config, LAYOUT_KEY, layout_of(get_adapter(stock_type), model.config))
    cls = type(model)
    if cls.__module__.startswith("transformers.") and stock_type in CONFIG_MAPPING:
        model.__class__ = pruned_model_class(cls)
    return model


def _install_old_folder_hint() -> None:
    """Wrap transformers' loading report so that a stock class given a pruned folder of an earlier version raises
    :class:`OldPrunedFolderError` (pointing to :func:`upgrade_pruned_folder`) instead of the size-mismatch error
    that suggests ``ignore_mismatched_sizes=True``. Nothing happens where transformers has no such report."""
    from transformers import modeling_utils

    report = getattr(modeling_utils, "log_state_dict_report", None)
    if _hint_installed or report is None:
        return

    def log_state_dict_report(model: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        loading_info = kwargs.get("loading_info", args[1] if len(args) > 1 else None)
        _refuse_old_pruned_folder(model, pretrained_model_name_or_path, loading_info)
        return report(model, pretrained_model_name_or_path, *args, **kwargs)

    log_state_dict_report.__doc__ = report.__doc__
    modeling_utils.log_state_dict_report = log_state_dict_report
    _hint_installed.append(True)


def _refuse_old_pruned_folder(model: Any, path: Any, loading_info: Any) -> None:
    """Raise :class:`OldPrunedFolderError` when a stock class is loading a pruned folder of an earlier version and
    the weights do not fit it (which they never do once heads are gone)."""
    config = getattr(model, "config", None)
    if (
        config is None
        or getattr(config, KEPT_HEADS_KEY, None) is None
        or str(getattr(config, "model_type", "")).startswith(MODEL_TYPE_PREFIX)
        or type(model).__module__ == "cahp.surgery.persistence"  # load_pruned's own loader checks by itself
    ):
        return
    mismatched = bool(getattr(loading_info, "mismatched_keys", None)) or any(
        "size mismatch" in str(message) for message in getattr(loading_info, "error_msgs", None) or []
    )
    if mismatched:
        stock = type(model).__name__.removeprefix(CLASS_PREFIX)
        raise OldPrunedFolderError(
            f"{path} holds a model pruned by an earlier cahp version (model_type {config.model_type!r} with "
            f"{KEPT_HEADS_KEY}), which the stock {stock} cannot load: convert the folder once with "
            f"cahp.surgery.autoload.upgrade_pruned_folder({str(path)!r}), or load it with cahp.load_pruned; "
            "do not pass ignore_mismatched_sizes=True, which replaces the pruned attention weights with random ones"
        )


# ---- saving ------------------------------------------------------------------------------------------------


def save_pruned(
    model: PreTrainedModel,
    folder: str | PathLike[str],
    *,
    stock: bool = False,
    tokenizer: Any = None,
    name_or_path: str | None = None,
    dtype: torch.dtype | str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save a (pruned) model so that plain ``from_pretrained`` loads it, with or without cahp.

    Everything is written to a hidden ``.<name>.saving`` folder beside ``folder`` and moved into ``folder`` only
    once complete (``config.json`` last), so a full disk or a killed process never leaves a folder that looks
    complete; other files already in ``folder`` stay. The folder names no local path (:func:`make_shareable`).

    Args:
        model: any model with an adapter; pruned or not (an unpruned one is saved as it is).
        folder: where to write ``config.json``, the weights and ``modeling_cahp.py``.
        stock: write a stock config (no custom code) instead; needs a Llama-family or ViT model whose layers all
            kept the same, non-zero numbers of query and key-value heads.
        tokenizer: saved into the same folder, in the same step, when given.
        name_or_path: what ``config.json`` names the model as (``_name_or_path``): its alias or Hub id, say;
            default: :func:`shareable_name` of the one the model was loaded from.
        dtype: the floating dtype the weights are written in (a ``torch.dtype`` or a name of :data:`SAVE_DTYPES`),
            recorded as ``config.json``'s ``dtype`` so that ``from_pretrained`` loads them in it; ``model`` itself is
            not changed (its tensors are cast for the write and put back). ``None``: as the model is.
        **save_kwargs: passed to ``model.save_pretrained`` (``safe_serialization``, ``max_shard_size``, ...).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        PrunedModelError: ``stock=True`` for a model that no stock config describes (the message says why), or a
            weight beyond ``dtype``'s range (float16: 65504).
        CahpError: ``dtype`` is no floating dtype of :data:`SAVE_DTYPES`.
        DiskFullError: the disk filled up; nothing of this save is left behind.
    """
    folder = Path(folder)
    target = _save_dtype(dtype)
    stock_dict = stock_config_dict(model) if stock else None  # checked before anything is written
    staging = folder.parent / f".{folder.name}.saving"
    try:
        if staging.exists():
            shutil.rmtree(staging)  # left by a save that was killed
        with cast_for_saving(model, target):
            saved_dtype = str(model.dtype).removeprefix("torch.")
            staging.mkdir(parents=True)
            model.save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        if stock_dict is not None:
            stock_dict.pop("torch_dtype", None)
            stock_dict["dtype"] = saved_dtype  # what save_pretrained wrote: the weights' dtype
            config_path.write_text(json.dumps(stock_dict, indent=2, sort_keys=True) + "\n")
            (staging / MODELING_FILE).unlink(missing_ok=True)
        elif is_pruned(model):
            config_dict = _pruned_config_dict(json.loads(config_path.read_text()))
            config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(modeling_cahp.__file__, staging / MODELING_FILE)
        make_shareable(staging, name_or_path or shareable_name(getattr(model.config, "_name_or_path", "")))
        _move_into_place(staging, folder, remove=() if stock_dict is None else (MODELING_FILE,))
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise disk_full_error(folder, _state_bytes(model, target)) from error
        raise
    return folder


def disk_full_error(folder: Path, needed_bytes: int) -> DiskFullError:
    """The one-line error for a disk that filled up while about ``needed_bytes`` were written into ``folder``."""
    megabyte = 2**20
    free = _free_bytes(folder)
    missing = max(needed_bytes - free, 0) if free is not None else needed_bytes
    free_text = f", {free // megabyte} MB free" if free is not None else ""
    return DiskFullError(
        f"no space left on device at {folder} (the model needs about {math.ceil(needed_bytes / megabyte)} MB"
        f"{free_text}); free {max(math.ceil(missing / megabyte), 1)} MB or choose another --out "
        "(the unfinished run is kept: the same command resumes it)"
    )


def _free_bytes(folder: Path) -> int | None:
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        return shutil.disk_usage(ancestor).free
    except OSError:
        return None


def _state_bytes(model: PreTrainedModel, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's weights and buffers (what its weight files hold, headers aside), its floating tensors
    counted in ``dtype`` when given."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(
        tensor.numel() * (dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size())
        for tensor in tensors
    )


def _move_into_place(staging: Path, folder: Path, remove: tuple[str, ...] = ()) -> None:
    """Move the files of ``staging`` into ``folder`` (renamed as a whole when ``folder`` does not exist); weight
    files of an earlier save and the ``remove`` files go; ``config.json`` comes last."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    new = {path.name for path in staging.iterdir()}
    for pattern in _WEIGHT_PATTERNS:
        for old in folder.glob(pattern):
            if old.name not in new and old.is_file():
                old.unlink()
    for name in remove:
        (folder / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == "config.json"):
        target = folder / path.name
        if target.is_dir() and not path.is_dir():
            shutil.rmtree(target)
        if path.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
    staging.rmdir()


# ---- the dtype of a saved folder ---------------------------------------------------------------------------

#: The floating dtypes a folder can be saved in (``cahp prune --dtype``), by name; ``auto`` is
#: :func:`resolve_save_dtype`'s.
SAVE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The dtypes of the plain float tensor types, by their name in safetensors headers and GGUF files alike.
_FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class SaveDtype:
    """The dtype a pruned model is saved in, and why (one line, for the report's ``export`` record)."""

    dtype: torch.dtype
    why: str

    @property
    def name(self) -> str:
        """``"bfloat16"``: the name ``config.json`` records."""
        return str(self.dtype).removeprefix("torch.")


def _save_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a ``torch.dtype`` of :data:`SAVE_DTYPES` (``None`` stays ``None``).

    Raises:
        CahpError: anything else, naming the dtypes there are.
    """
    if dtype is None:
        return None
    found = SAVE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in SAVE_DTYPES.values():
        raise CahpError(f"a model is saved in one of {', '.join(SAVE_DTYPES)}, got dtype {dtype!r}")
    return found


@contextmanager
def cast_for_saving(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[torch.nn.Module]:
    """Within the block, ``model``'s floating parameters and persistent buffers hold copies cast to ``dtype``;
    after it (an error too) they hold the very tensors they held before, and ``config.dtype`` its value (which
    ``save_pretrained`` overwrites), so the model computes exactly as before. ``None``: nothing is cast.

    Raises:
        PrunedModelError: a finite weight that ``dtype`` cannot hold (beyond float16's 65504, say); nothing is
            left cast.
    """
    config = getattr(model, "config", None)
    config_dtype = getattr(config, "dtype", None)
    parameters: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        if dtype is not None:
            for module_name, module in model.named_modules():
                for name, parameter in module._parameters.items():
                    if parameter is None or id(parameter) in seen or not parameter.is_floating_point():
                        continue
                    seen.add(id(parameter))  # a tied weight is cast once, and stays tied
                    if parameter.dtype != dtype:
                        original = parameter.data
                        parameter.data = _cast(original, dtype, f"{module_name}.{name}".lstrip("."))
                        parameters.append((parameter, original))
                for name, buffer in module._buffers.items():
                    if buffer is None or name in module._non_persistent_buffers_set or not buffer.is_floating_point():
                        continue
                    if buffer.dtype != dtype:
                        module._buffers[name] = _cast(buffer, dtype, f"{module_name}.{name}".lstrip("."))
                        buffers.append((module._buffers, name, buffer))
        yield model
    finally:
        for parameter, original in parameters:
            parameter.data = original
        for owner, name, buffer in buffers:
            owner[name] = buffer
        if config is not None:
            config.dtype = config_dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``tensor`` cast to ``dtype`` (a copy).

    Raises:
        PrunedModelError: a finite value became infinite (beyond ``dtype``'s range).
    """
    cast = tensor.detach().to(dtype)
    if bool((cast.isinf() & tensor.isfinite()).any()):
        largest = float(tensor.detach().abs().max())
        raise PrunedModelError(
            f"{name} holds a weight of magnitude {largest:.4g}, beyond {str(dtype).removeprefix('torch.')}'s "
            f"range ({torch.finfo(dtype).max:.4g}): save in bfloat16 (float32's range) or float32"
        )
    return cast


def source_dtype(model: str | PathLike[str] | ModelSource) -> SaveDtype:
    """The floating dtype a model came in, read without loading it: its ``config.json``'s ``dtype`` (or
    ``torch_dtype``), else the float type of its safetensors weights (a half type where there is one: the float32
    tensors beside it are norms), and for a GGUF file the float type of its tensors (the same way).

    A GGUF file of quantized blocks (``smollm2-135m``: Q4_1) has no float dtype; transformers de-quantizes it to the
    float32 the run evaluates, so that is the answer, with why. So is float32 for a model that records no dtype (a
    ``pytorch_model.bin`` without one): the dtype transformers loads it in.

    Raises:
        ModelNotFoundError: the model cannot be resolved or its config read.
    """
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    if source.gguf_file is not None:
        return _gguf_dtype(Path(source.location) / source.gguf_file)
    recorded = getattr(load_model_config(source), "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    if isinstance(recorded, torch.dtype) and recorded.is_floating_point:
        if recorded in SAVE_DTYPES.values():
            return SaveDtype(recorded, "auto: the dtype of the model's config.json")
        return SaveDtype(torch.float32, f"auto: the model's config.json says {recorded}, not a dtype cahp saves in")
    stored = _safetensors_dtype(Path(source.location)) if source.is_local else None
    if stored is not None:
        return SaveDtype(stored, "auto: the dtype of the model's weight files (its config.json records none)")
    return SaveDtype(torch.float32, "auto: the model records no dtype: float32, the dtype transformers loads it in")


def _float_type(names: Iterable[Any]) -> torch.dtype | None:
    """The dtype of a checkpoint whose tensors have the types ``names`` (as :data:`_FLOAT_TYPES` names them; other
    types are ignored): a half type where there is one (its float32 tensors are the norms), else float32; ``None``
    when none is a float type."""
    present = {_FLOAT_TYPES[name] for name in names if name in _FLOAT_TYPES}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        if dtype in present:
            return dtype
    return None


def _safetensors_dtype(folder: Path) -> torch.dtype | None:
    """The float type of a folder's safetensors weights (the first shard's), or ``None`` where it has none."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            first = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
            path = folder / first
        else:
            path = folder / "model.safetensors"
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return _float_type(entry.get("dtype") for key, entry in header.items() if key != "__metadata__")


def _gguf_dtype(path: Path) -> SaveDtype:
    """The float type of a GGUF file's tensors; float32 for a file of quantized blocks, saying so."""
    try:
        from gguf import GGUFReader

        types = Counter(tensor.tensor_type.name for tensor in GGUFReader(path).tensors)
    except Exception as error:  # gguf missing, or a file it cannot read: what the run loaded is float32
        return SaveDtype(torch.float32, f"auto: the GGUF file's tensor types cannot be read ({error}): float32")
    quantized = Counter({name: count for name, count in types.items() if name not in _FLOAT_TYPES})
    if quantized:
        kind = quantized.most_common(1)[0][0]
        return SaveDtype(
            torch.float32,
            f"auto: the model came as a quantized GGUF file ({kind} blocks), which has no float dtype to keep: "
            "float32, the dtype it was de-quantized to and evaluated in (--dtype bfloat16 halves the folder)",
        )
    found = _float_type(types) or torch.float32
    return SaveDtype(found, "auto: the float type of the model's GGUF file")


def resolve_save_dtype(setting: str, model: str | PathLike[str] | ModelSource) -> SaveDtype:
    """The dtype ``cahp prune --dtype setting`` saves ``model``'s pruned folder in: ``auto``: :func:`source_dtype`;
    a name of :data:`SAVE_DTYPES`: that one.

    Raises:
        CahpError: another setting, naming the ones there are.
    """
    if setting == "auto":
        return source_dtype(model)
    if setting not in SAVE_DTYPES:
        raise CahpError(f"dtype must be one of auto, {', '.join(SAVE_DTYPES)}, got {setting!r}")
    return SaveDtype(SAVE_DTYPES[setting], "--dtype")


def folder_bytes(folder: str | PathLike[str]) -> int:
    """The bytes of the files under ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def saved_dtype_record(folder: str | PathLike[str], saved: SaveDtype) -> dict[str, Any]:
    """What the report's ``export`` record says about a folder saved in ``saved``: the dtype, why, and the size."""
    size = folder_bytes(folder)
    return {"dtype": saved.name, "dtype_why": saved.why, "size_bytes": size, "size_mb": round(size / 2**20, 1)}


# ---- shareable folders -------------------------------------------------------------------------------------


def shareable_name(name_or_path: str | PathLike[str] | None) -> str:
    """What a shared folder may call a model: a Hub id or alias as it is; a local folder by its own name
    (``/home/me/runs/minilm-sst5`` -> ``minilm-sst5``); ``""`` for nothing."""
    text = str(name_or_path or "").rstrip("/")
    if not text:
        return ""
    if _is_local_path(text) or Path(text).expanduser().exists() or ("/" in text and text.startswith(".")):
        return Path(text).expanduser().name
    return text


def _is_local_path(text: str) -> bool:
    """Whether ``text`` names a path on this machine: anything naming the home folder, or an absolute or ``~`` path
    without spaces (a template such as ``"/ {{x}}"`` is no path)."""
    if not text or "\n" in text or len(text) > 4096:
        return False
    home = str(Path.home())
    if len(home) > 1 and home in text:
        return True
    return (os.path.isabs(text) or text.startswith("~")) and not any(character.isspace() for character in text)


def make_shareable(folder: str | PathLike[str], name_or_path: str = "") -> None:
    """Remove what a saved model folder says about the machine it was made on.

    In the settings files (:data:`SETTINGS_FILES`): ``_name_or_path`` / ``name_or_path`` become ``name_or_path``
    (see :func:`shareable_name`), any other value that is a local path becomes that path's last part, and a
    ``config.json`` whose architectures are no classifier loses ``id2label`` / ``label2id`` (left there by a
    classifier it was loaded from). Vocabularies (``tokenizer.json``, ...) are not touched.
    """
    folder = Path(folder)
    for name in SETTINGS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(content, dict):
            continue
        cleaned = _without_local_paths(
            content, lambda key, value: name_or_path if key.endswith("name_or_path") else None
        )
        if name == "config.json":
            _drop_classifier_labels(cleaned)
        if cleaned != content:
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _without_local_paths(value: Any, named: Callable[[str, Any], str | None], key: str = "") -> Any:
    """``value`` (JSON) with every string that is a local path replaced: by ``named(key, value)`` when that is
    not ``None``, else by the path's last part."""
    if isinstance(value, dict):
        return {item_key: _without_local_paths(item, named, str(item_key)) for item_key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item, named, key) for item in value]
    if isinstance(value, str):
        replacement = named(key, value)
        if replacement is not None and (_is_local_path(value) or value == "" or Path(value).exists()):
            return replacement
        if _is_local_path(value):
            return Path(value).expanduser().name
    return value


def _drop_classifier_labels(config_dict: dict[str, Any]) -> None:
    names = config_dict.get("architectures") or []
    if names and not any("Classification" in name or name.endswith("ForMultipleChoice") for name in names):
        config_dict.pop("id2label", None)
        config_dict.pop("label2id", None)


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
    return pruned_folder_config({**config_dict, LAYOUT_KEY: layout_of(get_adapter(stock_type), config)})


def _stock_architectures(config_dict: dict[str, Any]) -> list[str] | None:
    """``architectures`` naming the stock classes (a model loaded through ``Cahp...`` classes saves those)."""
    names = config_dict.get("architectures")
    return [name.removeprefix(CLASS_PREFIX) for name in names] if names else names


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
    # a model read from a GGUF file (Gemma 3) has no architectures in its config: its own class is the one
    own_class = type(model).__name__.removeprefix(CLASS_PREFIX)
    config_dict["architectures"] = _stock_architectures(config_dict) or [own_class]
    _drop_classifier_labels(config_dict)
    config_dict["head_dim"] = adapter.head_size(model)
    config_dict["num_attention_heads"] = query_heads
    if adapter.num_kv_heads_key is not None:
        config_dict[adapter.num_kv_heads_key] = kv_heads
    _check_stock_config(config_dict, query_heads)
    return config_dict


def _check_stock_config(config_dict: dict[str, Any], query_heads: int) -> None:
    """Refuse a stock config that transformers' own config class would not load: Llama's and Gemma 3's check
    that ``hidden_size`` is a multiple of ``num_attention_heads``, although their attention reads ``head_dim``.

    Raises:
        PrunedModelError: the config class's complaint, in one line.
    """
    from huggingface_hub.errors import StrictDataclassError

    config_class = CONFIG_MAPPING[config_dict["model_type"]]
    try:
        config_class.from_dict({key: value for key, value in config_dict.items() if key != "model_type"})
    except (ValueError, TypeError, StrictDataclassError) as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise PrunedModelError(
            f"transformers' {config_class.__name__} refuses {query_heads} heads per layer ({reason}), so no stock "
            "config loads this model; keep a head count that divides hidden_size, or save with stock=False"
        ) from None
