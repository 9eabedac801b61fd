#!/usr/bin/env bash
# Run the whole test suite: static checks, unit tests, then real FUSE/IPFS/runc/containerd
# integration tests. Needs root. Installs what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" >&2
ruff check .
echo "== mypy --strict" >&2
mypy
echo "== pytest" >&2
exec pytest -q --durations=25 "$@"
