#!/usr/bin/env python
"""Kernel benchmark: Prism's kernels vs vLLM's FA3 dense vs the official Prism kernels (issue 2, item 7).

Llama-3.1-8B layer shape (32 q heads, 8 kv heads, head dim 128, bf16, causal), one request whose
K/V sit in a FlashAttention-layout paged cache ([pages, 16, HKV, 2D], K and V packed in the last
dim, randomly permuted block table). Sections:

  sparse      block-sparse attention at fixed masks (sink + diagonal + a random subset of the other
              causal blocks per (head, query block)), density 1.0 / 0.2 / 0.1 / 0.05 at 8K / 32K / 128K:
              ours (sparse_prefill on the paged cache) vs FA3 dense (same paged cache) vs the official
              block_sparse_attention (contiguous [1, H, L, D], its own mask format) and, with
              --official-paged, the official paged kernel on the same cache. The FA3 attend step is
              timed checked (``prism_fa3_ms``: a step's first layer) and replayed
              (``prism_fa3_replayed_ms``: its later layers, launches recorded once, no argument work).
  estimation  pooling + calibration + dual-band top-p selection, ours vs the official
              prism_block_estimate, on structured synthetic q/k (see make_structured_qk): median
              time and extra GPU memory (peak over the call minus what was allocated before it;
              ours includes allocating its buffers, the official includes its temporaries); the
              shipped defaults' estimation also as GPU time alone (``prism_default_gpu_ms``: calls
              queued behind a sleeping kernel; the median per-call time reads the host where the
              host takes longer, e.g. at 8K).
  break_even  estimation + sparse attention at the density our selection picks on the structured
              input, and at fixed proxy densities 0.3 / 0.5, vs FA3 dense at 8K / 16K / 32K.
  fp8         an fp8 (e4m3) KV cache as vLLM's --kv-cache-dtype fp8 keeps it on FA3 (per-tensor scales,
              value = fp8 * scale; queries quantised to fp8 too, as vLLM's Attention layer does for
              FlashAttention) at 32K / 128K on the structured input: FA3 dense on the fp8 cache and on
              the bf16 cache (same run, for their ratio), our estimation on the fp8 cache (fp8 q, as the
              backend gets it; also bf16 q, and the bf16 cache for the ratio), our FA3 attend step on
              the fp8 cache at a fixed density-0.1 mask (with descales), and estimation + attend
              (the sum of the two medians) vs FA3 fp8 dense.
  layouts     (--attend-layout, default head,group,head_views,group_views,head_halves) the FA3
              attend step in the head layout (one virtual sequence per query block and q head), the
              group layout (per query block and kv head, the group's G heads packed over the union
              of their selections), their copy-free twins head_views / group_views (one FA3 call per
              q head / kv head on views of q and out), and head_halves (the head layout's sequences
              cut at the block middle, kernels/attend_fa3.py): sparse rows and the
              structured selection's break-even row report the union's density beside the
              per-head density, each layout's time, speed-up and per-block cost against FA3 dense
              (per UNION block for the group layouts: what they compute), and the Triton launches
              alone (``*_tables_ms``; for the view layouts the table build that replaces the copies).
              The sparse section's fixed masks are independent per head (the union's worst
              case); the structured input's heads of a kv group share a direction (select alike).
  sanity      once at the smallest length: ours at density 1.0 vs FA3 (max abs error), ours vs the
              official kernel on the same fixed mask, our selection vs prism_vllm.reference; fp8: the
              attend step at density 1.0 vs FA3 dense on the same fp8 cache, and our selection from
              the fp8 cache vs the reference on the dequantised q / k.

Every section runs unless --skip names it (--skip sparse,estimation,break_even,fp8); fp8 is on by
default like the others, so the plain command and the CPU dry run cover it. The time-limited
commands of benchmarks/gpu_suite.sh's attend piece skip it; its attend-fp8 piece times it alone.

Usage (GPU machine, from the repo root; vLLM staged for FA3):
    bash benchmarks/fetch_official.sh     # here, then carry benchmarks/_official
    python benchmarks/bench_kernels.py --official-dir benchmarks/_official --commit $SHA
    python benchmarks/bench_kernels.py --sweep  # sparse_prefill launch settings, one table
    python benchmarks/bench_kernels.py --attend-sweep  # the FA3 attend step's copy launches and sequence order
    python benchmarks/bench_kernels.py --skip sparse,estimation,break_even --out kernels-fp8-h200.json  # fp8 rows only
    python benchmarks/bench_kernels.py --shape gqa7_d64 --skip fp8 --out kernels-gqa7-h200.json  # the four attend layouts, d=64
    python benchmarks/plot_kernels.py benchmarks/results/kernels-h200.json
CPU plumbing check (TRITON_INTERPRET=1, fp16, tiny shapes, no FA3, no official):
    python benchmarks/bench_kernels.py --dry-run --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

if "--dry-run" in sys.argv:
    # The interpreter must be chosen before triton is imported (by torch or by our kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernels-h200.json"
DEFAULT_SWEEP_OUT = REPO / "benchmarks" / "results" / "kernels-sweep-h200.json"
DEFAULT_ATTEND_SWEEP_OUT = REPO / "benchmarks" / "results" / "kernels-attend-sweep-h200.json"
KB = 1024


def tok(L: int) -> str:
    return f"{L // KB}K" if L % KB == 0 else str(L)


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    device: str
    dtype: torch.dtype
    hq: int = 32
    hkv: int = 8
    d: int = 128
    page: int = 16
    block: int = 128
    rope_base: float = 500000.0  # Llama-3.1
    lengths: list[int] = field(default_factory=lambda: [8 * KB, 32 * KB, 128 * KB])
    densities: list[float] = field(default_factory=lambda: [1.0, 0.2, 0.1, 0.05])
    est_lengths: list[int] = field(default_factory=lambda: [8 * KB, 32 * KB, 128 * KB])
    be_lengths: list[int] = field(default_factory=lambda: [8 * KB, 16 * KB, 32 * KB])
    be_proxies: list[float] = field(default_factory=lambda: [0.3, 0.5])
    sweep_points: list[tuple[int, float]] = field(default_factory=lambda: [(32 * KB, 1.0), (128 * KB, 0.1)])
    attend_sweep_points: list[tuple[int, float]] = field(
        default_factory=lambda: [(32 * KB, 0.1), (128 * KB, 0.2), (128 * KB, 0.1)])
    fp8_lengths: list[int] = field(default_factory=lambda: [32 * KB, 128 * KB])
    fp8_density: float = 0.1  # the fixed mask of the fp8 attend rows
    budget_ms: float = 400.0  # time spent per measurement (after warm-up), at least min_reps calls
    min_reps: int = 3
    max_reps: int = 50
    dry: bool = False
    select_precision: Optional[str] = None  # selection's tl.dot precision (None: its default)
    attend_layouts: list[str] = field(default_factory=lambda: list(ATTEND_LAYOUTS))  # FA3 attend layouts timed

    @property
    def scale(self) -> float:
        return self.d ** -0.5


SHAPES = {"llama8b": (32, 8, 128), "gqa7_d64": (14, 2, 64)}
#: kernels/attend_fa3.py's LAYOUTS (named here: the module imports kernels lazily)
ATTEND_LAYOUTS = ("head", "group", "head_views", "group_views", "head_halves")
SECTIONS = ("sparse", "estimation", "break_even", "fp8")


def make_setup(args: argparse.Namespace) -> Setup:
    if args.dry_run:
        s = Setup(
            device="cpu",  # the interpreter runs kernels on host memory
            dtype=torch.float16,  # tl.dot on bf16 is wrong under the interpreter
            hq=2, hkv=1, d=64,
            lengths=[384], densities=[1.0, 0.5],
            est_lengths=[384], be_lengths=[384], be_proxies=[0.5],
            sweep_points=[(256, 1.0)], attend_sweep_points=[(384, 0.5)], fp8_lengths=[384],
            budget_ms=0.0, min_reps=1, max_reps=1, dry=True,
        )
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run on the GPU machine, or use --dry-run for the CPU plumbing check")
        s = Setup(device="cuda", dtype=torch.bfloat16)
        if args.quick:
            s.lengths, s.densities = [8 * KB, 32 * KB], [1.0, 0.1]
            s.est_lengths, s.be_lengths, s.be_proxies = [8 * KB, 32 * KB], [8 * KB, 16 * KB], [0.3]
            s.sweep_points = [(32 * KB, 1.0)]
            s.fp8_lengths = [32 * KB]
            s.budget_ms = 200.0
    if not args.dry_run:
        s.hq, s.hkv, s.d = SHAPES[args.shape]
    if args.lengths:
        s.lengths = s.est_lengths = s.fp8_lengths = [int(x) for x in args.lengths.split(",")]
    if args.densities:
        s.densities = [float(x) for x in args.densities.split(",")]
    if args.budget_ms is not None:
        s.budget_ms = args.budget_ms
    s.select_precision = args.select_precision
    s.attend_layouts = [x for x in args.attend_layout.split(",") if x]
    return s


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], Any], s: Setup) -> float:
    """Median milliseconds of fn(): one warm-up call (compilation, autotuning), one call to size
    the repetitions to s.budget_ms, then min_reps..max_reps calls each timed with CUDA events.
    The inputs here are far larger than L2 (40-50 MB), so no cache flushing is needed."""
    if s.device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    n = int(min(s.max_reps, max(s.min_reps, s.budget_ms // max(est, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))


def gpu_and_host_ms(fn: Callable[[], Any], n: int, trials: int = 3, sleep_s: float = 0.1) -> tuple[float, float]:
    """(GPU ms, host ms) per call of fn() (CUDA): n calls queued behind a kernel sleeping about
    ``sleep_s``, so the host's time to issue them is hidden from the GPU's and measured on its
    own; median of ``trials`` each. Size the sleep above n calls' host time: else the GPU waited
    for the host and its figure is an upper bound."""
    gpus, hosts = [], []
    for _ in range(trials):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2e9 * sleep_s))
        a.record()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        hosts.append((time.perf_counter() - t0) * 1e3 / n)
        b.record()
        torch.cuda.synchronize()
        gpus.append(a.elapsed_time(b) / n)
    return statistics.median(gpus), statistics.median(hosts)


def bench_gpu(fn: Callable[[], Any], s: Setup, n: int = 20, trials: int = 3) -> float:
    """GPU milliseconds per call of fn() (``gpu_and_host_ms`` after one warm-up call; bench()
    times each call on its own and reads the host time where it is the larger, e.g. a short
    estimation). CPU: bench()."""
    if s.device != "cuda":
        return bench(fn, s)
    fn()
    return gpu_and_host_ms(fn, n, trials)[0]


ERRORS: list[str] = []


def bench_or_none(fn: Callable[[], Any], s: Setup, what: str) -> Optional[float]:
    """bench() for a baseline (FA3, official): a failure is recorded in the notes and gives None
    instead of ending a one-shot GPU run."""
    try:
        return bench(fn, s)
    except Exception as e:  # noqa: BLE001
        msg = f"{what} failed: {type(e).__name__}: {str(e)[:300]}"
        ERRORS.append(msg)
        print(msg, file=sys.stderr, flush=True)
        if s.device == "cuda":
            torch.cuda.synchronize()
        return None


def extra_memory_mb(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Peak GPU memory allocated during fn() minus what was allocated before it (MB)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    return (peak - base) / 2**20


def attn_tflops(tokens: int, density: float, s: Setup) -> float:
    """Causal attention FLOPs (4 * L^2/2 * D per head) scaled by the computed block fraction."""
    return 4.0 * tokens * tokens / 2 * s.d * s.hq * density / 1e12


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Paged:
    """One request's K/V in a FlashAttention-layout paged cache."""

    cache: torch.Tensor  # [NP, PS, HKV, 2D]
    k: torch.Tensor  # [NP, PS, HKV, D] strided view (K half)
    v: torch.Tensor  # [NP, PS, HKV, D] strided view (V half)
    block_table: torch.Tensor  # [1, pages] int32, a random permutation of the pages
    tokens: int


