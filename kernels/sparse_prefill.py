"""Block-sparse prefill attention over vLLM's paged KV cache (Prism step 6).

Exact ``softmax(scale * q k^T) v`` per query row over the keys of the key blocks selected for
its (query block, q head), causal per token; see ``prism_vllm.reference.block_sparse_attention``
(one request) -- this kernel does every request of a launch at once, reading K/V in place from
the paged cache (FlashAttention's packed layout, NHD or HND) and never materialising scores.

Shape legend (one launch, see kernels/plan.py):

    T     query rows of the launch (chunks of R requests, contiguous in q)
    HQ    q heads; HKV kv heads; G = HQ // HKV (q head h reads kv head h // G, no K/V repeat)
    D     head dim (64, 128 or 256)
    B     Prism block (plan.block_size, 128); query block g covers absolute positions
          [qb_abs[g]*B, +B) of request qb_req[g], clipped to the chunk's rows
    PS    page size (tokens per KV-cache page), NP pages in the cache
    q: [T, HQ, D]   out: [T, HQ, D]   k_cache, v_cache: [NP, PS, HKV, D]   block_table: [R, max_pages]
    sel_idx: int16 [plan.sel_capacity]   sel_cnt: int32 [NQB * HQ]

Structure (FlashAttention-2 forward, Hopper habits):
* one program = BLOCK_M query rows of one query block and one q head; the q tile stays on chip;
* it walks the selected key blocks in BLOCK_N-key tiles gathered from pages (block_table is read
  once per tile when a page holds whole tiles, else once per key, a cached gather);
* online softmax in base 2 with ``scale * log2(e)`` folded into one FMA per score;
* every selected block before the diagonal is fully visible, so that loop carries no mask math;
  only the diagonal block (and the keys past the end of the sequence in it) is masked;
* the program order puts the G q heads of one kv head side by side (they read the same K/V
  tiles, which then come from L2) and the latest, heaviest query blocks first (a shorter tail).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (
    AtLeast,
    check,
    check_block_table,
    check_gqa,
    check_plan,
    check_selection_buffers,
    check_tensor,
    launch,
    strides,
)
from .plan import PrefillPlan, sel_count_at, sel_row_start

__all__ = ["HEAD_DIMS", "SparsePrefillConfig", "candidate_configs", "default_config", "sparse_prefill"]

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class SparsePrefillConfig:
    """Launch settings of the kernel (the knobs a benchmark sweeps).

    block_m: query rows per program (64 or 128; B must be a multiple). With 64, a Prism block is
        served by two programs.
    block_n: keys per inner tile (32, 64 or 128; B must be a multiple).
    num_warps: warps per program (8 = two Hopper warpgroups for block_m 128).
    num_stages: software-pipelining depth; the page-id loads take half of it, so K/V tiles are
        prefetched (num_stages - 1) // 2 tiles ahead. Shared memory: about
        2 * (BLOCK_M * D + ((num_stages + 1) // 2) * 2 * BLOCK_N * D) bytes (227 KB max on Hopper).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 5


# Defaults by head dim for Hopper. The page lookup is a load feeding the K/V load addresses, so
# Triton's pipeliner splits num_stages between the two: K/V tiles are prefetched
# (num_stages - 1) // 2 tiles ahead (5 -> 2 tiles, 3 -> 1 tile). The D=128 default is the one
# the H200 GPU tests ran with (24.06 ms at 32K density 1.0, 44.64 ms at 128K density 0.1). The
# sweep's winner, 128x128x8x5 (22.99 / 42.60 ms, same output; 225 KB of shared memory, 16 bytes
# spilled; benchmarks/results/kernels-sweep-h200.json), becomes the default once the GPU tests
# have run with it. D=64 and D=256 come from offline sm_90 builds (Triton 3.6, ptxas -v: no
# spills, within 227 KB) and were not timed; D=256 keeps 3 stages because deeper ones spill or
# overflow shared memory.
_DEFAULTS = {
    64: SparsePrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=5),
    128: SparsePrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=5),
    256: SparsePrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
}
#: Head dims the kernel is built for.
HEAD_DIMS: tuple[int, ...] = tuple(_DEFAULTS)

