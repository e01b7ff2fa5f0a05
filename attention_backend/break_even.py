"""``min_context_len = "auto"``: the shortest sequence from which Prism pays, measured on the
serving GPU for each layer shape.

Whether a prefill chunk gains from Prism depends on the layer's shape (heads, head size), the
density the selection actually picks and the fixed cost of estimation, not on one global number.
So, once per layer shape and process (when the first such layer's weights are loaded, before vLLM
sizes its KV cache), ``measure`` times on synthetic data, for sequences of S tokens whose last
chunk holds T = min(S, max_num_batched_tokens) rows (what a prompt of S tokens ends with):

    dense(S)         FlashAttention on the chunk (vLLM's own call, the layer's FA version)
    estimate(S)      Prism's estimation (pooling + calibrated two-band selection)
    attend(S, rho)   Prism's attend step at block densities rho in DENSITIES

each as synchronised wall time, so Python and launch overhead count (they decide the break-even of
small models, whose layers run for a fraction of a millisecond). The estimation is timed as a
step's later layers run it (its launches replayed, ``prefill.prism_estimate``); a step's first
layer also pays the argument checks, ~0.4 ms of host time once per step. ``TimingTable.break_even`` then
turns the table and a density per measured length into the shortest S from which Prism
(estimate + attend) takes at most MARGIN of dense at every longer measured S.

The density falls with length (SmolLM2 at the default selection: 0.85 of the blocks at 8K, 0.29 at
128K), so it is learned per length (``prism_vllm.stats.LengthDensity``, from sampled launches;
``densities_for`` fills lengths not sampled yet from the nearest shorter one, else PRIOR_DENSITY,
which a block budget caps). A length nobody has sampled may be where Prism pays, but while
FlashAttention serves it nothing is sampled there: so where the table says Prism could pay at all
(``could_pay``: at its lowest timed density), the builder plans a *shadow* step for a chunk of that
length. FlashAttention serves it exactly as it would anyway, and Prism only runs its estimation
beside it to count the blocks it would select (once per length, again every EXPLORE_EVERY dense
steps there; the cost is one estimation per layer on that step). The decision and its numbers go
to the startup log and ``/prism/stats``.

With ``attend_layout = "auto"`` (and the FA3 attend step), ``choose_layout`` first picks the
layer shape's attend layout the same way: each layout that attends exactly the selected blocks
("head", "head_views", and "head_halves" at head sizes up to 64) must reproduce FlashAttention
on an every-block selection, and the fastest at a typical density wins; ``measure`` then times
the attend step in that layout. The layout choice and ``measure`` time repeated calls as a
step's later layers make them: "head" and "head_halves" replay their first call's launches
(``prefill.prism_attend``), "head_views" (per-head views of q) runs in full every time.

With an integer ``min_context_len`` nothing is timed, but ``warm_up`` runs the same synthetic
calls once, untimed, at the lengths Prism will serve: vLLM's own warm-up sends no prefill through
the attention backend, so without it Triton would compile Prism's kernels on the first long
requests (seconds each).

Pure arithmetic here is tested on CPU; ``measure``, ``choose_layout`` and ``warm_up`` need a CUDA GPU.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from prism_vllm.config import AUTO_FALLBACK_MIN_CONTEXT_LEN
from prism_vllm.stats import LENGTH_BUCKETS

__all__ = ["TimingTable", "LayoutChoice", "measure", "table_for", "choose_layout", "layout_for", "densities_for",
           "warm_up", "DENSITIES", "PRIOR_DENSITY", "MARGIN", "EXPLORE_EVERY"]

logger = logging.getLogger("prism_vllm.attention_backend")

#: Block densities the attend step is timed at (interpolated linearly in between).
DENSITIES = (0.1, 0.3, 0.6, 1.0)
#: Sequence lengths timed (those above max_model_len are skipped). Up to 128K: a small model's
#: layers pay most there (SmolLM2-135M at the 'quality' selection: 1.19x TTFT at 64K, 1.92x at
#: 128K with Prism forced on, benchmarks/results/speed.json at aae5b7f), and a table that stopped
#: at 64K kept Prism off for good. The 128K row holds a synthetic cache of 128K tokens for a moment
#: (512 MiB for 8 kv heads of d=128 in bf16); a failed allocation falls back like any failure.
LENGTHS = LENGTH_BUCKETS
#: Prism is used where it takes at most this share of FlashAttention's time: the rest covers what
#: the synthetic timing does not see (selection variance, the step's other work around a chunk).
MARGIN = 0.9
#: Density assumed before the first sampled launch (default thresholds select 0.2-0.5 of the blocks
#: on the models measured here, benchmarks/results/speed*.json).
PRIOR_DENSITY = 0.5
#: Never decide below this: one Prism block row of context is not worth estimating.
MIN_AUTO = 2048
#: A length where Prism could pay but FlashAttention serves is sampled again (a shadow step) after
#: this many dense steps there: the text served may have changed since.
EXPLORE_EVERY = 64


def densities_for(sampled: Sequence[Optional[float]], prior: float) -> list[float]:
    """The density to decide with at each of LENGTHS: the sampled one where there is one, else
    the nearest shorter sampled one (the density falls with length, so that over-estimates and
    errs toward FlashAttention), else ``prior``."""
    out, last = [], None
    for d in sampled:
        last = d if d is not None else last
        out.append(last if last is not None else prior)
    return out


@dataclass
class TimingTable:
    """Synchronised wall times (ms) of one layer shape, by sequence length S (see module doc)."""

    shape: str
    lengths: list[int]
    dense_ms: list[float]
    estimate_ms: list[float]
    attend_ms: list[list[float]]
    """[len(lengths)][len(densities)]."""
    densities: list[float] = field(default_factory=lambda: list(DENSITIES))
    chunk: int = 0
    """max_num_batched_tokens the chunks were cut with."""
    seconds: float = 0.0
    """Wall time the measurement took."""

    def prism_ms(self, i: int, density: float) -> float:
        """Estimate + attend at length index i, attend interpolated linearly in density."""
        d = min(max(density, self.densities[0]), self.densities[-1])
        a = self.attend_ms[i]
        for j in range(len(self.densities) - 1):
            lo, hi = self.densities[j], self.densities[j + 1]
            if d <= hi:
                w = (d - lo) / (hi - lo)
                return self.estimate_ms[i] + a[j] + w * (a[j + 1] - a[j])
        return self.estimate_ms[i] + a[-1]

    def _density(self, density: "float | Sequence[float]", i: int) -> float:
        return float(density) if isinstance(density, (int, float)) else float(density[i])

    def could_pay(self, i: int, margin: float = MARGIN) -> bool:
        """Whether Prism pays at length index i at the lowest density timed (else no density
        learned there could turn it on)."""
        return self.prism_ms(i, self.densities[0]) <= margin * self.dense_ms[i]

    def break_even(self, density: "float | Sequence[float]", margin: float = MARGIN) -> Optional[int]:
        """Shortest sequence length (tokens, a multiple of 128) from which Prism at ``density``
        (one figure, or one per measured length) takes at most ``margin`` of dense at every
        measured length; interpolated (log length, linear ratio) between the last length where
        it does not pay and the first where it does. None: Prism does not pay at any measured
        length."""
        ratio = [self.prism_ms(i, self._density(density, i)) / self.dense_ms[i] for i in range(len(self.lengths))]
        first = None
        for i in range(len(ratio)):
            if all(r <= margin for r in ratio[i:]):
                first = i
                break
        if first is None:
            return None
        if first == 0:
            tokens = self.lengths[0]
        else:
            (l0, r0), (l1, r1) = (self.lengths[first - 1], ratio[first - 1]), (self.lengths[first], ratio[first])
            w = (r0 - margin) / (r0 - r1) if r0 != r1 else 1.0
            tokens = math.exp(math.log(l0) + w * (math.log(l1) - math.log(l0)))
        return max(MIN_AUTO, int(math.ceil(tokens / 128.0)) * 128)

    def summary(self, density: "float | Sequence[float]", sampled: Sequence[bool] = ()) -> dict[str, Any]:
        """What /prism/stats and the startup log show (``sampled``: per length, whether its
        density was sampled there rather than carried over or assumed)."""
        return {
            "shape": self.shape,
            "min_context_len": self.break_even(density),
            "chunk_tokens": self.chunk,
            "measured_in_s": round(self.seconds, 2),
            "rows": [
                {"tokens": L, "dense_ms": round(d, 3), "estimate_ms": round(e, 3),
                 "density": round(self._density(density, i), 4),
                 "density_sampled": bool(sampled[i]) if i < len(sampled) else False,
                 "prism_ms_at_density": round(self.prism_ms(i, self._density(density, i)), 3)}
                for i, (L, d, e) in enumerate(zip(self.lengths, self.dense_ms, self.estimate_ms))
            ],
        }


#: Per shape: the measured table, or None once a measurement failed (not retried per layer).
_TABLES: dict[str, Optional[TimingTable]] = {}
_LOCK = threading.Lock()


def table_for(shape: str) -> Optional[TimingTable]:
    """The measured table of a layer shape in this process, if any."""
    return _TABLES.get(shape)


#: Timed calls per measurement (after one warm-up call); their median is kept.
REPS = 3


def _wall_ms(fn: Callable[[], Any]) -> float:
    fn()  # warm-up (Triton compiles here on a cold cache)
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _once(fn: Callable[[], Any]) -> float:
    """``warm_up``'s stand-in for ``_wall_ms``: one untimed call (Triton compiles here)."""
    fn()
    return 0.0