def make_paged(k: torch.Tensor, v: torch.Tensor, s: Setup, gen: torch.Generator) -> Paged:
    """Scatter contiguous k, v ([L, HKV, D]) into a packed NHD paged cache with spare pages, pages
    assigned in random order. Unused slots hold random values (never zeros: they would hide
    reads of the wrong slot)."""
    L = k.shape[0]
    pages = -(-L // s.page)
    npages = pages + 7
    cache = torch.randn(npages, s.page, s.hkv, 2 * s.d, device=s.device, dtype=s.dtype, generator=gen)
    perm = torch.randperm(npages, device=s.device, generator=gen)[:pages]
    pad = pages * s.page - L
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(pages, s.page, s.hkv, s.d)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(pages, s.page, s.hkv, s.d)
    cache[perm, :, :, : s.d] = kp
    cache[perm, :, :, s.d :] = vp
    # What vLLM's FlashAttention backend passes: kv_cache.transpose(1, 2).split(D, -1) of the
    # logical [NP, HKV, PS, 2D] cache, i.e. these strided views of the physical NHD tensor.
    return Paged(cache, cache[..., : s.d], cache[..., s.d :], perm.to(torch.int32).view(1, -1).contiguous(), L)


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """A per-tensor dequantisation scale that maps x's largest magnitude to e4m3's largest value:
    a 0-dim float32 tensor on x's device, like vLLM's ``layer._k_scale`` buffer (vLLM keeps 1.0
    unless the checkpoint or calculate_kv_scales sets it; a scale that is not 1.0 here makes a
    forgotten or doubled descale show in the sanity checks)."""
    return (x.abs().amax().float() / FP8_MAX).clamp_min(1e-12)


def fp8_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What vLLM stores or hands FA3: fp8(x / scale), saturated (reshape_and_cache_flash, QuantFP8)."""
    return x.float().div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def make_paged_fp8(kv: Paged, k_scale: torch.Tensor, v_scale: torch.Tensor, s: Setup) -> Paged:
    """The same paged cache quantised to fp8, K half with k_scale and V half with v_scale (spare
    slots included), same block table. vLLM allocates the cache as uint8 and views it as
    float8_e4m3fn for FlashAttention and Prism: the same bytes as this fp8 tensor."""
    cache = torch.empty(kv.cache.shape, dtype=FP8, device=kv.cache.device)
    cache[..., : s.d] = fp8_quant(kv.cache[..., : s.d], k_scale)
    cache[..., s.d :] = fp8_quant(kv.cache[..., s.d :], v_scale)
    return Paged(cache, cache[..., : s.d], cache[..., s.d :], kv.block_table, kv.tokens)


def randn(shape: tuple[int, ...], s: Setup, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, device=s.device, dtype=torch.float32, generator=gen).to(s.dtype)


def _rope_neox(x: torch.Tensor, base: float) -> torch.Tensor:
    """NeoX-style RoPE (pair i with i + D/2) at positions 0..L-1 of x: [L, H, D] float32."""
    L, _, D = x.shape
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    ang = (torch.arange(L, device=x.device, dtype=torch.float64)[:, None] * inv[None, :]).float()
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def make_structured_qk(
    L: int, s: Setup, gen: torch.Generator, *, salient_frac: float = 0.02, a_salient: float = 4.0,
    a_local: float = 2.0, a_query: float = 2.0, split_pair: int = 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic post-RoPE q [L, HQ, D] and k [L, HKV, D] whose Prism selection is sparse-ish.

    Random Gaussian q/k give near-uniform pooled scores, hence near-dense selections. Here every
    kv head has a direction c shared by its q heads, split by RoPE pair: the fast pairs
    (< split_pair) carry c at a constant amplitude in every key (after RoPE their pooled scores
    decay with block distance: local / slash structure, seen by the high band); the slow pairs
    carry c only in the sink block and a few random "salient" blocks (vertical stripes, seen by
    the low band). Unit Gaussian noise on top. Tuned on CPU against prism_vllm.reference: it
    selects ~17% of causal blocks at 8K, 13% at 32K and 5% at 128K (bf16 inputs, default
    PrismConfig), falling with length as real long-context selections do. A stand-in for real
    activations, not a claim about any model.
    """
    dev, G, D, half = s.device, s.hq // s.hkv, s.d, s.d // 2
    nk = -(-L // s.block)
    c = torch.randn(s.hkv, D, device=dev, generator=gen)
    cq = c.repeat_interleave(G, 0) + 0.3 * torch.randn(s.hq, D, device=dev, generator=gen)
    local = ((torch.arange(D, device=dev) % half) < split_pair).float()
    salient = torch.rand(s.hkv, nk, device=dev, generator=gen) < salient_frac
    salient[:, 0] = True
    amp = salient.float() * a_salient  # [HKV, nk]
    blk = torch.arange(L, device=dev) // s.block
    k = torch.randn(L, s.hkv, D, device=dev, generator=gen)
    k += (a_local * local + amp[:, blk].T[:, :, None] * (1.0 - local)) * c  # [L, HKV, D]
    q = torch.randn(L, s.hq, D, device=dev, generator=gen) + a_query * cq
    return _rope_neox(q, s.rope_base).to(s.dtype), _rope_neox(k, s.rope_base).to(s.dtype)


# ----------------------------------------------------------------------------------------------
# masks: one fixed block mask, in our BSR layout and the official dense layout
# ----------------------------------------------------------------------------------------------
def causal_blocks(nq: int) -> int:
    return nq * (nq + 1) // 2


def fixed_mask(hq: int, nq: int, density: float, device: str, gen: torch.Generator) -> torch.Tensor:
    """Bool [HQ, nq, nq]: per (head, query block i) the sink (0), the diagonal (i) and each other
    causal block independently with the probability that makes the expected overall density
    (selected / causal blocks) equal ``density`` (floored by the forced blocks)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nq, device=device)[None, :]
    causal = j <= i
    forced = causal & ((j == 0) | (j == i))
    free = causal & ~forced
    n_forced, n_free = int(forced.sum()), int(free.sum())
    p = 0.0 if n_free == 0 else min(1.0, max(0.0, (density * causal_blocks(nq) - n_forced) / n_free))
    if p >= 1.0:
        return causal.expand(hq, nq, nq).clone()
    rnd = torch.rand(hq, nq, nq, device=device, generator=gen) < p
    return forced | (free & rnd)


def mask_density(mask: torch.Tensor) -> float:
    return float(mask.sum()) / (mask.shape[0] * causal_blocks(mask.shape[1]))


def union_mask(mask: torch.Tensor, hkv: int) -> torch.Tensor:
    """Bool [HQ, nq, nk]: every q head's row replaced by the OR over its kv group (what the group
    layout attends). Its density is the union's density: the blocks the group layout computes."""
    hq, nq, nk = mask.shape
    return mask.view(hkv, hq // hkv, nq, nk).any(1, keepdim=True).expand(hkv, hq // hkv, nq, nk).reshape(hq, nq, nk)


# ----------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------
def load_fa3(s: Setup) -> tuple[Optional[Callable[..., Any]], str]:
    """vLLM's flash_attn_varlen_func with FA3 available, else (None, why)."""
    if s.dry:
        return None, "dry run"
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func, is_fa_version_supported
    except Exception as e:  # noqa: BLE001 - any import failure means "no FA3 here"
        return None, (f"vllm.vllm_flash_attn not importable ({type(e).__name__}: {e}); "
                      "stage vLLM and `source /root/prism-stage/env.sh`")
    if not is_fa_version_supported(3):
        return None, "FA3 not supported on this GPU/build"
    return flash_attn_varlen_func, "vllm.vllm_flash_attn FA3"


def fa3_call(fa: Callable[..., Any], q: torch.Tensor, kv: Paged, s: Setup, out: torch.Tensor,
             scales: Any = None) -> Callable[[], Any]:
    """FA3 dense causal attention of the one request over the paged cache. ``scales``: an fp8
    cache's ``Fp8Scales`` (q fp8 too, ``out`` the model dtype), passed as vLLM's FlashAttention
    passes them: per-tensor scales expanded to [sequences, kv heads] descales."""
    L = q.shape[0]
    cu_seqlens_q = torch.tensor([0, L], dtype=torch.int32, device=s.device)
    seqused = torch.tensor([L], dtype=torch.int32, device=s.device)
    descales = {}
    if scales is not None:
        descales = {f"{n}_descale": t.reshape(1, 1).expand(1, s.hkv)
                    for n, t in (("q", scales.q), ("k", scales.k), ("v", scales.v)) if t is not None}
    return lambda: fa(
        q=q, k=kv.k, v=kv.v, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=L, seqused_k=seqused, max_seqlen_k=L,
        softmax_scale=s.scale, causal=True, block_table=kv.block_table, fa_version=3, **descales,
    )


@dataclass
class Official:
    """The official Prism functions used here (from --official-dir)."""

    commit: str
    block_sparse_attention: Optional[Callable[..., Any]] = None
    block_sparse_attention_paged: Optional[Callable[..., Any]] = None
    prism_block_estimate: Optional[Callable[..., Any]] = None
    notes: list[str] = field(default_factory=list)


def _load_module_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_official(dir_: Optional[str], s: Setup) -> tuple[Optional[Official], str]:
    """Import the official package's kernels from DIR/prism (never copied into this repo).

    Its prism/__init__.py and prism.py import transformers (for type annotations and the HF
    patch). The whole package is imported when that works; otherwise its kernel modules are
    loaded by file path and prism.py is imported with stand-ins for the three transformers
    names it uses only as annotations (glue, marked below)."""
    if s.dry:
        return None, "dry run"
    if not dir_:
        return None, "no --official-dir (bash benchmarks/fetch_official.sh, then carry benchmarks/_official)"
    root = Path(dir_).resolve()
    pkg = root / "prism"
    if not (pkg / "kernels" / "block_sparse_attn.py").exists():
        return None, f"{pkg}/kernels/block_sparse_attn.py not found"
    commit = (root / "COMMIT").read_text().strip() if (root / "COMMIT").exists() else "unknown"
    off = Official(commit=commit)
    sys.path.insert(0, str(root))
    try:
        bsa = importlib.import_module("prism.kernels.block_sparse_attn")
        bsa_paged = importlib.import_module("prism.kernels.block_sparse_attn_paged")
    except Exception as e:  # noqa: BLE001
        off.notes.append(f"package import of kernels failed ({e}); loaded by file path")
        bsa = _load_module_file("prism_official_bsa", pkg / "kernels" / "block_sparse_attn.py")
        bsa_paged = _load_module_file("prism_official_bsa_paged", pkg / "kernels" / "block_sparse_attn_paged.py")
    off.block_sparse_attention = bsa.block_sparse_attention
    off.block_sparse_attention_paged = bsa_paged.block_sparse_attention_paged
    try:
        est = importlib.import_module("prism.prism")
    except Exception as e:  # noqa: BLE001
        # --- glue: stand-ins for annotation-only transformers imports of prism/prism.py ---
        off.notes.append(f"import prism.prism failed ({type(e).__name__}: {e}); retried with transformers stand-ins")
        for modname, attr in (
            ("transformers.cache_utils", "Cache"),
            ("transformers.processing_utils", "Unpack"),
            ("transformers.modeling_flash_attention_utils", "FlashAttentionKwargs"),
        ):
            m = sys.modules.get(modname) or types.ModuleType(modname)
            if not hasattr(m, attr):
                setattr(m, attr, type(attr, (), {"__class_getitem__": classmethod(lambda cls, item: cls)}))
            sys.modules[modname] = m
        sys.modules.setdefault("transformers", types.ModuleType("transformers"))
        for k in [k for k in sys.modules if k == "prism" or k.startswith("prism.")]:
            del sys.modules[k]
        # --- end glue ---
        try:
            est = importlib.import_module("prism.prism")
        except Exception as e2:  # noqa: BLE001
            off.notes.append(f"official estimation unavailable: {type(e2).__name__}: {e2}")
            est = None
    if est is not None:
        off.prism_block_estimate = est.prism_block_estimate
    return off, f"official Prism {commit[:12]} from {pkg}"


class Ours:
    """Our kernels on one request of L tokens, through the product's entry points
    (prism_vllm.kernels.prefill: PrismParams, PrismWorkspace, prism_prefill)."""

    def __init__(self, s: Setup, L: int, config: Any = None):
        from prism_vllm.config import PrismConfig
        from prism_vllm.kernels import make_plan
        from prism_vllm.kernels.prefill import PrismParams
        from prism_vllm.rope import RopeLayout, prism_bands

        self.s = s
        # default: the paper's two calibrated bands (as the official code); the estimation section
        # also times the shipped defaults (PrismConfig())
        self.cfg = config if config is not None else PrismConfig(rule="paper")
        self.bands = prism_bands(RopeLayout(s.d, s.d, True, s.rope_base), self.cfg)  # the config's rule
        self.params = PrismParams.make(bands=self.bands, scale=s.scale, config=self.cfg, device=s.device)
        self.plan = make_plan([0, L], [0], s.hq, s.block).to(s.device)
        self.tokens = L
        self.precision = s.select_precision or "tf32x3"  # prism_prefill's default
        self.tuning: Any = None
        """The selection's SelectionTuning (None: the shipped DEFAULT_TUNING)."""

    def alloc(self) -> Any:
        """A PrismWorkspace sized exactly for this launch (the backend allocates one per device,
        sized for its scheduler limits, and shares it between layers)."""
        from prism_vllm.kernels.prefill import PrismWorkspace

        p, s = self.plan, self.s
        return PrismWorkspace(
            max_q_blocks=p.num_q_blocks, max_k_blocks=p.num_k_blocks, max_reqs=1, max_sel_capacity=p.sel_capacity,
            num_q_heads=s.hq, num_kv_heads=s.hkv, head_dim=s.d, device=s.device, block_size=s.block,
        )

    def estimate(self, q: torch.Tensor, kv: Paged, ws: Any, scales: Any = None) -> None:
        """The estimation half of prism_prefill, exactly as the backend runs it
        (prism_vllm.kernels.prefill.prism_estimate: pool q, pool k with key energies and split
        keys, select); ``scales``: the ``Fp8Scales`` of an fp8 q / cache."""
        from prism_vllm.kernels.prefill import prism_estimate

        prism_estimate(q, kv.k, kv.block_table, self.plan, self.params, ws, precision=self.precision,
                       tuning=self.tuning, q_scale=scales.q if scales is not None else None,
                       k_scale=scales.k if scales is not None else None)

    def prefill(self, q: torch.Tensor, kv: Paged, ws: Any, out: torch.Tensor) -> torch.Tensor:
        """The whole Prism prefill (estimation + sparse attention), as the backend calls it."""
        from prism_vllm.kernels.prefill import prism_prefill

        return prism_prefill(q, kv.k, kv.v, kv.block_table, self.plan, self.params, ws, out, precision=self.precision)

    def sparse(self, q: torch.Tensor, kv: Paged, sel_idx: torch.Tensor, sel_cnt: torch.Tensor, out: torch.Tensor,
               config: Any = None) -> torch.Tensor:
        """sparse_prefill with its launch settings (a SparsePrefillConfig; None: the head dim's default)."""
        from prism_vllm.kernels.sparse_prefill import sparse_prefill

        return sparse_prefill(q, kv.k, kv.v, kv.block_table, self.plan, sel_idx, sel_cnt, self.s.scale, out,
                              config=config)

    def attend_setup(self, kv: Paged) -> None:
        """FA3 attend step state: the bucket plan and buffers the backend would use for a step of
        this one request (max_num_batched_tokens = L), and the cache's virtual-page view."""
        from prism_vllm.kernels.attend_fa3 import AttendWorkspace, attend_capacity, make_attend_plan, virtual_kv

        s, p = self.s, self.plan
        layouts = tuple(dict.fromkeys(("head", *s.attend_layouts)))  # head: the backend's, the fp8 rows'
        cap = attend_capacity(max_num_batched_tokens=self.tokens, max_q_blocks=p.num_q_blocks,
                              max_k_blocks=p.num_k_blocks, num_q_heads=s.hq, head_dim=s.d,
                              element_size=torch.empty(0, dtype=s.dtype).element_size(), block_size=s.block,
                              layouts=layouts)
        self.attend_ws = AttendWorkspace(cap, s.hq, s.d, s.dtype, s.device, s.block, layouts=layouts)
        self.attend_plans = {lay: make_attend_plan(p.to("cpu"), cap, layout=lay, num_kv_heads=s.hkv)
                             for lay in layouts}
        self.vkv = virtual_kv(kv.k, kv.v, s.block)
        assert not isinstance(self.vkv, str), self.vkv

    def sparse_fa3(self, q: torch.Tensor, kv: Paged, sel_idx: torch.Tensor, sel_cnt: torch.Tensor, out: torch.Tensor,
                   fa: Callable[..., Any], order: str = "kv_desc", copies_only: bool = False,
                   scales: Any = None, layout: str = "head") -> torch.Tensor:
        """The FA3 attend step (q copy + table build, FA3, output scatter), as the backend runs it;
        ``copies_only``: the Triton launches per bucket without the FA3 calls; ``scales``: the
        ``Fp8Scales`` of an fp8 q / cache (FA3's descales); ``layout``: "head" (the backend's),
        "group" (a kv group's heads in one sequence over the union of their selections), or
        "head_views" / "group_views" (one FA3 call per q head / kv head on views, no copies: their
        ``copies_only`` is the table build alone)."""
        from prism_vllm.kernels.attend_fa3 import attend_fa3, scatter_out, virtual_sequences
        from prism_vllm.kernels.plan import BlockSelection

        sel = BlockSelection(plan=self.plan, indices=sel_idx, counts=sel_cnt)
        plan = self.attend_plans[layout]
        if copies_only:
            for b in plan.buckets:
                a = virtual_sequences(q, self.vkv, kv.block_table, sel, b, self.attend_ws, order=order, layout=layout)
                if "out" in a:  # the view layouts write out in place
                    scatter_out(a["out"], out, self.plan, b, self.s.hkv, order=order, layout=layout)
            return out
        sc = {} if scales is None else {"q_scale": scales.q, "k_scale": scales.k, "v_scale": scales.v}
        return attend_fa3(q, self.vkv, kv.block_table, sel, plan, self.s.scale, out,
                          flash_attn_varlen_func=fa, workspace=self.attend_ws, order=order, layout=layout, **sc)

    def sparse_fa3_replay(self, q: torch.Tensor, kv: Paged, sel_idx: torch.Tensor, sel_cnt: torch.Tensor,
                          out: torch.Tensor, fa: Callable[..., Any]) -> Callable[[], None]:
        """The FA3 attend step as a step's later layers run it in the backend: one checked call
        (``sparse_fa3``, head layout) recorded, then its launches replayed without the argument
        checks and building (``prefill.prism_attend`` swaps each layer's q / out / cache /
        selection in; here the same tensors). Returns the replay as a no-argument call."""
        from prism_vllm.kernels._launch import LaunchReplay, recording

        with recording() as calls:
            self.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa)
        replay = LaunchReplay(calls, (q, out))
        return lambda: replay(q, out)

    def sel(self, ws: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return ws.sel_idx, ws.sel_cnt[: self.plan.num_q_blocks * self.s.hq]

    def bsr(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sel_idx, sel_cnt) of a block mask [HQ, nq, nk] of this one-request plan."""
        from prism_vllm.kernels.plan import BlockSelection

        sel = BlockSelection.from_masks([mask], self.plan)
        return sel.indices, sel.counts

    def selected_mask(self, ws: Any) -> torch.Tensor:
        """The block mask [HQ, nq, nk] the estimation wrote into ``ws`` (on the benchmark's device)."""
        from prism_vllm.kernels.plan import BlockSelection

        sel = BlockSelection(self.plan, *self.sel(ws))
        sel.check_rows()
        return sel.to_masks(device=self.s.device)[0]

    def density(self, ws: Any) -> float:
        return float(self.sel(ws)[1].sum()) / (self.s.hq * causal_blocks(self.plan.num_q_blocks))


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
class Progress:
    """tqdm when present, else one line per step."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.n, self.desc = total, 0, desc

    def step(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.desc} {self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs error, ||a-b|| / ||b||) in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max()), float((a - b).norm() / b.norm().clamp_min(1e-30))


def sparse_inputs(L: int, s: Setup, gen: torch.Generator) -> tuple[torch.Tensor, Paged, torch.Tensor, torch.Tensor]:
    q = randn((L, s.hq, s.d), s, gen)
    k = randn((L, s.hkv, s.d), s, gen)
    v = randn((L, s.hkv, s.d), s, gen)
    return q, make_paged(k, v, s, gen), k, v


def run_sparse(s: Setup, fa3: Optional[Callable[..., Any]], off: Optional[Official], res: dict[str, Any],
               bar: Progress, official_paged: bool) -> None:
    from prism_vllm import reference

    gen = torch.Generator(device=s.device).manual_seed(1)
    for li, L in enumerate(s.lengths):
        q, kv, k, v = sparse_inputs(L, s, gen)
        ours = Ours(s, L)
        nq = ours.plan.num_q_blocks
        out = torch.empty_like(q)
        fa3_ms = fa3_out = None
        fa3v = None
        if fa3 is not None:
            fa3_out = torch.empty_like(q)
            fa3_ms = bench_or_none(fa3_call(fa3, q, kv, s, fa3_out), s, f"FA3 {tok(L)}")
            fa3v = functools.partial(fa3, fa_version=3)
        elif s.dry:  # plumbing check of the FA3 attend step: FA's semantics in plain PyTorch
            fa3v = reference.paged_varlen_attention
        if fa3v is not None:
            ours.attend_setup(kv)
            nb = {lay: len(p.buckets) for lay, p in ours.attend_plans.items()}
            if "head" in nb:  # the backend's layout, as earlier results record it
                res.setdefault("attend_buckets", {})[tok(L)] = nb["head"]
            res.setdefault("attend_buckets_by_layout", {})[tok(L)] = nb  # view layouts: FA3 calls = buckets x heads
        bar.step(f"{tok(L)} fa3")
        qc = kc = vc = None
        if off is not None:
            qc = q.permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, HQ, L, D], its layout
            kc = k.permute(1, 0, 2).unsqueeze(0).contiguous()
            vc = v.permute(1, 0, 2).unsqueeze(0).contiguous()
            pos = torch.arange(L, device=s.device)
            req_to_token = (kv.block_table[0].long()[pos // s.page] * s.page + pos % s.page).to(torch.int32)[None]
            k_pool, v_pool = kv.k.flatten(0, 1), kv.v.flatten(0, 1)  # [NP*PS, HKV, D] views of the cache
            zero = torch.zeros(1, dtype=torch.int32, device=s.device)
            seq = torch.tensor([L], dtype=torch.int32, device=s.device)
        for di, dens in enumerate(s.densities):
            mask = fixed_mask(s.hq, nq, dens, s.device, gen)
            sel_idx, sel_cnt = ours.bsr(mask)
            measured = mask_density(mask)
            row: dict[str, Any] = {"tokens": L, "density_target": dens, "density": round(measured, 5)}
            if li == 0 and di == 0 and dens == 1.0:
                check_dense(s, ours, q, kv, k, v, sel_idx, sel_cnt, fa3, res)
            row["prism_ms"] = bench(lambda: ours.sparse(q, kv, sel_idx, sel_cnt, out), s)
            row["fa3_ms"] = fa3_ms
            if fa3v is not None and "head" in s.attend_layouts:
                # the FA3 attend step, every copy and table build included
                row["prism_fa3_ms"] = bench_or_none(lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa3v), s,
                                                    f"FA3 attend {tok(L)} d={dens}")
                if row["prism_fa3_ms"] is not None:
                    replayed = ours.sparse_fa3_replay(q, kv, sel_idx, sel_cnt, out, fa3v)
                    row["prism_fa3_replayed_ms"] = bench(replayed, s)
                    if not _checked(res, f"fa3_attend_replayed_vs_checked_{tok(L)}"):
                        out.fill_(float("nan"))
                        ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa3v)
                        checked = out.clone()
                        out.fill_(float("nan"))
                        replayed()  # must write the same rows, bit for bit
                        mx, rel = rel_err(out, checked)
                        res["sanity"].append({"check": f"fa3_attend_replayed_vs_checked_{tok(L)}", "tokens": L,
                                              "density": measured, "max_abs_err": mx, "rel_err": rel,
                                              "ok": bool(torch.equal(out, checked))})
                        del checked
                    row["fa3_attend_copies_ms"] = bench(
                        lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa3v, copies_only=True), s)
                    if L == max(s.lengths) and dens == 0.1:
                        row["prism_fa3_head_asc_ms"] = bench(
                            lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa3v, order="head_asc"), s)
                    if fa3_ms is not None:
                        row["fa3_attend_speedup_vs_fa3"] = round(fa3_ms / row["prism_fa3_ms"], 3)
                        row["fa3_attend_per_block_eff"] = round(fa3_ms * measured / row["prism_fa3_ms"], 3)
                    if not _checked(res, f"fa3_attend_vs_triton_{tok(L)}"):
                        tri = torch.full_like(q, float("nan"))
                        ours.sparse(q, kv, sel_idx, sel_cnt, tri)
                        out.fill_(float("nan"))
                        ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa3v)
                        add_check(res, f"fa3_attend_vs_triton_{tok(L)}", L, measured, out, tri, tol=2e-2)
                        if dens == 1.0 and fa3_out is not None:
                            add_check(res, f"fa3_attend_dense_vs_fa3_{tok(L)}", L, measured, out, fa3_out, tol=2e-2)
                        del tri
            for lay in ("group", "head_views", "group_views", "head_halves"):
                if fa3v is not None and lay in s.attend_layouts:
                    layout_rows(s, ours, row, lay, q, kv, mask, sel_idx, sel_cnt, out, fa3v, fa3_ms, res,
                                check=dens < 1.0)
            row["official_ms"] = None
            if off is not None and off.block_sparse_attention is not None:
                omask = mask.unsqueeze(0)  # [1, HQ, nq, nk] bool: the official format
                row["official_ms"] = bench_or_none(
                    lambda: off.block_sparse_attention(qc, kc, vc, omask, s.block, True), s,
                    f"official sparse {tok(L)} d={dens}",
                )
                first_sparse = li == 0 and dens < 1.0
                if row["official_ms"] is not None and first_sparse and not _checked(res, "prism_vs_official_same_mask"):
                    out.fill_(float("nan"))
                    ours.sparse(q, kv, sel_idx, sel_cnt, out)
                    o_off = off.block_sparse_attention(qc, kc, vc, omask, s.block, True)[0].permute(1, 0, 2)
                    add_check(res, "prism_vs_official_same_mask", L, measured, out, o_off, tol=2e-2)
                if official_paged and off.block_sparse_attention_paged is not None:
                    row["official_paged_ms"] = bench_or_none(
                        lambda: off.block_sparse_attention_paged(
                            q, k_pool, v_pool, omask, req_to_token, zero, seq, zero, zero, s.block, True
                        ),
                        s,
                        f"official paged sparse {tok(L)} d={dens}",
                    )
            if li == 0 and dens < 1.0 and not _checked(res, "prism_vs_reference_fixed_mask"):
                out.fill_(float("nan"))
                ours.sparse(q, kv, sel_idx, sel_cnt, out)
                # The float32 reference materialises [heads, L, L] scores: on the GPU check the
                # first and the last kv head's group of q heads only (~3 GB of temporaries at 8K).
                G = s.hq // s.hkv
                groups = range(s.hkv) if s.dry else sorted({0, s.hkv - 1})
                for gi in groups:
                    hs = slice(gi * G, (gi + 1) * G)
                    ref = reference.block_sparse_attention(q[:, hs], k[:, gi : gi + 1], v[:, gi : gi + 1], 0,
                                                           mask[hs], s.block, s.scale)
                    add_check(res, "prism_vs_reference_fixed_mask", L, measured, out[:, hs], ref,
                              tol=5e-3 if s.dtype == torch.float16 else 2e-2)
                    del ref
            tf = attn_tflops(L, measured, s)
            row["prism_tflops"] = round(tf / (row["prism_ms"] / 1e3), 1)
            if fa3_ms is not None:
                row["fa3_tflops"] = round(attn_tflops(L, 1.0, s) / (fa3_ms / 1e3), 1)
                row["speedup_vs_fa3"] = round(fa3_ms / row["prism_ms"], 3)
                if row["official_ms"] is not None:
                    row["official_speedup_vs_fa3"] = round(fa3_ms / row["official_ms"], 3)
            if row["official_ms"] is not None:
                row["speedup_vs_official"] = round(row["official_ms"] / row["prism_ms"], 3)
            res["sparse"].append(row)
            bar.step(f"{tok(L)} d={dens}")
            mask = sel_idx = sel_cnt = None  # freed before the next row's (rebound, not del: the lambdas above read them)
        q = kv = k = v = out = qc = kc = vc = None
        if s.device == "cuda":
            torch.cuda.empty_cache()


def union_columns(s: Setup, row: dict[str, Any], mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The union mask of a row's selection and its density, written into the row (once)."""
    umask = union_mask(mask, s.hkv)
    ud = mask_density(umask)
    row["union_density"] = round(ud, 5)
    row["union_over_head_density"] = round(ud / max(mask_density(mask), 1e-12), 3)
    return umask, ud


def layout_rows(s: Setup, ours: Ours, row: dict[str, Any], layout: str, q: torch.Tensor, kv: Paged,
                mask: torch.Tensor, sel_idx: torch.Tensor, sel_cnt: torch.Tensor, out: torch.Tensor,
                fa: Callable[..., Any], fa3_ms: Optional[float], res: dict[str, Any], check: bool) -> None:
    """The columns of a row (same selection as the head layout's) for the layouts beside the
    backend's: "group" (copies, a kv group's heads over the union of their selections), the
    view layouts (one FA3 call per q head / kv head on views of q and out) and "head_halves" (the
    head layout's sequences cut at the block middle: FA3's 64-row tile). The union's density
    beside the per-head one (group layouts), the attend step's time, its Triton launches alone
    (``*_tables_ms``: for the view layouts the table build that replaces the copies), its
    speed-up over FA3 dense and its per-block efficiency (FA3 dense time x density / its time,
    per UNION block for the group layouts: what they compute). With ``check``, once per length:
    its output against the Triton kernel on the selection or its union."""
    union = layout in ("group", "group_views")
    ud = union_columns(s, row, mask)[1] if union else mask_density(mask)
    tag = f"{tok(ours.tokens)} d={row.get('density_target', row['density'])}"
    row[f"prism_fa3_{layout}_ms"] = ms = bench_or_none(
        lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa, layout=layout), s, f"FA3 attend {layout} {tag}")
    if ms is None:
        return
    row[f"fa3_attend_{layout}_tables_ms"] = bench(
        lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa, copies_only=True, layout=layout), s)
    if fa3_ms is not None:
        row[f"fa3_attend_{layout}_speedup_vs_fa3"] = round(fa3_ms / ms, 3)
        row[f"fa3_attend_{layout}_per_{'union_' if union else ''}block_eff"] = round(fa3_ms * ud / ms, 3)
    name = f"fa3_attend_{layout}_vs_triton{'_union' if union else ''}_{tok(ours.tokens)}"
    if check and not _checked(res, name):
        si, sc = ours.bsr(union_mask(mask, s.hkv)) if union else (sel_idx, sel_cnt)
        want = torch.full_like(q, float("nan"))
        ours.sparse(q, kv, si, sc, want)
        out.fill_(float("nan"))
        ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa, layout=layout)
        add_check(res, name, ours.tokens, ud, out, want, tol=2e-2)
        del si, sc, want