# Spill-free and within shared memory on sm_90 (checked offline as above).
_CANDIDATES = {
    64: [
        SparsePrefillConfig(128, 128, 8, 5),
        SparsePrefillConfig(128, 128, 8, 3),
        SparsePrefillConfig(128, 64, 8, 5),
        SparsePrefillConfig(128, 64, 8, 7),
        SparsePrefillConfig(64, 64, 4, 5),
        SparsePrefillConfig(64, 128, 4, 3),
    ],
    128: [
        SparsePrefillConfig(128, 64, 8, 5),
        SparsePrefillConfig(128, 128, 8, 3),
        SparsePrefillConfig(128, 128, 8, 5),  # 225 KB shared memory, 16 B/thread spilled: the edge
        SparsePrefillConfig(128, 64, 8, 7),
        SparsePrefillConfig(128, 64, 8, 3),
        SparsePrefillConfig(128, 32, 8, 5),
        SparsePrefillConfig(64, 64, 4, 5),
    ],
    256: [
        SparsePrefillConfig(128, 64, 8, 3),
        SparsePrefillConfig(128, 32, 8, 5),
    ],
}


def default_config(head_dim: int) -> SparsePrefillConfig:
    """The default launch settings for a head dim (64, 128 or 256)."""
    if head_dim not in _DEFAULTS:
        raise NotImplementedError(
            f"sparse_prefill supports head dims {HEAD_DIMS}, got head_dim={head_dim}; "
            "serve this model with the FLASH_ATTN backend"
        )
    return _DEFAULTS[head_dim]


def candidate_configs(head_dim: int) -> list[SparsePrefillConfig]:
    """Launch settings worth timing for a head dim, default first (for benchmark sweeps)."""
    default = default_config(head_dim)
    return [default] + [c for c in _CANDIDATES[head_dim] if c != default]


@triton.jit
def _tile_rows(
    bt_row,  # block_table row of the request (int32 pointer)
    n0,  # absolute position of the tile's first key (a multiple of BLOCK_N)
    seq,  # keys that exist (only read when MASKED)
    stride_p,
    stride_s,
    PS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Element offsets of the tile's BLOCK_N key rows (positions n0 .. n0+BLOCK_N-1) in a cache
    view with page stride stride_p and slot stride stride_s (head offset and d excluded); int64."""
    offs = tl.arange(0, BLOCK_N)
    if PS % BLOCK_N == 0:
        # the whole tile lies in one page: one block_table load per tile
        page = tl.load(bt_row + n0 // PS).to(tl.int64)
        rows = page * stride_p + ((n0 % PS) + offs).to(tl.int64) * stride_s
    else:
        # one lookup per key (a warp's duplicates coalesce into one transaction). Loading one id
        # per page and broadcasting it (reshape or gather) would save instructions, but with
        # Triton 3.6 either op keeps the software pipeliner from pipelining the K/V loads.
        pos = n0 + offs
        if MASKED:
            # pages past the end of the sequence may hold no valid id
            pages = tl.load(bt_row + pos // PS, mask=pos < seq, other=0)
        else:
            pages = tl.load(bt_row + pos // PS)
        rows = pages.to(tl.int64) * stride_p + (pos % PS).to(tl.int64) * stride_s
    return rows


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    k_head,  # k_cache + kv_head * stride_kh
    v_head,
    bt_row,
    n0,
    seq,
    qpos,  # [BLOCK_M] absolute positions of the program's rows (read when MASKED)
    qk_scale,
    stride_kp,
    stride_ks,
    stride_vp,
    stride_vs,
    D: tl.constexpr,
    PS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One BLOCK_N-key tile of the online softmax. MASKED (constexpr, so the mask math compiles
    away in the main loop): keys past qpos (causal) or past seq (no data) are dropped."""
    offs_d = tl.arange(0, D)
    k_rows = _tile_rows(bt_row, n0, seq, stride_kp, stride_ks, PS, BLOCK_N, MASKED)
    v_rows = _tile_rows(bt_row, n0, seq, stride_vp, stride_vs, PS, BLOCK_N, MASKED)
    if MASKED:
        kpos = n0 + tl.arange(0, BLOCK_N)
        live = (kpos < seq)[:, None]
        # slots past the sequence end are uninitialised cache memory (maybe NaN): never load
        # them, since 0 * NaN in p @ v would poison the row
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=live, other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=live, other=0.0)
    else:
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :])
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :])
    qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
    if MASKED:
        visible = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < seq)
        qk = tl.where(visible, qk, float("-inf"))
    # base-2 online softmax: scale*log2(e) folded into one FMA per score; m_i starts finite,
    # so a row with no visible key in this tile gets p = exp2(-inf) = 0 and alpha = 1
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


