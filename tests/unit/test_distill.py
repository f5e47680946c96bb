"""Recovery objectives (cahp.train.distill): distillation losses on tiny models of every family, and resuming."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cahp.data import EncodedSplit
from cahp.errors import ConfigError
from cahp.models import load_tokenizer, resolve_model
from cahp.surgery import heads_to_remove, prune_heads
from cahp.train.distill import (
    Distillation,
    RecoveryObjective,
    build_recovery_loss,
    relation_distillation,
)
from cahp.train.loop import TrainingConfig, train_model
from tests.conftest import tiny_bert_folder
from tests.unit.tiny_models import FAMILIES, SPECS, build_model, make_inputs, plan_for

ALL_TERMS = RecoveryObjective(loss="kd-relations", relation_heads=3, hidden_weight=1.0)


def _batch(family: str) -> dict[str, torch.Tensor]:
    batch = make_inputs(family)
    batch["labels"] = torch.tensor([0, 2])
    return batch


def _pruned(teacher: torch.nn.Module, family: str) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    prune_heads(student, heads_to_remove(student, plan_for(family)))
    return student


@pytest.mark.parametrize("family", FAMILIES)
def test_losses_are_zero_for_the_teacher_itself(family: str) -> None:
    teacher = build_model(family)
    student = copy.deepcopy(teacher)  # eval mode: no dropout, so the student computes exactly the teacher
    loss, parts = Distillation(ALL_TERMS, teacher)(student, _batch(family), np.arange(2))
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)
    assert parts["relations"] == pytest.approx(0.0, abs=1e-6)
    assert parts["hidden"] == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(0.5 * parts["ce"], abs=1e-5)  # alpha * CE and nothing else


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_student_has_positive_losses_and_only_it_gets_gradients(family: str) -> None:
    teacher = build_model(family)
    student = _pruned(teacher, family)  # one layer keeps no head (its relations are skipped), GQA: whole groups
    loss, parts = Distillation(ALL_TERMS, teacher)(student, _batch(family), np.arange(2))
    assert parts["kd"] > 1e-6 and parts["relations"] > 1e-6 and parts["hidden"] > 1e-6
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    assert all(torch.isfinite(g).all() for g in student_grads)


def test_relations_ignore_padding_and_need_no_equal_widths() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(1, 5, 12), torch.randn(1, 5, 4)  # the student kept a third of the width
    mask = torch.ones(1, 5, dtype=torch.long)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    noise_t, noise_s = torch.randn(1, 3, 12) * 50, torch.randn(1, 3, 4) * 50  # garbage in the padded positions
    plain = relation_distillation(student, teacher, mask, 4)
    padded = relation_distillation(
        torch.cat([student, noise_s], dim=1), torch.cat([teacher, noise_t], dim=1), padded_mask, 4
    )
    torch.testing.assert_close(plain, padded)
    assert plain > 0
    # more relation heads than the student's width: capped at its width instead of empty chunks
    assert torch.isfinite(relation_distillation(student, teacher, mask, 64))


def test_relations_of_a_layer_with_zero_heads_are_skipped() -> None:
    teacher = build_model("bert")
    student = copy.deepcopy(teacher)
    prune_heads(student, {1: [0, 1, 2, 3]})  # layer 1 keeps nothing; the others are unchanged
    only_layer_1 = RecoveryObjective(loss="kd-relations", relation_layers="1")
    loss, parts = Distillation(only_layer_1, teacher)(student, _batch("bert"), np.arange(2))
    assert "relations" not in parts and torch.isfinite(loss)
    first_two = RecoveryObjective(loss="kd-relations", relation_layers="0,1")
    _, parts = Distillation(first_two, teacher)(student, _batch("bert"), np.arange(2))
    assert parts["relations"] == pytest.approx(0.0, abs=1e-6)  # layer 0 computes the teacher's q/k/v; 1 is skipped


def test_kd_alpha_and_temperature_mix_as_documented() -> None:
    teacher = build_model("bert")
    student = _pruned(teacher, "bert")
    batch = _batch("bert")
    _, parts = Distillation(RecoveryObjective(loss="kd", alpha=0.0), teacher)(student, batch, np.arange(2))
    loss, _ = Distillation(RecoveryObjective(loss="kd", alpha=0.25, temperature=3.0), teacher)(
        student, batch, np.arange(2)
    )
    with torch.no_grad():
        s, t = student(**batch).logits / 3.0, teacher(**batch).logits / 3.0
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * 9.0
    assert loss.item() == pytest.approx(0.25 * parts["ce"] + 0.75 * kl.item(), rel=1e-5)


def test_settings_are_checked() -> None:
    for bad in (
        {"loss": "mse"},
        {"temperature": 0},
        {"alpha": 1.5},
        {"relation_heads": 0},
        {"relation_layers": "x"},
        {"hidden_weight": -1},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            RecoveryObjective(**bad)
    with pytest.raises(ConfigError, match=r"layers 0\.\.2"):
        RecoveryObjective(loss="kd-relations", relation_layers="3").layers(3)
    assert RecoveryObjective(relation_layers="last").layers(6) == [5]


# ---- in the training loop ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("distill") / "tiny", layers=2, heads=4, num_labels=3)


def _data(tokenizer: object) -> EncodedSplit:
    rng = np.random.default_rng(0)
    features = []
    for _ in range(24):
        ids = [101, *rng.integers(1000, 2000, size=rng.integers(3, 12)).tolist(), 102]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return EncodedSplit(features, rng.integers(0, 3, size=24))


def _recover(folder: Path, objective: RecoveryObjective, checkpoint: Path | None) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    student = copy.deepcopy(teacher)
    prune_heads(student, {0: [0, 1], 1: [3]})
    tokenizer = load_tokenizer(resolve_model(folder))
    data = _data(tokenizer)
    loss = build_recovery_loss(objective, teacher, tokenizer, data, 8)
    config = TrainingConfig(epochs=2.0, learning_rate=1e-3, batch_size=4, checkpoint_every=4, seed=3)
    train_model(student, tokenizer, data, config, checkpoint_path=checkpoint, progress=False, loss_fn=loss)
    return student


@pytest.mark.parametrize("loss", ["kd", "kd-relations"])
def test_distilled_recovery_resumes_to_the_same_weights(
    tiny_classifier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    objective = RecoveryObjective(loss=loss)
    straight = _recover(tiny_classifier, objective, None)

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def interrupting_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 10:  # in the second epoch, after the checkpoint at step 8
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        _recover(tiny_classifier, objective, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = _recover(tiny_classifier, objective, tmp_path / "checkpoint.pt")
    for (name, value), (_, other) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(other, value, rtol=0, atol=1e-6, msg=name)


def test_kd_computes_the_teacher_once_and_changes_training(tiny_classifier: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    tokenizer = load_tokenizer(resolve_model(tiny_classifier))
    data = _data(tokenizer)
    distillation = build_recovery_loss(RecoveryObjective(loss="kd"), teacher, tokenizer, data, 8)
    assert distillation is not None and distillation.teacher_forwards == 3  # 24 examples in batches of 8
    assert distillation.teacher_logits is not None and distillation.teacher_logits.shape == (24, 3)
    assert build_recovery_loss(RecoveryObjective(loss="ce"), teacher, tokenizer, data, 8) is None
    ce = _recover(tiny_classifier, RecoveryObjective(loss="ce"), None)
    kd = _recover(tiny_classifier, RecoveryObjective(loss="kd", alpha=0.0), None)
    differs = [not torch.equal(a, b) for a, b in zip(ce.state_dict().values(), kd.state_dict().values(), strict=True)]
    assert any(differs)


def test_image_models_distil_without_an_attention_mask() -> None:
    family = next(f for f in FAMILIES if SPECS[f].is_image)
    teacher = build_model(family)
    student = _pruned(teacher, family)
    batch = {**make_inputs(family), "labels": torch.tensor([0, 1])}
    loss, parts = Distillation(ALL_TERMS, teacher)(student, batch, np.arange(2))
    assert torch.isfinite(loss) and parts["relations"] > 0


# ---- configs -------------------------------------------------------------------------------------------------


def test_records_of_earlier_runs_replay_with_cross_entropy_and_new_runs_take_the_default() -> None:
    from cahp.pipeline import PruneConfig

    earlier_record = {"command": "prune", "model": "m", "task": {"task": "sst5"}, "method": "random"}
    assert PruneConfig.from_dict(earlier_record).recovery_objective.loss == "ce"
    hand_written = {"model": "m", "task": {"task": "sst5"}}
    assert PruneConfig.from_dict(hand_written).recovery_objective == PruneConfig(model="m").recovery_objective
    assert PruneConfig(model="m").recovery.group_by_length  # new runs recover on length-grouped batches
    with pytest.raises(ConfigError, match=r"^prune config\.recovery_objective: .*alpha"):
        PruneConfig.from_dict({**hand_written, "recovery_objective": {"loss": "kd", "alpha": 2}})


def test_cli_options_set_the_recovery_objective() -> None:
    from cahp.cli import build_parser
    from cahp.commands.prune import prune_config

    args = build_parser().parse_args(
        [
            *("prune", "--model", "m", "--out", "o", "--recovery-loss", "kd-relations", "--kd-alpha", "0"),
            *("--relation-layers", "last", "--hidden-weight", "0.5", "--kd-temperature", "4"),
        ]
    )
    objective = prune_config(args).recovery_objective
    assert (objective.loss, objective.alpha, objective.relation_layers) == ("kd-relations", 0.0, "last")
    assert (objective.hidden_weight, objective.temperature) == (0.5, 4.0)