def _checked(res: dict[str, Any], name: str) -> bool:
    return any(c["check"] == name for c in res["sanity"])


def add_check(res: dict[str, Any], name: str, L: int, density: Optional[float], a: torch.Tensor, b: torch.Tensor,
              tol: float) -> None:
    mx, rel = rel_err(a, b)
    ok = bool(math.isfinite(rel) and rel < tol and torch.isfinite(a.float()).all())
    res["sanity"].append({"check": name, "tokens": L, "density": density, "max_abs_err": mx, "rel_err": rel,
                          "tol_rel": tol, "ok": ok})
    print(f"sanity {name} L={L}: max abs err {mx:.3e}, rel err {rel:.3e} ({'ok' if ok else 'FAILED'})",
          file=sys.stderr, flush=True)


def add_selection_check(res: dict[str, Any], name: str, L: int, got: torch.Tensor, want: torch.Tensor) -> None:
    """Our selection's block mask vs the reference's: the share of the reference's selected
    blocks that differ (near-ties may flip a block)."""
    diff = float((got != want).sum()) / max(1, int(want.sum()))
    ok = diff < 1e-3
    res["sanity"].append({"check": name, "tokens": L, "mismatch_frac": diff, "ref_density": mask_density(want),
                          "ok": ok})
    print(f"sanity {name} L={L}: {diff:.2e} of selected blocks differ from the reference "
          f"({'ok' if ok else 'FAILED'})", file=sys.stderr, flush=True)