# one binary whatever the step's query-block count and the alignment of its block_table row slice
@triton.jit(do_not_specialize=["NQB"], do_not_specialize_on_alignment=["block_table"])
def _sparse_prefill_fwd_kernel(
    q,
    k_cache,
    v_cache,
    block_table,
    out,
    cu_seqlens_q,
    ctx_lens,
    seqused_k,
    dense,
    qb_req,
    qb_abs,
    sel_off,
    sel_idx,
    sel_cnt,
    qk_scale,  # scale * log2(e)
    NQB,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_bt,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    PS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALL_BLOCKS: tl.constexpr,
):
    """Program pid -> (query block g, row part mp, q head h), h fastest: the G heads of a kv head
    are neighbours (shared K/V tiles in L2); g runs from the last query block down (heaviest
    first). Rows of the program: absolute positions qb_abs[g]*B + mp*BLOCK_M + [0, BLOCK_M)."""
    tl.static_assert(B % BLOCK_M == 0, "Prism block must be a multiple of BLOCK_M")
    tl.static_assert(B % BLOCK_N == 0, "Prism block must be a multiple of BLOCK_N")
    MP: tl.constexpr = B // BLOCK_M  # programs per query block and head
    TPB: tl.constexpr = B // BLOCK_N  # key tiles per Prism block

    pid = tl.program_id(0)
    h = pid % HQ
    rest = pid // HQ
    mp = rest % MP
    g = NQB - 1 - rest // MP

    r = tl.load(qb_req + g)
    qb = tl.load(qb_abs + g)
    ctx = tl.load(ctx_lens + r)
    seq = tl.load(seqused_k + r)
    row0 = tl.load(cu_seqlens_q + r)
    # plan.dense[r] (or ALL_BLOCKS): every causal block, the selection row is not read
    dense_flag = tl.load(dense + r) | ALL_BLOCKS
    is_dense = dense_flag != 0
    is_sparse = dense_flag == 0

    pos_lo = qb * B + mp * BLOCK_M
    if (pos_lo + BLOCK_M <= ctx) | (pos_lo >= seq):
        # this part of the query block lies outside the chunk (partial first / last block)
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    qpos = pos_lo + offs_m
    row_ok = (qpos >= ctx) & (qpos < seq)
    rows = (row0 + qpos - ctx).to(tl.int64)  # only dereferenced under row_ok
    q_tile = tl.load(
        q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )

    kvh = h // G
    k_head = k_cache + kvh.to(tl.int64) * stride_kh
    v_head = v_cache + kvh.to(tl.int64) * stride_vh
    bt_row = block_table + r.to(tl.int64) * stride_bt

    # selection row (g, h): int64 offsets, sel_off[g] * HQ overflows int32 at long contexts
    sel_row = sel_idx + sel_row_start(tl.load(sel_off + g), h, qb, HQ)
    cnt = tl.load(sel_cnt + sel_count_at(g, h, HQ))
    # the diagonal block (if selected) is the last index of the ascending row
    last = tl.load(sel_row + cnt - 1, mask=(cnt > 0) & is_sparse, other=-1).to(tl.int32)
    has_diag = (last == qb) | is_dense
    n_full = tl.where(is_dense, qb, cnt - (last == qb).to(tl.int32))

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # fully visible blocks: every key precedes every row of the program, no mask math
    for it in tl.range(0, n_full * TPB):
        j = it // TPB
        sel = tl.load(sel_row + j, mask=is_sparse, other=0).to(tl.int32)
        blk = tl.where(is_dense, j, sel)
        n0 = blk * B + (it % TPB) * BLOCK_N
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q_tile, k_head, v_head, bt_row, n0, seq, qpos, qk_scale,
            stride_kp, stride_ks, stride_vp, stride_vs, D, PS, BLOCK_N, False,
        )

    # diagonal block: only the tiles up to the program's last row (and the sequence end)
    if has_diag:
        n_hi = tl.minimum(pos_lo + BLOCK_M, seq)
        n_diag = tl.cdiv(n_hi - qb * B, BLOCK_N)
        for it in tl.range(0, n_diag, num_stages=1):
            n0 = qb * B + it * BLOCK_N
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q_tile, k_head, v_head, bt_row, n0, seq, qpos, qk_scale,
                stride_kp, stride_ks, stride_vp, stride_vs, D, PS, BLOCK_N, True,
            )

    # rows with an empty selection (never produced by Prism's selection) are written as 0
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(
        out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(out.dtype.element_ty),
        mask=row_ok[:, None],
    )


