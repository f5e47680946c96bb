"""Check the results the prose states against the committed results.

    python benchmarks/check_claims.py            # exit 1 with one line per failing claim or citation problem
    python benchmarks/check_claims.py --list     # every claim with its stated and computed value

``benchmarks/claims.toml`` lists every number or ranking that ``README.md``, ``benchmarks/README.md`` and
``docs/*.md`` state about results. Each claim has an ``id``, the ``file`` it appears in, the stated value
(``stated``: a number, a list of numbers, a boolean, a string or a list of strings), a tolerance (``tol``: the
rounding of the stated figure, for numbers) and an ``expr``: a Python expression over the helpers below, which read
only the committed JSON under ``benchmarks/results/``. The prose cites a claim right after the sentence that states
it, with an HTML comment that does not render: ``<!-- claim: sst5-recovery-ranking -->`` (several ids: comma-separated).

The check fails when a computed value differs from the stated one by more than ``tol``, when the prose cites an id
that ``claims.toml`` lacks, or when a claim is not cited in the file it names.

It needs only the standard library (no scipy): the t quantile of the paired intervals is computed from the exact
Student t distribution function for whole degrees of freedom (``t_quantile``).
"""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import math
import re
import statistics
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BENCH = RESULTS / "bench"
CLAIMS = HERE / "claims.toml"
#: the prose whose result statements are claims (docs/*.md is globbed)
PROSE = ("README.md", "benchmarks/README.md", "docs/*.md")
CITATION = re.compile(r"<!--\s*claims?:\s*([^>]*?)\s*-->")
STAGES = {"pruned": "after_pruning", "recovered": "after_recovery"}


# ---------------------------------------------------------------- statistics (pure functions)
def t_cdf(t: float, df: int) -> float:
    """Student t distribution function for a whole number of degrees of freedom, exactly.

    The closed forms of Abramowitz & Stegun 26.7.3 / 26.7.4: with theta = atan(t / sqrt(df)),
    odd df: 1/2 + (theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + 2·4/(3·5) cos^4 + ...)) / pi (df - 2 terms),
    even df: 1/2 + sin(theta)/2 (1 + 1/2 cos^2 + 1·3/(2·4) cos^4 + ...) (df / 2 terms).
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df}")
    theta = math.atan2(t, math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
        return 0.5 + (theta + math.sin(theta) * math.cos(theta) * total) / math.pi
    total, term = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return 0.5 + math.sin(theta) / 2 * total


def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Paired:
    """A paired mean difference ``a - b`` with its two-sided t interval."""

    mean: float
    lo: float
    hi: float
    n: int
    wins: int  # pairs where a > b

    @property
    def contains_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi

    def points(self) -> list[float]:
        """[mean, lo, hi] in points (x100)."""
        return [100 * self.mean, 100 * self.lo, 100 * self.hi]


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """Mean of the per-pair differences ``a[i] - b[i]`` and its ``level`` t interval (n - 1 degrees of freedom)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired needs two equal-length samples of 2 or more, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    centre = statistics.fmean(diffs)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Paired(centre, centre - half, centre + half, n, sum(d > 0 for d in diffs))


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def paired_t_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p value of the paired t test of ``a - b``."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))
    return 2.0 * (1.0 - t_cdf(abs(t), len(diffs) - 1))


def binomial_se(p: float, n: int) -> float:
    """Standard error of one accuracy ``p`` measured on ``n`` examples."""
    return math.sqrt(p * (1.0 - p) / n)


def mean(xs: Iterable[float]) -> float:
    return statistics.fmean(list(xs))


def sd(xs: Iterable[float]) -> float:
    """Sample standard deviation (n - 1), as the bench summaries report it."""
    return statistics.stdev(list(xs))


def pts(x: float | Iterable[float]) -> Any:
    """Accuracy (difference) in points: x100, elementwise for a list."""
    if isinstance(x, int | float):
        return 100.0 * x
    return [100.0 * v for v in x]


def span(xs: Iterable[float]) -> list[float]:
    """[min, max]: what a stated range "a–b" is checked against."""
    values = list(xs)
    return [min(values), max(values)]


