"""``cahp prune-lm`` on tiny random Llama, Mistral and Qwen2 causal LMs (3 layers, 4 query / 2 key-value heads):
the flow end to end in every mode (groups, uniform, uniform layers), its config, resume and refusals; masking
equals removal for LM logits and for greedy generation with a KV cache; the KV cache shrinks in proportion to the
removed key-value heads; a stock export loads where cahp cannot be imported, with identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from cahp.calibration import CausalLanguageModeling
from cahp.cli import main
from cahp.data.batching import iter_batches
from cahp.data.lm import make_blocks
from cahp.decoder import DecoderPruneConfig, lm_loss_fn, load_causal_lm, prune_lm, summary
from cahp.errors import CahpError
from cahp.evaluation.generation import (
    greedy_continuations,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    measure_generation,
)
from cahp.evaluation.perplexity import perplexity
from cahp.pipeline import PruneConfig
from cahp.surgery import head_mask, heads_to_remove, kept_kv_heads_by_layer, prune_heads
from cahp.surgery.autoload import save_pruned
from cahp.train.loop import TrainingConfig
from tests.unit.test_language_modeling import GQA_FAMILIES, SHARED_DATA, causal_lm, random_corpus, word_tokenizer
from tests.unit.test_loading import _WITHOUT_CAHP
from tests.unit.tiny_models import HEADS, LAYERS

#: Words of the SST-2 prompt and its label words, so the tiny tokenizer can run the zero-shot task.
PROMPT_WORDS = ["Review", ":", "Sentiment", "(", "positive", "or", "negative", ")"]
HAS_SST2 = (SHARED_DATA / "sst2").is_dir()

#: The three modes of a run: (gqa_mode, uniform_layers, budget, query heads kept, key-value heads kept) of 12 / 6.
MODES = {
    "groups": ("groups", False, "keep=8", 8, 4),  # 4 whole groups, each layer at least one: uneven layers
    "uniform": ("uniform", False, "sparsity=0.5", 6, 6),  # the same count in both groups of a layer
    "uniform_layers": ("groups", True, "keep=6", 6, 3),  # one group in every layer
}


def tiny_tokenizer(padding_side: str = "right") -> Any:
    return word_tokenizer([f"w{i}" for i in range(80)] + PROMPT_WORDS, padding_side)


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny causal LM (with its tokenizer) per GQA family, and a corpus file."""
    root = tmp_path_factory.mktemp("lm")
    folders = {}
    for family in GQA_FAMILIES:
        folder = root / family
        causal_lm(family).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[family] = folder
    (root / "corpus.txt").write_text("\n\n".join(random_corpus(documents=40).documents) + "\n")  # a paragraph each
    folders["corpus"] = root / "corpus.txt"
    return folders


def tiny_config(folders: dict[str, Path], family: str = "llama", **changes: Any) -> DecoderPruneConfig:
    settings: dict[str, Any] = {
        "model": str(folders[family]),
        "method": "magnitude",
        "budget": "sparsity=0.5",
        "corpus": str(folders["corpus"]),
        "context_length": 16,
        "calibration_blocks": 6,
        "eval_blocks": 6,
        "prompted": ("sst2",) if HAS_SST2 else (),
        "data_dir": str(SHARED_DATA),
        "prompted_examples": 6,
        "continuation_tokens": 4,
        "prompt_tokens": 8,
        "new_tokens": 3,
        "latency_repeats": 1,
    }
    settings.update(changes)
    return DecoderPruneConfig(**settings)


# ---------------------------------------------------------------------------------------------------- the flow


