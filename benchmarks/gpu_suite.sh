#!/usr/bin/env bash
# The GPU machine's part of the project, in pieces that fit one device call each (10 min).
# Run from the repo root after staging vLLM + the model (shared/device/README.md) and carrying
# benchmarks/data (python -m benchmarks.corpus; the quality piece also python -m benchmarks.corpus_austen):
#   source /root/prism-stage/env.sh && bash benchmarks/gpu_suite.sh PIECE [OUTDIR [COMMIT]]
# (env.sh: the staged environment's PATH / PYTHONPATH / model paths; a machine with vLLM 0.26 and
# this package installed needs none of it; OUTDIR defaults to ./gpu-out, COMMIT to git's HEAD)
# Pieces:
#   attend    FA3 attend step: its GPU tests (+ fp8 pooling), then the kernel benchmark with FA3
#             attend rows for the Llama-3.1-8B layer and a 14q/2kv d=64 layer (needs vLLM's FA3),
#             (each FA3 row in the five attend layouts: head, group, head_views, group_views, head_halves)
#   attend-fp8  the kernel benchmark's fp8 KV cache rows (Llama-3.1-8B layer, 32K / 128K)
#   attend-sweep  the attend step's copy launches, sequence order and FA3 split-KV (shipped bound
#             against FA3's own heuristic: time, output difference, extra GPU memory) for the
#             Llama-3.1-8B layer and the 14q/2kv d=64 layer (needs vLLM's FA3; alone: it times things)
#   kernels   kernel GPU tests + kernel benchmark
#   attend-profile  GPU vs host time per call of the estimation and the FA3 attend step (checked,
#             replayed as a step's later layers run it, copies alone; dense FA3 beside) for the
#             d=64 layer and the Llama-3.1-8B layer at 8K / 32K, 10% of the blocks (needs vLLM's FA3)
#   estimation  where the estimation's time goes (GPU per kernel vs host per call), its launch-knob
#             sweep at 32K/128K, and Nsight Compute metrics of the selection kernel where ncu
#             exists (nothing staged: torch + triton; the package importable)
#   pool      the pooling kernels' launch settings (estimation_sweep.py --pool-sweep) at 8K / 128K,
#             Llama-3.1-8B layer (nothing staged; alone on the GPU: it times things)
#   vllm      backend GPU tests (LLM engines side by side) + the served tests
#   tp        tensor-parallel test (2 GPUs)
#   load      load test alone
#   speed     evidence: TTFT on SmolLM2 (alone on the GPU: it times things)
#   speed-native  the same at SmolLM2's native context (4K / 8K, max_model_len 8192: no YaRN)
#             -> results/speed-native.json (#11's "every model": the decision and TTFT there)
#   speed-fp8 the same with vLLM's --kv-cache-dtype fp8 on both engines -> results/speed-fp8.json
#   llama8b   evidence: TTFT on the Llama-3.1-8B architecture (alone on the GPU)
#   quality   the quality sweep (ΔPPL / passkeys / density / TTFT per selection point): set
#             PRISM_QUALITY_LENGTHS=8K,16K for one call and =32K for the next, then merge the two
#             quality.json here (python -m benchmarks.run --merge-quality A B --out benchmarks/results)
#             PRISM_QUALITY_POINTS=paper:0.998,meanpool:0.995,meanpool:0.998 runs only those points (and
#             FLASH_ATTN) at every length in one call; merging it into quality.json replaces FLASH_ATTN's
#             rows, so the older points' TTFT ratios would be across runs: rather rerun the whole sweep.
#             A point's ':l2' suffix adds local_blocks=2 (e.g. meanpool:0.998:l2); 'dense:c2048' is
#             FLASH_ATTN in prefill chunks of 2048 tokens, the numerics control: how far this model's
#             passkeys and perplexity move without Prism (e.g. PRISM_QUALITY_POINTS=dense:c2048,meanpool:0.998
#             PRISM_QUALITY_LENGTHS=16K,32K)
#   quality-fp8  the quality / fast presets beside FLASH_ATTN, every engine on vLLM's fp8 KV cache
#   shared    everything that times nothing, side by side on one GPU, each under a time limit:
#             vllm + accuracy evidence + load test + the selection/prefill kernel GPU tests
# OUTDIR collects logs and result JSON (device calls return at most 8 files: see the end).
set -uo pipefail
piece=${1:?usage: bash benchmarks/gpu_suite.sh PIECE [OUTDIR [COMMIT]] (pieces: see the header)}
out=${2:-gpu-out}; sha=${3:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}
mkdir -p "$out"
export VLLM_ALLOW_INSECURE_SERIALIZATION=1 PYTHONUNBUFFERED=1
LIMIT=${PRISM_PIECE_LIMIT_S:-540}
log() { echo "== $piece $(date -u +%FT%TZ) $*"; }
# The kernel-only pieces (estimation, kernels) need nothing staged, but on a bare machine
# `pip install -e .` may fail (no setuptools in its Python): then the package is put on
# PYTHONPATH as a tree of links with the installed layout (prism_vllm.kernels = kernels/, ...),
# and Python runs with -P so that the checkout's own prism_vllm/ does not shadow it.
ensure_package() {
  python -P -c "import prism_vllm.kernels" 2> /dev/null && return
  local pkg=/tmp/prism-pkg/prism_vllm
  mkdir -p "$pkg"
  for f in "$PWD"/prism_vllm/*; do ln -sfn "$f" "$pkg/"; done
  for d in kernels attention_backend server; do ln -sfn "$PWD/$d" "$pkg/$d"; done
  export PYTHONPATH=/tmp/prism-pkg${PYTHONPATH:+:$PYTHONPATH}
  python -P -c "import prism_vllm.kernels" && log "package on PYTHONPATH through /tmp/prism-pkg (not installed)"
}
summary() { grep -E "PASSED|FAILED|XFAIL|XPASS|ERROR|SKIPPED|passed|failed|passkey" "$1" | tail -"${2:-16}"; }

run_vllm() {  # [pytest -k expression]
  timeout "$LIMIT" python -m pytest -m gpu -v -s tests/test_vllm_gpu.py tests/test_cli.py -k "${1:-not tensor_parallel}" \
    > "$out/gpu-vllm.log" 2>&1
  echo "pytest rc=$?" >> "$out/gpu-vllm.log"
}
run_kernels_changed() {  # [pytest -k expression]
  timeout "$LIMIT" python -m pytest -m gpu -q tests/test_selection.py tests/test_prefill.py -k "${1:-}" \
    > "$out/gpu-kernels.log" 2>&1
  echo "pytest rc=$?" >> "$out/gpu-kernels.log"
}
run_load() {
  # other jobs may share the GPU: a low utilization floor and a fixed KV cache (vLLM's memory
  # profiling fails when another process frees memory meanwhile); the memory check counts the
  # server's own processes
  timeout "$LIMIT" python benchmarks/load_test.py --out "$out/load-h200.json" --commit "$sha" \
    --extra --gpu-memory-utilization 0.1 --kv-cache-memory-bytes 8589934592 \
    > "$out/load.log" 2>&1
  echo "load rc=$?" >> "$out/load.log"
}
run_bench() {  # PART BUDGET_S [more benchmarks.run flags]; BENCH_TAG names the log files (default PART)
  local part=$1 budget=$2 tag=${BENCH_TAG:-$1}; shift 2
  python -m benchmarks.run --only "$part" --budget-s "$budget" --commit "$sha" --out "$out/results" "$@" \
    > "$out/bench-$tag.log" 2>&1
  echo "bench rc=$?" >> "$out/bench-$tag.log"
  tar czf "$out/logs-$tag.tgz" -C "$out/results" logs 2>/dev/null && rm -rf "$out/results/logs"
}

case "$piece" in
  attend)
    log "FA3 attend GPU tests"
    # tests: 53.5 s at 9bdb1ed (36 tests), before head_halves doubled the head-layout GPU cases;
    # the benchmarks time five layouts per row: limits add up to 580 s
    timeout 120 python -m pytest -m gpu -q -s tests/test_attend_fa3.py tests/test_pooling_fp8.py \
      > "$out/gpu-attend.log" 2>&1; echo "pytest rc=$?" >> "$out/gpu-attend.log"; tail -4 "$out/gpu-attend.log"
    log "kernel benchmark, Llama-3.1-8B layer, layouts head / group / head_views / group_views / head_halves"
    timeout 260 python benchmarks/bench_kernels.py --skip break_even,fp8 --commit "$sha" --out "$out/kernels-fa3-h200.json" \
      > "$out/bench-fa3.log" 2>&1; echo "bench rc=$?" >> "$out/bench-fa3.log"; tail -24 "$out/bench-fa3.log"
    log "kernel benchmark, 14q/2kv d=64 layer"
    timeout 200 python benchmarks/bench_kernels.py --shape gqa7_d64 --skip estimation,break_even,fp8 --commit "$sha" \
      --out "$out/kernels-fa3-d64-h200.json" > "$out/bench-fa3-d64.log" 2>&1; echo "bench rc=$?" >> "$out/bench-fa3-d64.log"
    tail -16 "$out/bench-fa3-d64.log" ;;
  attend-fp8)
    log "kernel benchmark, fp8 KV cache, Llama-3.1-8B layer"
    timeout 150 python benchmarks/bench_kernels.py --skip sparse,estimation,break_even --commit "$sha" \
      --out "$out/kernels-fp8-h200.json" > "$out/bench-fp8.log" 2>&1; echo "bench rc=$?" >> "$out/bench-fp8.log"
    tail -12 "$out/bench-fp8.log" ;;
  attend-sweep)
    for shape in llama8b gqa7_d64; do
      log "attend sweep (launches, order, split-KV), $shape"
      timeout 250 python benchmarks/bench_kernels.py --attend-sweep --shape $shape --commit "$sha" \
        --out "$out/kernels-attend-sweep-$shape-h200.json" > "$out/attend-sweep-$shape.log" 2>&1
      echo "sweep rc=$?" >> "$out/attend-sweep-$shape.log"; tail -16 "$out/attend-sweep-$shape.log"
    done ;;
  attend-profile)
    for shape in gqa7_d64 llama8b; do
      log "estimation + attend step profile, $shape"
      timeout 150 python benchmarks/profile_estimation.py --shape $shape --lengths 8192,32768 --attend 0.1 --reps 10 \
        --commit "$sha" --out "$out/profile-attend-$shape.json" > "$out/profile-attend-$shape.log" 2>&1
      echo "profile rc=$?" >> "$out/profile-attend-$shape.log"; tail -2 "$out/profile-attend-$shape.log" | cut -c1-400
    done ;;
  estimation)
    ensure_package
    log "estimation profile, Llama-3.1-8B layer"
    timeout 150 python -P benchmarks/profile_estimation.py --commit "$sha" --out "$out/profile-estimation.json" \
      > "$out/profile.log" 2>&1; echo "profile rc=$?" >> "$out/profile.log"; grep -v "^ " "$out/profile.log" | tail -8
    log "estimation launch-knob sweep"
    timeout 250 python -P benchmarks/estimation_sweep.py --lengths 32768,131072 --sweep \
      --out "$out/estimation-sweep.json" > "$out/sweep.log" 2>&1; echo "sweep rc=$?" >> "$out/sweep.log"; tail -2 "$out/sweep.log"
    if command -v ncu > /dev/null; then
      log "ncu: selection kernel at 128K (4 level launches)"
      timeout 100 ncu -k regex:_select_kernel -c 4 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis python -P benchmarks/profile_estimation.py \
        --lengths 131072 --once > "$out/ncu-select.txt" 2>&1; echo "ncu rc=$?" >> "$out/ncu-select.txt"
      grep -E "Duration|Achieved Occupancy|Registers Per|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Stall|rc=" "$out/ncu-select.txt" | head -40
    fi ;;
  pool)
    ensure_package
    log "pooling launch sweep, Llama-3.1-8B layer"
    timeout "$LIMIT" python -P benchmarks/estimation_sweep.py --lengths 8192,131072 --pool-sweep \
      --out "$out/pool-sweep.json" > "$out/pool-sweep.log" 2>&1; echo "pool sweep rc=$?" >> "$out/pool-sweep.log"
    tail -2 "$out/pool-sweep.log" ;;
  kernels)
    ensure_package
    log "kernel GPU tests"
    python -P -m pytest -m gpu -q -s tests/test_sparse_prefill.py tests/test_pooling.py tests/test_selection.py \
      tests/test_prefill.py -k "not every_candidate" > "$out/gpu-kernels.log" 2>&1; echo "pytest rc=$?" >> "$out/gpu-kernels.log"
    tail -3 "$out/gpu-kernels.log"
    log "kernel benchmark"
    python -P benchmarks/bench_kernels.py --official-dir benchmarks/_official --commit "$sha" --out "$out/kernels-h200.json" --plot \
      > "$out/bench.log" 2>&1; echo "bench rc=$?" >> "$out/bench.log"; tail -32 "$out/bench.log" ;;
  vllm)
    run_vllm; summary "$out/gpu-vllm.log" ;;
  tp)
    python -m pytest -m gpu -v tests/test_vllm_gpu.py -k "tensor_parallel" > "$out/gpu-tp.log" 2>&1
    echo "pytest rc=$?" >> "$out/gpu-tp.log"; summary "$out/gpu-tp.log" 4 ;;
  load)
    run_load; tail -15 "$out/load.log" ;;
  speed|llama8b)
    run_bench "$piece" "$LIMIT"; tail -30 "$out/bench-$piece.log" ;;
  speed-native)  # the speed part at lengths that need no YaRN, in a folder of its own (the speed part
    # writes speed.json: in $out/results it would replace a speed run's), then renamed into results/
    out_main=$out; out=$out/native; mkdir -p "$out"
    BENCH_TAG=speed-native run_bench speed "$LIMIT" --speed-lengths 4K,8K
    out=$out_main; mkdir -p "$out/results"
    mv "$out/native/results/speed.json" "$out/results/speed-native.json" 2>/dev/null
    mv "$out/native/results/speed.png" "$out/results/speed-native.png" 2>/dev/null
    mv "$out/native/bench-speed-native.log" "$out/native/logs-speed-native.tgz" "$out/" 2>/dev/null
    rm -rf "$out/native"
    tail -30 "$out/bench-speed-native.log" ;;
  speed-fp8)  # dense and Prism forced on (no shipped-defaults engine), as in speed.json's first two columns
    BENCH_TAG=speed-fp8 run_bench speed "$LIMIT" --kv-cache-dtype fp8 --no-speed-default-config
    tail -30 "$out/bench-speed-fp8.log" ;;
  quality)  # its own jobs share the GPU; each times its prompt alone (benchmarks.common.GpuLock)
    run_bench quality "$LIMIT" --jobs "${PRISM_QUALITY_JOBS:-6}" \
      ${PRISM_QUALITY_LENGTHS:+--quality-lengths "$PRISM_QUALITY_LENGTHS"} \
      ${PRISM_QUALITY_POINTS:+--quality-points "$PRISM_QUALITY_POINTS"}
    grep -E "quality |WARNING|not ok|skipped" "$out/bench-quality.log" | tail -40 ;;
  quality-fp8)  # issue 14: FLASH_ATTN and the quality / fast presets on an fp8 KV cache -> quality-fp8.json
    BENCH_TAG=quality-fp8 run_bench quality "$LIMIT" --kv-cache-dtype fp8 --jobs "${PRISM_QUALITY_JOBS:-6}" \
      --quality-points paper:0.99,paper:0.95 ${PRISM_QUALITY_LENGTHS:+--quality-lengths "$PRISM_QUALITY_LENGTHS"}
    grep -E "quality |WARNING|not ok|skipped" "$out/bench-quality-fp8.log" | tail -40 ;;
  shared)
    log "start: vllm tests, accuracy, load test, kernel tests side by side"
    run_vllm & run_bench accuracy "$((LIMIT - 15))" --jobs 4 & run_load & run_kernels_changed &
    wait
    log "done"
    summary "$out/gpu-vllm.log" 20; tail -3 "$out/gpu-kernels.log"; tail -4 "$out/load.log"; tail -25 "$out/bench-accuracy.log" ;;
  retest)  # re-run what PRISM_RETEST_K selects, the load test and the budget kernel tests side by side
    run_vllm "${PRISM_RETEST_K:-not tensor_parallel}" & run_load & run_kernels_changed budget &
    wait
    summary "$out/gpu-vllm.log" 20; tail -3 "$out/gpu-kernels.log"; tail -12 "$out/load.log" ;;
  *) echo "unknown piece $piece"; exit 2 ;;
esac
