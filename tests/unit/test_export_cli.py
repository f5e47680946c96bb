"""``cahp export --format onnx`` on tiny classifiers: pruned and dense folders, optimized graphs, refusals."""

from __future__ import annotations

import errno
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from cahp.cli import build_parser, main
from cahp.errors import ConfigError
from cahp.onnx_export import DEFAULT_TOLERANCE, OnnxExportError, export_classifier
from tests.conftest import tiny_bert_folder

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime, onnxscript) is needed")
pytest.importorskip("onnxscript", reason="the onnx extra (onnx, onnxruntime, onnxscript) is needed")

TEXTS = ["a quiet, lovely film", "bad", "the actors try hard but the plot never starts moving at all"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dense classifier and an unevenly pruned copy of it (one layer keeps a single head)."""
    from cahp.models import load_classifier
    from cahp.surgery import prune_heads
    from cahp.surgery.autoload import save_pruned

    root = tmp_path_factory.mktemp("export")
    dense = tiny_bert_folder(root / "dense", layers=2, heads=4, num_labels=3)
    model, tokenizer = load_classifier(dense)
    prune_heads(model, {0: [1, 2], 1: [0, 1, 3]})
    save_pruned(model, root / "pruned")
    tokenizer.save_pretrained(root / "pruned")
    return {"dense": dense, "pruned": root / "pruned"}


def onnx_matches_loaded_model(onnx_file: Path, folder: Path) -> None:
    """ONNX Runtime on the written file equals the folder's PyTorch model on a batch of another shape."""
    from cahp.models import load_classifier

    model, tokenizer = load_classifier(folder)
    batch = tokenizer(TEXTS * 2, padding="max_length", max_length=23, return_tensors="pt")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]
    (logits,) = session.run(None, {name: batch[name].numpy() for name in names})
    with torch.no_grad():
        expected = model(**{name: batch[name] for name in names}).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-5, rtol=0)


def test_pruned_folder_exports_and_matches_pytorch(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx" / "pruned.onnx"
    assert main(["export", "--model", str(folders["pruned"]), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs logit diff" in printed and "pruned model" in printed
    assert [p.name for p in out.parent.iterdir()] == ["pruned.onnx"], "one self-contained file, no leftovers"
    onnx_matches_loaded_model(out, folders["pruned"])
    import onnx

    graph = onnx.load(str(out)).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", "sequence"]] * len(graph.input) and len(dims) >= 2, "named dynamic axes"
    (logits,) = graph.output
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 3]


def test_dense_folder_exports_an_optimized_graph(folders: dict[str, Path], tmp_path: Path) -> None:
    result = export_classifier(folders["dense"], tmp_path / "dense.onnx", optimize=True, opset=18, max_length=40)
    assert result.optimized and not result.pruned and result.opset == 18
    assert [(c.batch_size, c.seq_len) for c in result.checks][-1] == (2, 40), "one check at --max-length"
    assert result.max_abs_diff <= DEFAULT_TOLERANCE
    onnx_matches_loaded_model(result.path, folders["dense"])


def test_a_graph_that_differs_from_pytorch_is_refused_and_nothing_written(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import copy

    import cahp.surgery

    real_export = cahp.surgery.export_onnx

    def export_other_weights(model, path, example_inputs, **kwargs):  # type: ignore[no-untyped-def]
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.classifier.bias += 0.01
        return real_export(other, path, example_inputs, **kwargs)

    monkeypatch.setattr(cahp.surgery, "export_onnx", export_other_weights)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    code = main(["export", "--model", str(folders["pruned"]), "--out", str(out), "--overwrite"])
    assert code == 1
    error = capsys.readouterr().err
    assert (
        "OnnxExportError" in error and "differ from PyTorch's by up to 0.01" in error and "nothing was written" in error
    )
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "no temporary file or scratch folder left"


@pytest.mark.parametrize("where", ["result", "export"])
def test_a_full_disk_is_reported_as_such_and_nothing_written(
    where: str,
    folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import cahp.surgery

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "result":  # the copy of the checked graph to --out
        monkeypatch.setattr(shutil, "copyfile", no_space)
    else:  # the exporter's own write, re-raised by torch as another error

        def export_fails(*args: object, **kwargs: object) -> None:
            try:
                no_space()
            except OSError as error:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from error

        monkeypatch.setattr(cahp.surgery, "export_onnx", export_fails)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    assert main(["export", "--model", str(folders["pruned"]), "--out", str(out), "--overwrite"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "OnnxExportError: no space left on device at " + str(tmp_path) in error
    assert "free space or choose another --out" in error and "MB free" in error and "--opset" not in error
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "no temporary file or scratch folder left"


def test_a_folder_without_write_permission_is_reported(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(source: object, target: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(shutil, "copyfile", refused)
    with pytest.raises(OnnxExportError, match=r"cannot write .*: Permission denied; choose another --out"):
        export_classifier(folders["pruned"], tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_missing_onnx_packages_name_the_extra(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a)
    )
    assert main(["export", "--model", str(folders["pruned"]), "--out", str(tmp_path / "m.onnx")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "onnxruntime" in error and "pip install 'cahp[onnx]'" in error
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("folder", "is a folder: give a file name"),
        ("exists", "exists: pass --overwrite"),
        ("suffix", "should end in .onnx"),
        ("base model", "is not a sequence classifier"),
    ],
)
def test_bad_requests_are_refused_before_export(
    case: str, message: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    model, out = folders["pruned"], tmp_path / "model.onnx"
    if case == "folder":
        out = tmp_path
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "suffix":
        out = tmp_path / "model.bin"
    else:
        model = tiny_bert_folder(tmp_path / "base", layers=1, heads=2)
    with pytest.raises(OnnxExportError, match=message):
        export_classifier(model, out)
    assert case != "exists" or out.read_bytes() == b"keep me"


def test_max_length_above_the_models_limit_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="64"):  # the tiny model has 64 positions
        export_classifier(folders["pruned"], tmp_path / "model.onnx", max_length=65)
    assert not (tmp_path / "model.onnx").exists()


def test_parser_defaults_match_the_api() -> None:
    args = build_parser().parse_args(["export", "--model", "m", "--out", "m.onnx"])
    assert (args.format, args.tolerance, args.optimize, args.opset, args.max_length) == (
        "onnx",
        DEFAULT_TOLERANCE,
        False,
        None,
        None,
    )
