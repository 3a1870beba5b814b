"""Every benchmark under bench/ still imports: a benchmark is run by hand, rarely, so a
rename elsewhere in the package breaks it silently otherwise (bench/live_steer.py once
imported a function from a module it had left)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # one python importing torch, transformers and vLLM

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "bench").glob("*.py"))

# One process imports them all, each under its file's stem (not as __main__, so none runs).
IMPORT_ALL = """
import importlib.util, sys
for path in sys.argv[1:]:
    name = "bench_" + path.rsplit("/", 1)[-1][:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path} has no main()"
    print("imported", path)
"""


def test_every_benchmark_imports():
    assert len(BENCHES) >= 10
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL, *map(str, BENCHES)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT / "bench")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("imported") == len(BENCHES)
