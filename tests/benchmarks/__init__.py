"""Benchmark scripts live outside the package; `load_benchmark` imports one by file name."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """A fresh module object of ``benchmarks/<name>.py`` (registered in sys.modules, which
    dataclasses need to resolve string annotations)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
