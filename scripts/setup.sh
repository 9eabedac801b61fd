#!/usr/bin/env bash
# Install everything ipfsnap needs on a Debian 12 machine (idempotent), as root:
# system packages, the project virtualenv .venv with ipfsnap, the managed IPFS node.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config          # FUSE for the lazy layers (pyfuse3 builds against it)
  runc                                   # container runtime
  containerd                             # proxy-snapshotter integration tests
  golang-go golang-github-containerd-stargz-snapshotter-dev  # reference library (interop oracle)
  stargz-snapshotter                     # ctr-remote (reference CLI, benchmarks)
  debootstrap busybox-static             # sample images built offline
  docker-registry                        # loopback registry for image pull tests
  nodejs npm                             # js-ipfs, the managed IPFS node
  curl ca-certificates
  strace                                 # tests: TCP_NODELAY on the managed node's sockets
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node/npm may come from elsewhere (the machine image ships them); accept those
if command -v node >/dev/null && command -v npm >/dev/null; then
  tmp=(); for p in "${missing[@]}"; do [[ $p == nodejs || $p == npm ]] || tmp+=("$p"); done
  missing=("${tmp[@]+"${tmp[@]}"}")
fi
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >&2
fi
.venv/bin/pip install -q -e ".[dev]" >&2

# js-ipfs from the committed lockfile; again whenever the lockfile is newer than the install
# (npm records the installed tree in node_modules/.package-lock.json). --omit=optional: the
# optional webrtc/electron dependencies download binaries from outside the registry and hang.
if [ -f node/package-lock.json ] && { [ ! -f node/node_modules/.package-lock.json ] ||
     [ node/package-lock.json -nt node/node_modules/.package-lock.json ]; }; then
  echo "setup: installing the managed IPFS node (npm ci, a few minutes)" >&2
  (cd node && npm ci --omit=optional --no-audit --no-fund >&2)
fi
echo "setup: done ($ROOT/.venv/bin/ipfsnap)" >&2
