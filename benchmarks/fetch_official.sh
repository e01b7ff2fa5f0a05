#!/usr/bin/env bash
# Export the official Prism package (github xinghaow99/prism, `prism/` only) into
# benchmarks/_official/ for `benchmarks/kernels.py --official-dir benchmarks/_official`.
# The folder is git-ignored: the official code is benchmarked beside ours, never committed.
#
# Usage: bash benchmarks/fetch_official.sh [MIRROR_GIT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
MIRROR="${1:-${PRISM_OFFICIAL_MIRROR:-/work/.mirror/xinghaow99+prism/repo}}"
if [ ! -d "$MIRROR" ]; then
    echo "official Prism mirror not found at $MIRROR (pass its git dir as the first argument)" >&2
    exit 1
fi
rm -rf _official
mkdir -p _official
git -C "$MIRROR" archive HEAD prism | tar -x -C _official
git -C "$MIRROR" rev-parse HEAD > _official/COMMIT
echo "official Prism $(cat _official/COMMIT) -> $(pwd)/_official/prism"
