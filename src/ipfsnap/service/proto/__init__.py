"""Generated from containerd 1.6's API protos by scripts/gen-proto.sh; do not edit."""