#: Longest sequence the startup runs untimed so that every selection launch compiles: one key block
#: past the longest row the selection holds on chip (``SelectionTuning.resident_max_blocks``, 2048
#: blocks), so the multi-pass launch of longer rows compiles too.
TOP_WARM_TOKENS = 2049 * 128


def _top_length(max_model_len: int, done: Sequence[int]) -> list[int]:
    """[the longest sequence to run untimed at startup] when it is longer than every length in
    ``done``: each power-of-two row length of the selection is its own compiled launch, so a
    40K-token max_model_len needs its 512-block level, which the 32K measurement does not reach."""
    top = min(int(max_model_len), TOP_WARM_TOKENS)
    return [top] if top > max(done, default=0) else []


def _untimed(shape: str, probe: dict[str, Any], lengths: Sequence[int], layout: str) -> bool:
    """``measure``'s synthetic calls once each at ``lengths``, untimed (Triton compiles them);
    False (logged) when that failed: those kernels then compile on first use."""
    if not lengths:
        return True
    try:
        _measure(**probe, lengths=list(lengths), layout=layout, timer=_once)
        torch.cuda.synchronize()  # a fault surfaces here, inside the try
        return True
    except Exception as e:  # noqa: BLE001 - a warm-up must never stop the server
        logger.warning("Prism: could not run %s untimed for %s (%s: %s); their kernels compile on first use",
                       "/".join(str(L) for L in lengths), shape, type(e).__name__, e)
        return False
    finally:
        torch.cuda.empty_cache()


