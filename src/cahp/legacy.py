"""Records written by earlier versions of cahp, read in today's keys: the one place that knows old formats.

* :func:`upgrade_prune_record`: a ``run_config.json`` of ``cahp prune`` (or of ``cahp prune-lm``) from before methods
  had one interface, before recovery objectives, or from the separate causal-LM command;
* :func:`upgrade_bench_record`: a bench config or cell record from before methods had one interface, or from
  before a grid's seed could seed each cell's recovery.

Each takes the raw JSON dictionary and returns one in today's keys (a current record passes unchanged), so that
configs and resumed runs of earlier versions keep working. (Pruned model folders of earlier versions are upgraded
by :func:`cahp.surgery.autoload.upgrade_pruned_folder`, next to the format it writes.)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from cahp.errors import CahpError
from cahp.methods.plan import Budget
from cahp.workloads.causal_lm import LMOptions


def upgrade_prune_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``run_config.json`` written before methods had one interface, in today's keys (others pass unchanged).

    Then CAHP's options were a ``cahp`` block (with the budget, the guardrail and the seed), head scorers' a
    ``scorer_settings`` block, and the gradient salience had its own ``salience_fraction``. A run's record (it
    has a ``command`` key) without a ``recovery_objective`` was written before recovery objectives existed: it
    recovered with cross-entropy; one without ``reconstruct``, before the reconstruction step: it had none.
    """
    if raw.get("command") == "prune-lm" or (raw.get("objective") == "causal-lm" and "corpus" in raw):
        raw = _upgrade_prune_lm_record(raw)
    if "command" in raw and "recovery_objective" not in raw:
        raw = {**raw, "recovery_objective": {"loss": "ce"}}
    if "command" in raw and "reconstruct" not in raw:  # recorded before reconstruction existed: it had none
        raw = {**raw, "reconstruct": "none"}
    if "cahp" not in raw:
        return raw
    record = {
        key: value
        for key, value in raw.items()
        if key not in ("cahp", "scorer_settings", "salience_fraction", "signature_batch_size")
    }
    old = dict(raw["cahp"])
    record["seed"] = old.pop("seed", 42)
    record["allow_empty_layers"] = old.pop("allow_empty_layers", False)
    keep, sparsity = old.pop("keep", None), old.pop("sparsity", None)
    record["budget"] = Budget.from_options(keep, sparsity).label() if (keep or sparsity) else "auto"
    scorer_settings = dict(raw.get("scorer_settings", {}))
    if raw.get("method", "cahp") == "cahp":
        settings = {key: value for key, value in old.items() if key != "salience" or value != "gradient"}
        if old.get("salience", "gradient") == "gradient":
            scorer_settings.setdefault("fraction", raw.get("salience_fraction", 0.25))
        if scorer_settings:
            settings["salience_settings"] = scorer_settings
        settings["batch_size"] = raw.get("signature_batch_size", 32)
        record["method_settings"] = settings
    else:
        record["method_settings"] = scorer_settings
    return record


def _upgrade_prune_lm_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``cahp prune-lm`` run's config (its text and measurement settings flat beside the run's) as a ``causal-lm``
    prune config; it recovered on the LM loss (``ce``) with the recipe it records."""
    text_keys = {item.name for item in fields(LMOptions)}
    record = {key: value for key, value in raw.items() if key not in text_keys and key != "command"}
    record["lm"] = {key: value for key, value in raw.items() if key in text_keys}
    record["objective"] = "causal-lm"
    record.setdefault("recovery_objective", {"loss": "ce"})
    if "command" in raw:
        record["command"] = "prune"
    return record


def upgrade_bench_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A config or record of the bench written before methods had one interface, or before
    ``recovery_seeding`` existed, in today's keys.

    Before methods had one interface, CAHP's settings were a ``cahp`` block and head scorers' a
    ``scorer_settings`` block; every seed used one calibration sample; CAHP's gradient salience used every
    calibration batch, drawn in the order of ``calibration_seed``, and a scorer named as CAHP's salience took the
    scorer settings of that name.

    Before ``recovery_seeding`` existed, every cell recovered with the recipe's own ``recovery.seed``, whatever
    its grid seed: a config or record without the key reads as ``"fixed"``, so every committed grid (and a
    resumed folder of one) keeps its meaning. (A config built in code gets the dataclass default, ``per_seed``.)
    Likewise a config or record without ``reconstruct`` reads as ``"none"`` (no reconstruction step, as before it
    existed); a config built in code gets the default of ``cahp prune``, ``weights``.
    """
    record = _upgrade_bench_methods(raw)
    record.setdefault("recovery_seeding", "fixed")
    record.setdefault("reconstruct", "none")
    return record


def _upgrade_bench_methods(raw: dict[str, Any]) -> dict[str, Any]:
    """A bench config from before methods had one interface (``cahp`` and ``scorer_settings`` blocks) in
    today's keys; any other passes unchanged (as a copy)."""
    if "cahp" not in raw and "scorer_settings" not in raw:
        return dict(raw)
    if "method_settings" in raw:
        raise CahpError(
            'bench config: "method_settings" replaces the older "cahp" and "scorer_settings" keys; give only '
            '"method_settings" ({method: {setting: value}})'
        )
    record = {key: value for key, value in raw.items() if key not in ("cahp", "scorer_settings")}
    settings: dict[str, dict[str, Any]] = {m: dict(v) for m, v in (raw.get("scorer_settings") or {}).items()}
    if "cahp" in raw.get("methods", ["cahp"]) or raw.get("cahp"):
        cahp = dict(raw.get("cahp") or {})
        salience = cahp.get("salience", "gradient")
        cahp.pop("allow_empty_layers", None)
        salience_settings = {"fraction": 1.0} if salience == "gradient" else dict(settings.get(salience, {}))
        if salience_settings:
            cahp["salience_settings"] = salience_settings
        cahp["salience_seed"] = raw.get("calibration_seed", 0)
        if "cahp" in raw.get("methods", ["cahp"]):
            settings["cahp"] = cahp
    record["method_settings"] = settings
    record.setdefault("resample_calibration", False)
    return record
