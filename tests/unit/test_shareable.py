"""Issue 35: a saved model folder names no local path (its card, ``config.json``, ``generation_config.json``, the
tokenizer's files, any other file), for every family and both workloads (sequence classifier, causal LM saved
with a stock config or a ``cahp_`` one), and a causal LM's folder carries no classifier labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

from cahp.pipeline import PruneConfig, prune
from cahp.surgery import prune_heads
from cahp.surgery.autoload import save_pruned, shareable_name
from cahp.train import FinetuneConfig, TaskOptions, TrainingConfig, finetune
from tests.conftest import tiny_bert_folder, tiny_task_folder
from tests.unit.tiny_models import FAMILIES, SPECS, VOCAB, build_model, make_inputs, plan_for

CAUSAL_FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2"]
STOCK_CAUSAL_FAMILIES = ["llama", "mistral", "qwen2"]
UNIFORM_GROUPS_PLAN = {layer: [2, 3] for layer in range(3)}  # the same key-value group dropped everywhere


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {f"t{index}": index for index in range(VOCAB)} | {"[UNK]": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[UNK]")


def _leaks(folder: Path, secrets: list[str]) -> list[str]:
    """``file: secret`` for every file under ``folder`` (binary ones too) that contains one of ``secrets``."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path.name}: {secret}" for secret in secrets if secret.encode() in content]
    return found


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of its own (``Path.home()`` and ``~`` point there), under which the models live."""
    folder = tmp_path / "home" / "someone"
    folder.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(folder))
    assert Path.home() == folder
    return folder


def _loaded_from_disk(model: torch.nn.Module, folder: Path, auto: type, with_tokenizer: bool) -> tuple:
    """``model`` saved in ``folder`` and loaded back from its absolute path (so that ``_name_or_path`` and the
    tokenizer's records name it), with its tokenizer."""
    model.save_pretrained(folder)
    if with_tokenizer:
        _tokenizer().save_pretrained(folder)
    loaded = auto.from_pretrained(folder, attn_implementation="eager").eval()
    assert str(folder) in loaded.config._name_or_path, "the test needs a model that remembers its path"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    return loaded, tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_folder_names_no_local_path(family: str, home: Path) -> None:
    source = home / "runs" / f"{family}-finetuned"
    auto = AutoModelForImageClassification if SPECS[family].is_image else AutoModelForSequenceClassification
    model, tokenizer = _loaded_from_disk(build_model(family), source, auto, not SPECS[family].is_image)
    expected = model(**make_inputs(family)).logits
    prune_heads(model, plan_for(family))
    out = save_pruned(model, home / "runs" / f"{family}-pruned" / "model", tokenizer=tokenizer)
    assert _leaks(out, [str(out), str(source), str(home)]) == []
    config = json.loads((out / "config.json").read_text())
    assert config.get("_name_or_path", "") in ("", f"{family}-finetuned"), "a local model: its folder's own name"
    assert config["id2label"], "a classifier keeps its labels"
    assert not list(out.parent.glob(".*")), "no staging folder is left beside the model"
    reloaded = auto.from_pretrained(out).eval()  # still loads, with the same outputs
    with torch.no_grad():
        assert reloaded(**make_inputs(family)).logits.shape == expected.shape
        torch.testing.assert_close(reloaded(**make_inputs(family)).logits, model(**make_inputs(family)).logits)


@pytest.mark.parametrize(
    ("family", "stock"),
    [(family, False) for family in CAUSAL_FAMILIES] + [(family, True) for family in STOCK_CAUSAL_FAMILIES],
)
def test_causal_lm_folder_names_no_local_path_and_no_labels(family: str, stock: bool, home: Path) -> None:
    classifier_config = build_model(family).config  # 3 labels: what a classifier it came from leaves behind
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(classifier_config).eval()
    assert dense.config.id2label and len(dense.config.id2label) == 3
    source = home / "models" / f"{family}-lm"
    model, tokenizer = _loaded_from_disk(dense, source, AutoModelForCausalLM, True)
    if stock:
        prune_heads(model, UNIFORM_GROUPS_PLAN)
    else:
        prune_heads(model, plan_for(family))
    out = save_pruned(model, home / "runs" / f"{family}-lm-pruned" / "model", stock=stock, tokenizer=tokenizer)
    assert _leaks(out, [str(out), str(source), str(home)]) == []
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == (family if stock else f"cahp_{family}")
    assert "id2label" not in config and "label2id" not in config, "a causal LM carries no classifier labels"
    assert (out / "generation_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


def test_shareable_name() -> None:
    assert shareable_name("/home/someone/runs/minilm-sst5/") == "minilm-sst5"
    assert shareable_name("~/x/ft") == "ft"
    assert shareable_name("minilm-l6") == "minilm-l6"
    assert shareable_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert shareable_name(None) == ""


def test_make_shareable_rewrites_paths_in_settings_files(home: Path, tmp_path: Path) -> None:
    from cahp.surgery.autoload import make_shareable

    folder = tmp_path / "folder"
    folder.mkdir()
    source = str(home / "runs" / "ft")
    config = {"_name_or_path": source, "architectures": ["LlamaForCausalLM"], "id2label": {"0": "a"}, "label2id": {}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": source, "chat_template": "/ {{x}}"}))
    make_shareable(folder, "ft")
    assert json.loads((folder / "config.json").read_text()) == {
        "_name_or_path": "ft",
        "architectures": ["LlamaForCausalLM"],
    }
    assert json.loads((folder / "tokenizer_config.json").read_text()) == {
        "name_or_path": "ft",
        "chat_template": "/ {{x}}",
    }


def test_pruned_run_folder_names_no_local_path(home: Path) -> None:
    """``cahp prune``'s model folder (card, config, tokenizer) of a local fine-tune on a local data folder, with the
    command typed with absolute paths: none of them appears in the folder, and the card still names the base model,
    the task, the method and the command."""
    data = tiny_task_folder(home / "data" / "toy", examples=60)
    base = tiny_bert_folder(home / "models" / "tiny", layers=3, heads=4)
    task = TaskOptions(str(data), max_length=16)
    training = TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8)
    finetuned = home / "runs" / "tiny-toy"
    finetune(FinetuneConfig(model=str(base), task=task, training=training), finetuned, progress=False)
    out = home / "runs" / "tiny-toy-pruned"
    command = f"cahp prune --model {finetuned} --task {data} --method magnitude --keep 5 --out {out} --data-dir={data}"
    config = PruneConfig(
        model=str(finetuned),
        task=task,
        method="magnitude",
        budget="keep=5",
        recovery=TrainingConfig(epochs=0),
        latency_repeats=2,
        latency_seq_len=16,
        latency_batch_size=4,
    )
    prune(config, out, progress=False, command=command)
    folder = out / "model"
    assert _leaks(folder, [str(out), str(finetuned), str(base), str(data), str(home)]) == []
    card = (folder / "README.md").read_text()
    assert "- pruned from: `tiny-toy` (fine-tuned on toy" in card, "a local fine-tune: its name and lineage"
    assert "which was made from: `tiny`" in card
    assert "`magnitude`" in card and "task: `toy`" in card
    assert "cahp prune --model tiny-toy --task toy --method magnitude --keep 5 --out tiny-toy-pruned" in card
    assert str(finetuned) in (out / "run_config.json").read_text(), "the run's own records keep the real paths"
