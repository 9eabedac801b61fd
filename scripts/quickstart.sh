#!/usr/bin/env bash
# ipfsnap's main job on a fresh Debian 12 machine, as root: install everything, then push a
# small sample image to IPFS, pull it back lazily and run it.
#
#   scripts/quickstart.sh [--python] [--keep] [--no-setup] [--state-dir DIR]
#
#   --python      use the Debian bookworm + python3 sample (debootstrap, ~1 min the first
#                 time, then cached) instead of the busybox one (built in a second)
#   --keep        leave the IPFS node, the snapshotter and the lazy mounts running afterwards
#   --no-setup    skip scripts/setup.sh (already installed; scripts/test.sh runs it anyway)
#   --state-dir   private state dir (default $IPFSNAP_STATE_DIR, else /var/lib/ipfsnap)
#
# The seed workflow it runs (stdout gets the image's CID and the container's output, progress
# goes to stderr):
#   ipfsnap ipfs daemon &                        unless an IPFS API is already reachable
#   ipfsnap image import sample.tar --name sample
#   ipfsnap image ipfs-push sample               -> CID
#   ipfsnap image rpull --ipfs CID
#   ipfsnap run --snapshotter=stargz --rm -t CID hello <greeting command>
# Running it twice is fine: the import, the push (same CID) and the pull are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SAMPLE=busybox
KEEP=0
SETUP=1
STATE_DIR=${IPFSNAP_STATE_DIR:-/var/lib/ipfsnap}
while (($#)); do
  case $1 in
    --python) SAMPLE=python ;;
    --busybox) SAMPLE=busybox ;;
    --keep) KEEP=1 ;;
    --no-setup) SETUP=0 ;;
    --state-dir) STATE_DIR=${2:?--state-dir needs a directory}; shift ;;
    --state-dir=*) STATE_DIR=${1#*=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "quickstart: $*" >&2; }
die() { echo "quickstart: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts, overlayfs and runc need it)"

if ((SETUP)); then
  say "installing (scripts/setup.sh)"
  bash scripts/setup.sh
fi
IPFSNAP=$ROOT/.venv/bin/ipfsnap
[ -x "$IPFSNAP" ] || die "$IPFSNAP missing: run scripts/setup.sh first"

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
export IPFSNAP_STATE_DIR=$STATE_DIR
ipfsnap() { "$IPFSNAP" --state-dir "$STATE_DIR" "$@"; }

WORK=$(mktemp -d /tmp/ipfsnap-quickstart.XXXXXX)
DAEMON_PID=""
cleanup() {
  local rc=$?
  set +e
  if ((KEEP)); then
    say "--keep: leaving the IPFS node${DAEMON_PID:+ (pid $DAEMON_PID)} and the snapshotter running"
  else
    stop_snapshotter
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
      say "stopping the IPFS node (pid $DAEMON_PID)"
      kill -TERM "$DAEMON_PID"
      # js-ipfs closes its repo and the API in a second or two; give it 30 s before SIGKILL
      for _ in $(seq 300); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$DAEMON_PID" 2>/dev/null && { say "IPFS node did not stop: killing it"; kill -KILL "$DAEMON_PID"; }
      wait "$DAEMON_PID" 2>/dev/null
    fi
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lazy_mounts() { findmnt -rn -o TARGET -t fuse.ipfsnap | grep -F "$STATE_DIR/" || true; }

# The lazy layers are FUSE filesystems served by worker processes that outlive the CLI; the
# snapshotter (started on demand, or here) adopts them, and 'snapshotter stop' unmounts them.
stop_snapshotter() {
  if [ -n "$(lazy_mounts)" ]; then
    ipfsnap snapshotter >/dev/null 2>&1 || say "could not start the snapshotter to unmount layers"
  fi
  ipfsnap snapshotter stop >/dev/null 2>&1 || say "snapshotter stop failed (see $STATE_DIR/snapshotter.log)"
  local left
  left=$(lazy_mounts)
  if [ -n "$left" ]; then
    say "lazy mounts left after stopping the snapshotter, unmounting: $(echo $left)"
    echo "$left" | while read -r m; do umount -l "$m"; done
  fi
}

# 1. an IPFS node: the user's (IPFSNAP_IPFS_API, $IPFS_PATH/api, ~/.ipfs/api, or one we left
#    running with --keep) or the managed node, started here and stopped at the end
if api=$(ipfsnap ipfs id 2>/dev/null); then
  say "using the running IPFS node: $(echo "$api" | head -c 120)"
elif [ -n "${IPFSNAP_IPFS_API:-}" ]; then
  die "IPFSNAP_IPFS_API=$IPFSNAP_IPFS_API does not answer"
else
  say "starting the managed IPFS node (repo $STATE_DIR/ipfs)"
  "$IPFSNAP" --state-dir "$STATE_DIR" ipfs daemon >"$WORK/daemon.out" 2>"$WORK/daemon.err" &
  DAEMON_PID=$!
  # js-ipfs is ready in 2-4 s (more on a loaded machine); 120 s covers a cold npm cache
  for _ in $(seq 1200); do
    grep -q "IPFS node ready" "$WORK/daemon.out" 2>/dev/null && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.err" >&2; DAEMON_PID=""; die "the IPFS node did not start"; }
    sleep 0.1
  done
  grep -q "IPFS node ready" "$WORK/daemon.out" || { cat "$WORK/daemon.err" >&2; die "the IPFS node was not ready within 120 s"; }
  say "$(cat "$WORK/daemon.out")"
fi

# 2. the sample image, built offline
say "building the $SAMPLE sample image"
if [ "$SAMPLE" = python ]; then
  GREETING=(python3 -c 'print("Hello, World!")')
else
  GREETING=(sh -c 'echo "Hello, World!"; cat /hello.txt')
fi
built=$("$ROOT/.venv/bin/python" scripts/build_sample.py "$SAMPLE" "$WORK/sample") ||
  die "building the $SAMPLE sample image failed"
ARCHIVE=$(echo "$built" | head -n1)

say "ipfsnap image import $ARCHIVE --name sample"
ipfsnap image import "$ARCHIVE" --name sample >&2 || die "image import failed"

say "ipfsnap image ipfs-push sample"
CID=$(ipfsnap image ipfs-push sample) || die "ipfs-push failed"
[ -n "$CID" ] || die "ipfs-push printed no CID"
echo "CID: $CID"

say "ipfsnap image rpull --ipfs $CID"
ipfsnap image rpull --ipfs "$CID" >&2 || die "rpull of $CID failed"

# a container left over by an interrupted earlier run would make the id clash
ipfsnap rm -f hello >/dev/null 2>&1 || true
say "ipfsnap run --snapshotter=stargz --rm -t $CID hello ${GREETING[*]}"
set +e
ipfsnap run --snapshotter=stargz --rm -t "$CID" hello "${GREETING[@]}"
rc=$?
set -e
((rc == 0)) || die "the container exited with status $rc"
say "done: $CID ran from IPFS, layers mounted lazily"
