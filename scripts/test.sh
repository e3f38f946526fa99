#!/usr/bin/env bash
# The tests: set up, then pytest against real services the fixtures start (redis-server, Neo4j 5.26
# through its Java test harness, a Celery worker, Qdrant local mode, SQLite, an OpenAI-compatible LLM
# test server). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
if command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then
  bash scripts/neo4j.sh build   # Maven Central, once (~190 MB into ~/.m2); a no-op when unchanged
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
