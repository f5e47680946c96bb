"""Data parallelism: two CPU processes (gloo, spawned) give the one-process statistics, scores, kept heads and
recovered weights; a two-process ``cahp prune`` writes once, from rank 0, and an interrupted one resumes.

The multi-process tests spawn 2 processes that run a named scenario and pickle their result per rank; the test
compares it with the same scenario run in this (single) process.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cahp import distributed
from cahp.calibration import Calibration, SequenceClassification, local_share
from cahp.data.batching import EncodedSplit, iter_batches
from tests.unit.tiny_models import LABELS, VOCAB, build_model

WORLD = 2

#: Every built-in scorer, on batches small enough that each process gets several (trained scorers: few steps);
#: the ``*-empty`` cases leave one process without a batch (or without rows of a step's batch).
SCORER_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random", {}),
    "magnitude": ("magnitude", {}),
    "entropy": ("entropy", {"batch_size": 4}),
    "gradient": ("gradient", {"batch_size": 4}),
    "gradient-fraction": ("gradient", {"batch_size": 4, "fraction": 0.5, "normalize_layers": False}),
    "gradient-empty": ("gradient", {"batch_size": 32}),
    "hies": ("hies", {"batch_size": 4}),
    "fisher": ("fisher", {"max_examples": 12}),
    "kwon": ("kwon", {"max_examples": 12}),
    "attattr": ("attattr", {"steps": 2, "batch_size": 4, "max_examples": 10}),
    "l0": ("l0", {"steps": 6, "batch_size": 5}),
    "l0-empty": ("l0", {"steps": 4, "batch_size": 1}),
    "dsp": ("dsp", {"steps": 6, "batch_size": 5}),
    "sink": ("sink", {"batch_size": 4}),
    "redundancy": ("redundancy", {"batch_size": 4}),
}


def test_every_builtin_scorer_has_a_case() -> None:
    from cahp.scoring import BUILTIN_SCORERS

    assert {name for name, _ in SCORER_CASES.values()} == {*BUILTIN_SCORERS, "kwon"}  # kwon: Fisher blocks


# ---- helpers that run in every process ----------------------------------------------------------------------


def _tokenizer() -> Any:
    from cahp.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm-l6"))  # only pads: pad id 0 fits every tiny model


def _data(examples: int = 20, seed: int = 0) -> EncodedSplit:
    """Token ids below the tiny vocabulary, lengths 3..10 (batches get padded), 3 labels."""
    rng = np.random.default_rng(seed)
    features = []
    for _ in range(examples):
        ids = [1, *rng.integers(3, VOCAB, int(rng.integers(1, 9))).tolist(), 2]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids)})
    return EncodedSplit(features, rng.integers(0, LABELS, examples))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch with one thread, as each spawned process does (float32 sums depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _calibration() -> Calibration:
    return Calibration(_data(), _tokenizer(), SequenceClassification(LABELS), batch_size=4)


def _fit_everything(_: Path) -> dict[str, Any]:
    """Every scorer's scores and a budget's kept heads, and CAHP's salience, profiles and plan (auto budget)."""
    from cahp.engine import Engine
    from cahp.methods.plan import Budget

    engine = Engine(build_model("bert"), _calibration())
    result: dict[str, Any] = {}
    for case, (name, settings) in SCORER_CASES.items():
        fitted = engine.fit(name, {"seed": 3, **settings}, Budget.keep(6))
        result[case] = {"scores": fitted.scores_, "kept": fitted.plan(Budget.keep(6)).kept_heads_by_layer}
    cahp = engine.fit("cahp", {"seed": 3, "batch_size": 4, "tsne_iterations": 250})
    result["cahp"] = {
        "salience": cahp.salience_,
        "profiles": cahp.selector_.profiles_,
        "kept": cahp.plan(Budget.auto()).kept_heads_by_layer,
    }
    return result