def check_dense(s: Setup, ours: Ours, q: torch.Tensor, kv: Paged, k: torch.Tensor, v: torch.Tensor,
                sel_idx: torch.Tensor, sel_cnt: torch.Tensor, fa3: Optional[Callable[..., Any]],
                res: dict[str, Any]) -> None:
    """Ours at density 1.0 (poisoned output first) vs FA3 on the same cache, or vs an independent
    dense reference when FA3 is absent (SDPA on GPU, the float32 reference on CPU)."""
    from prism_vllm import reference

    L = q.shape[0]
    out = torch.full_like(q, float("nan"))
    ours.sparse(q, kv, sel_idx, sel_cnt, out)
    if fa3 is not None:
        ref = torch.empty_like(q)
        fa3_call(fa3, q, kv, s, ref)()
        add_check(res, "prism_dense_vs_fa3", L, 1.0, out, ref, tol=2e-2)
    elif s.device == "cuda":
        G = s.hq // s.hkv
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(G, 1).transpose(0, 1), v.repeat_interleave(G, 1).transpose(0, 1),
            is_causal=True, scale=s.scale,
        ).transpose(0, 1)
        add_check(res, "prism_dense_vs_sdpa", L, 1.0, out, ref, tol=2e-2)
    else:
        ref = reference.dense_causal_attention(q, k, v, 0, s.scale)
        add_check(res, "prism_dense_vs_reference", L, 1.0, out, ref, tol=5e-3)


