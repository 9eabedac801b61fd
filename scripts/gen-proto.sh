#!/bin/sh
# Regenerate src/ipfsnap/service/proto/ (committed) from the containerd API protos Debian
# ships with containerd's Go source (golang-github-containerd-containerd-dev, 1.6.x).
#
# The protos use gogoproto options, which only matter to Go code generation; protoc needs
# gogo.proto to parse them, so we strip the import and the options into a temporary copy.
# The copies are laid out as ipfsnap/service/proto/<name>.proto so that the generated
# modules import each other as ipfsnap.service.proto.<name>_pb2. The proto *packages*
# (containerd.services.snapshots.v1, ...) are unchanged: they are what goes on the wire as
# gRPC service and message names.
#
# Usage: scripts/gen-proto.sh   (from the repository root; needs .venv with grpcio-tools)
set -eu
API=${CONTAINERD_API:-/usr/share/gocode/src/github.com/containerd/containerd/api}
PY=${PYTHON:-.venv/bin/python}
OUT=src/ipfsnap/service/proto
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/ipfsnap/service/proto"

strip() {  # strip SRC NAME
    "$PY" - "$1" "$tmp/ipfsnap/service/proto/$2.proto" <<'PYEOF'
import re
import sys

src, dst = sys.argv[1], sys.argv[2]
text = open(src, encoding="utf-8").read()
text = re.sub(r'^import weak "gogoproto/gogo.proto";\n', "", text, flags=re.M)
text = re.sub(r"^\s*option \(gogoproto\.[^;]*;\n", "", text, flags=re.M)
text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
text = text.replace(
    '"github.com/containerd/containerd/api/types/mount.proto"', '"ipfsnap/service/proto/mount.proto"'
).replace(
    '"github.com/containerd/containerd/api/types/descriptor.proto"',
    '"ipfsnap/service/proto/descriptor.proto"',
)
assert "gogoproto" not in text, src
open(dst, "w", encoding="utf-8").write(text)
PYEOF
}

strip "$API/types/mount.proto" mount
strip "$API/types/descriptor.proto" descriptor
strip "$API/services/snapshots/v1/snapshots.proto" snapshots
strip "$API/services/content/v1/content.proto" content
strip "$API/services/images/v1/images.proto" images
strip "$API/services/leases/v1/leases.proto" leases

rm -f "$OUT"/*_pb2*.py "$OUT"/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -I "$tmp" \
    --python_out=src --pyi_out=src --grpc_python_out=src \
    "$tmp"/ipfsnap/service/proto/*.proto
cat > "$OUT/__init__.py" <<'PYEOF'
"""Generated from containerd 1.6's API protos by scripts/gen-proto.sh; do not edit."""
PYEOF
ls "$OUT"
