"""The method comparison harness: ``cahp bench --config FILE`` (see :mod:`cahp.bench.runner`)."""

from cahp.bench.runner import BenchConfig, expand_path, run_bench

__all__ = ["BenchConfig", "expand_path", "run_bench"]