def run_estimation(s: Setup, off: Optional[Official], res: dict[str, Any], bar: Progress) -> dict[int, dict[str, Any]]:
    """Returns per length the structured inputs' estimation time and our selection (for break-even)."""
    from prism_vllm import reference

    gen = torch.Generator(device=s.device).manual_seed(2)
    keep: dict[int, dict[str, Any]] = {}
    for li, L in enumerate(sorted(set(s.est_lengths) | set(s.be_lengths))):
        q, k = make_structured_qk(L, s, gen)
        v = randn((L, s.hkv, s.d), s, gen)
        kv = make_paged(k, v, s, gen)
        ours = Ours(s, L)
        ws = ours.alloc()
        row: dict[str, Any] = {"tokens": L}
        row["prism_ms"] = bench(lambda: ours.estimate(q, kv, ws), s)
        row["prism_density"] = round(ours.density(ws), 5)
        row["workspace_mb"] = round(ws.nbytes / 2**20, 2)
        # With the workspace already allocated (as in the backend) the call itself allocates nothing.
        row["call_extra_mem_mb"] = extra_memory_mb(lambda: ours.estimate(q, kv, ws), s.device)
        del ws

        def ours_fresh() -> Any:
            w = ours.alloc()
            ours.estimate(q, kv, w)
            return w

        # Reported extra memory: this launch's workspace plus anything the call allocates.
        row["extra_mem_mb"] = extra_memory_mb(ours_fresh, s.device)
        ws = ours_fresh()
        if li == 0:
            # our selection vs the reference spec on the same input (near-ties may flip a block)
            got = ours.selected_mask(ws)
            qp = reference.pool_blocks(q, 0, s.block)
            kp = reference.pool_blocks(k, 0, s.block)
            want = reference.select_blocks(qp, kp, 0, ours.bands, ours.cfg)
            add_selection_check(res, "prism_selection_vs_reference", L, got, want)
        # the shipped defaults' selection (PrismConfig(): the default preset's rule and thresholds),
        # what the backend runs unless configured otherwise
        from prism_vllm.config import PrismConfig

        shipped = Ours(s, L, PrismConfig())
        ws_shipped = shipped.alloc()
        row["default_rule"] = shipped.cfg.rule
        row["prism_default_ms"] = bench(lambda: shipped.estimate(q, kv, ws_shipped), s)
        row["prism_default_gpu_ms"] = bench_gpu(lambda: shipped.estimate(q, kv, ws_shipped), s)
        row["prism_default_density"] = round(shipped.density(ws_shipped), 5)
        ws_shipped = shipped = None
        row["official_ms"] = row["official_extra_mem_mb"] = row["official_density"] = None
        if off is not None and off.prism_block_estimate is not None and L in s.est_lengths:
            G = s.hq // s.hkv
            qc = q.permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, HQ, L, D]
            # Its estimate takes keys with HQ heads: its HF forward repeats KV heads first.
            kc = k.repeat_interleave(G, 1).permute(1, 0, 2).unsqueeze(0).contiguous()
            row["official_ms"] = bench_or_none(lambda: off.prism_block_estimate(qc, kc), s,
                                               f"official estimation {tok(L)}")
            if row["official_ms"] is not None:
                row["official_extra_mem_mb"] = extra_memory_mb(lambda: off.prism_block_estimate(qc, kc), s.device)
                om = off.prism_block_estimate(qc, kc)[0]
                row["official_density"] = round(mask_density(om), 5)
                del om
            del qc, kc
        if L in s.est_lengths:
            res["estimation"].append(row)
        keep[L] = {"est_ms": row["prism_ms"], "q": q, "kv": kv, "ws": ws, "ours": ours,
                   "density": row["prism_density"]} if L in s.be_lengths else {}
        bar.step(f"est {tok(L)}")
    return keep


def run_break_even(s: Setup, fa3: Optional[Callable[..., Any]], est: dict[int, dict[str, Any]],
                   res: dict[str, Any], bar: Progress) -> None:
    from prism_vllm import reference

    gen = torch.Generator(device=s.device).manual_seed(3)
    for L in s.be_lengths:
        e = est[L]
        q, kv, ours, ws = e["q"], e["kv"], e["ours"], e["ws"]
        out = torch.empty_like(q)
        fa3_ms = None
        if fa3 is not None:
            fa3_ms = bench_or_none(fa3_call(fa3, q, kv, s, torch.empty_like(q)), s, f"FA3 {tok(L)}")

        def row(mode: str, density: float, sparse_ms: float, total_ms: float) -> dict[str, Any]:
            r = {"tokens": L, "mode": mode, "density": round(density, 5), "estimation_ms": e["est_ms"],
                 "sparse_ms": sparse_ms, "total_ms": total_ms, "fa3_ms": fa3_ms}
            r["speedup_vs_fa3"] = round(fa3_ms / total_ms, 3) if fa3_ms else None
            r["not_slower_than_fa3"] = (total_ms <= fa3_ms) if fa3_ms else None
            return r

        sel_idx, sel_cnt = ours.sel(ws)
        sp = bench(lambda: ours.sparse(q, kv, sel_idx, sel_cnt, out), s)
        # total: prism_prefill (estimation + sparse attention), the backend's call
        total = bench(lambda: ours.prefill(q, kv, ws, out), s)
        r = row("prism_selection_structured_synthetic", e["density"], sp, total)
        fa = functools.partial(fa3, fa_version=3) if fa3 is not None else reference.paged_varlen_attention if s.dry \
            else None
        if fa is not None:
            # the FA3 attend step on this selection, per layout (the heads of a group select alike here)
            ours.attend_setup(kv)
            if "head" in s.attend_layouts:
                r["fa3_attend_ms"] = bench_or_none(lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa), s,
                                                   f"FA3 attend structured {tok(L)}")
                if r["fa3_attend_ms"] is not None and fa3_ms is not None:
                    r["fa3_attend_per_block_eff"] = round(fa3_ms * e["density"] / r["fa3_attend_ms"], 3)
            got = ours.selected_mask(ws)
            for lay in ("group", "head_views", "group_views", "head_halves"):
                if lay in s.attend_layouts:
                    layout_rows(s, ours, r, lay, q, kv, got, sel_idx, sel_cnt, out, fa, fa3_ms, res, check=False)
        res["break_even"].append(r)
        for dens in s.be_proxies:
            mask = fixed_mask(s.hq, ours.plan.num_q_blocks, dens, s.device, gen)
            si, sc = ours.bsr(mask)
            sp = bench(lambda: ours.sparse(q, kv, si, sc, out), s)
            res["break_even"].append(row(f"proxy_fixed_density_{dens}", mask_density(mask), sp, e["est_ms"] + sp))
        bar.step(f"break-even {tok(L)}")
        est[L] = {}
        if s.device == "cuda":
            torch.cuda.empty_cache()


