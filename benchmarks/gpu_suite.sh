#!/usr/bin/env bash
# The GPU machine's part of the project, in pieces that fit one device call each (10 min).
# Run from the repo root after staging vLLM + the model (shared/device/README.md):
#   source /root/prism-stage/env.sh && bash benchmarks/gpu_suite.sh PIECE OUTDIR COMMIT
# Pieces: kernels (kernel GPU tests + kernel benchmark), vllm (backend GPU tests),
#         serve (served GPU tests), tp (tensor-parallel test, 2 GPUs), load (load test).
set -uo pipefail
piece=$1; out=$2; sha=${3:-unknown}
mkdir -p "$out"
export VLLM_ALLOW_INSECURE_SERIALIZATION=1 PYTHONUNBUFFERED=1
log() { echo "== $piece $(date -u +%FT%TZ) $*"; }
case "$piece" in
  kernels)
    log "kernel GPU tests"
    python -m pytest -m gpu -q -s tests/test_sparse_prefill.py tests/test_pooling.py tests/test_selection.py \
      tests/test_prefill.py -k "not every_candidate" > "$out/gpu-kernels.log" 2>&1; echo "pytest rc=$?" >> "$out/gpu-kernels.log"
    tail -3 "$out/gpu-kernels.log"
    log "kernel benchmark"
    python benchmarks/kernels.py --official-dir benchmarks/_official --commit "$sha" --out "$out/kernels-h200.json" --plot \
      > "$out/bench.log" 2>&1; echo "bench rc=$?" >> "$out/bench.log"; tail -32 "$out/bench.log" ;;
  vllm)
    python -m pytest -m gpu -v tests/test_vllm_gpu.py -k "not serve and not tensor_parallel" > "$out/gpu-vllm.log" 2>&1
    echo "pytest rc=$?" >> "$out/gpu-vllm.log"; grep -E "PASSED|FAILED|XFAIL|XPASS|ERROR|passed|failed" "$out/gpu-vllm.log" | tail -14 ;;
  serve)
    python -m pytest -m gpu -v tests/test_vllm_gpu.py tests/test_cli.py -k "serve" > "$out/gpu-serve.log" 2>&1
    echo "pytest rc=$?" >> "$out/gpu-serve.log"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$out/gpu-serve.log" | tail -6 ;;
  tp)
    python -m pytest -m gpu -v tests/test_vllm_gpu.py -k "tensor_parallel" > "$out/gpu-tp.log" 2>&1
    echo "pytest rc=$?" >> "$out/gpu-tp.log"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$out/gpu-tp.log" | tail -4 ;;
  load)
    python benchmarks/load_test.py --out "$out/load-h200.json" > "$out/load.log" 2>&1; echo "load rc=$?" >> "$out/load.log"
    tail -15 "$out/load.log" ;;
  *) echo "unknown piece $piece"; exit 2 ;;
esac
