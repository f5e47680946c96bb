"""Pruned folders load with plain ``from_pretrained``: with cahp imported, without cahp (remote code), and as
stock configs (uniformly pruned Llama-family models); older folders still load with ``load_pruned``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

from cahp.errors import OldPrunedFolderError, PrunedModelError, PrunedRecordError, UnreadableWeightsError
from cahp.surgery import load_pruned, prune_heads
from cahp.surgery.autoload import MODELING_FILE, save_pruned, stock_config_dict, upgrade_pruned_folder
from cahp.surgery.modeling_cahp import LAYOUT_KEY
from tests.unit.tiny_models import FAMILIES, SPECS, VOCAB, build_model, make_inputs, plan_for

STOCK_FAMILIES = ["llama", "mistral", "qwen2", "gemma3_text", "vit"]
# uniform prunes: "groups" drops key-value group {2, 3} everywhere; "uniform" drops heads 1 and 3 everywhere
# (for ViT, without key-value groups, both are the same kind of prune)
UNIFORM_PLANS = {"groups": {layer: [2, 3] for layer in range(3)}, "uniform": {layer: [1, 3] for layer in range(3)}}


def _auto_class(family: str) -> type:
    return AutoModelForImageClassification if SPECS[family].is_image else AutoModelForSequenceClassification


def _logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(family)).logits


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per family (pruned unevenly, one layer without heads) written by save_pruned, with the
    inputs and the logits of ``load_pruned`` saved next to it."""
    root = tmp_path_factory.mktemp("pruned")
    folders = {}
    for family in FAMILIES:
        model = prune_heads(build_model(family), plan_for(family))
        folder = save_pruned(model, root / family)
        torch.save(make_inputs(family), root / f"{family}-inputs.pt")
        torch.save(_logits(load_pruned(folder).eval(), family), root / f"{family}-expected.pt")
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def habit_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per family written the transformers way: ``prune_heads`` then ``model.save_pretrained``, with
    the logits of the pruned model in memory saved next to it."""
    root = tmp_path_factory.mktemp("habit")
    folders = {}
    for family in FAMILIES:
        model = prune_heads(build_model(family), plan_for(family))
        model.save_pretrained(root / family)
        torch.save(make_inputs(family), root / f"{family}-inputs.pt")
        torch.save(_logits(model, family), root / f"{family}-expected.pt")
        folders[family] = root / family
    return folders


def _old_format(folder: Path) -> Path:
    """Turn a folder of save_pruned into what earlier cahp versions wrote: the stock model_type with the record,
    no auto_map, no layout, no modeling file."""
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = config["model_type"].removeprefix("cahp_")
    for key in ("auto_map", LAYOUT_KEY):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / MODELING_FILE).unlink()
    return folder


@pytest.fixture(scope="module")
def stock_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uniformly pruned Llama-family models saved as stock configs, with their in-memory logits."""
    root = tmp_path_factory.mktemp("stock")
    folders = {}
    for family in STOCK_FAMILIES:
        for mode, plan in UNIFORM_PLANS.items():
            model = prune_heads(build_model(family, attn_implementation="sdpa"), plan, gqa_mode=mode)
            folder = save_pruned(model, root / f"{family}-{mode}", stock=True)
            torch.save(make_inputs(family), root / f"{family}-{mode}-inputs.pt")
            torch.save(_logits(model, family), root / f"{family}-{mode}-expected.pt")
            folders[f"{family}-{mode}"] = folder
    return folders


# ---- with cahp imported --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_from_pretrained_equals_load_pruned(family: str, pruned_folders: dict[str, Path]) -> None:
    folder = pruned_folders[family]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"cahp_{family}", "a pruned folder must not claim its stock model_type"
    model = _auto_class(family).from_pretrained(folder).eval()
    expected = torch.load(folder.parent / f"{family}-expected.pt")
    torch.testing.assert_close(_logits(model, family), expected, rtol=0, atol=1e-6)
    base = AutoModel.from_pretrained(folder).eval()  # the bare encoder/decoder of the same folder loads too
    with torch.no_grad():
        hidden = base(**make_inputs(family)).last_hidden_state
        torch.testing.assert_close(hidden, model.base_model(**make_inputs(family)).last_hidden_state, rtol=0, atol=0)