def run_fp8(s: Setup, fa3: Optional[Callable[..., Any]], res: dict[str, Any], bar: Progress) -> None:
    """fp8 (e4m3) KV cache rows: what vLLM's --kv-cache-dtype fp8 runs on FA3, beside FA3 on bf16.

    Inputs per length: the estimation section's structured q / k (so our estimation selects what
    it would there) and random v, in the model dtype (bf16; fp16 in the dry run), scattered into
    a paged cache; per-tensor scales from their largest magnitudes (``fp8_scale``); the fp8 cache
    is that cache quantised (same pages, same block table) and q is quantised with its own scale,
    as vLLM's Attention layer does when the backend takes fp8 queries (FlashAttention does on
    CUDA, and FA3 needs q in the cache's dtype). The attend step reads a fixed mask at
    ``s.fp8_density`` (as the sparse section does), not the estimation's selection; ``total_ms``
    is the sum of the estimation and attend medians.
    """
    from prism_vllm import reference
    from prism_vllm.kernels.prefill import Fp8Scales

    gen = torch.Generator(device=s.device).manual_seed(5)
    # The dry run has no FA3: FA's semantics in plain PyTorch stand in for the attend step's FA3
    # calls and for the sanity check's dense output (never timed as FA3 dense).
    dense = fa3 if fa3 is not None else reference.paged_varlen_attention if s.dry else None
    fa = functools.partial(fa3, fa_version=3) if fa3 is not None else dense
    for li, L in enumerate(s.fp8_lengths):
        q, k = make_structured_qk(L, s, gen)
        v = randn((L, s.hkv, s.d), s, gen)
        kv = make_paged(k, v, s, gen)
        sc = Fp8Scales(q=fp8_scale(q), k=fp8_scale(k), v=fp8_scale(v))
        q8 = fp8_quant(q, sc.q)
        kv8 = make_paged_fp8(kv, sc.k, sc.v, s)
        del v
        ours = Ours(s, L)
        out = torch.empty_like(q)  # the model dtype: FA3 writes it from fp8 inputs
        row: dict[str, Any] = {"tokens": L, "kv_cache_dtype": "float8_e4m3fn", "q_dtype": "float8_e4m3fn",
                               "scales": {n: float(getattr(sc, n)) for n in ("q", "k", "v")},
                               "fa3_fp8_ms": None, "fa3_bf16_ms": None}
        if fa3 is not None:
            row["fa3_fp8_ms"] = bench_or_none(fa3_call(fa3, q8, kv8, s, out, scales=sc), s, f"FA3 fp8 {tok(L)}")
            row["fa3_bf16_ms"] = bench_or_none(fa3_call(fa3, q, kv, s, out), s, f"FA3 bf16 {tok(L)}")
        bar.step(f"fp8 {tok(L)} fa3")

        ws = ours.alloc()
        row["estimation_ms"] = bench(lambda: ours.estimate(q8, kv8, ws, sc), s)  # as the backend runs it
        row["estimation_density"] = round(ours.density(ws), 5)
        if li == 0:
            # the cache's K half holds exactly fp8_quant(k): the spec on the dequantised values
            qp = reference.pool_blocks(q8.float() * sc.q, 0, s.block)
            kp = reference.pool_blocks(fp8_quant(k, sc.k).float() * sc.k, 0, s.block)
            want = reference.select_blocks(qp, kp, 0, ours.bands, ours.cfg)
            add_selection_check(res, "fp8_selection_vs_reference", L, ours.selected_mask(ws), want)
            del qp, kp, want
        k_only = Fp8Scales(k=sc.k)  # bf16 q: what a backend without fp8 queries would hand over
        row["estimation_bf16q_ms"] = bench(lambda: ours.estimate(q, kv8, ws, k_only), s)
        row["estimation_bf16_ms"] = bench(lambda: ours.estimate(q, kv, ws), s)  # the bf16 cache
        del k
        bar.step(f"fp8 {tok(L)} estimation")

        mask = fixed_mask(s.hq, ours.plan.num_q_blocks, s.fp8_density, s.device, gen)
        sel_idx, sel_cnt = ours.bsr(mask)
        measured = mask_density(mask)
        row["density"] = round(measured, 5)
        row["attend_ms"] = row["total_ms"] = None
        if fa is not None:
            ours.attend_setup(kv8)
            if li == 0:
                full = fixed_mask(s.hq, ours.plan.num_q_blocks, 1.0, s.device, gen)
                fi, fc = ours.bsr(full)
                got = torch.full_like(q, float("nan"))
                ours.sparse_fa3(q8, kv8, fi, fc, got, fa, scales=sc)
                ref = torch.full_like(q, float("nan"))
                fa3_call(dense, q8, kv8, s, ref, scales=sc)()
                what = "fa3_fp8" if fa3 is not None else "paged_reference"
                add_check(res, f"fp8_attend_dense_vs_{what}_{tok(L)}", L, 1.0, got, ref, tol=2e-2)
                del full, fi, fc, got, ref
            row["attend_ms"] = bench_or_none(lambda: ours.sparse_fa3(q8, kv8, sel_idx, sel_cnt, out, fa, scales=sc),
                                             s, f"FA3 attend fp8 {tok(L)} d={s.fp8_density}")
        if row["attend_ms"] is not None:
            row["total_ms"] = row["estimation_ms"] + row["attend_ms"]
        f8 = row["fa3_fp8_ms"]
        if f8 is not None and row["fa3_bf16_ms"] is not None:
            row["fa3_fp8_speedup_vs_bf16"] = round(row["fa3_bf16_ms"] / f8, 3)
        if f8 is not None and row["attend_ms"] is not None:
            row["attend_speedup_vs_fa3_fp8"] = round(f8 / row["attend_ms"], 3)
            row["attend_per_block_eff"] = round(f8 * measured / row["attend_ms"], 3)
            row["total_speedup_vs_fa3_fp8"] = round(f8 / row["total_ms"], 3)
        res["fp8"].append(row)
        bar.step(f"fp8 {tok(L)} attend")
        # the next length's inputs replace these (no del: the timed lambdas name them)


def run_sweep(s: Setup, fa3: Optional[Callable[..., Any]], res: dict[str, Any]) -> None:
    sp_mod = importlib.import_module("prism_vllm.kernels.sparse_prefill")  # the module, not the function

    configs = sp_mod.candidate_configs(s.d)
    gen = torch.Generator(device=s.device).manual_seed(4)
    bar = Progress(len(s.sweep_points) * (len(configs) + 1), "sweep")  # + 3 precision rows, untracked
    for L, dens in s.sweep_points:
        q, kv, _, _ = sparse_inputs(L, s, gen)
        ours = Ours(s, L)
        mask = fixed_mask(s.hq, ours.plan.num_q_blocks, dens, s.device, gen)
        si, sc = ours.bsr(mask)
        out = torch.empty_like(q)
        fa3_ms = None
        if fa3 is not None:
            fa3_ms = bench_or_none(fa3_call(fa3, q, kv, s, torch.empty_like(q)), s, f"FA3 {tok(L)}")
        bar.step(f"{tok(L)} fa3")
        first: Optional[torch.Tensor] = None
        for c in configs:
            knobs = asdict(c)  # block_m, block_n, num_warps, num_stages
            r: dict[str, Any] = {"tokens": L, "density": round(mask_density(mask), 5), **knobs, "fa3_ms": fa3_ms}
            try:
                out.fill_(float("nan"))  # poison: every row must be written
                r["prism_ms"] = bench(lambda: ours.sparse(q, kv, si, sc, out, config=c), s)
                r["speedup_vs_fa3"] = round(fa3_ms / r["prism_ms"], 3) if fa3_ms else None
                # every config must compute what the first (default) one does
                if first is None:
                    first = out.clone()
                r["max_abs_diff_vs_default"], r["rel_diff_vs_default"] = rel_err(out, first)
                r["ok"] = bool(r["rel_diff_vs_default"] < 1e-2 and torch.isfinite(out).all())
            except Exception as ex:  # noqa: BLE001 - e.g. out of shared memory for a config
                r["prism_ms"], r["error"] = None, f"{type(ex).__name__}: {str(ex)[:200]}"
            res["sweep"].append(r)
            bar.step(f"{tok(L)} {knobs}")
        q = kv = mask = si = sc = out = None
    # Selection precision at the longest sweep length, on the structured input: time and how
    # many selected blocks differ from the exact ("ieee") selection.
    L = max(p[0] for p in s.sweep_points)
    q, k = make_structured_qk(L, s, gen)
    kv = make_paged(k, randn((L, s.hkv, s.d), s, gen), s, gen)
    ours = Ours(s, L)
    exact = None
    for prec in ("ieee", "tf32x3", "tf32"):
        ours.precision = prec
        ws = ours.alloc()
        r = {"tokens": L, "section": "estimation", "select_precision": prec}
        try:
            r["prism_ms"] = bench(lambda: ours.estimate(q, kv, ws), s)
            r["density"] = round(ours.density(ws), 5)
            m = ours.selected_mask(ws)
            exact = m if exact is None else exact
            r["blocks_differing_from_ieee"] = int((m != exact).sum())
        except Exception as ex:  # noqa: BLE001
            r["prism_ms"], r["error"] = None, f"{type(ex).__name__}: {str(ex)[:200]}"
        res["sweep"].append(r)
    bar.close()


