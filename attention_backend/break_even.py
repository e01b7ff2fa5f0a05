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
turns the table and a density into the shortest S from which Prism (estimate + attend) takes at
most MARGIN of dense at every longer measured S. The density is the one Prism has been selecting
(sampled launches, ``prism_vllm.stats``), or PRIOR_DENSITY until the first samples arrive (a
block budget caps it). The decision and its numbers go to the startup log and ``/prism/stats``.

Pure arithmetic here is tested on CPU; ``measure`` needs a CUDA GPU.
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

__all__ = ["TimingTable", "measure", "table_for", "DENSITIES", "PRIOR_DENSITY", "MARGIN"]

logger = logging.getLogger("prism_vllm.attention_backend")

#: Block densities the attend step is timed at (interpolated linearly in between).
DENSITIES = (0.1, 0.3, 0.6, 1.0)
#: Sequence lengths timed (those above max_model_len are skipped).
LENGTHS = (4096, 8192, 16384, 32768, 65536)
#: Prism is used where it takes at most this share of FlashAttention's time: the rest covers what
#: the synthetic timing does not see (selection variance, the step's other work around a chunk).
MARGIN = 0.9
#: Density assumed before the first sampled launch (default thresholds select 0.2-0.5 of the blocks
#: on the models measured here, benchmarks/results/speed*.json).
PRIOR_DENSITY = 0.5
#: Never decide below this: one Prism block row of context is not worth estimating.
MIN_AUTO = 2048


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

    def break_even(self, density: float, margin: float = MARGIN) -> Optional[int]:
        """Shortest sequence length (tokens, a multiple of 128) from which Prism at ``density``
        takes at most ``margin`` of dense at every measured length; interpolated (log length,
        linear ratio) between the last length where it does not pay and the first where it
        does. None: Prism does not pay at any measured length."""
        ratio = [self.prism_ms(i, density) / self.dense_ms[i] for i in range(len(self.lengths))]
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

    def summary(self, density: float) -> dict[str, Any]:
        """What /prism/stats and the startup log show."""
        return {
            "shape": self.shape,
            "density": round(density, 4),
            "min_context_len": self.break_even(density),
            "chunk_tokens": self.chunk,
            "measured_in_s": round(self.seconds, 2),
            "rows": [
                {"tokens": L, "dense_ms": round(d, 3), "estimate_ms": round(e, 3),
                 "prism_ms_at_density": round(self.prism_ms(i, density), 3)}
                for i, (L, d, e) in enumerate(zip(self.lengths, self.dense_ms, self.estimate_ms))
            ],
        }


_TABLES: dict[str, TimingTable] = {}
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
) -> Optional[TimingTable]:
    """Time dense vs Prism for one layer shape on this GPU (once per shape and process).

    ``params``: the layer's PrismParams; ``fa3_attend``: vLLM's FA3 varlen call when the layer's
    attend step runs on FA3 (None: the Triton kernel). Returns None (and logs why) when there is
    no CUDA device or anything fails: "auto" then falls back to AUTO_FALLBACK_MIN_CONTEXT_LEN.
    """
    with _LOCK:
        if shape in _TABLES:
            return _TABLES[shape]
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        t_start = time.perf_counter()
        try:
            table = _measure(num_q_heads, num_kv_heads, head_dim, dtype, scale, params, max_model_len,
                             max_num_batched_tokens, flash_attn_varlen_func, fa_version, fa3_attend, device,
                             [L for L in lengths if L <= max_model_len])
        except Exception as e:  # noqa: BLE001 - a measurement must never stop the server
            logger.warning("Prism: could not measure the break-even for %s (%s: %s); min_context_len=%d",
                           shape, type(e).__name__, e, AUTO_FALLBACK_MIN_CONTEXT_LEN)
            return None
        finally:
            torch.cuda.empty_cache()
        if table is None:
            return None
        table.shape, table.seconds = shape, time.perf_counter() - t_start
        _TABLES[shape] = table
        return table


def _measure(hq: int, hkv: int, d: int, dtype: torch.dtype, scale: float, params: Any, max_model_len: int,
             chunk: int, fa: Callable[..., Any], fa_version: Optional[int], fa3_attend: Optional[Callable[..., Any]],
             device: torch.device, lengths: list[int]) -> Optional[TimingTable]:
    from prism_vllm.kernels import FA3Launch, PrismWorkspace, make_plan, prism_attend, prism_estimate
    from prism_vllm.kernels.attend_fa3 import make_attend_plan

    if not lengths:
        return None
    page, B = 16, 128
    gen = torch.Generator(device=device).manual_seed(0)
    S_max = max(lengths)
    n_pages = S_max // page + 1
    kv = torch.randn(n_pages, page, hkv, 2 * d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    k_cache, v_cache = kv.split(d, dim=-1)
    perm = torch.randperm(n_pages, generator=gen, device=device).to(torch.int32)
    table_t = perm[None, :]
    q_all = torch.randn(min(chunk, S_max), hq, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    fa_kw = {} if fa_version is None else {"fa_version": fa_version}
    dense_ms, est_ms, attend_ms, used = [], [], [], []
    for S in lengths:
        T = min(S, chunk)
        q, out = q_all[:T], torch.empty_like(q_all[:T])
        cu = torch.tensor([0, T], dtype=torch.int32, device=device)
        seq = torch.tensor([S], dtype=torch.int32, device=device)
        dense_ms.append(_wall_ms(lambda: fa(q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=T,
                                            seqused_k=seq, max_seqlen_k=S, softmax_scale=scale, causal=True,
                                            block_table=table_t, **fa_kw)))
        plan_cpu = make_plan([0, T], [S - T], hq, B)
        plan = plan_cpu.to(device)
        sizes = PrismWorkspace.sizes_for(T, S, 1, hq, num_kv_heads=hkv, head_dim=d,
                                         attend_dtype=dtype if fa3_attend is not None else None)
        ws = PrismWorkspace.allocate(sizes, device)
        est_ms.append(_wall_ms(lambda: prism_estimate(q, k_cache, table_t, plan, params, ws)))
        row = []
        for rho in DENSITIES:
            sel = _fixed_selection(plan_cpu, hq, rho, gen, device)
            fa3 = None
            if fa3_attend is not None:
                fa3 = FA3Launch(flash_attn_varlen_func=fa3_attend, attend=make_attend_plan(plan_cpu, ws.attend.capacity))
            row.append(_wall_ms(lambda: prism_attend(q, k_cache, v_cache, table_t, sel, params, ws, out, fa3=fa3)))
        attend_ms.append(row)
        used.append(S)
    return TimingTable(shape="", lengths=used, dense_ms=dense_ms, estimate_ms=est_ms, attend_ms=attend_ms, chunk=chunk)


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