def _tiny_classifier() -> torch.nn.Module:
    """A dropout-free tiny BERT classifier, the same weights in every process."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def _train(folder: Path, interrupt_at_call: int | None = None) -> dict[str, Any]:
    """Recovery-style training: 17 examples in global batches of 8 (the last batch has one row, so one process
    gets none), 2 epochs. With ``interrupt_at_call``, a first run dies (KeyboardInterrupt) at that loss call after
    a checkpoint at every step, and a second run resumes from the checkpoint."""
    from cahp.train.loop import TrainingConfig, train_model

    training = TrainingConfig(epochs=2, learning_rate=1e-3, batch_size=8, warmup_ratio=0.0, seed=5, checkpoint_every=1)
    checkpoint = folder / "checkpoint.pt" if interrupt_at_call is not None else None
    if interrupt_at_call is not None:
        calls = [0]

        def dying(model: torch.nn.Module, batch: dict[str, torch.Tensor], indices: Any) -> Any:
            calls[0] += 1
            if calls[0] == interrupt_at_call:
                raise KeyboardInterrupt
            return model(**batch).loss, {}

        with pytest.raises(KeyboardInterrupt):
            train_model(
                _tiny_classifier(), _tokenizer(), _data(17, seed=1), training, checkpoint_path=checkpoint, loss_fn=dying
            )
        assert calls[0] == interrupt_at_call, "every process stops at the same step"
    model = _tiny_classifier()
    history = train_model(model, _tokenizer(), _data(17, seed=1), training, progress=False, checkpoint_path=checkpoint)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "history": history}


def _train_resumed(folder: Path) -> dict[str, Any]:
    return _train(folder, interrupt_at_call=2)


def _prune_cli(folder: Path) -> dict[str, Any]:
    """``cahp prune`` through the CLI (which initialises the process group), recording every file each process
    writes atomically and whether it opened the output folder; ``folder/crash`` makes the recovery raise
    KeyboardInterrupt (a killed run), ``folder/count_fits`` counts the fits."""
    import cahp.pipeline
    import cahp.run
    from cahp.cli import main
    from cahp.scoring.gradient import GradientScorer

    written = _record_writes()
    opened: list[str] = []
    fits: list[str] = []
    real_prepare = cahp.pipeline.StagedOutput.prepare

    def recording_prepare(self: Any) -> Any:
        opened.append(str(self.out))
        return real_prepare(self)

    cahp.pipeline.StagedOutput.prepare = recording_prepare  # type: ignore[method-assign]
    real_score = GradientScorer._score

    def counting_score(self: Any, *args: Any) -> Any:
        fits.append("gradient")
        return real_score(self, *args)

    GradientScorer._score = counting_score  # type: ignore[method-assign]
    if (folder / "crash").exists():

        def crash(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        cahp.run.train_model = crash  # type: ignore[attr-defined]
    if (folder / f"unreadable_model_on_rank{os.environ['RANK']}").exists():
        import cahp.workloads.classification
        from cahp.errors import ModelNotFoundError

        def unreadable(*args: Any, **kwargs: Any) -> None:
            raise ModelNotFoundError("cannot read the model on this process")

        cahp.workloads.classification.load_classifier = unreadable  # type: ignore[assignment]
    own = folder / f"argv{os.environ['RANK']}"  # a rank's own command line, where a test gives one
    argv = (own if own.is_file() else folder / "argv").read_text().split("\n")
    status = main(argv)
    return {"status": status, "written": written, "opened": opened, "fits": fits}


def _record_writes() -> list[str]:
    """Record (in the returned list) every file written through :func:`cahp.outputs.atomic_write`."""
    import cahp.engine
    import cahp.outputs
    import cahp.train.loop

    written: list[str] = []
    real_write = cahp.outputs.atomic_write

    def recording_write(path: Any, writer: Callable[[Path], None]) -> Path:
        written.append(str(path))
        return real_write(path, writer)

    for module in (cahp.outputs, cahp.engine, cahp.train.loop):
        module.atomic_write = recording_write  # type: ignore[attr-defined]
    return written


def _bench(folder: Path) -> dict[str, Any]:
    """``run_bench`` of the pickled config in ``folder``, recording the files each process writes."""
    from cahp.bench import run_bench

    written = _record_writes()
    result = run_bench(pickle.loads((folder / "bench_config.pkl").read_bytes()), progress=False)
    return {"result": result, "written": written}


def _disagree(_: Path) -> dict[str, Any]:
    """Rank 1 holds other weights: the first fit must refuse, in every process."""
    from cahp.engine import Engine
    from cahp.errors import CahpError

    model = build_model("bert")
    if distributed.rank() == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    try:
        Engine(model, _calibration()).fit("gradient", {"batch_size": 4})
    except CahpError as error:
        return {"error": str(error)}
    return {"error": None}


def _gradients(_: Path) -> dict[str, Any]:
    """Gradient sums: ``used`` has a gradient on rank 0 only, ``unused`` on no process."""
    used, unused = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    if distributed.rank() == 0:
        used.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.all_reduce_gradients([used, unused])
    return {"used": None if used.grad is None else used.grad.tolist(), "unused_grad_is_none": unused.grad is None}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "gradients": _gradients,
    "fit": _fit_everything,
    "train": _train,
    "train_resumed": _train_resumed,
    "prune": _prune_cli,
    "bench": _bench,
    "disagree": _disagree,
}


def _worker(rank: int, port: int, scenario: str, folder: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    if scenario != "prune":  # the prune scenario goes through the CLI entry point, which initialises the group
        assert distributed.init_from_environment()
    try:
        result = SCENARIOS[scenario](Path(folder))
    finally:
        distributed.shutdown()
    (Path(folder) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_two_processes(scenario: str, folder: Path) -> list[dict[str, Any]]:
    """Run ``scenario`` in 2 spawned gloo processes; their results in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("rank*.pkl"):
        stale.unlink()
    # fork: the children reuse this process's imports (a spawned child re-imports torch and transformers, which
    # costs ~15 s each on a loaded 2-core machine); each child runs torch with one thread
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(_free_port(), scenario, str(folder)), nprocs=WORLD, join=True, start_method=method
    )
    return [pickle.loads((folder / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD)]


# ---- one process: sharding and the helpers ------------------------------------------------------------------


def test_single_process_helpers_are_the_identity() -> None:
    tensor = torch.arange(4.0)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum(tensor) is tensor
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.local_rows(5) == slice(0, 5)
    batch = {"input_ids": torch.zeros(3, 2)}
    assert local_share(batch) == (batch, 1.0)


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 8])
def test_local_rows_split_every_batch_exactly_once(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        shares.append(list(range(rows))[distributed.local_rows(rows)])
    assert [row for share in shares for row in share] == list(range(rows))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(
    "options", [{}, {"shuffle": True, "seed": 4, "epoch": 2}, {"sort_by_length": True}, {"shuffle": True, "seed": 9}]
)
def test_global_batch_sequence_is_iter_batches_and_shards_partition_it(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calibration = _calibration()
    expected = [
        indices.tolist() for indices, _ in iter_batches(calibration.tokenizer, calibration.examples, 3, **options)
    ]
    assert [indices.tolist() for indices, _ in calibration.indexed_batches(3, **options)] == expected
    assert [b.tolist() for b in calibration.batch_indices(3, **options)] == expected
    seen: list[list[int]] = []
    counts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        mine = [indices.tolist() for indices, _ in calibration.indexed_batches(3, limit=5, **options)]
        assert mine == expected[rank:5:3], "batch i goes to process i % world"
        assert calibration.local_num_batches(3, limit=5) == len(mine)
        unsharded = [indices.tolist() for indices, _ in calibration.whole().indexed_batches(3, **options)]
        assert unsharded == expected, "an unsharded calibration gives every process every batch"
        seen += mine
        counts.append(len(mine))
    assert sorted(seen) == sorted(expected[:5]) and counts == [2, 2, 1]
    assert calibration.subset(10, seed=0).sharded and not calibration.whole().subset(10, seed=0).sharded


# ---- two processes ------------------------------------------------------------------------------------------

two_processes = pytest.mark.distributed


@pytest.fixture(scope="module")
def fitted_two_ways(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with one_thread():
        one = _fit_everything(Path("."))
    two = run_two_processes("fit", tmp_path_factory.mktemp("fit"))
    return one, two


@two_processes
@pytest.mark.parametrize("case", sorted(SCORER_CASES))
def test_two_processes_give_the_one_process_scores_and_heads(
    case: str, fitted_two_ways: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    one, two = fitted_two_ways
    # trained gates: float32 gradients of split batches differ in the last bits, which Adam steps and DSP's
    # annealed soft top-k (temperature down to 0.05) amplify to ~1e-4 over the steps
    trained = SCORER_CASES[case][0] in ("l0", "dsp")
    for rank, result in enumerate(two):
        np.testing.assert_allclose(
            result[case]["scores"],
            one[case]["scores"],
            rtol=1e-3 if trained else 1e-9,
            atol=1e-7,
            err_msg=f"rank {rank}",
        )
        assert result[case]["kept"] == one[case]["kept"], f"rank {rank} keeps other heads"


@two_processes
def test_two_processes_give_the_one_process_cahp(fitted_two_ways: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    one, two = fitted_two_ways
    for rank, result in enumerate(two):
        np.testing.assert_allclose(
            result["cahp"]["salience"], one["cahp"]["salience"], rtol=1e-9, err_msg=f"rank {rank}"
        )
        np.testing.assert_allclose(
            result["cahp"]["profiles"], one["cahp"]["profiles"], rtol=1e-6, atol=1e-9, err_msg=f"rank {rank} signatures"
        )
        assert result["cahp"]["kept"] == one["cahp"]["kept"], f"rank {rank} keeps other heads"


@two_processes
def test_data_parallel_recovery_matches_one_process(tmp_path: Path) -> None:
    with one_thread():
        one = _train(tmp_path)
    two = run_two_processes("train", tmp_path / "two")
    for rank, result in enumerate(two):
        for name, tensor in one["state"].items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")
        losses = [row["train_loss"] for row in result["history"]]
        np.testing.assert_allclose(losses, [row["train_loss"] for row in one["history"]], rtol=1e-4)
    assert [row["step"] for row in two[0]["history"]] == [3, 6], "3 global steps per epoch, as in one process"


@two_processes
def test_interrupted_data_parallel_recovery_resumes_from_rank_zeros_checkpoint(tmp_path: Path) -> None:
    with one_thread():
        one = _train(tmp_path)
    two = run_two_processes("train_resumed", tmp_path / "two")
    assert (tmp_path / "two" / "checkpoint.pt").is_file(), "rank 0 wrote the checkpoint"
    for rank, result in enumerate(two):
        for name, tensor in one["state"].items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")
        assert [row["steps_this_run"] for row in result["history"]] == [2, 3], "resumed after the first step"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import tiny_bert_folder, tiny_task_folder

    root = tmp_path_factory.mktemp("prune")
    return tiny_bert_folder(root / "model", layers=2, heads=4, num_labels=3), tiny_task_folder(root / "task", 40)


def _prune_argv(model: Path, task: Path, out: Path) -> list[str]:
    return [
        "prune",
        *("--model", str(model), "--task", str(task), "--max-length", "16", "--out", str(out)),
        *("--method", "gradient", "--keep", "5", "--calibration-batch-size", "4"),
        *("--method-setting", "batch_size=4", "--recovery-epochs", "1", "--recovery-loss", "ce"),
        *("--latency-repeats", "1", "--latency-seq-len", "16", "--latency-batch-size", "2"),
    ]


@two_processes
def test_two_process_prune_writes_once_from_rank_zero(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    from cahp.cli import main

    model, task = tiny_run
    out = tmp_path / "out"
    (tmp_path / "argv").write_text("\n".join(_prune_argv(model, task, out)))
    main_result, other = run_two_processes("prune", tmp_path)
    assert main_result["status"] == other["status"] == 0
    assert other["written"] == [] and other["opened"] == [], "only rank 0 opens and writes the output"
    assert other["fits"] == main_result["fits"] == ["gradient"], "every process fits (collectively), once"
    reports = [path for path in main_result["written"] if path.endswith("report.json")]
    assert len(reports) == 1 and len(main_result["written"]) == len(set(main_result["written"])), "each file once"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "no staging folder, no lock"
    report = json.loads((out / "report.json").read_text())
    one = tmp_path / "one"
    with one_thread():
        assert main(_prune_argv(model, task, one)) == 0
    expected = json.loads((one / "report.json").read_text())
    assert report["kept_heads_by_layer"] == expected["kept_heads_by_layer"]
    np.testing.assert_allclose(report["plan"]["details"]["scores"], expected["plan"]["details"]["scores"], rtol=1e-9)


@two_processes
def test_interrupted_two_process_prune_resumes(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    model, task = tiny_run
    out = tmp_path / "out"
    (tmp_path / "argv").write_text("\n".join(_prune_argv(model, task, out)))
    (tmp_path / "crash").touch()
    interrupted = run_two_processes("prune", tmp_path)
    assert [result["status"] for result in interrupted] == [130, 130], "both processes stop at the recovery"
    assert not out.exists() and (tmp_path / ".out.partial" / "stages" / "plan.json").is_file()
    assert not (tmp_path / ".out.lock").exists(), "the interrupted run released its lock"
    (tmp_path / "crash").unlink()
    resumed = run_two_processes("prune", tmp_path)
    assert [result["status"] for result in resumed] == [0, 0]
    assert [result["fits"] for result in resumed] == [[], []], "the cached plan is not fitted again, anywhere"
    report = json.loads((out / "report.json").read_text())
    assert "plan" in report["stages_cached"] and report["recovery_history"]
    assert not (tmp_path / ".out.partial").exists()


@two_processes
def test_gradient_sum_keeps_none_for_a_parameter_no_process_used(tmp_path: Path) -> None:
    """A parameter without a gradient on every process stays ``grad = None`` (the optimiser skips it, no weight
    decay, as in one process); one with a gradient on some process gets the sum everywhere."""
    for result in run_two_processes("gradients", tmp_path):
        assert result == {"used": [1.0, 2.0, 3.0], "unused_grad_is_none": True}


def test_processes_with_different_weights_are_refused(tmp_path: Path) -> None:
    errors = [result["error"] for result in run_two_processes("disagree", tmp_path)]
    assert all(error is not None and "processes disagree" in error for error in errors), errors


@two_processes
def test_two_process_bench_writes_cells_once_with_the_one_process_heads(tmp_path: Path) -> None:
    import json

    from cahp.bench import BenchConfig, run_bench
    from cahp.train import TaskOptions, TrainingConfig
    from tests.conftest import tiny_bert_folder, tiny_task_folder

    model = tiny_bert_folder(tmp_path / "model", layers=2, heads=4, num_labels=3)
    task = TaskOptions(str(tiny_task_folder(tmp_path / "task", examples=40)), max_length=16)

    def config(out: Path) -> BenchConfig:
        return BenchConfig(
            model=str(model),
            out=str(out),
            task=task,
            methods=["fisher", "random"],
            budgets=[0.5],
            seeds=[0],
            method_settings={"fisher": {"max_examples": 16}},
            recovery=TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=8),
            recovery_max_examples=16,
        )

    (tmp_path / "bench_config.pkl").write_bytes(pickle.dumps(config(tmp_path / "two")))
    main_result, other = run_two_processes("bench", tmp_path)
    assert other["written"] == [], "only rank 0 writes"
    cells = sorted(path for path in main_result["written"] if "/cells/" in path)
    assert len(cells) == len(set(cells)) == 2 and main_result["result"]["computed"] == other["result"]["computed"] == 2
    with one_thread():
        run_bench(config(tmp_path / "one"), progress=False)
    for name in ("fisher__seed0__0.5.json", "random__seed0__0.5.json"):
        two_cell = json.loads((tmp_path / "two" / "cells" / name).read_text())
        one_cell = json.loads((tmp_path / "one" / "cells" / name).read_text())
        assert two_cell["kept_heads_by_layer"] == one_cell["kept_heads_by_layer"], name


@two_processes
def test_two_process_causal_lm_prune_with_distillation_equals_one_process(tmp_path: Path) -> None:
    """``cahp prune --objective causal-lm`` with ``kd`` under 2 processes: the same heads and, up to float summation
    order, the same recovered perplexity as one process; rank 0 alone writes."""
    import json

    from cahp.cli import main
    from tests.unit.test_decoder import tiny_tokenizer
    from tests.unit.test_language_modeling import causal_lm, random_corpus

    causal_lm("llama").save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "corpus.txt").write_text("\n\n".join(random_corpus(documents=40).documents) + "\n")

    def argv(out: Path) -> list[str]:
        return [
            *("prune", "--objective", "causal-lm", "--model", str(tmp_path / "llama")),
            *("--corpus", str(tmp_path / "corpus.txt"), "--context-length", "16", "--calibration-blocks", "6"),
            *("--eval-blocks", "6", "--prompted", "none", "--continuation-tokens", "2", "--prompt-tokens", "8"),
            *("--new-tokens", "2", "--generation-batch-sizes", "1", "--latency-repeats", "1"),
            *("--method", "fisher", "--keep", "6", "--recovery-loss", "kd", "--recovery-epochs", "2"),
            *("--recovery-learning-rate", "1e-2", "--batch-size", "4", "--out", str(out)),
        ]

    (tmp_path / "argv").write_text("\n".join(argv(tmp_path / "two")))
    main_result, other = run_two_processes("prune", tmp_path)
    assert main_result["status"] == other["status"] == 0
    assert other["written"] == [] and other["opened"] == [], "only rank 0 opens and writes the output"
    with one_thread():
        assert main(argv(tmp_path / "one")) == 0
    two, one = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("two", "one"))
    assert two["kept_heads_by_layer"] == one["kept_heads_by_layer"]
    assert two["recovery"]["objective"] == one["recovery"]["objective"] == "causal-lm kd (T=2, alpha=0.5)"
    losses = [[row["train_loss"] for row in report["recovery"]["history"]] for report in (two, one)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert two["perplexity"]["after"] == pytest.approx(one["perplexity"]["after"], rel=1e-4)
    assert two["perplexity"]["after"] < two["perplexity"]["pruned"]


@two_processes
def test_processes_started_with_different_settings_stop_at_once_naming_them(
    tiny_run: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Regression: ranks given ``--recovery-epochs 1`` and ``3`` hung until the collective timeout."""
    model, task = tiny_run
    out = tmp_path / "out"
    (tmp_path / "argv0").write_text("\n".join(_prune_argv(model, task, out)))
    (tmp_path / "argv1").write_text("\n".join([*_prune_argv(model, task, out), "--recovery-epochs", "3"]))
    results = run_two_processes("prune", tmp_path)
    assert [result["status"] for result in results] == [1, 1], "both processes stop with an error"
    err = capfd.readouterr().err  # the two processes' lines may interleave
    assert err.count("cahp: error:") == 2 and err.count("different run settings") == 2
    assert "recovery.epochs" in err
    assert not out.exists() and not list(tmp_path.glob(".out*")), "nothing written, no lock left"


@two_processes
def test_an_early_failure_on_one_process_is_every_process_error(
    tiny_run: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rank 1 cannot read its model: both processes stop with that error instead of waiting for a timeout."""
    model, task = tiny_run
    out = tmp_path / "out"
    (tmp_path / "argv").write_text("\n".join(_prune_argv(model, task, out)))
    (tmp_path / "unreadable_model_on_rank1").touch()
    results = run_two_processes("prune", tmp_path)
    assert [result["status"] for result in results] == [1, 1]
    err = capfd.readouterr().err  # the two processes' lines may interleave
    assert err.count("cahp: error:") == 2 and err.count("cannot read the model on this process") == 2
    assert "process 1 stopped with ModelNotFoundError" in err, "rank 0 stops with rank 1's error"
    assert not out.exists() and not list(tmp_path.glob(".out*")), "nothing written, no lock left"


@two_processes
def test_two_process_reconstruction_equals_one_process(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``--reconstruct weights`` under 2 processes: the Gram sums are all-reduced, so the per-layer errors and the
    reconstructed model's accuracy are the one-process ones."""
    import json

    from cahp.cli import main

    model, task = tiny_run

    def argv(out: Path) -> list[str]:
        arguments = _prune_argv(model, task, out)
        arguments[arguments.index("--recovery-epochs") + 1] = "0"
        return [*arguments, "--reconstruct", "weights", "--calibration-size", "24"]

    (tmp_path / "argv").write_text("\n".join(argv(tmp_path / "two")))
    main_result, other = run_two_processes("prune", tmp_path)
    assert main_result["status"] == other["status"] == 0
    with one_thread():
        assert main(argv(tmp_path / "one")) == 0
    two, one = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("two", "one"))
    assert two["kept_heads_by_layer"] == one["kept_heads_by_layer"]
    records = [report["post_surgery"]["reconstruction"] for report in (two, one)]
    assert records[0]["tokens"] == records[1]["tokens"] > 0, "every calibration token counted once"
    for two_layer, one_layer in zip(records[0]["layers"], records[1]["layers"], strict=True):
        for key in ("error_before", "error_after"):
            assert two_layer[key] == pytest.approx(one_layer[key], rel=1e-6, abs=1e-9), key
    assert two["accuracy"]["after_pruning"]["test"]["accuracy"] == one["accuracy"]["after_pruning"]["test"]["accuracy"]