def test_text_classification_pipeline_loads_a_pruned_folder(pruned_folders: dict[str, Path]) -> None:
    vocab = {f"t{index}": index for index in range(VOCAB)} | {"[UNK]": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    classifier = transformers.pipeline("text-classification", model=str(pruned_folders["bert"]), tokenizer=fast)
    scores = classifier("t5 t17 t42 t8", top_k=None)
    expected = torch.softmax(load_pruned(pruned_folders["bert"]).eval()(torch.tensor([[5, 17, 42, 8]])).logits, -1)
    by_label = {item["label"]: item["score"] for item in scores}
    assert [by_label[f"LABEL_{index}"] for index in range(3)] == pytest.approx(expected[0].tolist(), abs=1e-5)


def test_folder_of_an_earlier_version_still_loads_and_upgrades(tmp_path: Path) -> None:
    model = prune_heads(build_model("bert"), plan_for("bert"))
    folder = _old_format(save_pruned(model, tmp_path / "old"))
    expected = _logits(load_pruned(folder).eval(), "bert")
    torch.testing.assert_close(expected, _logits(model, "bert"), rtol=0, atol=1e-6)
    for kwargs in ({}, {"ignore_mismatched_sizes": True}):  # the stock class cannot hold the smaller weights
        with pytest.raises(OldPrunedFolderError, match="upgrade_pruned_folder") as refused:
            AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
        assert isinstance(refused.value, RuntimeError), "still the RuntimeError transformers raised before"
        assert "\n" not in str(refused.value) and "ignore_mismatched_sizes=True" in str(refused.value)
    upgrade_pruned_folder(folder)
    upgraded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(upgraded, "bert"), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(load_pruned(folder).eval(), "bert"), expected, rtol=0, atol=1e-6)


def test_an_old_folder_loaded_by_load_pruned_saves_in_the_new_format(tmp_path: Path) -> None:
    model = prune_heads(build_model("gpt2"), plan_for("gpt2"))
    loaded = load_pruned(_old_format(save_pruned(model, tmp_path / "old"))).eval()
    assert isinstance(loaded, type(build_model("gpt2")))
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "cahp_gpt2"
    new = AutoModelForSequenceClassification.from_pretrained(tmp_path / "new").eval()
    torch.testing.assert_close(_logits(new, "gpt2"), _logits(model, "gpt2"), rtol=0, atol=1e-6)


# ---- prune_heads, then model.save_pretrained (the transformers habit) ---------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_after_prune_heads_writes_a_pruned_folder(
    family: str, habit_folders: dict[str, Path], pruned_folders: dict[str, Path]
) -> None:
    folder = habit_folders[family]
    written = json.loads((folder / "config.json").read_text())
    reference = json.loads((pruned_folders[family] / "config.json").read_text())
    for key in ("model_type", "auto_map", "architectures", LAYOUT_KEY, "cahp_kept_heads"):
        assert written.get(key) == reference.get(key), key
    assert written["model_type"] == f"cahp_{family}"
    assert (folder / MODELING_FILE).read_text() == (pruned_folders[family] / MODELING_FILE).read_text()
    expected = torch.load(folder.parent / f"{family}-expected.pt")  # in memory, eager attention
    model = _auto_class(family).from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(model, family), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(load_pruned(folder).eval(), family), _logits(model, family), rtol=0, atol=0)


def test_a_pruned_model_keeps_its_stock_type_in_memory(tmp_path: Path) -> None:
    stock = build_model("llama")
    model = prune_heads(build_model("llama"), plan_for("llama"))
    assert isinstance(model, type(stock)) and type(model).__name__ == "CahpLlamaForSequenceClassification"
    model.save_pretrained(tmp_path)
    assert model.config.model_type == "llama", "the rest of a run still sees the stock model_type"
    assert model.config.architectures == ["LlamaForSequenceClassification"]


