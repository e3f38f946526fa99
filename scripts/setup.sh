#!/usr/bin/env bash
# Install what memq needs on a fresh Debian machine, idempotently:
#   - redis-server (Debian package), when missing
#   - PostgreSQL's binaries (Debian's postgresql package), when initdb is missing: the tests run their own
#     throwaway server (tests/rigs/postgres_server.py)
#   - a virtualenv in .venv with torch 2.13.0 first (CPU wheel), then memq with its local embedder
#     (the `local` extra) and test extras
# Re-running is cheap: the pip step is skipped while pyproject.toml is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # Debian starts a system redis on 6379; memq starts its own on free ports, so stop that one
  (as_root systemctl stop redis-server >/dev/null 2>&1 || as_root service redis-server stop >/dev/null 2>&1) || true
fi

# Debian puts initdb and postgres in /usr/lib/postgresql/<version>/bin, not on PATH
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "setup: installing postgresql" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # Debian creates and starts a system cluster on 5432; the tests start their own, so stop and disable that one
  if ! as_root systemctl disable --now postgresql >/dev/null 2>&1; then
    as_root service postgresql stop >/dev/null 2>&1 || true
    as_root update-rc.d postgresql disable >/dev/null 2>&1 || true
  fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
stamp=.venv/.memq-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: any other version pulls a different build
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[local,test]"
  echo "$want" > "$stamp"
fi
