#!/usr/bin/env bash
# The main job: set up, start a local Redis and a worker, backfill LoCoMo conv-26 with the offline
# model, wait for every job, and print search results for its QA questions. Extra args go to `memq demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/memq demo "$@"