# ---- damaged folders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pruned", [False, True])
def test_cut_short_weights_are_one_line(pruned: bool, tmp_path: Path) -> None:
    model = build_model("bert")
    if pruned:
        model = prune_heads(model, plan_for("bert"))
    save_pruned(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UnreadableWeightsError, match=r"model\.safetensors .* cannot be read") as refused:
        load_pruned(tmp_path)
    assert "\n" not in str(refused.value) and "copy the folder again" in str(refused.value)


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"0": [0, 7]}, "names heads \\[7\\]"),
        ({"0": "0, 2"}, "must be a list"),
        ({"0": [0, 0]}, "names a head twice"),
        ({"9": [0]}, "names layer '9'"),
        ([0, 1], "must map layers"),
    ],
)
def test_malformed_record_is_its_own_one_line_error(record: object, says: str, tmp_path: Path) -> None:
    folder = save_pruned(prune_heads(build_model("bert"), plan_for("bert")), tmp_path / "new")
    for current in (
        folder,
        _old_format(save_pruned(prune_heads(build_model("bert"), plan_for("bert")), tmp_path / "old")),
    ):
        config = json.loads((current / "config.json").read_text())
        config["cahp_kept_heads"] = record
        (current / "config.json").write_text(json.dumps(config))
        with pytest.raises(PrunedRecordError, match=says) as refused:
            load_pruned(current)
        message = str(refused.value)
        assert "\n" not in message and "malformed" in message and "weights do not match" not in message
    with pytest.raises(ValueError, match=f"{says}.*malformed"):  # plain from_pretrained, through the Cahp class
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_resaving_a_loaded_pruned_model_keeps_it_loadable(pruned_folders: dict[str, Path], tmp_path: Path) -> None:
    loaded = AutoModelForSequenceClassification.from_pretrained(pruned_folders["gpt2"]).eval()
    save_pruned(loaded, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    again = load_pruned(tmp_path).eval()
    torch.testing.assert_close(_logits(again, "gpt2"), _logits(loaded, "gpt2"), rtol=0, atol=0)


def test_unpruned_model_is_saved_as_it_is(tmp_path: Path) -> None:
    save_pruned(build_model("bert"), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    assert not (tmp_path / MODELING_FILE).exists()


@pytest.mark.parametrize("family", ["mpnet", "llama"])
def test_a_model_loaded_by_its_auto_class_prunes_further(family: str, pruned_folders: dict[str, Path]) -> None:
    further = {2: [1]} if family == "mpnet" else {0: [0, 1]}
    loaded = prune_heads(AutoModelForSequenceClassification.from_pretrained(pruned_folders[family]).eval(), further)
    reference = prune_heads(load_pruned(pruned_folders[family]).eval(), further)
    torch.testing.assert_close(_logits(loaded, family), _logits(reference, family), rtol=0, atol=1e-6)


# ---- stock configs -------------------------------------------------------------------------------------------


def test_stock_config_renumbers_the_kept_heads() -> None:
    model = prune_heads(build_model("llama"), UNIFORM_PLANS["uniform"], gqa_mode="uniform")
    config = stock_config_dict(model)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 8)
    assert config["model_type"] == "llama" and not any(key.startswith("cahp_") for key in config)


def test_stock_folders_carry_no_custom_code(stock_folders: dict[str, Path]) -> None:
    for name, folder in stock_folders.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == name.split("-")[0], name
        assert "auto_map" not in config and not any(key.startswith("cahp_") for key in config), name
        assert not (folder / MODELING_FILE).exists(), name


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_stock_causal_lm_names_its_class_even_when_its_config_did_not(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_model(family).config).eval()
    model.config.architectures = None  # what a model read from a GGUF file (Gemma 3) carries
    model.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}  # a config's default labels: noise in a causal LM
    pruned = prune_heads(model, UNIFORM_PLANS["uniform"], gqa_mode="uniform")
    config = json.loads((save_pruned(pruned, tmp_path / family, stock=True) / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__.removeprefix("Cahp")]
    assert "id2label" not in config and "label2id" not in config


@pytest.mark.parametrize(
    ("family", "plan", "reason"),
    [
        ("bert", {0: [1], 1: [1], 2: [1]}, "derives the head size"),
        ("llama", plan_for("llama"), "kept"),  # layer 1 kept nothing, layer 2 everything
    ],
)
def test_stock_config_refuses_what_no_stock_config_describes(family: str, plan: dict, reason: str) -> None:
    model = prune_heads(build_model(family), plan)
    with pytest.raises(PrunedModelError, match=reason):
        stock_config_dict(model)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_stock_config_its_config_class_refuses_is_not_written(family: str, tmp_path: Path) -> None:
    """LlamaConfig and Gemma3TextConfig refuse hidden_size % num_attention_heads != 0 although their attention
    reads head_dim: 3 heads of 8 in a 32-wide model get the cahp_ config instead."""
    config = build_model(family).config
    config.num_key_value_heads = config.num_attention_heads  # no groups: any head can go
    model = AutoModelForSequenceClassification.from_config(config).eval()
    pruned = prune_heads(model, {layer: [1] for layer in range(3)})
    with pytest.raises(PrunedModelError, match=f"{type(config).__name__} refuses 3 heads per layer"):
        save_pruned(pruned, tmp_path / "stock", stock=True)
    assert not (tmp_path / "stock").exists()
    folder = save_pruned(pruned, tmp_path / "cahp")
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(reloaded, family), _logits(pruned, family), rtol=0, atol=1e-6)