def diffs(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def jaccard(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Jaccard overlap of two ``kept_heads_by_layer`` records."""
    sa = {(int(layer), head) for layer, heads in a.items() for head in heads}
    sb = {(int(layer), head) for layer, heads in b.items() for head in heads}
    return len(sa & sb) / len(sa | sb)


def shared_heads(a: dict[str, list[int]], b: dict[str, list[int]]) -> int:
    sa = {(int(layer), head) for layer, heads in a.items() for head in heads}
    sb = {(int(layer), head) for layer, heads in b.items() for head in heads}
    return len(sa & sb)


# ---------------------------------------------------------------- the committed results
@functools.cache
def _json(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def result(name: str, *keys: str | int) -> Any:
    """``results/<name>.json`` indexed by ``keys`` (e.g. ``result('calibration', 'stages', 'agreement')``)."""
    value = _json(RESULTS / f"{name}.json")
    for key in keys:
        value = value[key]
    return value


def config(grid: str) -> dict[str, Any]:
    """The grid's ``bench_config.json``."""
    return _json(BENCH / grid / "bench_config.json")


def floor_of(grid: str) -> dict[str, Any] | None:
    """The noise floor a published grid's summary prints (``summary.json``; ``None`` for a causal-LM grid)."""
    floor: dict[str, Any] | None = _json(BENCH / grid / "summary.json").get("noise_floor")
    return floor


def published() -> list[str]:
    """Every published grid (a folder of ``results/bench`` with a summary)."""
    return sorted(path.parent.name for path in BENCH.glob("*/summary.json"))


def _budget(budget: float | str) -> str:
    return budget if isinstance(budget, str) else f"{budget:g}"


def cell(grid: str, method: str, budget: float | str, seed: int = 0) -> dict[str, Any]:
    """One committed cell: ``results/bench/<grid>/cells/<method>__seed<seed>__<budget>.json``."""
    return _json(BENCH / grid / "cells" / f"{method}__seed{seed}__{_budget(budget)}.json")


def seeds(grid: str, method: str, budget: float | str) -> list[int]:
    """The seeds committed for one method and budget, in order."""
    pattern = re.compile(rf"{re.escape(method)}__seed(\d+)__{re.escape(_budget(budget))}\.json")
    found = (pattern.fullmatch(path.name) for path in (BENCH / grid / "cells").iterdir())
    return sorted(int(match.group(1)) for match in found if match)


def _split(record: dict[str, Any]) -> dict[str, Any]:
    (only,) = record.values()  # every committed cell evaluates one split (test, or validation for SST-2)
    return only


def acc(
    grid: str, method: str, budget: float | str, seed: int = 0, stage: str = "recovered", metric: str = "accuracy"
) -> float:
    """Accuracy (or ``metric='macro_f1'``) of one cell, ``stage`` 'pruned' or 'recovered'."""
    return float(_split(cell(grid, method, budget, seed)["accuracy"][STAGES[stage]])[metric])


def accs(
    grid: str, method: str, budget: float | str, stage: str = "recovered", metric: str = "accuracy"
) -> list[float]:
    """``acc`` of every committed seed, in seed order."""
    return [acc(grid, method, budget, seed, stage, metric) for seed in seeds(grid, method, budget)]


def macc(grid: str, method: str, budget: float | str, stage: str = "recovered", metric: str = "accuracy") -> float:
    """Mean over the committed seeds (one seed for the deterministic scorers)."""
    return mean(accs(grid, method, budget, stage, metric))


def kept(grid: str, method: str, budget: float | str, seed: int = 0) -> int:
    return int(cell(grid, method, budget, seed)["kept"])


def heads(grid: str, method: str, budget: float | str, seed: int = 0) -> dict[str, list[int]]:
    return cell(grid, method, budget, seed)["kept_heads_by_layer"]


def secs(grid: str, method: str, budget: float | str, seed: int = 0, stage: str = "recovery_and_evaluate") -> float:
    """Wall seconds of one stage of a cell (``scoring``, ``selection``, ``prune_and_evaluate``,
    ``recovery_and_evaluate``)."""
    return float(cell(grid, method, budget, seed)["seconds"][stage])


def teacher_secs(grid: str, method: str, budget: float | str, seed: int = 0, setup: bool = False) -> float:
    """Seconds the recovery's teacher took in a cell: at every step (``kd-relations``), or its one logit pass
    before the first step (``setup=True``: ``kd``)."""
    teacher = cell(grid, method, budget, seed)["teacher"]
    return float(teacher["shared_setup"]["teacher_seconds"] if setup else teacher["teacher_seconds"])


def depth(grid: str, method: str, budget: float | str, seed: int = 0) -> float:
    """Mean relative depth of the kept heads (0 = first layer, 1 = last), as the bench summaries report it."""
    record = cell(grid, method, budget, seed)
    layers = [
        int(layer) / (record["layers"] - 1) for layer, kept in record["kept_heads_by_layer"].items() for _ in kept
    ]
    return mean(layers)


def mdepth(grid: str, method: str, budget: float | str) -> float:
    return mean(depth(grid, method, budget, seed) for seed in seeds(grid, method, budget))


def seed_overlap(grid: str, method: str, budget: float | str) -> float:
    """Mean pairwise Jaccard overlap of the kept heads between the committed seeds."""
    runs = [heads(grid, method, budget, seed) for seed in seeds(grid, method, budget)]
    pairs = [jaccard(a, b) for i, a in enumerate(runs) for b in runs[i + 1 :]]
    return mean(pairs)


def stability(task: str, method: str, key: str) -> Any:
    """A method's entry in ``results/stability.json`` (``jaccard_mean``, ``spearman_mean``, ``k_star``, ...)."""
    (row,) = (row for row in result("stability", "rows") if row["task"] == task)
    (entry,) = (entry for entry in row["methods"] if entry["method"] == method)
    return entry[key]


def _head_table(name: str, key: str) -> list[Any]:
    return [value for row in result(f"heads/{name}", "heads", key) for value in row]


def sinks_also_special(name: str) -> list[int]:
    """[special-token heads that are also sinks, special-token heads] of ``results/heads/<name>.json``."""
    pairs = list(zip(_head_table(name, "is_sink"), _head_table(name, "is_special_token_head"), strict=True))
    return [sum(sink and special for sink, special in pairs), sum(special for _, special in pairs)]


def sink_clusters(name: str) -> list[int]:
    """CAHP's clusters in ``results/heads/<name>.json``: [only sinks, sinks and others, no sink]."""
    members: dict[int, list[bool]] = {}
    clusters = [c for row in result(f"heads/{name}", "cahp", "cluster") for c in row]
    for cluster, sink in zip(clusters, _head_table(name, "is_sink"), strict=True):
        members.setdefault(cluster, []).append(sink)
    kinds = [all(m) for m in members.values()], [any(m) and not all(m) for m in members.values()]
    return [sum(kinds[0]), sum(kinds[1]), sum(not any(m) for m in members.values())]


def consensus(name: str, size: str, method: str, key: str) -> Any:
    """A row of ``results/<name>.json`` (``stability_consensus``, ``stability_consensus_mnli``): ``key`` of one
    calibration size (``'1000'``, ``'all'``, ...) and method (``'cahp'``, ``'cahp-consensus'``)."""
    (row,) = (row for row in result(name, "rows") if row["size"] == size and row["method"] == method)
    return row[key]


def ppl(grid: str, method: str, budget: float | str, stage: str = "recovered", seed: int = 0) -> float:
    """Perplexity of a causal-LM cell."""
    return float(cell(grid, method, budget, seed)["quality"][STAGES[stage]]["perplexity"]["perplexity"])


def zero_shot(grid: str, method: str, budget: float | str, stage: str = "recovered", seed: int = 0) -> float:
    """Zero-shot SST-2 accuracy of a causal-LM cell."""
    return float(cell(grid, method, budget, seed)["quality"][STAGES[stage]]["sst2-zero-shot"]["accuracy"])


def dense_record(grid: str) -> dict[str, Any]:
    """The grid's ``dense.json``: the unpruned model's measurements."""
    return _json(BENCH / grid / "dense.json")


def dense(grid: str, metric: str = "accuracy") -> float:
    """The unpruned model's accuracy in a grid (``metric='perplexity'`` for a causal-LM grid)."""
    record = dense_record(grid)
    if "quality" in record:
        quality = record["quality"]
        return float(
            quality["perplexity"]["perplexity"] if metric == "perplexity" else quality["sst2-zero-shot"][metric]
        )
    return float(_split(record["accuracy"])[metric])


def ranking(scores: dict[str, float], reverse: bool = True) -> list[str]:
    """Names ordered by score, best first (``reverse=False``: lowest first, e.g. perplexity)."""
    return sorted(scores, key=lambda name: scores[name], reverse=reverse)


def rank_of(name: str, scores: dict[str, float], reverse: bool = True) -> int:
    """1-based rank of ``name`` (ties share the better rank)."""
    mine = scores[name]
    return 1 + sum((s > mine) if reverse else (s < mine) for s in scores.values())


def by_method(
    grid: str, methods: Iterable[str], budget: float | str, stage: str = "recovered", **kw: Any
) -> dict[str, float]:
    """{method: mean accuracy over its seeds} at one budget."""
    return {m: macc(grid, m, budget, stage, **kw) for m in methods}


def distinct_cells(grids: Iterable[str]) -> int:
    """Cells that measured something different: cells of one grid with the same method, kept heads and accuracies
    (a seed whose knee keeps as many heads as a fixed budget, or two seeds that choose the same heads, repeat a
    cell to the last digit) count once."""
    seen = set()
    for grid in grids:
        for path in sorted((BENCH / grid / "cells").glob("*.json")):
            record = _json(path)
            measured = tuple(
                (stage, split, values["accuracy"], values["macro_f1"])
                for stage, by_split in sorted(record["accuracy"].items())
                for split, values in sorted(by_split.items())
            )
            seen.add((grid, record["method"], json.dumps(record["kept_heads_by_layer"], sort_keys=True), measured))
    return len(seen)


def cell_count(grids: Iterable[str]) -> int:
    return sum(len(list((BENCH / grid / "cells").glob("*.json"))) for grid in grids)


#: the ten methods of the MiniLM and MPNet grids, in the tables' order
TEN = ("cahp", "random", "magnitude", "entropy", "gradient", "hies", "attattr", "fisher", "l0", "dsp")
#: the five methods of the recovery studies, in the SST-5 table's order
FIVE = ("attattr", "cahp", "gradient", "dsp", "random")
#: the builtins a claim's ``expr`` may call
_ALLOWED = ("abs", "all", "any", "bool", "dict", "enumerate", "float", "int", "len", "list", "max", "min", "range")
SAFE_BUILTINS = {name: getattr(builtins, name) for name in (*_ALLOWED, "round", "set", "sorted", "str", "sum", "zip")}
#: what a claim's ``expr`` can use: the helpers and constants above
NAMESPACE: dict[str, Any] = {
    name: obj
    for name, obj in dict(globals()).items()
    if not name.startswith("_")
    and ((getattr(obj, "__module__", None) == __name__ and callable(obj)) or name in ("TEN", "FIVE"))
}


# ---------------------------------------------------------------- claims and citations
@dataclass(frozen=True)
class Claim:
    id: str
    file: str
    expr: str
    stated: Any
    tol: float | list[float] = 0.0  # one for every number, or one per element of a stated list
    text: str = ""


@dataclass(frozen=True)
class Failure:
    id: str
    file: str
    stated: Any
    computed: Any

    def line(self) -> str:
        return f"{self.id}  {self.file}  stated={_show(self.stated)}  computed={_show(self.computed)}"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def load_claims(path: Path = CLAIMS) -> list[Claim]:
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    claims = []
    for entry in data.get("claim", []):
        unknown = set(entry) - {"id", "file", "expr", "stated", "tol", "text"}
        if unknown:
            raise ValueError(f"claim {entry.get('id')!r}: unknown keys {sorted(unknown)}")
        claims.append(Claim(**entry))
    ids = [claim.id for claim in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate claim ids: {duplicates}")
    return claims


def evaluate(claim: Claim) -> Any:
    # the helpers go in as globals, so that comprehensions in an expression see them too
    return eval(claim.expr, {"__builtins__": SAFE_BUILTINS, **NAMESPACE})  # expressions of claims.toml


def matches(stated: Any, computed: Any, tol: float | Sequence[float]) -> bool:
    """Numbers (and lists of numbers) within ``tol``; booleans, strings and lists of strings exactly.

    ``tol`` is one tolerance for every number, or a list with one per element of a stated list.
    """
    if isinstance(stated, bool) or isinstance(computed, bool):
        return isinstance(stated, bool) and isinstance(computed, bool) and stated == computed
    if isinstance(stated, list):
        if not isinstance(computed, list | tuple) or len(stated) != len(computed):
            return False
        tols = tol if isinstance(tol, list | tuple) else [tol] * len(stated)
        if len(tols) != len(stated):
            raise ValueError(f"{len(tols)} tolerances for {len(stated)} stated values")
        return all(matches(s, c, t) for s, c, t in zip(stated, computed, tols, strict=True))
    if isinstance(tol, list | tuple):
        raise ValueError("a list of tolerances needs a list of stated values")
    if isinstance(stated, int | float) and isinstance(computed, int | float):
        return abs(float(stated) - float(computed)) <= tol + 1e-9
    return bool(stated == computed)


def check_claims(claims: Sequence[Claim]) -> tuple[list[Failure], dict[str, Any]]:
    failures, computed = [], {}
    for claim in claims:
        try:
            value = evaluate(claim)
        except Exception as error:  # a broken expression is a failing claim, not a crash
            value = f"error: {type(error).__name__}: {error}"
        computed[claim.id] = value
        if not matches(claim.stated, value, claim.tol):
            failures.append(Failure(claim.id, claim.file, claim.stated, value))
    return failures, computed


def prose_files(root: Path = REPO) -> list[Path]:
    files: list[Path] = []
    for pattern in PROSE:
        files.extend(sorted(root.glob(pattern)))
    return files


def citations(files: Iterable[Path], root: Path = REPO) -> dict[str, set[str]]:
    """{claim id: the files (relative to ``root``) that cite it}."""
    cited: dict[str, set[str]] = {}
    for path in files:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            for claim_id in (part.strip() for part in match.group(1).split(",")):
                if claim_id:
                    cited.setdefault(claim_id, set()).add(path.relative_to(root).as_posix())
    return cited


def check_citations(claims: Sequence[Claim], cited: dict[str, set[str]]) -> list[str]:
    """One line per cited id that no claim has, and per claim not cited in the file it names."""
    known = {claim.id: claim for claim in claims}
    problems = [
        f"{claim_id}  {', '.join(sorted(files))}  cited, but claims.toml has no such claim"
        for claim_id, files in sorted(cited.items())
        if claim_id not in known
    ]
    for claim in claims:
        files = cited.get(claim.id, set())
        if claim.file not in files:
            where = f" (cited in {', '.join(sorted(files))})" if files else ""
            problems.append(f"{claim.id}  {claim.file}  not cited in {claim.file}{where}")
    return problems


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=Path, default=CLAIMS)
    parser.add_argument("--root", type=Path, default=REPO, help="where README.md and docs/ are")
    parser.add_argument("--list", action="store_true", help="print every claim with its computed value")
    args = parser.parse_args(argv)
    claims = load_claims(args.claims)
    failures, computed = check_claims(claims)
    problems = [failure.line() for failure in failures]
    problems += check_citations(claims, citations(prose_files(args.root), args.root))
    if args.list:
        for claim in claims:
            out(f"{claim.id}  {claim.file}  stated={_show(claim.stated)}  computed={_show(computed[claim.id])}")
    for line in problems:
        out(f"FAIL {line}")
    if not problems:
        out(f"check_claims: {len(claims)} claims hold and are cited")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
