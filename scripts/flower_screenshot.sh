#!/usr/bin/env bash
# Screenshots of Flower during a LoCoMo backfill (docs/flower-*.png): a local redis-server, one worker,
# `memq flower`, a backfill of conv-26, then headless Chromium (Debian's `chromium`) on Flower's
# dashboard and tasks pages while the jobs run. Waits for their scope's turn show as succeeded tasks
# ("waiting for the scope's turn ..."), not retries.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work="$(mktemp -d)"
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port="$(free_port)"; flower_port="$(free_port)"; metrics_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --daemonize yes \
  --pidfile "$work/redis.pid" >/dev/null
export MEMQ_REDIS__URL="redis://127.0.0.1:$redis_port/0" MEMQ_DATA_DIR="$work/data" \
  MEMQ_FLOWER__PORT="$flower_port" MEMQ_METRICS__PORT="$metrics_port"
cleanup() { kill "${worker:-}" "${flower:-}" 2>/dev/null || true; kill "$(cat "$work/redis.pid")" 2>/dev/null || true; }
trap cleanup EXIT
echo "work: $work" >&2
.venv/bin/memq worker --concurrency 2 --loglevel WARNING >"$work/worker.log" 2>&1 & worker=$!
export MEMQ_FLOWER__BASIC_AUTH="shot:$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(8))')"
.venv/bin/memq flower >"$work/flower.log" 2>&1 & flower=$!
until curl -sf "http://127.0.0.1:$flower_port/healthcheck" >/dev/null; do sleep 1; done
sleep 8   # the worker loads its embedder
.venv/bin/memq backfill "${1:-../shared/data/locomo10.json}" --conversation conv-26 >/dev/null
sleep "${2:-25}"  # into the backfill: jobs of one scope wait for their turn
mkdir -p docs
shot() { chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,900 \
           --virtual-time-budget=8000 --screenshot="$1" "$2" >/dev/null 2>&1; }
site="http://$MEMQ_FLOWER__BASIC_AUTH@127.0.0.1:$flower_port"
shot docs/flower-dashboard.png "$site/"
shot docs/flower-tasks.png "$site/tasks"
curl -s -u "$MEMQ_FLOWER__BASIC_AUTH" "http://127.0.0.1:$flower_port/api/tasks?limit=5000" >"$work/tasks.json"
waiting="$(.venv/bin/python - "$work/tasks.json" <<'PY'
import collections, json, sys
tasks = json.load(open(sys.argv[1]))
states = collections.Counter(t["state"] for t in tasks.values())
waits = [i for i, t in tasks.items() if "waiting for the scope" in str(t.get("result"))]
print(f"flower: {len(tasks)} tasks, states {dict(states)}, {len(waits)} results 'waiting for the scope's turn'",
      file=sys.stderr)
print(waits[0] if waits else "")
PY
)"
[ -n "$waiting" ] && shot docs/flower-waiting-task.png "$site/task/$waiting"
