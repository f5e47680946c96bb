"""Issue 33, item 1: ``cahp prune --dtype auto|float32|float16|bfloat16``. A pruned folder saved in float16 or bfloat16
holds weights of that dtype, its ``config.json`` says so, and ``from_pretrained`` gives the logits of the model cast to
that dtype, with cahp and without it, for a stock and an uneven (``cahp_``) causal LM and a classifier; the model in
memory is not changed by the save. ``auto`` keeps the dtype the model came in (a model saved in float16 stays
float16; a quantized GGUF file gives float32, saying why); a bad value is refused in one line before any work."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from cahp.cli import build_parser, main
from cahp.commands.prune import prune_config
from cahp.errors import CahpError, ModelNotFoundError, PrunedModelError
from cahp.pipeline import PruneConfig, prune
from cahp.surgery import prune_heads
from cahp.surgery.autoload import (
    SAVE_DTYPES,
    folder_bytes,
    resolve_save_dtype,
    save_pruned,
    source_dtype,
)
from cahp.train import TaskOptions, TrainingConfig
from tests.conftest import tiny_bert_folder, tiny_task_folder
from tests.unit.test_decoder import tiny_config, tiny_tokenizer
from tests.unit.test_language_modeling import random_corpus
from tests.unit.test_loading import _WITHOUT_CAHP
from tests.unit.tiny_models import build_model, make_inputs, plan_for

HALF_DTYPES = ("float16", "bfloat16")
#: The folders of the round trip: (family, auto class, stock config, plan).
KINDS: dict[str, tuple[str, type, bool, dict[int, list[int]]]] = {
    "llama-stock": ("llama", AutoModelForCausalLM, True, {layer: [2, 3] for layer in range(3)}),  # uniform
    "llama-cahp": ("llama", AutoModelForCausalLM, False, plan_for("llama")),  # uneven, one layer without heads
    "bert-cahp": ("bert", AutoModelForSequenceClassification, False, plan_for("bert")),
}


def _model(family: str, auto: type) -> PreTrainedModel:
    """A tiny float32 model with sdpa attention (what ``from_pretrained`` picks when it reloads the folder):
    a causal LM for ``AutoModelForCausalLM``, else the tiny classifier."""
    classifier = build_model(family, attn_implementation="sdpa")
    if auto is not AutoModelForCausalLM:
        return classifier
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(classifier.config, attn_implementation="sdpa").eval()


def _cast_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A copy of ``model`` with its parameters cast to ``dtype``: what ``from_pretrained`` builds from the saved
    weights (``.to(dtype)`` would cast the rotary ``inv_freq`` buffers too, which ``from_pretrained`` computes in
    float32)."""
    cast = copy.deepcopy(model)
    for parameter in cast.parameters():
        parameter.data = parameter.data.to(dtype)
    return cast