#: Per shape: the seconds a warm-up took, or None once it failed (not retried per layer).
_WARM: dict[str, Optional[float]] = {}


def warm_up(shape: str, *, min_len: int, layout: str = "head", **probe: Any) -> Optional[float]:
    """Prism's kernels run once, untimed, for one layer shape (``probe``: ``measure``'s keyword
    arguments, less ``lengths`` and ``layout``) on ``measure``'s synthetic inputs, at the measured
    lengths from the one holding ``min_len`` (an integer min_context_len: the shortest sequence
    Prism serves) up to max_model_len, and at max_model_len itself (up to TOP_WARM_TOKENS), so
    that Triton compiles them at startup; logged once. Once per shape and process: the seconds it
    took, or None without CUDA, when Prism serves no length, or on failure (logged; the kernels
    then compile on first use, as before)."""
    with _LOCK:
        if shape in _WARM:
            return _WARM[shape]
        device = probe["device"]
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        max_len = int(probe["max_model_len"])
        if min_len > max_len:
            return None
        lengths = [L for i, L in enumerate(LENGTHS)
                   if L <= max_len and (i + 1 == len(LENGTHS) or LENGTHS[i + 1] > min_len)]
        top = _top_length(max_len, lengths)
        t_start = time.perf_counter()
        _WARM[shape] = None
        ok = _untimed(shape, probe, lengths, layout)
        ok = _untimed(shape, probe, top, layout) and ok  # alone: a failed allocation there spares the rest
        if not ok:
            return None
        lengths += top
        _WARM[shape] = time.perf_counter() - t_start
        logger.info("Prism: kernels for %s compiled on %s in %.1f s (sequences of %s tokens, untimed; "
                    "min_context_len=%d)", shape, torch.cuda.get_device_name(device), _WARM[shape],
                    ", ".join(str(L) for L in lengths), min_len)
        return _WARM[shape]


