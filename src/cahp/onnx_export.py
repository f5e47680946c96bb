"""``cahp export --format onnx``: a saved classifier (pruned or not) as one ONNX file, checked against PyTorch.

saved folder -> :func:`cahp.models.load_classifier` -> :func:`cahp.surgery.export_onnx` (dynamic batch and
sequence axes) -> one self-contained ``.onnx`` file whose dynamic axes are named ``batch`` and ``sequence`` ->
optionally ONNX Runtime's graph optimizations
(``ORT_ENABLE_ALL``) saved as the model -> ONNX Runtime runs the file on real tokenized batches of other sizes
than the export example, and the largest absolute logit difference to PyTorch must stay within a tolerance ->
the file is written atomically (:func:`cahp.outputs.atomic_write`), so an error leaves no file and an earlier
one untouched. A full disk (or a folder without write permission) is reported as such, with the space needed.

An optimized graph may contain fusions for the CPU it was optimized on (ONNX Runtime's own caveat for
``ORT_ENABLE_ALL``); export without ``--optimize`` for a file to run on other hardware.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cahp.errors import CahpError

#: The packages the export needs, all in the ``onnx`` extra.
ONNX_PACKAGES: tuple[str, ...] = ("onnx", "onnxruntime", "onnxscript")

#: Default limit of the largest absolute logit difference between ONNX Runtime and PyTorch (fp32).
DEFAULT_TOLERANCE = 1e-4

#: Tokens per example of the longest check batch when no ``max_length`` is given (capped by the model's limit).
DEFAULT_CHECK_LENGTH = 128

#: The names of the graph inputs' dynamic axes, in axis order (every input is ``[batch, sequence]``).
AXIS_NAMES: tuple[str, ...] = ("batch", "sequence")

#: Errors of a write that failed for lack of space: no space left, or the disk quota exceeded.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Errors of a write that the file system refused: no permission, or a read-only file system.
_NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

#: Sentences of different lengths for the export example and the checks (any text model's tokenizer reads them).
_TEXTS: tuple[str, ...] = (
    "A gripping, beautifully acted film.",
    "The plot wanders and the jokes fall flat, but the music is lovely.",
    "Bad.",
    "I expected far more from a director with such a strong record, and left before the end.",
    "Fine.",
    "An honest, warm story about two brothers who have not spoken in years.",
    "Nothing here works: not the script, not the acting, not even the scenery.",
)


class OnnxExportError(CahpError):
    """An ONNX export that cannot be done or does not match PyTorch (the message says what to do)."""


@dataclass(frozen=True)
class ExportCheck:
    """One comparison of ONNX Runtime with PyTorch: a batch of ``batch_size`` x ``seq_len`` tokens."""

    batch_size: int
    seq_len: int
    max_abs_diff: float


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_classifier` wrote and how it was checked.

    Attributes:
        path: the written ``.onnx`` file.
        model: the exported folder (or alias/hub id).
        input_names: the graph's inputs, in order (each ``[batch, seq]`` int64).
        opset: the ONNX opset of the default domain in the written file.
        optimized: whether ONNX Runtime's ``ORT_ENABLE_ALL`` graph is what was written.
        pruned: whether the model has removed heads.
        checks: the ONNX Runtime vs PyTorch comparisons (other batch sizes and lengths than the export's).
        tolerance: the largest absolute logit difference accepted.
        size_bytes: the file's size.
    """

    path: Path
    model: str
    input_names: tuple[str, ...]
    opset: int
    optimized: bool
    pruned: bool
    checks: tuple[ExportCheck, ...]
    tolerance: float
    size_bytes: int

    @property
    def max_abs_diff(self) -> float:
        return max(check.max_abs_diff for check in self.checks)


def check_onnx_packages() -> None:
    """Refuse early, in one line, when a package of the ``onnx`` extra is missing.

    Raises:
        OnnxExportError: names the missing packages and the extra to install.
    """
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxExportError(f"ONNX export needs {', '.join(missing)} (not installed): pip install 'cahp[onnx]'")