def _logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(family)).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per ``<kind>-<dtype>``: the folder save_pruned wrote in that dtype, the inputs and the cast model's logits
    saved next to it, the float32 logits, and what the model in memory held before and after the save."""
    root = tmp_path_factory.mktemp("dtype")
    cases: dict[str, dict[str, Any]] = {}
    for kind, (family, auto, stock, plan) in KINDS.items():
        for name in HALF_DTYPES:
            model = prune_heads(_model(family, auto), plan)
            before = {key: (tensor.data_ptr(), tensor.clone()) for key, tensor in model.state_dict().items()}
            config_dtype = model.config.dtype
            full = _logits(model, family)
            folder = save_pruned(model, root / f"{kind}-{name}", stock=stock, dtype=name)
            cast = _cast_copy(model, SAVE_DTYPES[name])
            torch.save(make_inputs(family), root / f"{kind}-{name}-inputs.pt")
            torch.save(_logits(cast, family), root / f"{kind}-{name}-expected.pt")
            cases[f"{kind}-{name}"] = {
                "family": family,
                "auto": auto,
                "stock": stock,
                "dtype": SAVE_DTYPES[name],
                "folder": folder,
                "full": full,
                "model": model,
                "before": before,
                "config_dtype": config_dtype,
            }
    return cases


CASES = [f"{kind}-{name}" for kind in KINDS for name in HALF_DTYPES]


@pytest.mark.parametrize("case", CASES)
def test_the_folder_holds_the_dtype_and_says_so(case: str, saved: dict[str, dict[str, Any]]) -> None:
    entry = saved[case]
    folder, dtype = entry["folder"], entry["dtype"]
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    floating = {key: tensor.dtype for key, tensor in tensors.items() if tensor.is_floating_point()}
    assert floating and set(floating.values()) == {dtype}, floating
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.") and "torch_dtype" not in config
    assert config["model_type"] == (entry["family"] if entry["stock"] else f"cahp_{entry['family']}")
    assert not list(folder.parent.glob(f".{folder.name}.saving")), "no staging folder is left"


@pytest.mark.parametrize("case", CASES)
def test_from_pretrained_gives_the_cast_models_logits(case: str, saved: dict[str, dict[str, Any]]) -> None:
    entry = saved[case]
    folder, dtype, family = entry["folder"], entry["dtype"], entry["family"]
    reloaded = entry["auto"].from_pretrained(folder).eval()
    assert reloaded.dtype == dtype, "config.json's dtype is what from_pretrained loads"
    logits = _logits(reloaded, family)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits, torch.load(folder.parent / f"{case}-expected.pt"))  # the dtype's tolerance
    # and the cast costs no more than the dtype's rounding against the float32 model
    torch.testing.assert_close(logits.float(), entry["full"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("case", CASES)
def test_the_model_in_memory_is_not_changed(case: str, saved: dict[str, dict[str, Any]]) -> None:
    entry = saved[case]
    model = entry["model"]
    after = model.state_dict()
    assert after.keys() == entry["before"].keys()
    for key, (pointer, tensor) in entry["before"].items():
        assert after[key].data_ptr() == pointer, f"{key}: the very tensor it held"
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    assert model.dtype == torch.float32 and model.config.dtype == entry["config_dtype"]
    torch.testing.assert_close(_logits(model, entry["family"]), entry["full"], rtol=0, atol=0)


def test_the_folders_load_without_cahp(saved: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    jobs = [
        {
            "folder": str(entry["folder"]),
            "auto": entry["auto"].__name__,
            "remote": not entry["stock"],
            "inputs": str(entry["folder"].parent / f"{case}-inputs.pt"),
            "output": str(tmp_path / f"{case}.pt"),
        }
        for case, entry in saved.items()
    ]
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CAHP, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for case, job in zip(saved, jobs, strict=True):
        logits = torch.load(job["output"])
        assert logits.dtype == saved[case]["dtype"], case
        torch.testing.assert_close(logits, torch.load(Path(job["inputs"]).with_name(f"{case}-expected.pt")), msg=case)


def test_a_tied_model_stays_tied_and_float32(tmp_path: Path) -> None:
    model = prune_heads(_model("gpt2", AutoModelForCausalLM), plan_for("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    save_pruned(model, tmp_path / "model", dtype=torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.dtype == torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight is reloaded.transformer.wte.weight


def test_a_weight_beyond_float16_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = prune_heads(_model("llama", AutoModelForCausalLM), plan_for("llama"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(PrunedModelError, match=r"up_proj.weight holds a weight of magnitude 1e\+06.*bfloat16"):
        save_pruned(model, tmp_path / "model", dtype="float16")
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())
    assert model.dtype == torch.float32 and float(model.model.layers[0].mlp.up_proj.weight[0, 0].detach()) == 1e6
    save_pruned(model, tmp_path / "model", dtype="bfloat16")  # float32's range
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["int8", "auto", torch.int8, torch.float64])
def test_save_pruned_refuses_a_dtype_it_does_not_save_in(dtype: Any, tmp_path: Path) -> None:
    model = prune_heads(build_model("bert"), plan_for("bert"))
    with pytest.raises(CahpError, match="a model is saved in one of float32, float16, bfloat16"):
        save_pruned(model, tmp_path / "model", dtype=dtype)
    assert not list(tmp_path.iterdir())


# ---- auto ------------------------------------------------------------------------------------------------------


def _lm_folder(root: Path, dtype: torch.dtype) -> Path:
    """A tiny Llama causal LM saved in ``dtype`` with its tokenizer."""
    folder = root / f"llama-{dtype}".replace("torch.", "")
    _model("llama", AutoModelForCausalLM).to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_auto_keeps_the_float16_a_causal_lm_came_in(tmp_path: Path) -> None:
    """The run loads the model in float32 (and measures it so); the folder it saves is float16 again, and the
    report's export record says so, with why and the folder's size."""
    source = _lm_folder(tmp_path, torch.float16)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(random_corpus(documents=40).documents) + "\n")
    config = tiny_config({"llama": source, "corpus": corpus}, prompted=(), gqa_mode="uniform", uniform_layers=True)
    assert config.save_dtype == "auto"
    report = prune(config, tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "model"
    export = report["export"]
    assert export["format"] == "stock" and export["dtype"] == "float16" and "config.json" in export["dtype_why"]
    card = {"README.md", "kept_heads.png"}  # written after the save
    written = sum(path.stat().st_size for path in folder.iterdir() if path.name not in card)
    assert export["size_bytes"] == written and export["size_mb"] == round(written / 2**20, 1)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.dtype == torch.float16
    assert json.loads((tmp_path / "run" / "report.json").read_text())["export"] == export


def test_an_explicit_dtype_overrides_the_source_and_is_recorded(tmp_path: Path) -> None:
    """A float32 classifier pruned with ``save_dtype="bfloat16"``: the folder is bfloat16, half the float32 one."""
    model = tiny_bert_folder(tmp_path / "tiny", layers=3, heads=4, num_labels=3)
    task = TaskOptions(str(tiny_task_folder(tmp_path / "task", examples=40)), max_length=16)
    settings: dict[str, Any] = {
        "model": str(model),
        "task": task,
        "method": "magnitude",
        "budget": "keep=6",
        "recovery": TrainingConfig(epochs=0),
        "eval_splits": ("validation",),
        "latency_repeats": 1,
        "latency_seq_len": 16,
        "latency_batch_size": 2,
    }
    sizes = {}
    for name in ("auto", "bfloat16"):
        report = prune(PruneConfig(**settings, save_dtype=name), tmp_path / name, progress=False)
        folder = tmp_path / name / "model"
        export = report["export"]
        expected = "float32" if name == "auto" else "bfloat16"
        assert export["dtype"] == expected and json.loads((folder / "config.json").read_text())["dtype"] == expected
        why = "--dtype" if name == "bfloat16" else "auto: the dtype of the model's config.json"
        assert export["format"] == "cahp" and export["dtype_why"] == why
        assert AutoModelForSequenceClassification.from_pretrained(folder).dtype == SAVE_DTYPES[expected]
        sizes[name] = (folder / "model.safetensors").stat().st_size
        assert export["size_bytes"] > sizes[name]
    assert sizes["bfloat16"] < 0.6 * sizes["auto"]


def test_source_dtype_reads_the_config_else_the_weights(tmp_path: Path) -> None:
    bf16 = _lm_folder(tmp_path, torch.bfloat16)
    assert source_dtype(bf16).dtype == torch.bfloat16 and "config.json" in source_dtype(bf16).why
    config = json.loads((bf16 / "config.json").read_text())
    del config["dtype"]
    (bf16 / "config.json").write_text(json.dumps(config))
    found = source_dtype(bf16)
    assert found.dtype == torch.bfloat16 and "weight files" in found.why, "the half type beside the float32 norms"
    (bf16 / "model.safetensors").unlink()
    assert source_dtype(bf16).dtype == torch.float32 and "records no dtype" in source_dtype(bf16).why
    assert resolve_save_dtype("float16", bf16).dtype == torch.float16
    with pytest.raises(ModelNotFoundError):
        source_dtype(tmp_path / "nowhere")


def _gguf_folder(root: Path, quantized: bool) -> Path:
    """A folder holding only a GGUF file: float16 tensors beside float32 norms, or Q8_0 blocks beside them."""
    gguf = pytest.importorskip("gguf")
    folder = root / ("q8" if quantized else "f16")
    folder.mkdir()
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), "llama")
    weight = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    if quantized:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, kind), raw_dtype=kind)  # byte rows
    else:
        writer.add_tensor("blk.0.attn_q.weight", weight.astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder


def test_a_gguf_source_keeps_its_float_type_and_a_quantized_one_is_float32(tmp_path: Path) -> None:
    assert source_dtype(_gguf_folder(tmp_path, quantized=False)).dtype == torch.float16
    quantized = source_dtype(_gguf_folder(tmp_path, quantized=True))
    assert quantized.dtype == torch.float32
    assert "quantized GGUF file (Q8_0 blocks)" in quantized.why and "--dtype bfloat16" in quantized.why


def test_smollm2_auto_is_float32_saying_why() -> None:
    try:
        found = source_dtype("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("smollm2-135m is not installed")
    assert found.dtype == torch.float32 and "Q4_1 blocks" in found.why and "\n" not in found.why


# ---- the setting -----------------------------------------------------------------------------------------------


def test_the_option_sets_the_config_and_replays() -> None:
    parser = build_parser()
    base = ["prune", "--model", "m", "--out", "o"]
    assert prune_config(parser.parse_args(base)).save_dtype == "auto"
    config = prune_config(parser.parse_args([*base, "--dtype", "bfloat16"]))
    assert config.save_dtype == "bfloat16"
    assert PruneConfig.from_dict(json.loads(json.dumps(config.to_dict()))).save_dtype == "bfloat16"
    assert PruneConfig.from_dict({"model": "m"}).save_dtype == "auto", "a record without it: auto"


def test_a_bad_dtype_is_refused_in_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CahpError) as error:
        PruneConfig(model="m", save_dtype="int8")
    assert str(error.value) == "save_dtype must be one of auto, float32, float16, bfloat16, got 'int8'"

    config = PruneConfig(model=str(tmp_path / "nowhere"))
    config.save_dtype = "fp8"
    with pytest.raises(CahpError, match="save_dtype must be one of"):
        prune(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", "m", "--out", str(tmp_path / "cli"), "--dtype", "int8"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--dtype: invalid choice: 'int8'" in lines[0]

    record = tmp_path / "run_config.json"
    record.write_text(json.dumps({"model": "m", "save_dtype": "half"}))
    assert main(["prune", "--config", str(record), "--out", str(tmp_path / "replay")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "save_dtype must be one of auto, float32, float16, bfloat16, got 'half'" in lines[0]
    assert not (tmp_path / "cli").exists() and not (tmp_path / "replay").exists()


def test_folder_bytes_counts_every_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"123")
    assert folder_bytes(tmp_path) == 8