#: The FA3 attend step's copy-launch candidates (kernels/attend_fa3.AttendLaunch), the default first:
#: rows per copy tile and warps per program.
ATTEND_LAUNCH_CANDIDATES = [(32, 4), (64, 4), (128, 4), (32, 8), (64, 8), (128, 8)]


def run_attend_sweep(s: Setup, fa3: Optional[Callable[..., Any]], res: dict[str, Any]) -> None:
    """The FA3 attend step's launch settings at s.attend_sweep_points (fixed masks, head layout):
    every AttendLaunch candidate (copies alone and the whole step) with the default order, then the
    other sequence order (whole step) with the default launch. Each run's output must equal the
    default's exactly (the candidates only move rows and build tables; FA3 is the same call).
    Last, the default with FA3's own split-KV heuristic (``copy_splits`` 0 against the shipped
    COPY_SPLITS): its time, its output's largest difference from the default's (a split sums in
    another order) and, on CUDA, the GPU memory each of the two calls allocates beyond its inputs
    (``extra_mb``: FA3's split accumulators, outside vLLM's memory profiling)."""
    from prism_vllm.kernels import attend_fa3 as af

    if fa3 is None and not s.dry:
        res["notes"].append("attend sweep skipped: no FA3")
        return
    fa3v = functools.partial(fa3, fa_version=3) if fa3 is not None else None
    if fa3v is None:
        from prism_vllm import reference

        fa3v = reference.paged_varlen_attention
    default = af.ATTEND_LAUNCH
    gen = torch.Generator(device=s.device).manual_seed(5)
    shipped_splits = af.COPY_SPLITS
    runs = [(bt, nw, "kv_desc", shipped_splits) for bt, nw in ATTEND_LAUNCH_CANDIDATES]
    runs += [(default.block_t, default.num_warps, o, shipped_splits) for o in af.ORDERS if o != "kv_desc"]
    runs += [(default.block_t, default.num_warps, "kv_desc", 0)]  # FA3's own split-KV heuristic
    bar = Progress(len(s.attend_sweep_points) * (len(runs) + 1), "attend sweep")
    try:
        for L, dens in s.attend_sweep_points:
            q, kv, _, _ = sparse_inputs(L, s, gen)
            ours = Ours(s, L)
            ours.attend_setup(kv)
            mask = fixed_mask(s.hq, ours.plan.num_q_blocks, dens, s.device, gen)
            si, sc = ours.bsr(mask)
            out = torch.empty_like(q)
            fa3_ms = bench_or_none(fa3_call(fa3, q, kv, s, torch.empty_like(q)), s, f"FA3 {tok(L)}") if fa3 else None
            bar.step(f"{tok(L)} fa3")
            first: Optional[torch.Tensor] = None
            for bt, nw, order, splits in runs:
                r: dict[str, Any] = {"tokens": L, "density": round(mask_density(mask), 5), "block_t": bt,
                                     "num_warps": nw, "order": order, "copy_splits": splits, "fa3_ms": fa3_ms,
                                     "default": (bt, nw, order, splits) == (default.block_t, default.num_warps,
                                                                            "kv_desc", shipped_splits)}
                try:
                    block_n = max(default.block_n, 32 * nw)
                    af.ATTEND_LAUNCH = replace(default, block_t=bt, num_warps=nw, block_n=block_n)
                    af.COPY_SPLITS = splits
                    if order == "kv_desc" and splits == shipped_splits:
                        r["copies_ms"] = bench(
                            lambda: ours.sparse_fa3(q, kv, si, sc, out, fa3v, order=order, copies_only=True), s)
                    out.fill_(float("nan"))  # poison: every row must be written
                    r["prism_fa3_ms"] = bench(lambda: ours.sparse_fa3(q, kv, si, sc, out, fa3v, order=order), s)
                    if fa3_ms:
                        r["speedup_vs_fa3"] = round(fa3_ms / r["prism_fa3_ms"], 3)
                    if r["default"] or splits != shipped_splits:
                        r["extra_mb"] = extra_memory_mb(lambda: ours.sparse_fa3(q, kv, si, sc, out, fa3v), s.device)
                    if r["default"]:
                        first = out.clone()
                    if splits == shipped_splits:
                        # every candidate against the default's output (None: the default itself failed)
                        r["equal_to_default"] = bool(torch.equal(out, first)) if first is not None else None
                    elif first is not None:  # a split sums the keys in another order
                        r["max_abs_diff_to_default"] = float((out.float() - first.float()).abs().max())
                    ok = r.get("equal_to_default") is not False and r.get("max_abs_diff_to_default", 0.0) <= 0.02
                    r["ok"] = ok and bool(torch.isfinite(out).all())
                except Exception as ex:  # noqa: BLE001 - one failing candidate keeps the others' rows
                    r["prism_fa3_ms"], r["ok"], r["error"] = None, False, f"{type(ex).__name__}: {str(ex)[:200]}"
                finally:
                    af.ATTEND_LAUNCH = default
                    af.COPY_SPLITS = shipped_splits
                res["attend_sweep"].append(r)
                bar.step(f"{tok(L)} t={bt} w={nw} {order} splits={splits}")
            q = kv = mask = si = sc = out = first = None
            if s.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    head = [h for _, h in cols]
    body = [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(c.rjust(w[i]) for i, c in enumerate(b)) for b in body]
    return "\n".join(lines)


def with_estimation(res: dict[str, Any]) -> None:
    """Sparse rows of the FA3 attend step gain the whole Prism step of their length: this run's
    estimation time (structured input, its own selection) plus the attend step at the row's fixed
    density, against FA3 dense, when the run timed both (same run, same GPU)."""
    for col, est_col in (("", "prism_ms"), ("_default", "prism_default_ms")):
        est = {r["tokens"]: r[est_col] for r in res.get("estimation", []) if r.get(est_col)}
        for r in res.get("sparse", []):
            e, a, f = est.get(r["tokens"]), r.get("prism_fa3_ms"), r.get("fa3_ms")
            if e and a and f:
                r[f"estimation{col}_ms"] = e
                r[f"fa3_attend_with{col}_estimation_speedup"] = round(f / (e + a), 3)


