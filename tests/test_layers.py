"""The shape of the house: import contracts (import-linter, in pyproject.toml) and light producer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    # When import-linter checks the contracts in pyproject.toml (layers, a light producer, nothing
    # importing the workers, no cycles inside a package)
    run = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True)
    # Then every contract is kept
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "4 kept, 0 broken" in run.stdout


PLUGIN = '''
import sys
def pytest_sessionfinish(session, exitstatus):
    heavy = [m for m in ("litellm", "qdrant_client", "qdrant_edge", "neo4j", "torch", "sentence_transformers") if m in sys.modules]
    print("HEAVY-MODULES", heavy)
'''


def test_the_producer_tests_need_only_redis(tmp_path: Path) -> None:
    # Given a pytest plugin that reports the heavy libraries loaded by the end of a session
    (tmp_path / "heavy_check.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # When the producer's tests run alone
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_producer.py", "-q", "-p", "heavy_check",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # Then they pass without loading any model, vector or graph library (so without Neo4j or a worker)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "HEAVY-MODULES []" in run.stdout
