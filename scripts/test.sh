#!/usr/bin/env bash
# The tests: set up, then pytest against real services the fixtures start (redis-server, a Celery
# worker, Qdrant local mode, SQLite, an OpenAI-compatible LLM test server). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