@pytest.mark.parametrize("mode", list(MODES))
def test_prune_lm_end_to_end_in_every_mode(mode: str, lm_folders: dict[str, Path], tmp_path: Path) -> None:
    gqa_mode, uniform_layers, budget, kept, kv_kept = MODES[mode]
    config = tiny_config(lm_folders, gqa_mode=gqa_mode, uniform_layers=uniform_layers, budget=budget)
    out = tmp_path / "run"
    report = prune_lm(config, out, progress=False, command="test")

    assert json.loads((out / "report.json").read_text())["heads"] == report["heads"]
    heads = report["heads"]
    assert (heads["kept"], heads["kv_kept"], heads["kv_total"]) == (kept, kv_kept, LAYERS * 2)
    assert report["kv_cache"]["ratio"] == pytest.approx(heads["kv_kept"] / heads["kv_total"])
    assert report["parameters"]["pruned"] < report["parameters"]["dense"]
    assert set(report["generation"]["by_batch"]) == {"1", "8"}
    counts = {(len(report["kept_heads_by_layer"][k]), len(report["kept_kv_heads_by_layer"][k])) for k in "012"}
    assert report["export"]["format"] == ("stock" if len(counts) == 1 else "cahp")
    if mode != "uniform":  # the uniform mode's layers may or may not come out alike
        assert report["export"]["format"] == ("stock" if uniform_layers else "cahp")
    if HAS_SST2:
        prompted = report["quality"]["pruned"]["prompted"]["sst2"]
        assert prompted["examples"] == 6 and "Sentiment" in prompted["prompt"]
    continuations = report["quality"]["dense"]["continuations"]
    assert [c["prompt"] for c in continuations] == list(config.lm.continuation_prompts)
    text = summary(report)
    assert "The capital of France is" in text and "KV cache" in text and "offline" not in text
    assert "one sample: a noisy single measurement" in text  # latency_repeats=1: no spread to give
    assert f" config in float32, {report['export']['size_mb']} MB (" in text
    card = (out / "model" / "README.md").read_text()
    assert "one timed run (a single, noisy sample)" in card and "Weights saved in float32 (" in card

    # the saved model is the pruned one: its perplexity on the evaluation blocks is the report's
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    blocks = make_blocks(tiny_tokenizer(), random_corpus(documents=40), context_length=16, max_blocks=6)
    assert perplexity(reloaded, tiny_tokenizer(), blocks)["perplexity"] == pytest.approx(
        report["perplexity"]["pruned"], rel=1e-5
    )
    replayed = PruneConfig.from_dict(json.loads((out / "run_config.json").read_text()))
    assert replayed == config


def test_the_summary_says_how_the_budget_was_rounded_and_what_the_guardrail_added(
    lm_folders: dict[str, Path], tmp_path: Path
) -> None:
    """Whole key-value groups of 2 query heads: keep=7 becomes 8 heads, and the summary line says so."""
    report = prune_lm(tiny_config(lm_folders, budget="keep=7"), tmp_path / "run", progress=False)
    first = summary(report).splitlines()[0]
    assert "budget keep=7: 7 heads rounded to 8" in first
    assert f"guardrail added {len(report['plan']['guardrail_heads'])}" in first


