"""Mean pooling of queries (ragged prefill chunks) and keys (vLLM's paged KV cache) per Prism block.

Step 1 of Prism (see ``prism_vllm.reference.pool_blocks``): every absolute block of B = 128
positions is summarised by the mean of its rows that exist. A chunk that starts mid-block pools
only its own rows of that first query block; the last query and key blocks may be partial.

Shape legend (one launch, see kernels/plan.py):

    T     query rows of the launch (chunks of R requests, contiguous in q)
    HQ    q heads; HKV kv heads; D head dim (any, padded to a power of two in registers)
    B     Prism block (plan.block_size); NQB / NKB query / key blocks over all requests
    PS    page size (tokens per KV-cache page, any multiple of 16), NP pages in the cache
    q: [T, HQ, D]   k_cache: [NP, PS, HKV, D]   block_table: [R, max_pages] int32
    pooled q: [NQB, HQ, D] float32   pooled k: [NKB, HKV, D] float32

fp8 (vLLM's ``--kv-cache-dtype fp8``): q and/or k_cache may be float8_e4m3fn with a per-tensor
dequantisation scale (value = fp8 * scale, vLLM's ``layer._q_scale`` / ``layer._k_scale``, a
float32 device tensor read in the kernel, never on the host). Rows are summed as exact fp8 -> fp32
conversions and the block mean is scaled once, so pooled q/k, the key energies and the split keys
are those of the dequantised values (``reference.pool_blocks(x.float() * scale)``).

Both kernels are pure streaming reductions (memory bound): one program per (block, head tile)
reads its block's rows in BLOCK_T-row tiles and accumulates in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import AtLeast, check, check_block_table, check_params, check_plan, check_tensor, launch, strides
from .params import PrismParams
from .plan import PrefillPlan

__all__ = ["PoolingLaunch", "pool_queries", "pool_keys_paged", "pooling_launch"]


@triton.jit
def _head_tile(h0, stride_h, stride_d, H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The program's [BLOCK_H, BLOCK_D] tile of heads h0.. and dims: (heads, dims, valid, element
    offsets within a row)."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hd_mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    hd_off = offs_h[:, None] * stride_h + offs_d[None, :] * stride_d
    return offs_h, offs_d, hd_mask, hd_off


@triton.jit
def _block_mean(
    x, scale, p_lo, p_hi, row0, stride_t, bt_row, stride_p, stride_s, hd_off, hd_mask, PS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """[BLOCK_H, BLOCK_D] float32 mean of the rows at positions [p_lo, p_hi) (times scale[0] when
    HAS_SCALE: fp8 input). Position p is row row0 + p of x (row stride stride_t) or, PAGED, slot
    p % PS of page bt_row[p // PS] of a paged cache (page / slot strides stride_p / stride_s)."""
    offs_t = tl.arange(0, BLOCK_T)
    # Row-wise partial sums; one cross-row reduction at the end instead of one per tile.
    acc = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_D), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_T):
        pos = p0 + offs_t
        ok = pos < p_hi
        if PAGED:
            # One page-table entry per row: any page size works (smaller or larger than B);
            # PS is constexpr so // and % become shifts for the usual power-of-two page sizes.
            page = tl.load(bt_row + pos // PS, mask=ok, other=0).to(tl.int64)
            row_off = page * stride_p + (pos % PS).to(tl.int64) * stride_s
        else:
            row_off = (row0 + pos).to(tl.int64) * stride_t
        v = tl.load(x + row_off[:, None, None] + hd_off[None, :, :], mask=ok[:, None, None] & hd_mask[None, :, :],
                    other=0.0)
        acc += v.to(tl.float32)  # fp8 -> fp32 is exact
    mean = tl.sum(acc, axis=0) / (p_hi - p_lo).to(tl.float32)
    if HAS_SCALE:  # constexpr: fp16/bf16 compile without it; mean(x * s) = mean(x) * s, one multiply
        mean = mean * tl.load(scale)
    return mean


@triton.jit
def _pool_queries_kernel(
    q,
    q_scale,
    out,
    cu_seqlens_q,
    ctx_lens,
    seqused_k,
    qb_req,
    qb_abs,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ob,
    stride_oh,
    stride_od,
    H: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """out[g, h, :] = mean of q's rows of absolute query block qb_abs[g] of request qb_req[g]
    (times q_scale[0] when HAS_SCALE: fp8 q)."""
    g = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H
    r = tl.load(qb_req + g)
    qb = tl.load(qb_abs + g)
    ctx = tl.load(ctx_lens + r)
    seq = tl.load(seqused_k + r)
    row0 = tl.load(cu_seqlens_q + r) - ctx  # q row of absolute position 0 (may be negative)
    p_lo = tl.maximum(qb * B, ctx)  # the chunk's rows of this block: positions [p_lo, p_hi)
    p_hi = tl.minimum(qb * B + B, seq)

    offs_h, offs_d, hd_mask, hd_off = _head_tile(h0, stride_qh, stride_qd, H, D, BLOCK_H, BLOCK_D)
    mean = _block_mean(q, q_scale, p_lo, p_hi, row0, stride_qt, q, 0, 0, hd_off, hd_mask, 1, BLOCK_T, BLOCK_H,
                       BLOCK_D, False, HAS_SCALE)
    o_ptr = out + g.to(tl.int64) * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptr, mean, mask=hd_mask)


# block_table's alignment unspecialised: a launch's table is a row slice of the engine's (starting
# past the step's decode rows), 16-byte aligned or not depending on the step when page sizes of 64+
# make its rows a width not divisible by 4; the kernel only gathers single entries from it
@triton.jit(do_not_specialize_on_alignment=["block_table"])
def _pool_keys_paged_kernel(
    k_cache,
    k_scale,
    block_table,
    out,
    energy_out,
    split_out,
    band_hi,
    band_lo,
    cu_kb,
    seqused_k,
    kb_req,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_od,
    stride_eb,
    stride_eh,
    stride_sb,
    stride_sh,
    stride_sp,
    PS: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ENERGY: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """out[kb, h, :] = mean of the keys of block j = kb - cu_kb[r] of request r = kb_req[kb],
    gathered from the paged cache (position p: page block_table[r, p // PS], slot p % PS), times
    k_scale[0] when HAS_SCALE (fp8 cache)."""
    kb = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H
    r = tl.load(kb_req + kb)
    j = kb - tl.load(cu_kb + r)
    seq = tl.load(seqused_k + r)
    p_lo = j * B
    p_hi = tl.minimum(p_lo + B, seq)

    offs_h, offs_d, hd_mask, hd_off = _head_tile(h0, stride_kh, stride_kd, H, D, BLOCK_H, BLOCK_D)
    bt_row = block_table + r.to(tl.int64) * stride_bt
    # dequantised before the energies and the split: they describe the real keys
    mean = _block_mean(k_cache, k_scale, p_lo, p_hi, 0, 0, bt_row, stride_kp, stride_ks, hd_off, hd_mask, PS,
                       BLOCK_T, BLOCK_H, BLOCK_D, True, HAS_SCALE)
    o_ptr = out + kb.to(tl.int64) * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptr, mean, mask=hd_mask)
    if ENERGY:  # |mean|^2 over all dims and over each band's dims (Prism's calibration statistics)
        m2 = mean * mean
        hi_m = tl.load(band_hi + offs_d, mask=offs_d < D, other=0.0)
        lo_m = tl.load(band_lo + offs_d, mask=offs_d < D, other=0.0)
        e_ptr = energy_out + kb.to(tl.int64) * stride_eb + offs_h * stride_eh
        h_ok = offs_h < H
        tl.store(e_ptr, tl.sum(m2, axis=1), mask=h_ok)
        tl.store(e_ptr + 1, tl.sum(m2 * hi_m[None, :], axis=1), mask=h_ok)
        tl.store(e_ptr + 2, tl.sum(m2 * lo_m[None, :], axis=1), mask=h_ok)
    if SPLIT:  # mean = hi + lo exactly, hi with the 13 low mantissa bits cleared (a tf32 value)
        hi = (mean.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        s_ptr = split_out + kb.to(tl.int64) * stride_sb + offs_h[:, None] * stride_sh + offs_d[None, :]
        tl.store(s_ptr, hi, mask=hd_mask)
        tl.store(s_ptr + stride_sp, mean - hi, mask=hd_mask)


#: Element types of q / k_cache: the model dtypes, plus vLLM's fp8 (e4m3, "fp8" / "fp8_e4m3" KV
#: cache and FlashAttention's quantised queries) which needs a dequantisation scale.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8 = torch.float8_e4m3fn


def _check_scale(name: str, x: torch.Tensor, scale_name: str, scale: Optional[torch.Tensor]) -> bool:
    """Validate the (dtype, scale) pair of q or k_cache; returns whether the kernel dequantises."""
    if x.dtype == _FP8:
        check(
            isinstance(scale, torch.Tensor),
            f"{name} is float8_e4m3fn: pass {scale_name}, its per-tensor dequantisation scale "
            f"(value = fp8 * scale; vLLM: layer._{scale_name}) as a float32 tensor of 1 element on "
            f"{x.device}, got {type(scale).__name__}",
        )
        check(
            scale.dtype == torch.float32 and scale.numel() == 1,
            f"Invalid {scale_name}: expected a float32 tensor of 1 element (per-tensor scale), got "
            f"{scale.dtype} {tuple(scale.shape)}; per-head fp8 scales are not supported, serve such "
            f"layers with FlashAttention",
        )
        check_tensor(scale_name, scale, device=x.device)
        return True
    check(
        x.dtype in _FLOAT_DTYPES,
        f"Invalid dtype of {name}: expected float16, bfloat16, float32 or float8_e4m3fn, got {x.dtype}"
        + (
            f"; fp8 data stored as uint8 (vLLM's fp8 KV cache) must be viewed as FlashAttention does: "
            f"{name}.view(torch.float8_e4m3fn)"
            if x.dtype == torch.uint8
            else ""
        ),
    )
    check(
        scale is None,
        f"{scale_name} is only for a float8_e4m3fn {name}; {name} is {x.dtype}: pass {scale_name}=None",
    )
    return False


@dataclass(frozen=True)
class PoolingLaunch:
    """Launch settings of both pooling kernels: one program per (block, BLOCK_H heads) reads its
    block in BLOCK_T-row tiles of [BLOCK_T, BLOCK_H, BLOCK_D] elements."""

    block_t: int
    block_h: int
    block_d: int
    num_warps: int = 4


#: Programs a pooling launch keeps at least when it widens its head tiles (about two per SM on an
#: H200's 132): below that, fewer and longer programs leave SMs idle.
_MIN_PROGRAMS = 256


def pooling_launch(num_heads: int, head_dim: int, num_blocks: int = 0) -> PoolingLaunch:
    """About 8K elements per loaded tile (16 KB of fp16/bf16), so a program keeps several row
    loads in flight without spilling. A tile row holds 1K elements (8 heads of d=128), widened
    up to 4K (all 32 q heads of a Llama-3.1-8B row: one contiguous read) while the launch of
    ``num_blocks`` blocks keeps at least _MIN_PROGRAMS programs. Measured on an H200 (2026-12-02,
    benchmarks/results/pool-sweep-h200.json, ``estimation_sweep.py --pool-sweep``; GPU time per
    kernel in profile-estimation-default-h200.json): pooling that layer's q at 128K took 0.25-0.27
    ms with whole-row tiles (2 rows x 32 heads, 4.0 TB/s) against 0.36 ms with 1K rows (8 rows x 8
    heads), at 32K 0.083 against 0.103 ms; at 8K (64 blocks: 64 programs) whole rows took 0.065 ms
    of GPU time against 0.033 ms with 1K rows (256 programs). Its 8 kv heads are one 1K row either
    way (0.11-0.13 ms at 128K; no launch setting gained more than 0.017 ms there). Through vLLM a
    q pooling launch holds one step's chunk: with 8K-token chunks (64 blocks) 32 q heads stay on
    8-head tiles, with 32K-token chunks they take whole rows; key pooling covers every key block of
    the context."""
    block_d = triton.next_power_of_2(head_dim)
    heads = triton.next_power_of_2(num_heads)
    block_h = min(heads, max(1, 1024 // block_d))
    # programs counted over the padded heads: the tile changes only at power-of-two block counts,
    # which the startup's synthetic chunks (4K-128K tokens) all reach, so each tile compiles there
    while (block_h < heads and 2 * block_h * block_d <= 4096
           and num_blocks * (heads // (2 * block_h)) >= _MIN_PROGRAMS):
        block_h *= 2
    block_t = max(1, min(32, 8192 // (block_h * block_d)))
    return PoolingLaunch(block_t=block_t, block_h=block_h, block_d=block_d)


def _checked_tuning(ln: PoolingLaunch, head_dim: int) -> PoolingLaunch:
    check(
        all(isinstance(v, int) and v >= 1 and v & (v - 1) == 0
            for v in (ln.block_t, ln.block_h, ln.block_d, ln.num_warps))
        and ln.block_d >= head_dim,
        f"Invalid pooling tuning {ln}: block_t, block_h, block_d and num_warps must be powers of two, "
        f"block_d >= head dim ({head_dim})",
    )
    return ln


def pool_queries(
    q: torch.Tensor, plan: PrefillPlan, out: torch.Tensor, q_scale: Optional[torch.Tensor] = None, *,
    tuning: Optional[PoolingLaunch] = None,
) -> torch.Tensor:
    """Mean-pooled queries of every (absolute) query block of the launch.

    Args:
        q: [T >= plan.num_tokens, HQ, D] float16/bfloat16/float32/float8_e4m3fn, any strides (e.g.
            a view of vLLM's padded query); rows cu_seqlens_q[r] .. cu_seqlens_q[r+1]-1 are request r's chunk.
        plan: the launch's PrefillPlan, on q's device.
        out: [>= plan.num_q_blocks, HQ, D] float32, any strides; row g receives the mean of the
            chunk's rows in absolute block plan.qb_abs[g] of request plan.qb_req[g]
            (``reference.pool_blocks(q_r, ctx_r, B)``).
        q_scale: required iff q is float8_e4m3fn: float32 tensor of 1 element on q's device, the
            per-tensor dequantisation scale (q = fp8 * q_scale; vLLM's ``layer._q_scale``, with
            which Attention.forward quantised the query for FlashAttention). Read in the kernel.
        tuning: launch settings (default ``pooling_launch(HQ, D, plan.num_q_blocks)``; benchmarks
            sweep them).

    Returns:
        out. One kernel launch; no host sync, no allocation.
    """
    check_tensor("q", q, shape=("T", "HQ", "D"))
    T, H, D = q.shape
    has_scale = _check_scale("q", q, "q_scale", q_scale)
    check_plan(plan, q.device, num_rows=T)
    check_tensor("out", out, shape=(AtLeast(plan.num_q_blocks), H, D), dtype=torch.float32, device=q.device)
    if plan.num_q_blocks == 0:
        return out
    ln = pooling_launch(H, D, plan.num_q_blocks) if tuning is None else _checked_tuning(tuning, D)
    grid = (plan.num_q_blocks, triton.cdiv(H, ln.block_h))
    launch(
        _pool_queries_kernel,
        grid,
        q=q,
        q_scale=q_scale if has_scale else out,  # unused pointer when HAS_SCALE is False
        out=out,
        **plan.tensors("cu_seqlens_q", "ctx_lens", "seqused_k", "qb_req", "qb_abs"),
        **strides(q, "qt", "qh", "qd"),
        **strides(out, "ob", "oh", "od"),
        H=H,
        D=D,
        B=plan.block_size,
        BLOCK_T=ln.block_t,
        BLOCK_H=ln.block_h,
        BLOCK_D=ln.block_d,
        HAS_SCALE=has_scale,
        num_warps=ln.num_warps,
    )
    return out


def pool_keys_paged(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: PrefillPlan,
    out: torch.Tensor,
    energy_out: Optional[torch.Tensor] = None,
    params: Optional[PrismParams] = None,
    split_out: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    *,
    tuning: Optional[PoolingLaunch] = None,
) -> torch.Tensor:
    """Mean-pooled keys of every key block of every request, read from the paged KV cache.

    Args:
        k_cache: [NP, PS, HKV, D] float16/bfloat16/float32/float8_e4m3fn view with any strides
            (vLLM 0.26: ``kv_cache.transpose(1, 2).split(D, -1)[0]`` of FlashAttention's packed
            cache, NHD or HND; an fp8 cache is uint8 storage, view it as float8_e4m3fn as
            FlashAttention does). Keys 0 .. seq_len-1 of every request must already be in the cache.
        block_table: [>= R, max_pages] int32; position p of request r is in page
            ``block_table[r, p // PS]``, slot ``p % PS``.
        plan: the launch's PrefillPlan, on the cache's device.
        out: [>= plan.num_k_blocks, HKV, D] float32, any strides; row cu_kb[r] + j receives the
            mean of request r's keys at positions [jB, min(jB + B, seq_len)).
        energy_out: optional float32 [>= plan.num_k_blocks, HKV, 3] (last dim contiguous):
            receives, per pooled key k, (|k|^2, |k * band_high|^2, |k * band_low|^2), the key
            statistics of Prism's energy calibration (``select_blocks(..., key_energy=...)``),
            so the selection does not recompute them.
        params: the layer's PrismParams, whose band masks the energies use; required with
            energy_out.
        split_out: optional float32 [>= plan.num_k_blocks, HKV, 2, D] (last dim contiguous):
            receives each pooled key as an exact sum hi + lo of two tf32-representable parts
            (``select_blocks(..., pooled_k_split=...)`` then scores with three plain tf32
            products instead of splitting the keys again in every program).
        k_scale: required iff k_cache is float8_e4m3fn: float32 tensor of 1 element on the
            cache's device, the per-tensor dequantisation scale (k = fp8 * k_scale; vLLM's
            ``layer._k_scale``, with which the cache write quantised the keys). out, energy_out
            and split_out then describe the dequantised keys. Read in the kernel.
        tuning: launch settings (default ``pooling_launch(HKV, D, plan.num_k_blocks)``;
            benchmarks sweep them).

    Returns:
        out. One kernel launch; no host sync, no allocation.
    """
    check_tensor("k_cache", k_cache, shape=("num_pages", "page_size", "HKV", "D"))
    NP, PS, H, D = k_cache.shape
    dev = k_cache.device
    has_scale = _check_scale("k_cache", k_cache, "k_scale", k_scale)
    check(PS >= 1, f"Invalid page size {PS}")
    check_plan(plan, dev)
    check_block_table(block_table, plan, dev)
    nkb = AtLeast(plan.num_k_blocks)
    check_tensor("out", out, shape=(nkb, H, D), dtype=torch.float32, device=dev)
    has_e = energy_out is not None
    if has_e:
        check_tensor("energy_out", energy_out, shape=(nkb, H, 3), dtype=torch.float32, device=dev, last_stride_1=True)
        check(params is not None, "energy_out needs params: the layer's PrismParams, whose band masks the energies use")
        check_params(params, D, dev, head_dim_of="k_cache")
    has_s = split_out is not None
    if has_s:
        check_tensor("split_out", split_out, shape=(nkb, H, 2, D), dtype=torch.float32, device=dev, last_stride_1=True)
    if plan.num_k_blocks == 0:
        return out
    ln = pooling_launch(H, D, plan.num_k_blocks) if tuning is None else _checked_tuning(tuning, D)
    grid = (plan.num_k_blocks, triton.cdiv(H, ln.block_h))
    launch(
        _pool_keys_paged_kernel,
        grid,
        k_cache=k_cache,
        k_scale=k_scale if has_scale else out,  # unused pointer when HAS_SCALE is False
        block_table=block_table,
        out=out,
        energy_out=energy_out if has_e else out,
        split_out=split_out if has_s else out,
        band_hi=params.band_high if has_e else out,
        band_lo=params.band_low if has_e else out,
        **plan.tensors("cu_kb", "seqused_k", "kb_req"),
        **strides(k_cache, "kp", "ks", "kh", "kd"),
        **strides(block_table, "bt"),
        **strides(out, "ob", "oh", "od"),
        **strides(energy_out, "eb", "eh"),
        **strides(split_out, "sb", "sh", "sp"),
        PS=PS,
        H=H,
        D=D,
        B=plan.block_size,
        BLOCK_T=ln.block_t,
        BLOCK_H=ln.block_h,
        BLOCK_D=ln.block_d,
        ENERGY=has_e,
        SPLIT=has_s,
        HAS_SCALE=has_scale,
        num_warps=ln.num_warps,
    )
    return out