def check_output_file(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a bad ``--out`` (:func:`cahp.outputs.check_output_file`, for ``.onnx``).

    Raises:
        OnnxExportError: what is wrong with ``out`` and what to do.
    """
    from cahp.outputs import check_output_file as check_file

    return check_file(out, overwrite, ".onnx", "ONNX Runtime", OnnxExportError)


def export_classifier(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    optimize: bool = False,
    opset: int | None = None,
    max_length: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> ExportResult:
    """Export a saved sequence classifier (pruned or not) to one ONNX file checked against PyTorch.

    Args:
        model: a folder cahp can load (:func:`cahp.models.load_classifier`: fine-tuned or pruned), or an
            alias/hub id of a classifier.
        out: the ``.onnx`` file to write (its folder is created); the weights are inside it.
        optimize: save ONNX Runtime's ``ORT_ENABLE_ALL`` optimized graph instead of the exported one.
        opset: the ONNX opset; ``None``: the exporter's default.
        max_length: tokens per example of the check batches (one check pads to exactly this length); ``None``:
            128, or the model's limit when that is lower. The graph itself takes any length up to the limit.
        tolerance: the largest absolute logit difference between ONNX Runtime and PyTorch accepted.
        overwrite: replace an existing ``out``.

    Returns:
        What was written and how it was checked.

    Raises:
        OnnxExportError: a missing package, a bad ``out``, a model that is not a classifier, an export that
            fails, or outputs that differ from PyTorch by more than ``tolerance`` (then nothing is written).
        ConfigError: ``max_length`` above the model's limit.
    """
    check_onnx_packages()
    if not tolerance > 0:
        raise OnnxExportError(f"tolerance must be above 0, got {tolerance!r}")
    path = check_output_file(out, overwrite)
    import torch

    from cahp.models import (
        check_max_length,
        is_classifier_config,
        load_classifier,
        load_model_config,
        model_max_length,
    )
    from cahp.outputs import atomic_write
    from cahp.surgery import export_onnx
    from cahp.surgery.removal import is_pruned

    if not is_classifier_config(load_model_config(model)):
        raise OnnxExportError(
            f"{model} is not a sequence classifier (its config names no ...ForSequenceClassification "
            "architecture): fine-tune it first with `cahp finetune`, then export the fine-tuned folder"
        )
    classifier, tokenizer = load_classifier(model)
    classifier.cpu().eval()
    if max_length is None:
        max_length = min(DEFAULT_CHECK_LENGTH, model_max_length(classifier.config, tokenizer) or DEFAULT_CHECK_LENGTH)
    check_max_length(max_length, classifier, tokenizer)
    accepted = set(inspect.signature(classifier.forward).parameters)

    def batch(texts: tuple[str, ...], padding: str | bool) -> dict[str, torch.Tensor]:
        encoded = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return {name: tensor for name, tensor in encoded.items() if name in accepted}

    example = batch(_TEXTS[:4], True)
    checks = [batch(_TEXTS[4:], True), batch(_TEXTS[:2], "max_length")]
    folder = _existing_parent(path)
    # at the peak the scratch folder holds the exported graph, its single-file copy (and the optimized graph)
    # while the final copy is written: each about the size of the weights
    needed_bytes = (3 + int(optimize)) * sum(t.numel() * t.element_size() for t in classifier.state_dict().values())
    try:
        with tempfile.TemporaryDirectory(prefix=".cahp-export-", dir=folder) as scratch:
            exported = Path(scratch) / "exported" / "model.onnx"
            try:
                export_onnx(classifier, exported, example, opset_version=opset)
            except Exception as error:  # torch.export / onnxscript raise many types; the first line says what
                _raise_if_unwritable(error, folder, path, needed_bytes, guess=True)
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise OnnxExportError(
                    f"ONNX export of {model} failed ({type(error).__name__}: {first_line}); "
                    "try another --opset, or report the model type"
                ) from error
            candidate = _single_file(exported, Path(scratch) / "model.onnx")
            if optimize:
                try:
                    candidate = _ort_optimize(candidate, Path(scratch) / "optimized.onnx")
                except Exception as error:  # ONNX Runtime's writer reports a full disk without an errno
                    _raise_if_unwritable(error, folder, path, needed_bytes, guess=True)
                    raise
            results = tuple(_compare(classifier, candidate, inputs) for inputs in checks)
            worst = max(check.max_abs_diff for check in results)
            if not worst <= tolerance:  # NaN fails too
                raise OnnxExportError(
                    f"ONNX Runtime's logits differ from PyTorch's by up to {worst:.3g} (tolerance {tolerance:g}); "
                    "nothing was written. Export without --optimize, try another --opset, or raise --tolerance if "
                    "the difference is expected"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda temporary: shutil.copyfile(candidate, temporary))
    except CahpError:
        raise
    except Exception as error:  # a write of the scratch files or of the result
        _raise_if_unwritable(error, folder, path, needed_bytes)
        raise
    return ExportResult(
        path=path,
        model=str(model),
        input_names=tuple(example),
        opset=_default_opset(path),
        optimized=optimize,
        pruned=is_pruned(classifier),
        checks=results,
        tolerance=tolerance,
        size_bytes=path.stat().st_size,
    )


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above ``path`` (the scratch folder goes there: same disk, no large copies)."""
    parent = path.parent.resolve()
    while not parent.is_dir():
        parent = parent.parent
    return parent


def _raise_if_unwritable(
    error: BaseException, folder: Path, path: Path, needed_bytes: int, *, guess: bool = False
) -> None:
    """Raise a one-line :class:`OnnxExportError` when ``error`` (or an error it came from) is a write that failed
    for lack of space or permission in ``folder``; return otherwise.

    A full disk is recognised by its errno (``ENOSPC``, ``EDQUOT``) or by the system's message inside another
    error's text (the exporter and ONNX Runtime re-raise it as their own); with ``guess``, for a step that mostly
    writes (the export, ONNX Runtime's optimization), also by less free space in ``folder`` than the export needs
    (``needed_bytes``), for errors that lost both.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    errnos = {cause.errno for cause in chain if isinstance(cause, OSError)}
    needed_mb = math.ceil(needed_bytes / 1e6)
    if errnos & _DISK_FULL_ERRNOS or any("no space left on device" in str(cause).lower() for cause in chain):
        full = True
    elif guess:
        try:
            full = shutil.disk_usage(folder).free < needed_bytes
        except OSError:
            full = False
    else:
        full = False
    if full:
        raise OnnxExportError(
            f"no space left on device at {folder} while exporting {path.name} (it needs about {needed_mb} MB free "
            "there while it works); free space or choose another --out"
        ) from error
    refused = next((c for c in chain if isinstance(c, OSError) and c.errno in _NOT_WRITABLE_ERRNOS), None)
    if refused is not None:
        where = refused.filename or folder
        raise OnnxExportError(f"cannot write {where}: {refused.strerror}; choose another --out") from error


def _name_dynamic_axes(graph: Any) -> None:
    """Rename the exporter's symbols of the inputs' dynamic axes (``s0``, ``s87``, ...) to :data:`AXIS_NAMES`
    (``batch``, ``sequence``) everywhere in ``graph`` (an ``onnx.GraphProto``): inputs, outputs, value infos."""
    renames: dict[str, str] = {}
    for value in graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, AXIS_NAMES, strict=False):
            if dim.dim_param:  # the exporter may give each input's batch axis its own symbol: all are one size
                renames.setdefault(dim.dim_param, name)
    if not renames:
        return
    symbol = re.compile(r"[A-Za-z_]\w*")
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:  # may be an expression of symbols, e.g. "s87*4"
                    dim.dim_param = symbol.sub(lambda found: renames.get(found[0], found[0]), dim.dim_param)


def _single_file(exported: Path, target: Path) -> Path:
    """``exported`` (whose weights may sit in a ``.data`` file beside it) rewritten as one file ``target``, with
    its dynamic axes named ``batch`` and ``sequence``."""
    import onnx

    proto = onnx.load(str(exported), load_external_data=True)
    _name_dynamic_axes(proto.graph)
    try:
        onnx.save_model(proto, str(target), save_as_external_data=False)
    except ValueError as error:  # protobuf's 2 GB limit
        raise OnnxExportError(
            f"the exported graph does not fit in one ONNX file ({error}); models above 2 GB are not supported"
        ) from error
    return target


def _ort_optimize(source: Path, target: Path) -> Path:
    """ONNX Runtime's ``ORT_ENABLE_ALL`` graph of ``source``, saved to ``target``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # its hardware-specific-graph warning is in the module docstring and the help
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    if not target.is_file():
        raise OnnxExportError(f"ONNX Runtime wrote no optimized graph for {source}; export without --optimize")
    return target


def _compare(model: Any, onnx_file: Path, inputs: dict[str, Any]) -> ExportCheck:
    """Run ``onnx_file`` in ONNX Runtime and ``model`` in PyTorch on ``inputs`` (``[batch, seq]`` tensors)."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.no_grad():
        torch_logits = model(**inputs).logits.numpy()
    if onnx_logits.shape != torch_logits.shape:
        raise OnnxExportError(
            f"ONNX Runtime returned logits of shape {onnx_logits.shape}, PyTorch {torch_logits.shape}: the graph "
            "did not keep dynamic batch and sequence axes; report the model type"
        )
    batch_size, seq_len = next(iter(inputs.values())).shape
    return ExportCheck(int(batch_size), int(seq_len), float(np.abs(onnx_logits - torch_logits).max()))


def _default_opset(path: Path) -> int:
    """The opset of the default ONNX domain recorded in ``path``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)


def describe(result: ExportResult) -> str:
    """A few lines for the terminal."""
    checks = ", ".join(f"{c.batch_size}x{c.seq_len} tokens: {c.max_abs_diff:.2e}" for c in result.checks)
    kind = "ORT_ENABLE_ALL-optimized graph" if result.optimized else "graph"
    return "\n".join(
        [
            f"ONNX Runtime vs PyTorch, max abs logit diff {result.max_abs_diff:.2e} "
            f"(tolerance {result.tolerance:g}; {checks})",
            f"saved {result.path} ({result.size_bytes / 1e6:.1f} MB, {kind}, opset {result.opset}, inputs "
            f"{', '.join(result.input_names)} [batch, sequence], {'pruned' if result.pruned else 'dense'} model)",
        ]
    )