# ---- without cahp ------------------------------------------------------------------------------------------

_WITHOUT_CAHP = r"""
import importlib.abc, json, sys
class BlockCahp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cahp" or name.startswith("cahp."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, BlockCahp())
try:
    import cahp
    raise SystemExit("cahp was importable")
except ModuleNotFoundError:
    pass
import torch, transformers
jobs = json.loads(sys.argv[1])
for job in jobs:
    auto = getattr(transformers, job["auto"])
    try:
        auto.from_pretrained(job["folder"])
        refused = False
    except Exception:
        refused = True
    if job["remote"] and not refused:
        raise SystemExit(f"{job['folder']} loaded without trust_remote_code and without cahp")
    model = auto.from_pretrained(job["folder"], trust_remote_code=job["remote"]).eval()
    with torch.no_grad():
        torch.save(model(**torch.load(job["inputs"])).logits, job["output"])
"""


def test_folders_load_without_cahp(
    pruned_folders: dict[str, Path], habit_folders: dict[str, Path], stock_folders: dict[str, Path], tmp_path: Path
) -> None:
    jobs = [
        {
            "folder": str(folder),
            "auto": _auto_class(family).__name__,
            "remote": True,
            "inputs": str(folder.parent / f"{family}-inputs.pt"),
            "expected": str(folder.parent / f"{family}-expected.pt"),
            "output": str(tmp_path / f"{folder.parent.name}-{family}.pt"),
        }
        for family, folder in [*pruned_folders.items(), *habit_folders.items()]
    ] + [
        {
            "folder": str(folder),
            "auto": _auto_class(name.split("-")[0]).__name__,
            "remote": False,
            "inputs": str(folder.parent / f"{name}-inputs.pt"),
            "expected": str(folder.parent / f"{name}-expected.pt"),
            "output": str(tmp_path / f"{name}.pt"),
        }
        for name, folder in stock_folders.items()
    ]
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CAHP, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in jobs:
        torch.testing.assert_close(
            torch.load(job["output"]), torch.load(job["expected"]), rtol=0, atol=1e-5, msg=job["folder"]
        )


_TOKENIZER_WITHOUT_CAHP = r"""
import builtins, importlib.abc, sys
class BlockCahp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cahp" or name.startswith("cahp."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, BlockCahp())
def asked(prompt=""):
    raise SystemExit(f"transformers asked: {prompt[-60:]!r}")
builtins.input = asked
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
print(tokenizer("t5 t17")["input_ids"])
"""


def test_the_tokenizer_loads_without_custom_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = {f"t{index}": index for index in range(VOCAB)} | {"[UNK]": 0}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    folder = save_pruned(prune_heads(build_model("bert"), plan_for("bert")), tmp_path / "model", tokenizer=tokenizer)
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail(f"transformers asked: {prompt}"))
    with_cahp = transformers.AutoTokenizer.from_pretrained(folder)  # cahp is imported here: nothing to ask
    assert with_cahp("t5 t17")["input_ids"] == [5, 17]
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _TOKENIZER_WITHOUT_CAHP, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert result.stdout.split("\n")[-2] == "[5, 17]"
    assert not (tmp_path / "modules").exists() or not any((tmp_path / "modules").rglob("modeling_cahp.py")), (
        "no custom code was copied to run"
    )


def test_modeling_file_imports_only_torch_and_transformers(pruned_folders: dict[str, Path]) -> None:
    import ast

    tree = ast.parse((pruned_folders["bert"] / MODELING_FILE).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - set(sys.stdlib_module_names) <= {"torch", "transformers"}, imported


def test_import_cahp_alone_registers_the_classes(pruned_folders: dict[str, Path]) -> None:
    script = (
        "import sys, cahp\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(pruned_folders['distilbert'])!r})\n"
        "print(type(model).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "CahpDistilBertForSequenceClassification"