def sparse_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: PrefillPlan,
    sel_idx: torch.Tensor,
    sel_cnt: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    config: SparsePrefillConfig | None = None,
    all_blocks: bool = False,
) -> torch.Tensor:
    """Block-sparse causal attention of every chunk of ``plan`` over the paged KV cache.

    Row t of request r (``plan.cu_seqlens_q[r] <= t < plan.cu_seqlens_q[r+1]``, absolute position
    ``plan.ctx_lens[r] + t - plan.cu_seqlens_q[r]``) in q head h attends, with an exact softmax of
    ``scale * q k^T``, to the keys at positions <= its own that lie in the key blocks selected for
    its query block g and head h: ``sel_idx[sel_off[g]*HQ + h*(qb_abs[g]+1) + i]`` for
    ``i < sel_cnt[g*HQ + h]`` (absolute block ids, ascending). Requests with ``plan.dense[r] = 1``
    attend to every causal block and their selection rows are not read. A row with an empty
    selection is written as zeros. Same math as ``prism_vllm.reference.block_sparse_attention``.

    Args:
        q: [T, HQ, D] float16/bfloat16, T >= plan.num_tokens; any strides with q.stride(-1) == 1.
        k_cache, v_cache: [NP, PS, HKV, D] views of the paged cache in q's dtype, any strides with
            stride(-1) == 1 (vLLM: ``kv_cache.transpose(1, 2).split(D, -1)`` of FlashAttention's
            packed NHD or HND cache). The chunk's own K/V must already be in the cache.
        block_table: [>= R, max_pages] int32; key position p of request r lives in page
            ``block_table[r, p // PS]``, slot ``p % PS``.
        plan: PrefillPlan of the launch, on q's device (``plan.num_q_heads == HQ``).
        sel_idx: int16 [>= plan.sel_capacity] selected key blocks (BSR indices).
        sel_cnt: int32 [>= plan.num_q_blocks * HQ] selected blocks per (query block, q head).
        scale: softmax scale (usually D ** -0.5).
        out: [T_out >= plan.num_tokens, HQ, D] output, any strides with stride(-1) == 1; rows
            [0, plan.num_tokens) are written, the others are left alone.
        config: launch settings, default ``default_config(D)``; see ``SparsePrefillConfig`` and
            ``candidate_configs`` for what a sweep should try.
        all_blocks: every row attends to every causal block; sel_idx / sel_cnt are not read
            (``BlockSelection.all_blocks``: estimation was skipped).

    Returns:
        out.

    Launches one kernel; reads nothing back to the host and allocates nothing.
    """
    check_tensor("q", q, shape=("T", "HQ", "D"), dtype=(torch.float16, torch.bfloat16), last_stride_1=True)
    T, HQ, D = q.shape
    default = default_config(D)  # NotImplementedError for head dims the kernel is not built for
    cfg = config if config is not None else default
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        # one dtype: fp8 caches go through the FA3 attend step
        check_tensor(name, t, shape=("num_pages", "page_size", "HKV", D), dtype=q.dtype, device=dev,
                     last_stride_1=True)
    check(
        v_cache.shape == k_cache.shape,
        f"Invalid shape of v_cache: expected {list(k_cache.shape)} (k_cache's), got {list(v_cache.shape)}",
    )
    _, PS, HKV, _ = k_cache.shape
    check_gqa(HQ, HKV)
    check(PS >= 1, f"Invalid page size {PS}")
    check_plan(plan, dev, num_q_heads=HQ, num_rows=T)
    check_tensor("out", out, shape=(AtLeast(plan.num_tokens), HQ, D),
                 dtype=(torch.float16, torch.bfloat16, torch.float32), device=dev, last_stride_1=True)
    check_block_table(block_table, plan, dev)
    check_selection_buffers(sel_idx, sel_cnt, plan, dev)
    # the running max is taken before scaling (one multiply per row, not per score): needs scale > 0
    check(float(scale) > 0.0, f"softmax scale must be > 0, got scale={scale}")
    B = plan.block_size
    for name, v in (("block_m", cfg.block_m), ("block_n", cfg.block_n)):
        check(v in (16, 32, 64, 128) and B % v == 0,
              f"{name}={v} must be 16, 32, 64 or 128 and divide the Prism block size {B}")
    if plan.num_q_blocks == 0:
        return out

    grid = (plan.num_q_blocks * (B // cfg.block_m) * HQ,)
    launch(
        _sparse_prefill_fwd_kernel,
        grid,
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        out=out,
        **plan.tensors("cu_seqlens_q", "ctx_lens", "seqused_k", "dense", "qb_req", "qb_abs", "sel_off"),
        sel_idx=sel_idx,
        sel_cnt=sel_cnt,
        qk_scale=float(scale) * _LOG2E,
        NQB=plan.num_q_blocks,
        **strides(q, "qt", "qh"),
        **strides(out, "ot", "oh"),
        **strides(k_cache, "kp", "ks", "kh"),
        **strides(v_cache, "vp", "vs", "vh"),
        **strides(block_table, "bt"),
        HQ=HQ,
        G=HQ // HKV,
        D=D,
        B=B,
        PS=PS,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        ALL_BLOCKS=int(bool(all_blocks)),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