def summary(res: dict[str, Any]) -> str:
    out = []
    if res.get("sparse"):
        out.append("== sparse attention (ms; speedup = FA3 / impl) ==")
        out.append(table(res["sparse"], [("tokens", "tokens"), ("density", "density"), ("prism_ms", "prism"),
                                          ("prism_fa3_ms", "prism_fa3"), ("prism_fa3_replayed_ms", "replayed"),
                                          ("fa3_attend_copies_ms", "copies"),
                                          ("fa3_attend_speedup_vs_fa3", "pfa3/fa3x"),
                                          ("fa3_attend_with_estimation_speedup", "+est x"),
                                          ("fa3_attend_with_default_estimation_speedup", "+est_default x"),
                                          ("fa3_attend_per_block_eff", "blk_eff"), ("prism_fa3_head_asc_ms", "head_asc"),
                                          ("union_density", "u_dens"), ("prism_fa3_group_ms", "grp_fa3"),
                                          ("fa3_attend_group_speedup_vs_fa3", "grp/fa3x"),
                                          ("fa3_attend_group_per_union_block_eff", "grp_ublk_eff"),
                                          ("prism_fa3_head_views_ms", "hv_fa3"),
                                          ("fa3_attend_head_views_tables_ms", "hv_tables"),
                                          ("fa3_attend_head_views_speedup_vs_fa3", "hv/fa3x"),
                                          ("fa3_attend_head_views_per_block_eff", "hv_blk_eff"),
                                          ("prism_fa3_group_views_ms", "gv_fa3"),
                                          ("fa3_attend_group_views_tables_ms", "gv_tables"),
                                          ("fa3_attend_group_views_speedup_vs_fa3", "gv/fa3x"),
                                          ("fa3_attend_group_views_per_union_block_eff", "gv_ublk_eff"),
                                          ("prism_fa3_head_halves_ms", "hh_fa3"),
                                          ("fa3_attend_head_halves_per_block_eff", "hh_blk_eff"),
                                          ("fa3_ms", "fa3"), ("official_ms", "official"),
                                          ("official_paged_ms", "off_paged"), ("speedup_vs_fa3", "prism/fa3x"),
                                          ("official_speedup_vs_fa3", "off/fa3x"), ("prism_tflops", "TFLOP/s")]))
    if res.get("estimation"):
        out.append("== estimation (ms, extra MB, selected density) ==")
        out.append(table(res["estimation"], [("tokens", "tokens"), ("prism_ms", "prism"), ("official_ms", "official"),
                                              ("extra_mem_mb", "prism_MB"), ("call_extra_mem_mb", "call_MB"),
                                              ("official_extra_mem_mb", "official_MB"),
                                              ("prism_density", "prism_dens"), ("official_density", "off_dens"),
                                              ("prism_default_ms", "default"),
                                              ("prism_default_gpu_ms", "default_gpu"), ("default_rule", "default_rule"),
                                              ("prism_default_density", "default_dens")]))
    if res.get("break_even"):
        out.append("== break-even: estimation + sparse vs FA3 dense (ms) ==")
        out.append(table(res["break_even"], [("tokens", "tokens"), ("mode", "mode"), ("density", "density"),
                                              ("estimation_ms", "est"), ("sparse_ms", "sparse"),
                                              ("total_ms", "total"), ("fa3_ms", "fa3"),
                                              ("speedup_vs_fa3", "fa3/total"), ("fa3_attend_ms", "attend"),
                                              ("fa3_attend_per_block_eff", "blk_eff"), ("union_density", "u_dens"),
                                              ("prism_fa3_group_ms", "attend_grp"),
                                              ("fa3_attend_group_per_union_block_eff", "grp_ublk_eff"),
                                              ("prism_fa3_head_views_ms", "attend_hv"),
                                              ("fa3_attend_head_views_per_block_eff", "hv_blk_eff"),
                                              ("prism_fa3_group_views_ms", "attend_gv"),
                                              ("fa3_attend_group_views_per_union_block_eff", "gv_ublk_eff"),
                                              ("prism_fa3_head_halves_ms", "attend_hh"),
                                              ("fa3_attend_head_halves_per_block_eff", "hh_blk_eff")]))
    if res.get("fp8"):
        out.append("== fp8 KV cache (e4m3, per-tensor scales; ms; x = FA3 fp8 dense / impl) ==")
        out.append(table(res["fp8"], [("tokens", "tokens"), ("density", "density"), ("fa3_fp8_ms", "fa3_fp8"),
                                      ("fa3_bf16_ms", "fa3_bf16"), ("fa3_fp8_speedup_vs_bf16", "bf16/fp8"),
                                      ("estimation_ms", "est"), ("estimation_bf16q_ms", "est_bf16q"),
                                      ("estimation_bf16_ms", "est_bf16"), ("estimation_density", "est_dens"),
                                      ("attend_ms", "attend"), ("total_ms", "total"),
                                      ("attend_speedup_vs_fa3_fp8", "attend_x"), ("total_speedup_vs_fa3_fp8", "total_x"),
                                      ("attend_per_block_eff", "blk_eff")]))
    if res.get("sweep"):
        out.append("== sparse_prefill launch settings ==")
        attn_rows = [r for r in res["sweep"] if "select_precision" not in r]
        out.append(table(attn_rows, [("tokens", "tokens"), ("density", "density"), ("block_m", "BM"),
                                         ("block_n", "BN"), ("num_warps", "warps"), ("num_stages", "stages"),
                                         ("prism_ms", "prism"), ("fa3_ms", "fa3"), ("speedup_vs_fa3", "fa3/prism"),
                                         ("rel_diff_vs_default", "rel_diff"), ("ok", "ok"), ("error", "error")]))
        est_rows = [r for r in res["sweep"] if "select_precision" in r]
        if est_rows:
            out.append("== estimation by selection precision ==")
            out.append(table(est_rows, [("tokens", "tokens"), ("select_precision", "precision"), ("prism_ms", "ms"),
                                        ("density", "density"), ("blocks_differing_from_ieee", "diff_blocks"),
                                        ("error", "error")]))
    if res.get("attend_sweep"):
        out.append("== FA3 attend step: copy launches (rows per tile, warps), sequence order and FA3 split-KV "
                   "(0: FA3's heuristic) (ms, MB) ==")
        out.append(table(res["attend_sweep"], [("tokens", "tokens"), ("density", "density"), ("block_t", "rows"),
                                               ("num_warps", "warps"), ("order", "order"), ("copy_splits", "splits"),
                                               ("copies_ms", "copies"), ("prism_fa3_ms", "attend"), ("fa3_ms", "fa3"),
                                               ("speedup_vs_fa3", "fa3/attend"), ("extra_mb", "extra MB"),
                                               ("ok", "ok"), ("error", "error")]))
    if res.get("break_even_min_tokens"):
        out.append("break-even (shortest measured length not slower than FA3 from there on): "
                   + ", ".join(f"{m}: {v}" for m, v in res["break_even_min_tokens"].items()))
    if res.get("sanity"):
        bad = [c for c in res["sanity"] if not c["ok"]]
        out.append(f"== sanity: {len(res['sanity']) - len(bad)}/{len(res['sanity'])} ok ==")
        for c in bad:
            out.append(f"FAILED {c}")
    if res.get("notes"):
        out.append("notes: " + " | ".join(res["notes"]))
    return "\n".join(out)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - the GPU machine's copy may have no .git
        return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--plot", action="store_true", help="also write the PNG plot next to the JSON")
    ap.add_argument("--quick", action="store_true", help="smaller set: 8K/32K, densities 1.0/0.1")
    ap.add_argument("--sweep", action="store_true",
                    help="only time sparse_prefill's launch settings at 32K d=1.0 and 128K d=0.1")
    ap.add_argument("--attend-sweep", action="store_true",
                    help="time the FA3 attend step's copy-launch settings and sequence orders (one table)")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check: interpreter, fp16, tiny shapes")
    ap.add_argument("--official-dir", default=None, help="folder holding the official prism/ package")
    ap.add_argument("--official-paged", action="store_true", help="also time the official paged kernel")
    ap.add_argument("--commit", default=None, help="commit of the measured tree (default: git rev-parse HEAD)")
    ap.add_argument("--lengths", default=None, help="comma-separated token counts (overrides sparse/estimation/fp8)")
    ap.add_argument("--densities", default=None, help="comma-separated densities for the sparse section")
    ap.add_argument("--budget-ms", type=float, default=None, help="time per measurement after warm-up")
    ap.add_argument("--select-precision", default=None, choices=["ieee", "tf32x3", "tf32"],
                    help="tl.dot precision of our selection kernel (default: the kernel's default)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES),
                    help="layer shape: llama8b (32 q / 8 kv heads, d=128) or gqa7_d64 (14 q / 2 kv heads, d=64)")
    ap.add_argument("--attend-layout", default=",".join(ATTEND_LAYOUTS),
                    help="comma-separated FA3 attend layouts to time: head (the backend's: a sequence per query "
                         "block and q head), group (per query block and kv head over the union of the group's "
                         "selections), head_views / group_views (the same, one FA3 call per q head / kv head "
                         "on views of q and out: no copies), head_halves (head's sequences cut at the block "
                         "middle: FA3's 64-row tile)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    layouts = set(filter(None, args.attend_layout.split(",")))
    if not layouts or layouts - set(ATTEND_LAYOUTS):
        ap.error(f"--attend-layout {args.attend_layout}: use some of {','.join(ATTEND_LAYOUTS)}")
    if skip - set(SECTIONS):
        ap.error(f"--skip {args.skip}: unknown section(s) {sorted(skip - set(SECTIONS))}; use {','.join(SECTIONS)}")

    s = make_setup(args)
    fa3, fa3_why = load_fa3(s)
    if args.sweep and args.attend_sweep:
        ap.error("--sweep and --attend-sweep are separate runs; pick one")
    sweeping = args.sweep or args.attend_sweep
    off, off_why = load_official(args.official_dir, s) if not sweeping else (None, "sweep")
    out_path = args.out or (DEFAULT_SWEEP_OUT if args.sweep else DEFAULT_ATTEND_SWEEP_OUT if args.attend_sweep
                            else DEFAULT_OUT)
    res: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if s.device == "cuda" else "cpu (dry run, TRITON_INTERPRET=1)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or os.environ.get("PRISM_COMMIT") or git_commit(),
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["bench_kernels.py", *argv]),
        "setup": {"hq": s.hq, "hkv": s.hkv, "head_dim": s.d, "dtype": str(s.dtype).replace("torch.", ""),
                  "page_size": s.page, "prism_block": s.block, "causal": True, "requests": 1,
                  "block_table": "random permutation", "timing": f"median of CUDA-event timed calls after warm-up, "
                  f"~{s.budget_ms:.0f} ms per measurement, >= {s.min_reps} calls"},
        "versions": {"torch": torch.__version__, "triton": _version("triton"), "vllm": _version("vllm"),
                     "official_prism": off.commit if off else None},
        "fa3": fa3_why if fa3 is None else "vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3, paged)",
        "official": off_why,
        "sparse": [], "estimation": [], "break_even": [], "fp8": [], "sanity": [], "notes": [],
    }
    if fa3 is None:
        msg = f"FA3 unavailable: {fa3_why}; fa3_ms columns are None"
        res["notes"].append(msg)
        print(msg, file=sys.stderr)
    if off is None:
        res["notes"].append(f"official Prism unavailable: {off_why}; official columns are None")
        print(f"official Prism unavailable: {off_why}", file=sys.stderr)
    else:
        res["notes"] += off.notes
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def keep_partial(signum: int, _frame: Any) -> None:
        # gpu_suite.sh runs this under `timeout`: what was measured before the limit comes back
        res["notes"].append(f"PARTIAL: stopped by signal {signum} before every row was measured")
        out_path.write_text(json.dumps(res, indent=1) + "\n")
        print(f"stopped by signal {signum}; wrote the rows so far to {out_path}", file=sys.stderr, flush=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, keep_partial)
    if args.sweep:
        res["sweep"] = []
        for k in SECTIONS:
            res.pop(k)
        run_sweep(s, fa3, res)
    elif args.attend_sweep:
        res["attend_sweep"] = []
        for k in SECTIONS:
            res.pop(k)
        run_attend_sweep(s, fa3, res)
    else:
        steps = (0 if "sparse" in skip else len(s.lengths) * (1 + len(s.densities)))
        steps += 0 if "estimation" in skip else len(set(s.est_lengths) | set(s.be_lengths))
        steps += 0 if "break_even" in skip or "estimation" in skip else len(s.be_lengths)
        steps += 0 if "fp8" in skip else 3 * len(s.fp8_lengths)
        bar = Progress(steps, "kernels")
        if "sparse" not in skip:
            run_sparse(s, fa3, off, res, bar, args.official_paged)
        if "estimation" not in skip:
            if "break_even" in skip:
                s.be_lengths = []
            est = run_estimation(s, off, res, bar)
            if s.be_lengths:
                run_break_even(s, fa3, est, res, bar)
            del est
        if "fp8" not in skip:
            try:
                run_fp8(s, fa3, res, bar)
            except Exception as e:  # noqa: BLE001 - a one-shot GPU run keeps the other sections' rows
                msg = f"fp8 section failed: {type(e).__name__}: {str(e)[:300]}"
                ERRORS.append(msg)
                res["sanity"].append({"check": "fp8_section_completed", "ok": False, "error": msg})
                print(msg, file=sys.stderr, flush=True)
        bar.close()
    res["notes"] += ERRORS
    with_estimation(res)
    if res.get("break_even"):
        # Per mode: the shortest measured length from which on estimation + sparse is not slower
        # than FA3 dense (None: slower at every measured length, or FA3 missing).
        summ = {}
        for mode in dict.fromkeys(r["mode"] for r in res["break_even"]):
            rows = sorted((r for r in res["break_even"] if r["mode"] == mode), key=lambda r: r["tokens"])
            first = None
            for i, r in enumerate(rows):
                if all(x["not_slower_than_fa3"] for x in rows[i:]):
                    first = r["tokens"]
                    break
            summ[mode] = first
        res["break_even_min_tokens"] = summ
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print(summary(res))
    print(f"wrote {out_path}")
    if args.plot and not sweeping:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_kernels import plot

        png = plot(out_path)
        print(f"wrote {png}")
    bad_sweep = [r for r in res.get("sweep", []) + res.get("attend_sweep", []) if r.get("ok") is False]
    return 0 if all(c["ok"] for c in res["sanity"]) and not bad_sweep else 2


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