def measure(
    shape: str,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    scale: float,
    params: Any,
    max_model_len: int,
    max_num_batched_tokens: int,
    flash_attn_varlen_func: Callable[..., Any],
    fa_version: Optional[int],
    fa3_attend: Optional[Callable[..., Any]],
    device: torch.device,
    lengths: Sequence[int] = LENGTHS,
    layout: str = "head",
    page_size: int = 16,
    fp8: Optional[torch.dtype] = None,
) -> Optional[TimingTable]:
    """Time dense vs Prism for one layer shape on this GPU (once per shape and process).

    ``params``: the layer's PrismParams; ``fa3_attend``: vLLM's FA3 varlen call when the layer's
    attend step runs on FA3 (None: the Triton kernel), in ``layout`` (``attend_fa3.LAYOUTS``);
    ``page_size``: the engine's KV-cache block size (the synthetic cache's pages); ``fp8``: the
    cache's fp8 dtype when it is quantized (``--kv-cache-dtype fp8``: the synthetic cache and q are
    fp8 too, with unit per-tensor scales, as vLLM quantizes the queries for FA3), else None.
    Sequences longer than the lengths timed, up to max_model_len (at most TOP_WARM_TOKENS), run
    once untimed afterwards so that their selection launches compile at startup too.
    Returns None (and logs why) when there is no CUDA device or anything fails: "auto" then falls
    back to AUTO_FALLBACK_MIN_CONTEXT_LEN. The decision is logged once per shape.
    """
    with _LOCK:
        if shape in _TABLES:
            return _TABLES[shape]
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        t_start = time.perf_counter()
        _TABLES[shape] = None
        probe = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, scale=scale,
                     params=params, max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                     flash_attn_varlen_func=flash_attn_varlen_func, fa_version=fa_version, fa3_attend=fa3_attend,
                     device=device, page_size=page_size, fp8=fp8)
        try:
            table = _measure(**probe, lengths=[L for L in lengths if L <= max_model_len], layout=layout)
        except Exception as e:  # noqa: BLE001 - a measurement must never stop the server
            logger.warning("Prism: could not measure the break-even for %s (%s: %s); min_context_len=%d",
                           shape, type(e).__name__, e, AUTO_FALLBACK_MIN_CONTEXT_LEN)
            return None
        finally:
            torch.cuda.empty_cache()
        if table is None:
            return None
        _untimed(shape, probe, _top_length(max_model_len, table.lengths), layout)  # failing costs a compile later
        table.shape, table.seconds = shape, time.perf_counter() - t_start
        _TABLES[shape] = table
        logger.info("Prism: timed dense vs Prism for %s on %s in %.1f s (min_context_len=auto)",
                    shape, torch.cuda.get_device_name(device), table.seconds)
        return table