def test_uniform_runs_export_a_stock_config(lm_folders: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(lm_folders, gqa_mode="uniform", uniform_layers=True, prompted=())
    report = prune_lm(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert report["export"]["format"] == "stock"
    assert saved["model_type"] == "llama" and saved["num_attention_heads"] == HEADS // 2
    assert saved["num_key_value_heads"] == 2 and not (tmp_path / "run" / "model" / "modeling_cahp.py").exists()


def test_prune_lm_runs_on_mistral_with_a_gradient_method(lm_folders: dict[str, Path], tmp_path: Path) -> None:
    # (a Qwen2 folder would load transformers' Qwen2 BPE tokenizer instead of the word-level one saved with it)
    config = tiny_config(lm_folders, "mistral", method="fisher", budget="keep=6", uniform_layers=True, prompted=())
    report = prune_lm(config, tmp_path / "run", progress=False)
    assert (report["heads"]["kv_kept"], report["export"]["format"]) == (LAYERS, "stock")
    assert report["kv_cache"]["pruned"]["bytes_per_token"] * 2 == report["kv_cache"]["dense"]["bytes_per_token"]


def test_an_interrupted_run_resumes_from_its_cached_stages(
    lm_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cahp.workloads.causal_lm as decoder

    config = tiny_config(lm_folders, prompted=())
    real_quality, calls = decoder.measure_lm, []

    def fail_after_dense(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_quality(*args, **kwargs)

    monkeypatch.setattr(decoder, "measure_lm", fail_after_dense)
    with pytest.raises(KeyboardInterrupt):
        prune_lm(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.partial" / "stages" / "plan.json").is_file()
    monkeypatch.setattr(decoder, "measure_lm", real_quality)
    report = prune_lm(config, tmp_path / "run", progress=False)
    assert report["stages_cached"] == ["plan", "quality_before"]


def test_recovery_on_the_lm_loss_lowers_the_perplexity(lm_folders: dict[str, Path], tmp_path: Path) -> None:
    recovery = TrainingConfig(epochs=3.0, learning_rate=1e-2, batch_size=2, warmup_ratio=0.0, weight_decay=0.0)
    config = tiny_config(lm_folders, prompted=(), recovery=recovery)  # a file corpus: the same blocks both roles
    report = prune_lm(config, tmp_path / "run", progress=False)
    assert report["after"] == "recovered" and len(report["recovery"]["history"]) == 3
    assert report["perplexity"]["after"] < report["perplexity"]["pruned"]
    assert "recovered" in summary(report)


def test_cahp_is_refused_in_one_line_naming_the_alternatives(lm_folders: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(lm_folders, method="cahp", budget="keep=6", prompted=())
    with pytest.raises(CahpError) as refused:
        prune_lm(config, tmp_path / "run", progress=False)
    message = str(refused.value)
    assert "\n" not in message and "fisher" in message and "magnitude" in message and "cahp prune" in message
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"gqa_mode": "some"}, "gqa_mode"),
        ({"stride": 32}, "stride"),
        ({"prompted": ("cola",)}, "cola"),
        ({"budget": "auto"}, "head count"),
        ({"generation_batch_sizes": (1, 0)}, "generation_batch_sizes"),
        ({"eval_blocks": 0}, "eval_blocks"),
        ({"method": "no-such-method"}, "no-such-method"),
        ({"context_length": 100_000}, "--context-length 100000 is longer than the model accepts"),
        ({"corpus": "/nowhere/corpus.txt", "model": "/nowhere/model"}, "corpus file /nowhere/corpus.txt"),  # first
    ],
)
def test_bad_settings_are_refused_before_any_work(
    changes: dict[str, Any], named: str, lm_folders: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(CahpError, match=named):
        prune_lm(tiny_config(lm_folders, **{"prompted": (), **changes}), tmp_path / "run", progress=False)
    assert not tmp_path.joinpath("run").exists()


@pytest.mark.skipif(not HAS_SST2, reason="needs the shared SST-2 data")
def test_the_prompted_subset_is_drawn_with_the_runs_seed_unless_sample_seed_says_otherwise(
    lm_folders: dict[str, Path],
) -> None:
    """A run_config written before ``sample_seed`` existed replays with the same prompted examples."""
    record = tiny_config(lm_folders, seed=7, prompted_examples=20).to_dict()
    record["lm"].pop("sample_seed")
    replayed = PruneConfig.from_dict(record)
    tokenizer = tiny_tokenizer()

    def texts(config: PruneConfig) -> list[tuple[str, ...]]:
        assert config.lm is not None
        split, _ = config.lm.load(tokenizer, config.seed).prompted["sst2"]
        return split.texts

    assert replayed.lm is not None and replayed.lm.sample_seed is None
    assert texts(replayed) == texts(tiny_config(lm_folders, seed=0, prompted_examples=20, sample_seed=7))
    assert texts(replayed) != texts(tiny_config(lm_folders, seed=7, prompted_examples=20, sample_seed=8))


def test_a_sequence_classifier_is_refused(tmp_path: Path) -> None:
    from tests.unit.tiny_models import build_model

    build_model("llama").save_pretrained(tmp_path / "classifier")
    tiny_tokenizer().save_pretrained(tmp_path / "classifier")
    with pytest.raises(CahpError, match="cahp prune"):
        load_causal_lm(str(tmp_path / "classifier"))


def test_the_command_line_runs_and_replays(lm_folders: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    arguments = [
        "prune-lm", "--model", str(lm_folders["llama"]), "--method", "magnitude", "--budget", "sparsity=0.5",
        "--gqa-mode", "uniform", "--uniform-layers", "--corpus", str(lm_folders["corpus"]), "--context-length", "16",
        "--calibration-blocks", "4", "--eval-blocks", "4", "--prompted", "none", "--continuation-tokens", "3",
        "--prompt-tokens", "8", "--new-tokens", "2", "--latency-repeats", "1",
    ]  # fmt: skip
    assert main([*arguments, "--out", str(tmp_path / "first")]) == 0
    printed = capsys.readouterr().out
    assert "The capital of France is" in printed and "stock config" in printed
    assert main(["prune-lm", "--config", str(tmp_path / "first"), "--out", str(tmp_path / "second")]) == 0
    first, second = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("first", "second"))
    assert second["config"] == first["config"] and second["perplexity"] == first["perplexity"]
    replay_with_cahp = [
        "prune-lm",
        "--config",
        str(tmp_path / "first"),
        "--method",
        "cahp",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(replay_with_cahp) == 1
    assert "fisher" in capsys.readouterr().err


def test_prune_lm_is_prune_with_the_causal_lm_objective_and_its_recipe() -> None:
    from cahp.cli import build_parser
    from cahp.commands.options import UsageError
    from cahp.commands.prune import LM_FIELDS, prune_config
    from cahp.workloads import RECOVERY_RECIPES
    from tests.unit.test_cli import _at, _subparsers

    parser = build_parser()
    arguments = ["--model", "m", "--out", "o", "--method", "fisher", "--keep", "6", "--context-length", "16"]
    alias = prune_config(parser.parse_args(["prune-lm", *arguments]))
    assert alias == prune_config(parser.parse_args(["prune", "--objective", "causal-lm", *arguments]))
    assert alias.objective == "causal-lm" and alias.lm is not None and alias.lm.context_length == 16
    assert alias.recovery == TrainingConfig(**RECOVERY_RECIPES["causal-lm"]), (
        "the causal-lm recipe, not the classifier's"
    )
    documented = {
        a.dest: a.config_default for a in _subparsers(parser)["prune"]._actions if hasattr(a, "config_default")
    }
    defaults = PruneConfig(model="m", objective="causal-lm")
    for dest, (path,) in LM_FIELDS.items():
        shown = documented[dest]
        assert (tuple(shown) if isinstance(shown, list) else shown) == _at(defaults, path), f"--{dest}"
    help_text = _subparsers(parser)["prune"].format_help()
    for name, value in RECOVERY_RECIPES["causal-lm"].items():  # the help shows the causal-lm recipe beside the other
        if name in ("learning_rate", "batch_size", "weight_decay", "checkpoint_every"):
            assert f"causal-lm: {value:g}" in help_text, name
    with pytest.raises(UsageError, match="--objective causal-lm"):
        prune_config(parser.parse_args(["prune", "--model", "m", "--out", "o", "--corpus", "x.txt"]))


# ---------------------------------------------------------------------------------------------------- equivalences


def _gates(model: PreTrainedModel, removed: dict[int, list[int]]) -> torch.Tensor:
    gates = torch.ones(LAYERS, HEADS)
    for layer, heads in removed.items():
        gates[layer, heads] = 0.0
    return gates


#: Per mode, heads to remove (original numbers) that the mode carries out as they are.
REMOVALS = {"groups": {0: [0, 1], 2: [2, 3]}, "uniform": {0: [1, 3], 1: [0, 2], 2: [1, 2]}}


@pytest.mark.parametrize("family", GQA_FAMILIES)
@pytest.mark.parametrize("gqa_mode", list(REMOVALS))
def test_masking_equals_removal_for_lm_logits(family: str, gqa_mode: str) -> None:
    model = causal_lm(family)
    removed = REMOVALS[gqa_mode]
    assert heads_to_remove(model, {layer: [h for h in range(HEADS) if h not in hs] for layer, hs in removed.items()},
                           gqa_mode) == removed  # fmt: skip
    input_ids = torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), head_mask(model, _gates(model, removed)):
        masked = model(input_ids=input_ids).logits
    pruned = prune_heads(causal_lm(family), removed, gqa_mode=gqa_mode)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=input_ids).logits, masked, rtol=0, atol=1e-5)
        assert not torch.allclose(model(input_ids=input_ids).logits, masked, atol=1e-3), "removal changes the logits"


@pytest.mark.parametrize("family", GQA_FAMILIES)
@pytest.mark.parametrize("gqa_mode", list(REMOVALS))
def test_greedy_generation_with_a_kv_cache_is_the_same_masked_and_pruned(family: str, gqa_mode: str) -> None:
    model, removed = causal_lm(family), REMOVALS[gqa_mode]
    tokenizer = tiny_tokenizer()
    prompts = ["w1 w2 w3", "w40 w7"]
    with head_mask(model, _gates(model, removed)):
        masked = greedy_continuations(model, tokenizer, prompts, max_new_tokens=12)
    pruned = greedy_continuations(prune_heads(causal_lm(family), removed, gqa_mode=gqa_mode), tokenizer, prompts, 12)
    dense = greedy_continuations(model, tokenizer, prompts, max_new_tokens=12)
    assert [m["token_ids"] for m in masked] == [p["token_ids"] for p in pruned]
    assert all(m["token_ids"] for m in masked)
    assert [d["token_ids"] for d in dense] != [m["token_ids"] for m in masked], "the heads mattered"


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_kv_cache_bytes_fall_in_proportion_to_removed_key_value_heads(family: str) -> None:
    dense = causal_lm(family)
    head_dim = dense.config.hidden_size // HEADS
    full = kv_cache_bytes_per_token(dense)
    assert full["bytes_per_token"] == LAYERS * 2 * 2 * head_dim * 4
    assert full["measured_bytes_per_token"] == kv_cache_bytes(dense, 8) / 8
    # a sliding layer's cache stops growing at its window, less one (the next token): Gemma 3's window of 3 here
    windows = [w for w in full["sliding_windows"] if w is not None]
    held = [1000 if w is None else min(1000, w - 1) for w in full["sliding_windows"]]
    assert kv_cache_bytes(dense, 1000) == sum(held) * 2 * 2 * head_dim * 4
    if any(w - 1 < 8 for w in windows):
        assert full["measured_bytes_per_token"] < full["bytes_per_token"]
    else:
        assert full["measured_bytes_per_token"] == full["bytes_per_token"]
    groups = prune_heads(causal_lm(family), {0: [0, 1], 1: [0, 1, 2, 3], 2: [2, 3]}, gqa_mode="groups")
    assert sum(len(h) for h in kept_kv_heads_by_layer(groups).values()) == 2
    shrunk = kv_cache_bytes_per_token(groups)  # counted and measured on a real cache (a layer left empty too)
    assert shrunk["bytes_per_token"] / full["bytes_per_token"] == pytest.approx(2 / (LAYERS * 2))
    query_only = prune_heads(causal_lm(family), REMOVALS["uniform"], gqa_mode="uniform")
    assert kv_cache_bytes_per_token(query_only)["bytes_per_token"] == full["bytes_per_token"]


def test_generation_speed_is_measured_for_every_model_and_batch() -> None:
    models = {"dense": causal_lm("llama"), "pruned": prune_heads(causal_lm("llama"), {0: [0, 1]})}
    result = measure_generation(models, batch_sizes=(1, 3), prompt_tokens=5, new_tokens=4, repeats=2)
    for row in result["by_batch"].values():
        assert row["tokens_per_second_ratio"] == pytest.approx(
            row["pruned"]["tokens_per_second"] / row["dense"]["tokens_per_second"], rel=1e-2
        )
        for key in ("prefill_ratio_range", "tokens_per_second_ratio_range"):  # per repeat, back to back
            low, high = row[key]
            assert 0 < low <= high
        assert all(row[name]["prefill_seconds"] > 0 for name in models)
    with pytest.raises(CahpError, match="new_tokens"):
        measure_generation(models, new_tokens=0)


def test_the_lm_loss_function_is_the_objective_loss() -> None:
    model, tokenizer = causal_lm("llama"), tiny_tokenizer()
    blocks = make_blocks(tokenizer, random_corpus(), context_length=12)
    _, batch = next(iter_batches(tokenizer, blocks.examples, 4))
    loss, parts = lm_loss_fn()(model, batch, None)
    assert parts["lm"] == pytest.approx(float(loss.detach())) and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(float(CausalLanguageModeling().loss(model, batch).detach()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- export


def test_a_uniform_export_loads_where_cahp_cannot_be_imported(tmp_path: Path) -> None:
    pruned = prune_heads(causal_lm("llama"), REMOVALS["uniform"], gqa_mode="uniform")
    folder = save_pruned(pruned, tmp_path / "stock", stock=True)
    inputs = {"input_ids": torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(3))}
    torch.save(inputs, tmp_path / "inputs.pt")
    job = {
        "folder": str(folder),
        "auto": "AutoModelForCausalLM",
        "remote": False,
        "inputs": str(tmp_path / "inputs.pt"),
        "output": str(tmp_path / "logits.pt"),
    }
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CAHP, json.dumps([job])], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = pruned(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- LoRA recovery

#: Loads a saved model where peft is not installed (``import peft`` fails, ``find_spec`` finds nothing).
_WITHOUT_PEFT = r"""
import importlib.util, json, sys
sys.modules["peft"] = None
assert importlib.util.find_spec("peft") is None
import torch, transformers
job = json.loads(sys.argv[1])
model = transformers.AutoModelForCausalLM.from_pretrained(job["folder"]).eval()
with torch.no_grad():
    torch.save(model(**torch.load(job["inputs"])).logits, job["output"])
"""


def test_merged_lora_adapters_give_the_peft_models_logits() -> None:
    from cahp.decoder import add_lora, lora_target_modules, merge_lora

    pytest.importorskip("peft")
    model = prune_heads(causal_lm("llama"), REMOVALS["groups"], gqa_mode="groups")
    inputs = {"input_ids": torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        before = model(**inputs).logits
    targets = lora_target_modules(model)
    assert "lm_head" not in targets and "model.layers.0.self_attn.q_proj" in targets
    assert "model.layers.1.mlp.down_proj" in targets
    wrapped = add_lora(model, rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            assert parameter.requires_grad == ("lora_" in name), name
            if "lora_B" in name:  # B starts at zero: give the adapters an effect
                parameter.normal_(0.0, 0.2)
        adapted = wrapped(**inputs).logits
    assert not torch.allclose(adapted, before, atol=1e-3), "the adapters change the logits"
    merged = merge_lora(wrapped)
    assert merged is model and not any("lora" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=0, atol=1e-5)


def test_lora_recovery_trains_merges_and_saves_a_model_that_loads_without_peft(
    lm_folders: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    recovery = TrainingConfig(epochs=3.0, learning_rate=1e-2, batch_size=2, warmup_ratio=0.0, weight_decay=0.0)
    config = tiny_config(
        lm_folders, prompted=(), recovery=recovery, recovery_lora_rank=4, gqa_mode="uniform", uniform_layers=True
    )
    report = prune_lm(config, tmp_path / "run", progress=False)
    lora = report["recovery"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["merged"]) == (4, 8, True)
    assert 0 < lora["trainable_parameters"] < report["parameters"]["pruned"] / 2
    losses = [row["train_loss"] for row in report["recovery"]["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], "the adapters learn"
    assert report["perplexity"]["after"] < report["perplexity"]["pruned"]
    assert "(LoRA rank 4, merged)" in summary(report)
    assert not any((tmp_path / "run").rglob("recovery_checkpoint.pt")), "the merged checkpoint is cleaned up"

    folder = tmp_path / "run" / "model"
    assert report["export"]["format"] == "stock" and not (folder / "adapter_config.json").exists()
    saved = json.loads((folder / "config.json").read_text())
    assert "lora" not in json.dumps(saved).lower() and "peft" not in json.dumps(saved).lower()
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in name for name in reloaded.state_dict())
    blocks = make_blocks(tiny_tokenizer(), random_corpus(documents=40), context_length=16, max_blocks=6)
    assert perplexity(reloaded, tiny_tokenizer(), blocks)["perplexity"] == pytest.approx(
        report["perplexity"]["after"], rel=1e-5
    ), "the saved model is the merged, recovered one"

    inputs = {"input_ids": torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(3))}
    torch.save(inputs, tmp_path / "inputs.pt")
    job = {"folder": str(folder), "inputs": str(tmp_path / "inputs.pt"), "output": str(tmp_path / "logits.pt")}
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PEFT, json.dumps(job)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), reloaded(**inputs).logits, rtol=0, atol=1e-5)


def test_a_lora_run_killed_after_merging_resumes_to_the_same_model(
    lm_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the merged weights overwrote the training checkpoint, so a run killed before its recovery
    stage was recorded wrapped the merged model in LoRA again and failed to load that checkpoint."""
    import cahp.run as decoder

    pytest.importorskip("peft")
    recovery = TrainingConfig(epochs=2.0, learning_rate=1e-2, batch_size=2, warmup_ratio=0.0, weight_decay=0.0)
    config = tiny_config(
        lm_folders, prompted=(), recovery=recovery, recovery_lora_rank=4, gqa_mode="uniform", uniform_layers=True
    )
    whole = prune_lm(config, tmp_path / "whole", progress=False)
    real_write = decoder.atomic_write

    def killed_after_merging(path: Path, write: Any) -> Any:
        result = real_write(path, write)
        if Path(path).name == "recovery_merged.pt":
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(decoder, "atomic_write", killed_after_merging)
    with pytest.raises(KeyboardInterrupt):
        prune_lm(config, tmp_path / "run", progress=False)
    monkeypatch.setattr(decoder, "atomic_write", real_write)
    resumed = prune_lm(config, tmp_path / "run", progress=False)
    assert resumed["perplexity"]["after"] == pytest.approx(whole["perplexity"]["after"], rel=1e-5)


def test_lora_recovery_without_peft_is_refused_in_one_line_before_any_work(
    lm_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    recovery = TrainingConfig(epochs=1.0, learning_rate=1e-2, batch_size=2)
    config = tiny_config(lm_folders, prompted=(), recovery=recovery, recovery_lora_rank=4)
    with pytest.raises(CahpError) as refused:
        prune_lm(config, tmp_path / "run", progress=False)
    assert "pip install 'cahp[lora]'" in str(refused.value) and "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
    arguments = ["prune-lm", "--model", str(lm_folders["llama"]), "--corpus", str(lm_folders["corpus"])]
    arguments += ["--method", "magnitude", "--sparsity", "0.5"]
    arguments += ["--recovery-epochs", "1", "--recovery-lora-rank", "4", "--out", str(tmp_path / "cli")]
    assert main(arguments) == 1
    assert "pip install 'cahp[lora]'" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_a_lora_rank_without_recovery_epochs_is_refused(lm_folders: dict[str, Path]) -> None:
    with pytest.raises(CahpError, match="--recovery-epochs above 0"):
        tiny_config(lm_folders, recovery_lora_rank=4)
    with pytest.raises(CahpError, match="recovery_lora_rank"):
        tiny_config(lm_folders, recovery=TrainingConfig(epochs=1.0), recovery_lora_rank=0)
