"""The benchmark scripts under benchmarks/ (not a package) loaded as modules, for the tests that exercise them."""
import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, module_name: str = None):
    """benchmarks/<name>.py as a fresh module (named bench_<name> unless ``module_name`` is given)."""
    spec = importlib.util.spec_from_file_location(module_name or f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
