#!/usr/bin/env bash
# Export the official Prism package (github xinghaow99/prism, `prism/` only) into
# benchmarks/_official/ for `benchmarks/bench_kernels.py --official-dir benchmarks/_official`.
# The folder is git-ignored: the official code is benchmarked beside ours, never committed.
#
# Usage: bash benchmarks/fetch_official.sh [GIT_DIR]
#   GIT_DIR (or $PRISM_OFFICIAL_MIRROR): a clone (or bare mirror) of the official repository;
#   without one it is cloned from GitHub into a temporary folder (needs the network).
set -euo pipefail
cd "$(dirname "$0")"
MIRROR="${1:-${PRISM_OFFICIAL_MIRROR:-}}"
if [ -z "$MIRROR" ]; then
    MIRROR="$(mktemp -d)/prism"
    trap 'rm -rf "$(dirname "$MIRROR")"' EXIT
    git clone --quiet --depth 1 https://github.com/xinghaow99/prism "$MIRROR"
elif [ ! -d "$MIRROR" ]; then
    echo "official Prism repository not found at $MIRROR (pass a clone's folder or git dir)" >&2
    exit 1
fi
rm -rf _official
mkdir -p _official
git -C "$MIRROR" archive HEAD prism | tar -x -C _official
git -C "$MIRROR" rev-parse HEAD > _official/COMMIT
echo "official Prism $(cat _official/COMMIT) -> $(pwd)/_official/prism"