class _Synthetic:
    """Random paged K/V of ``S_max`` tokens (pages in a shuffled order) and a chunk's q, the
    inputs every startup measurement times on; ``chunk(S)`` sets up the last chunk of an S-token
    sequence and its Prism workspace.

    The cache and the page table are laid out as vLLM's (FlashAttention's packed NHD cache of
    ``page_size``-token pages; a table row as wide as the runner's, cdiv(max_model_len,
    page_size) entries rounded up to a multiple of 128 / page_size as vLLM 0.26's
    MultiGroupBlockTable does), so that the kernels compile here for the strides and page size the
    engine's requests bring: Triton specialises on a stride being a multiple of 16, and a table of
    S_max / 16 + 1 columns had left the key pooling and the attend step's table builder to compile
    again on the first request. With ``fp8`` (an fp8 KV cache) the cache and q are in that dtype
    with unit per-tensor scales (``scales``), as the engine hands them to the layer, so that the
    fp8 variants compile here and the timings are the fp8 cache's; outputs stay in ``dtype``."""

    def __init__(self, hq: int, hkv: int, d: int, dtype: torch.dtype, chunk: int, S_max: int,
                 device: torch.device, fa: Callable[..., Any], fa_version: Optional[int], scale: float,
                 max_model_len: int = 0, page_size: int = 16, fp8: Optional[torch.dtype] = None) -> None:
        from prism_vllm.kernels.prefill import Fp8Scales

        self.hq, self.hkv, self.d, self.dtype, self.chunk_rows, self.device = hq, hkv, d, dtype, chunk, device
        self.fa, self.scale = fa, scale
        self.fa_kw = {} if fa_version is None else {"fa_version": fa_version}
        self.gen = torch.Generator(device=device).manual_seed(0)
        n_pages = -(-S_max // page_size)
        width = -(-max_model_len // page_size)
        if page_size <= 128:
            width = -(-width // (128 // page_size)) * (128 // page_size)
        width = max(n_pages, width)
        # drawn in the model dtype: no float32 copy (the 128K row's cache alone is 512 MiB in bf16)
        kv = torch.randn(n_pages, page_size, hkv, 2 * d, generator=self.gen, device=device, dtype=dtype)
        q = torch.randn(min(chunk, S_max), hq, d, generator=self.gen, device=device, dtype=dtype)
        self.scales: Optional[Fp8Scales] = None
        if fp8 is not None:
            kv, q = kv.to(fp8), q.to(fp8)  # values of unit variance: in fp8 range at scale 1
            one = torch.ones((), dtype=torch.float32, device=device)  # vLLM's layer._k_scale etc.
            self.scales = Fp8Scales(q=one, k=one, v=one)
        self.k_cache, self.v_cache = kv.split(d, dim=-1)
        self.table = torch.zeros(1, width, dtype=torch.int32, device=device)
        self.table[0, :n_pages] = torch.randperm(n_pages, generator=self.gen, device=device).to(torch.int32)
        self.q_all = q

    def out(self, T: int) -> torch.Tensor:
        """An output of T rows (the model dtype, whatever q's)."""
        return torch.empty(T, self.hq, self.d, dtype=self.dtype, device=self.device)

    def chunk(self, S: int, attend_layouts: Sequence[str], fa3: bool) -> tuple[Any, Any, Any]:
        """(plan on the host, plan on the device, workspace) of the last chunk of S tokens."""
        from prism_vllm.kernels import PrismWorkspace, make_plan

        T = min(S, self.chunk_rows)
        plan_cpu = make_plan([0, T], [S - T], self.hq, 128)
        sizes = PrismWorkspace.sizes_for(T, S, 1, self.hq, num_kv_heads=self.hkv, head_dim=self.d,
                                         attend_dtype=self.dtype if fa3 else None, attend_layouts=attend_layouts)
        return plan_cpu, plan_cpu.to(self.device), PrismWorkspace.allocate(sizes, self.device)

    def dense(self, S: int, out: torch.Tensor) -> Callable[[], Any]:
        """FlashAttention (the layer's own call) of the chunk over all S tokens into ``out``, as a
        callable to time (its small index tensors made here, outside the timed call)."""
        T = out.shape[0]
        cu = torch.tensor([0, T], dtype=torch.int32, device=self.device)
        seq = torch.tensor([S], dtype=torch.int32, device=self.device)
        q = self.q_all[:T]
        from prism_vllm.kernels.attend_fa3 import fa3_descales

        sc = self.scales  # descales as vLLM's FlashAttention passes them: [sequences, kv heads] views
        kw = dict(self.fa_kw) if sc is None else dict(self.fa_kw, **fa3_descales(sc.q, sc.k, sc.v, 1, self.hkv))
        return lambda: self.fa(q=q, k=self.k_cache, v=self.v_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=T,
                               seqused_k=seq, max_seqlen_k=S, softmax_scale=self.scale, causal=True,
                               block_table=self.table, **kw)

    def estimate(self, T: int, plan: Any, params: Any, ws: Any) -> Callable[[], Any]:
        """Prism's estimation of the chunk's T rows, as a callable to time."""
        from prism_vllm.kernels import prism_estimate

        q, sc = self.q_all[:T], self.scales
        return lambda: prism_estimate(q, self.k_cache, self.table, plan, params, ws,
                                      q_scale=None if sc is None else sc.q, k_scale=None if sc is None else sc.k)

    def pool_query_tiles(self) -> int:
        """The query pooling once per launch tile its rule can pick (``pooling.pooling_launch``
        widens the head tile with a step's query-block count, at power-of-two counts): the timed
        chunks are one request each and may not reach a step's count (a short tail chunk, many
        requests in one step). Each on a plan of n one-row requests (n query blocks). Returns
        the launches run."""
        from prism_vllm.kernels import make_plan, pool_queries
        from prism_vllm.kernels.pooling import pooling_launch

        tiles, n = set(), 1
        while n <= self.q_all.shape[0]:
            ln = pooling_launch(self.hq, self.d, n)
            if ln not in tiles:
                tiles.add(ln)
                plan = make_plan(list(range(n + 1)), [0] * n, self.hq, 128).to(self.device)
                out = torch.empty(n, self.hq, self.d, dtype=torch.float32, device=self.device)  # as pooled_q
                pool_queries(self.q_all, plan, out, q_scale=None if self.scales is None else self.scales.q)
            n *= 2
        return len(tiles)

    def attend(self, plan_cpu: Any, ws: Any, sel: Any, params: Any, out: torch.Tensor,
               fa3_attend: Optional[Callable[..., Any]], layout: str) -> Callable[[], Any]:
        """Prism's attend step of ``sel`` into ``out``, as a callable to time."""
        from prism_vllm.kernels import FA3Launch, prism_attend
        from prism_vllm.kernels.attend_fa3 import make_attend_plan

        fa3 = None
        if fa3_attend is not None:
            fa3 = FA3Launch(flash_attn_varlen_func=fa3_attend,
                            attend=make_attend_plan(plan_cpu, ws.attend.capacity, layout=layout,
                                                    num_kv_heads=self.hkv))
        q = self.q_all[: out.shape[0]]
        return lambda: prism_attend(q, self.k_cache, self.v_cache, self.table, sel, params, ws, out, fa3=fa3,
                                    scales=self.scales)


def _measure(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, scale: float, params: Any,
             max_model_len: int, max_num_batched_tokens: int, flash_attn_varlen_func: Callable[..., Any],
             fa_version: Optional[int], fa3_attend: Optional[Callable[..., Any]], device: torch.device,
             lengths: list[int], layout: str, page_size: int = 16, fp8: Optional[torch.dtype] = None,
             timer: Callable[[Callable[[], Any]], float] = _wall_ms) -> Optional[TimingTable]:
    """``measure``'s table (``timer``: how each synthetic call is taken, ``_wall_ms`` or ``_once``)."""
    if not lengths:
        return None
    hq, chunk = num_q_heads, max_num_batched_tokens
    syn = _Synthetic(hq, num_kv_heads, head_dim, dtype, chunk, max(lengths), device, flash_attn_varlen_func,
                     fa_version, scale, max_model_len, page_size, fp8)
    dense_ms, est_ms, attend_ms, used = [], [], [], []
    for S in lengths:
        T = min(S, chunk)
        out = syn.out(T)
        dense_ms.append(timer(syn.dense(S, out)))
        plan_cpu, plan, ws = syn.chunk(S, (layout,), fa3_attend is not None)
        est_ms.append(timer(syn.estimate(T, plan, params, ws)))
        row = []
        for rho in DENSITIES:
            sel = _fixed_selection(plan_cpu, hq, rho, syn.gen, device)
            row.append(timer(syn.attend(plan_cpu, ws, sel, params, out, fa3_attend, layout)))
        attend_ms.append(row)
        used.append(S)
    try:  # untimed: the tiles a step's query-block count may pick beyond these chunks'
        syn.pool_query_tiles()
        if syn.device.type == "cuda":
            torch.cuda.synchronize()  # a fault surfaces here
    except Exception as e:  # noqa: BLE001 - the timings above stand; these tiles then compile on first use
        logger.warning("Prism: could not run the query pooling's other tiles (%s: %s); they compile on first use",
                       type(e).__name__, e)
    return TimingTable(shape="", lengths=used, dense_ms=dense_ms, estimate_ms=est_ms, attend_ms=attend_ms, chunk=chunk)


# ----------------------------------------------------------------------------------------------
# the FA3 attend step's layout (PrismConfig.attend_layout = "auto")
# ----------------------------------------------------------------------------------------------
#: The sequence length and block density the layouts are timed at (a long prompt's last chunk at a
#: density the default thresholds select on the models measured, 0.37-0.51 in quality.json).
LAYOUT_TOKENS = 32768
LAYOUT_DENSITY = 0.4
#: A layout whose every-block output differs from FlashAttention's by more than this (max abs, on
#: outputs of unit-variance values) is not used.
LAYOUT_TOLERANCE = 2e-2


@dataclass
class LayoutChoice:
    """The attend layout of one layer shape and what decided it (startup log, /prism/stats)."""

    shape: str
    layout: str
    tokens: int
    chunk: int
    attend_ms: dict[str, float]
    """Synchronised wall time of the attend step per layout that passed its check."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Layouts left out, and why (an error, or every-block output unlike FlashAttention's)."""
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"shape": self.shape, "layout": self.layout, "tokens": self.tokens, "chunk_tokens": self.chunk,
                "density": LAYOUT_DENSITY, "attend_ms": {k: round(v, 3) for k, v in self.attend_ms.items()},
                "rejected": dict(self.rejected), "measured_in_s": round(self.seconds, 2)}


#: Per shape: the layout choice, or None once none could be chosen (not retried per layer).
_LAYOUTS: dict[str, Optional[LayoutChoice]] = {}


def layout_for(shape: str) -> Optional[LayoutChoice]:
    """The measured layout choice of a layer shape in this process, if any."""
    return _LAYOUTS.get(shape)


def choose_layout(shape: str, candidates: Sequence[str], **probe: Any) -> Optional[LayoutChoice]:
    """The fastest of ``candidates`` (layouts attending the same blocks) for one layer shape on
    this GPU, once per shape and process (``probe``: ``measure``'s keyword arguments, less
    ``lengths`` and ``layout``). Each layout first attends an every-block selection of the last
    chunk of min(max_model_len, LAYOUT_TOKENS) tokens, which must equal FlashAttention within
    LAYOUT_TOLERANCE (else it is rejected, with a warning), then is timed at LAYOUT_DENSITY.
    None (logged) when there is no CUDA device, no FA3 attend step, or nothing passes: the
    backend then uses "head".
    """
    with _LOCK:
        if shape in _LAYOUTS:
            return _LAYOUTS[shape]
        device = probe["device"]
        if probe.get("fa3_attend") is None or device.type != "cuda" or not torch.cuda.is_available():
            return None
        t_start = time.perf_counter()
        _LAYOUTS[shape] = None
        try:
            choice = _choose(candidates, **probe)
        except Exception as e:  # noqa: BLE001 - a measurement must never stop the server
            logger.warning("Prism: could not time the attend layouts for %s (%s: %s); layout 'head'",
                           shape, type(e).__name__, e)
            return None
        finally:
            torch.cuda.empty_cache()
        for layout, why in choice.rejected.items():
            logger.warning("Prism: attend layout %r not used for %s: %s", layout, shape, why)
        if not choice.attend_ms:
            return None
        choice.shape, choice.seconds = shape, time.perf_counter() - t_start
        _LAYOUTS[shape] = choice
        logger.info("Prism: attend layout %r for %s on %s (attend ms at %dK tokens, density %.1f: %s; "
                    "timed in %.1f s)", choice.layout, shape, torch.cuda.get_device_name(device),
                    choice.tokens // 1024, LAYOUT_DENSITY,
                    ", ".join(f"{k} {v:.3f}" for k, v in choice.attend_ms.items()), choice.seconds)
        return choice


def _choose(candidates: Sequence[str], *, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
            scale: float, params: Any, max_model_len: int, max_num_batched_tokens: int,
            flash_attn_varlen_func: Callable[..., Any], fa_version: Optional[int],
            fa3_attend: Callable[..., Any], device: torch.device, page_size: int = 16,
            fp8: Optional[torch.dtype] = None) -> LayoutChoice:
    S = min(int(max_model_len), LAYOUT_TOKENS)
    syn = _Synthetic(num_q_heads, num_kv_heads, head_dim, dtype, max_num_batched_tokens, S, device,
                     flash_attn_varlen_func, fa_version, scale, int(max_model_len), page_size, fp8)
    plan_cpu, _, ws = syn.chunk(S, tuple(candidates), True)
    T = plan_cpu.num_tokens
    ref = syn.out(T)
    syn.dense(S, ref)()
    every = _fixed_selection(plan_cpu, num_q_heads, 1.0, syn.gen, device)
    sel = _fixed_selection(plan_cpu, num_q_heads, LAYOUT_DENSITY, syn.gen, device)
    timed: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for layout in candidates:
        out = torch.zeros_like(ref)
        try:
            syn.attend(plan_cpu, ws, every, params, out, fa3_attend, layout)()
            err = float((out.float() - ref.float()).abs().max())
            if not err <= LAYOUT_TOLERANCE:
                rejected[layout] = f"every-block output differs from FlashAttention's by {err:.3g}"
                continue
            timed[layout] = _wall_ms(syn.attend(plan_cpu, ws, sel, params, out, fa3_attend, layout))
        except Exception as e:  # noqa: BLE001 - a layout that fails here is not used
            rejected[layout] = f"{type(e).__name__}: {e}"
    best = min(timed, key=timed.__getitem__) if timed else ""
    return LayoutChoice(shape="", layout=best, tokens=S, chunk=T, attend_ms=timed, rejected=rejected)


def _fixed_selection(plan: Any, hq: int, density: float, gen: torch.Generator, device: torch.device) -> Any:
    """A BlockSelection of every row's sink, diagonal and random other causal blocks, ``density``
    of the causal blocks in all (vectorised: the 128K plans have 1K query blocks)."""
    from prism_vllm.kernels.plan import BlockSelection

    nqb = plan.num_q_blocks
    qb = plan.qb_abs.long().to(device)  # [NQB]
    n = qb + 1
    width = int(n.max())
    cols = torch.arange(width, device=device)
    r = torch.rand(nqb, hq, width, generator=gen, device=device)
    keep = (r < density) & (cols[None, None, :] < n[:, None, None])
    keep[:, :, 0] = True
    keep[torch.arange(nqb, device=device), :, qb] = True
    counts = keep.sum(-1).to(torch.int32)  # [NQB, HQ]
    sel_off = plan.sel_off.long().to(device)
    starts = sel_off[:-1, None] * hq + torch.arange(hq, device=device)[None, :] * n[:, None]  # [NQB, HQ]
    pos = starts[:, :, None] + keep.long().cumsum(-1) - 1
    indices = torch.zeros(max(plan.sel_capacity, 1), dtype=torch.int16, device=device)
    indices[pos[keep]] = cols.expand_as(keep)[keep].to(torch.int16)
    return BlockSelection(plan=plan.to(device), indices=indices, counts=counts.flatten().contiguous())
