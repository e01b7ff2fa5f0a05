"""Prism block selection: calibrated dual-band scoring, top-p per band, union -> BSR block indices.

Steps 2-5 of Prism (``prism_vllm.reference.select_blocks``), fused: for every query block g and
q head h, with I = qb_abs[g] (its absolute block) and kv head h // G,

    t_b[g, h]   = sqrt(d_b / D) * rms(q_b)/rms(q) * rms(k_b)/rms(k)      (energy calibration)
                  rms(q*) over the pooled query block, rms(k*) over pooled key blocks 0..I
    logits_b[j] = <q_b, k_b[j]> / (sqrt(d_b) * t_b)                       j = 0..I (causal)
    p_b         = softmax(logits_b)
    keep_b      = { j : p_b[j] >= t*_b },  t*_b = max{ t : sum(p_b[p_b >= t]) >= threshold_b }
    selected    = keep_high | keep_low | {0 if keep_sink} | {I if keep_diagonal}

t*_b is the reference's "probability at which the descending cumulative sum first reaches the
threshold": the mass kept above a threshold t only changes at probability values, so the
largest t whose kept mass reaches the threshold is exactly that block's probability. The kernel
finds it without sorting, by bisection over the int32 bit patterns of t (non-negative floats
order like their bit patterns): exact, at most 31 steps.

Nothing of size [heads x q blocks x k blocks] touches global memory: a program owns BLOCK_G
query blocks of one request and the G q heads of one kv head (so each pooled-K tile is loaded
once for all of them), and keeps its rows of logits on chip:

* resident path (rows of <= a few thousand key blocks): the whole row of logits of both bands
  stays in registers ([2 * QR, NK_PAD], NK_PAD = next power of two >= plan.max_k_blocks);
  key tiles are scored with tl.dot and written into it; softmax, bisection and the ascending
  index emission (tl.cumsum over the selected mask) all run on the resident row;
* multi-pass path (longer rows, e.g. 1M-token contexts): the same math streaming key tiles,
  recomputing the logits in each pass (energies, online max/sum, then bisection passes that
  test NCAND thresholds at once, then emission with a running offset).

Shape legend (one launch, see kernels/plan.py):

    HQ    q heads; HKV kv heads; G = HQ // HKV; D head dim
    NQB / NKB query / key blocks over all requests; B = plan.block_size
    pooled_q: [NQB, HQ, D] float32     pooled_k: [NKB, HKV, D] float32
    band_high, band_low: [D] float32 0/1 masks (prism_vllm.rope.Bands)
    sel_idx: int16 [>= plan.sel_capacity]; row (g, h) at sel_off[g]*HQ + h*(qb_abs[g]+1)
    sel_cnt: int32 [>= NQB * HQ]; temps_out: float32 [>= NQB, HQ, 2] (optional)

Rows: row m of a program's [2 * QR, ...] tensors is band m // QR (0 high, 1 low) of q row
i = m % QR, which is query block g0 + i // G_PAD and q head kvh * G + i % G_PAD.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .plan import PrefillPlan

__all__ = ["select_blocks", "selection_launch_config"]

_EPS = 1e-6  # the reference's clamp on rms values and temperatures
_PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def _rows(
    g0, kvh, r, NQB, qb_req, qb_abs, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
    QR: tl.constexpr, N: tl.constexpr,
):
    """For N row slots (N = QR: q rows; N = 2 * QR: q rows of both bands), slot m being q row
    i = m % QR: (g, h, active, I) with I = qb_abs[g], or I = -1 for slots that are padding or
    belong to another request than r."""
    i = tl.arange(0, N) % QR
    gi = i // G_PAD
    hh = i % G_PAD
    g = g0 + gi
    ok = (gi < BLOCK_G) & (hh < G) & (g < NQB)
    req = tl.load(qb_req + g, mask=ok, other=-1)
    ok = ok & (req == r)
    qb = tl.load(qb_abs + g, mask=ok, other=-1)
    return g, kvh * G + hh, ok, qb


@triton.jit
def _load_k_tile(pooled_k, kb0, kvh, c0, ncol, stride_kb, stride_kh, stride_kd, offs_d, dmask, BN: tl.constexpr):
    """Pooled keys of key blocks c0 .. c0+BN-1 of the request (zeros past ncol): [BN, BLOCK_D]."""
    cols = c0 + tl.arange(0, BN)
    ptr = pooled_k + (kb0 + cols).to(tl.int64)[:, None] * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
    return tl.load(ptr, mask=(cols < ncol)[:, None] & dmask[None, :], other=0.0), cols


@triton.jit
def _key_energy(kv, cols, qb, is_hi, hi_m, lo_m):
    """Per row: (sum over visible blocks j <= I of |k_j|^2 over all dims, ... over the row's band)."""
    k2 = kv * kv
    e_all = tl.sum(k2, axis=1)
    e_hi = tl.sum(k2 * hi_m[None, :], axis=1)
    e_lo = tl.sum(k2 * lo_m[None, :], axis=1)
    vis = cols[None, :] <= qb[:, None]
    e_band = tl.where(is_hi[:, None], e_hi[None, :], e_lo[None, :])
    return tl.sum(tl.where(vis, e_all[None, :], 0.0), axis=1), tl.sum(tl.where(vis, e_band, 0.0), axis=1)


@triton.jit
def _multiplier(qv, qband, ek_all, ek_b, qb, d_b, D: tl.constexpr, CALIBRATE: tl.constexpr):
    """Logit multiplier 1 / (sqrt(d_b) * t_b) per row (t_b = 1 without calibration)."""
    if CALIBRATE:
        eps = 1e-6
        nblk = tl.maximum(qb + 1, 1).to(tl.float32)  # padding rows (qb = -1): no 0/0
        rq = tl.maximum(tl.sqrt(tl.sum(qv * qv, axis=1) / D), eps)
        rq_b = tl.sqrt(tl.sum(qband * qband, axis=1) / d_b)
        rk = tl.maximum(tl.sqrt(ek_all / (nblk * D)), eps)
        rk_b = tl.sqrt(ek_b / (nblk * d_b))
        t = tl.maximum(tl.sqrt(d_b / D) * (rq_b / rq) * (rk_b / rk), eps)
        mult = 1.0 / (tl.sqrt(d_b) * t)
    else:
        mult = 1.0 / tl.sqrt(d_b)
    return mult


@triton.jit
def _select_resident_kernel(
    pooled_q,
    pooled_k,
    band_hi,
    band_lo,
    qb_req,
    qb_abs,
    cu_kb,
    dense,
    sel_off,
    sel_idx,
    sel_cnt,
    temps_out,
    NQB,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    thr_hi,
    thr_lo,
    HQ: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    QR: tl.constexpr,
    NK_PAD: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CALIBRATE: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
    ALL_CAUSAL: tl.constexpr,
    WRITE_TEMPS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    M: tl.constexpr = 2 * QR
    NT: tl.constexpr = NK_PAD // BN
    tl.static_assert(NK_PAD % BN == 0)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    g0 = pid * BLOCK_G
    r_first = tl.load(qb_req + g0)
    r_last = tl.load(qb_req + tl.minimum(g0 + BLOCK_G, NQB) - 1)
    cols = tl.arange(0, NK_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    band = tl.arange(0, M) // QR
    is_hi = band == 0
    hi_m = tl.load(band_hi + offs_d, mask=dmask, other=0.0)
    lo_m = tl.load(band_lo + offs_d, mask=dmask, other=0.0)
    d_hi = tl.sum(hi_m, axis=0)  # band sizes, counted here so the host never reads the masks
    d_lo = tl.sum(lo_m, axis=0)

    # A group of query blocks may straddle requests; each request's rows are done in turn
    # (one iteration unless the group holds a request boundary).
    for r in range(r_first, r_last + 1):
        gq, hq, okq, qbq = _rows(g0, kvh, r, NQB, qb_req, qb_abs, G, G_PAD, BLOCK_G, QR, QR)
        causal_q = cols[None, :] <= qbq[:, None]  # [QR, NK_PAD]; all False for inactive rows
        is_dense = tl.load(dense + r) != 0
        if ALL_CAUSAL:
            sel = causal_q
        else:
            # -- the program's rows of both bands: [M] = [2 * QR] --
            gm, hm, okm, qbm = _rows(g0, kvh, r, NQB, qb_req, qb_abs, G, G_PAD, BLOCK_G, QR, M)
            ncol = tl.max(qbm, axis=0) + 1  # key blocks visible to any row of the group
            kb0 = tl.load(cu_kb + r)
            qptr = pooled_q + gm.to(tl.int64)[:, None] * stride_qb + hm[:, None] * stride_qh
            qv = tl.load(qptr + offs_d[None, :] * stride_qd, mask=okm[:, None] & dmask[None, :], other=0.0)
            qband = qv * tl.where(is_hi[:, None], hi_m[None, :], lo_m[None, :])
            n_tiles = tl.where(is_dense, 0, tl.cdiv(ncol, BN))  # dense requests need no scores

            # -- raw band scores of every visible key block, kept on chip --
            raw = tl.zeros((M, NT, BN), dtype=tl.float32)
            ek_all = tl.zeros((M,), dtype=tl.float32)
            ek_b = tl.zeros((M,), dtype=tl.float32)
            tiles = tl.arange(0, NT)
            for t in range(0, n_tiles):
                kv, kcols = _load_k_tile(
                    pooled_k, kb0, kvh, t * BN, ncol, stride_kb, stride_kh, stride_kd, offs_d, dmask, BN
                )
                s = tl.dot(qband, tl.trans(kv), input_precision=PRECISION)  # [M, BN], fp32 accumulate
                # Registers cannot be indexed dynamically: broadcast the tile, keep it in slot t.
                raw = tl.where((tiles == t)[None, :, None], s[:, None, :], raw)
                if CALIBRATE:
                    ea, eb = _key_energy(kv, kcols, qbm, is_hi, hi_m, lo_m)
                    ek_all += ea
                    ek_b += eb
            d_b = tl.where(is_hi, d_hi, d_lo)
            mult = _multiplier(qv, qband, ek_all, ek_b, qbm, d_b, D, CALIBRATE)
            if WRITE_TEMPS:
                tptr = temps_out + (gm.to(tl.int64) * HQ + hm) * 2 + band
                tl.store(tptr, mult, mask=okm & (n_tiles > 0))

            # -- softmax per row (causal blocks only) --
            causal_m = cols[None, :] <= qbm[:, None]
            logits = tl.where(causal_m, tl.reshape(raw, (M, NK_PAD)) * mult[:, None], float("-inf"))
            mx = tl.max(logits, axis=1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            e = tl.exp(logits - mx[:, None])
            z = tl.sum(e, axis=1)
            p = e / tl.where(z > 0.0, z, 1.0)[:, None]

            # -- top-p threshold by bisection over float bit patterns: lo feasible, hi not --
            thr = tl.where(is_hi, thr_hi, thr_lo)
            pb = p.to(tl.int32, bitcast=True)
            lo = tl.zeros((M,), dtype=tl.int32)
            hi = tl.max(pb, axis=1) + 1
            while tl.max(hi - lo, axis=0) > 1:
                mid = lo + (hi - lo) // 2
                mass = tl.sum(tl.where(pb >= mid[:, None], p, 0.0), axis=1)
                ok = mass >= thr
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            keep = ((pb >= lo[:, None]) & causal_m).to(tl.int32)
            # Union of the two bands: rows m and m + QR are the same (query block, head).
            sel = tl.max(tl.reshape(keep, (2, QR, NK_PAD)), axis=0) != 0
            sel = tl.where(is_dense, causal_q, sel)
        if KEEP_SINK:
            sel = sel | (cols[None, :] == 0)
        if KEEP_DIAG:
            sel = sel | (cols[None, :] == qbq[:, None])
        sel = sel & causal_q

        # -- BSR emission: ascending block ids at exclusive-prefix positions --
        seli = sel.to(tl.int32)
        pos = tl.cumsum(seli, axis=1) - seli
        base = tl.load(sel_off + gq, mask=okq, other=0).to(tl.int64) * HQ + hq.to(tl.int64) * (qbq + 1)
        vals = tl.zeros((QR, NK_PAD), dtype=tl.int16) + cols.to(tl.int16)[None, :]
        tl.store(sel_idx + base[:, None] + pos, vals, mask=sel)
        tl.store(sel_cnt + gq.to(tl.int64) * HQ + hq, tl.sum(seli, axis=1), mask=okq)


@triton.jit
def _tile_probs(qband, mult, mx, z, qbm, pooled_k, kb0, kvh, c0, ncol, stride_kb, stride_kh, stride_kd, offs_d, dmask,
                BN: tl.constexpr, PRECISION: tl.constexpr):
    """Probabilities [M, BN] of key blocks c0.. (0 where not causal); identical in every pass."""
    kv, kcols = _load_k_tile(pooled_k, kb0, kvh, c0, ncol, stride_kb, stride_kh, stride_kd, offs_d, dmask, BN)
    s = tl.dot(qband, tl.trans(kv), input_precision=PRECISION) * mult[:, None]
    causal = kcols[None, :] <= qbm[:, None]
    e = tl.where(causal, tl.exp(s - mx[:, None]), 0.0)
    return e / z[:, None], causal, kcols


@triton.jit
def _select_multipass_kernel(
    pooled_q,
    pooled_k,
    band_hi,
    band_lo,
    qb_req,
    qb_abs,
    cu_kb,
    dense,
    sel_off,
    sel_idx,
    sel_cnt,
    temps_out,
    NQB,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    thr_hi,
    thr_lo,
    HQ: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    QR: tl.constexpr,
    BN: tl.constexpr,
    NCAND: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CALIBRATE: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
    ALL_CAUSAL: tl.constexpr,
    WRITE_TEMPS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    M: tl.constexpr = 2 * QR
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    g0 = pid * BLOCK_G
    r_first = tl.load(qb_req + g0)
    r_last = tl.load(qb_req + tl.minimum(g0 + BLOCK_G, NQB) - 1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    band = tl.arange(0, M) // QR
    is_hi = band == 0
    hi_m = tl.load(band_hi + offs_d, mask=dmask, other=0.0)
    lo_m = tl.load(band_lo + offs_d, mask=dmask, other=0.0)
    d_hi = tl.sum(hi_m, axis=0)  # band sizes, counted here so the host never reads the masks
    d_lo = tl.sum(lo_m, axis=0)
    cand_i = tl.arange(0, NCAND)

    for r in range(r_first, r_last + 1):
        gq, hq, okq, qbq = _rows(g0, kvh, r, NQB, qb_req, qb_abs, G, G_PAD, BLOCK_G, QR, QR)
        gm, hm, okm, qbm = _rows(g0, kvh, r, NQB, qb_req, qb_abs, G, G_PAD, BLOCK_G, QR, M)
        ncol = tl.max(qbm, axis=0) + 1
        kb0 = tl.load(cu_kb + r)
        estimate = tl.load(dense + r) == 0
        if ALL_CAUSAL:
            estimate = estimate & False
        n_tiles = tl.where(estimate, tl.cdiv(ncol, BN), 0)
        qptr = pooled_q + gm.to(tl.int64)[:, None] * stride_qb + hm[:, None] * stride_qh
        qv = tl.load(qptr + offs_d[None, :] * stride_qd, mask=okm[:, None] & dmask[None, :], other=0.0)
        qband = qv * tl.where(is_hi[:, None], hi_m[None, :], lo_m[None, :])

        # -- pass 0: key energies of the causal prefixes (calibration) --
        ek_all = tl.zeros((M,), dtype=tl.float32)
        ek_b = tl.zeros((M,), dtype=tl.float32)
        if CALIBRATE:
            for t in range(0, n_tiles):
                kv, kcols = _load_k_tile(
                    pooled_k, kb0, kvh, t * BN, ncol, stride_kb, stride_kh, stride_kd, offs_d, dmask, BN
                )
                ea, eb = _key_energy(kv, kcols, qbm, is_hi, hi_m, lo_m)
                ek_all += ea
                ek_b += eb
        d_b = tl.where(is_hi, d_hi, d_lo)
        mult = _multiplier(qv, qband, ek_all, ek_b, qbm, d_b, D, CALIBRATE)
        if WRITE_TEMPS:
            tptr = temps_out + (gm.to(tl.int64) * HQ + hm) * 2 + band
            tl.store(tptr, mult, mask=okm & (n_tiles > 0))

        # -- pass 1: online max and normaliser of each row's softmax --
        mx = tl.full((M,), float("-inf"), dtype=tl.float32)
        z = tl.zeros((M,), dtype=tl.float32)
        for t in range(0, n_tiles):
            kv, kcols = _load_k_tile(pooled_k, kb0, kvh, t * BN, ncol, stride_kb, stride_kh, stride_kd, offs_d, dmask, BN)
            s = tl.dot(qband, tl.trans(kv), input_precision=PRECISION) * mult[:, None]
            s = tl.where(kcols[None, :] <= qbm[:, None], s, float("-inf"))
            m_new = tl.maximum(mx, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.exp(mx - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            mx = m_new
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        z = tl.where(z > 0.0, z, 1.0)

        # -- passes 2..: NCAND-way bisection of the threshold's bit pattern (lo feasible, hi not) --
        thr = tl.where(is_hi, thr_hi, thr_lo)
        lo = tl.zeros((M,), dtype=tl.int32)
        hi = tl.where(okm & estimate, 0x3F800001, 1)  # bits(1.0) + 1: no probability reaches it
        while tl.max(hi - lo, axis=0) > 1:
            span = (hi - lo).to(tl.int64)
            cand = (lo.to(tl.int64)[:, None] + span[:, None] * (cand_i[None, :] + 1) // (NCAND + 1)).to(tl.int32)
            mass = tl.zeros((M, NCAND), dtype=tl.float32)
            for t in range(0, n_tiles):
                p, causal, kcols = _tile_probs(
                    qband, mult, mx, z, qbm, pooled_k, kb0, kvh, t * BN, ncol, stride_kb, stride_kh, stride_kd,
                    offs_d, dmask, BN, PRECISION,
                )
                pb = p.to(tl.int32, bitcast=True)
                above = pb[:, :, None] >= cand[:, None, :]
                mass += tl.sum(tl.where(above, p[:, :, None], 0.0), axis=1)
            # The kept mass falls as the candidate rises, so the feasible ones form a prefix.
            n_ok = tl.sum((mass >= thr[:, None]).to(tl.int32), axis=1)
            new_lo = tl.sum(tl.where(cand_i[None, :] == n_ok[:, None] - 1, cand, 0), axis=1)
            new_hi = tl.sum(tl.where(cand_i[None, :] == n_ok[:, None], cand, 0), axis=1)
            lo = tl.where(n_ok > 0, new_lo, lo)
            hi = tl.where(n_ok < NCAND, new_hi, hi)

        # -- last pass: union of both bands, sink, diagonal; ascending emission --
        base = tl.load(sel_off + gq, mask=okq, other=0).to(tl.int64) * HQ + hq.to(tl.int64) * (qbq + 1)
        count = tl.zeros((QR,), dtype=tl.int32)
        for t in range(0, tl.cdiv(ncol, BN)):
            c0 = t * BN
            if estimate:
                p, causal, kcols = _tile_probs(
                    qband, mult, mx, z, qbm, pooled_k, kb0, kvh, c0, ncol, stride_kb, stride_kh, stride_kd,
                    offs_d, dmask, BN, PRECISION,
                )
                keep = ((p.to(tl.int32, bitcast=True) >= lo[:, None]) & causal).to(tl.int32)
                sel = tl.max(tl.reshape(keep, (2, QR, BN)), axis=0) != 0
            else:
                sel = tl.full((QR, BN), 1, dtype=tl.int1)
            cols = c0 + tl.arange(0, BN)
            if KEEP_SINK:
                sel = sel | (cols[None, :] == 0)
            if KEEP_DIAG:
                sel = sel | (cols[None, :] == qbq[:, None])
            sel = sel & (cols[None, :] <= qbq[:, None])
            seli = sel.to(tl.int32)
            pos = count[:, None] + tl.cumsum(seli, axis=1) - seli
            vals = tl.zeros((QR, BN), dtype=tl.int16) + cols.to(tl.int16)[None, :]
            tl.store(sel_idx + base[:, None] + pos, vals, mask=sel)
            count += tl.sum(seli, axis=1)
        tl.store(sel_cnt + gq.to(tl.int64) * HQ + hq, count, mask=okq)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


#: fp32 elements of resident logits per program ([2 * QR, NK_PAD]); 64 registers per thread at
#: 16 warps. Rows longer than fits with one query block per program take the multi-pass path.
_RESIDENT_ELEMS = 32768
_MAX_Q_ROWS = 32  # BLOCK_G * G_PAD cap (rows of one band)


def selection_launch_config(
    num_q_heads: int, num_kv_heads: int, max_k_blocks: int, resident_max_blocks: Optional[int] = None
) -> dict:
    """Launch settings of the selection kernel for a plan's shape (host ints only).

    Returns a dict with path ("resident" or "multipass"), G_PAD, BLOCK_G, QR, NK_PAD (resident),
    BN, NCAND (multi-pass) and num_warps. ``resident_max_blocks`` caps NK_PAD of the resident path
    (tests use a small cap to exercise the multi-pass path on small shapes).
    """
    G = num_q_heads // num_kv_heads
    g_pad = triton.next_power_of_2(G)
    nk_pad = max(16, triton.next_power_of_2(max(1, max_k_blocks)))
    cap = _RESIDENT_ELEMS // (2 * max(8, g_pad)) if resident_max_blocks is None else resident_max_blocks
    if nk_pad <= cap:
        block_g = max(1, min(_MAX_Q_ROWS // g_pad, _RESIDENT_ELEMS // (2 * g_pad * nk_pad)))
        block_g = 1 << (block_g.bit_length() - 1)  # power of two
        qr = max(8, block_g * g_pad)  # 2 * QR >= 16 rows for tl.dot
        bn = min(64, nk_pad)
        warps = max(4, min(16, (2 * qr * nk_pad) // (32 * 64)))
        return dict(path="resident", G_PAD=g_pad, BLOCK_G=block_g, QR=qr, NK_PAD=nk_pad, BN=bn, num_warps=warps)
    block_g = max(1, 16 // g_pad)
    qr = max(8, block_g * g_pad)
    return dict(path="multipass", G_PAD=g_pad, BLOCK_G=block_g, QR=qr, BN=32, NCAND=16, num_warps=8)


def select_blocks(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    plan: PrefillPlan,
    band_high: torch.Tensor,
    band_low: torch.Tensor,
    high_threshold: float,
    low_threshold: float,
    calibrate: bool,
    keep_sink: bool,
    keep_diagonal: bool,
    sel_idx: torch.Tensor,
    sel_cnt: torch.Tensor,
    temps_out: Optional[torch.Tensor] = None,
    *,
    precision: str = "ieee",
    resident_max_blocks: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prism's block selection of every (query block, q head) of the launch, as BSR rows.

    Row (g, h) lists, ascending, the absolute key blocks selected for q head h in query block g
    (``reference.select_blocks`` of the request, energy calibration included):
    ``sel_idx[sel_off[g]*HQ + h*(qb_abs[g]+1) + i]`` for ``i < sel_cnt[g*HQ + h]``. Requests with
    ``plan.dense[r] == 1`` get every causal block without estimation.

    Args:
        pooled_q: [>= NQB, HQ, D] float32 pooled queries (``pool_queries``), any strides.
        pooled_k: [>= NKB, HKV, D] float32 pooled keys (``pool_keys_paged``), any strides.
        plan: the launch's PrefillPlan on the same device (plan.num_q_heads == HQ).
        band_high, band_low: [D] float32 0/1 masks of the two RoPE bands (each >= 1 dim).
        high_threshold, low_threshold: top-p mass per band in (0, 1]; 1.0 keeps every block.
        calibrate: energy calibration (False: temperature 1).
        keep_sink, keep_diagonal: always keep block 0 / the query block's own block.
        sel_idx: int16 [>= plan.sel_capacity], written (only the first sel_cnt entries per row).
        sel_cnt: int32 [>= NQB * HQ], written.
        temps_out: optional float32 [>= NQB, HQ, 2], contiguous: receives the logit multipliers
            1 / (sqrt(d_band) * t_band) (high, low) of estimated rows (not written for dense
            requests, nor at all when a threshold is 1.0, which selects every block anyway).
        precision: tl.dot precision of the fp32 scores: "ieee" (exact fp32 FMA), "tf32x3"
            (tensor cores, ~fp32 accuracy) or "tf32" (fast, ~1e-3 relative: can flip blocks
            near the top-p boundary).
        resident_max_blocks: override of the longest row kept on chip (tests).

    Returns:
        (sel_idx, sel_cnt). One kernel launch; no host sync, no allocation.
    """
    _check(pooled_q.dim() == 3, f"Invalid shape of pooled_q: expected [NQB, HQ, D], got {tuple(pooled_q.shape)}")
    _check(pooled_k.dim() == 3, f"Invalid shape of pooled_k: expected [NKB, HKV, D], got {tuple(pooled_k.shape)}")
    _, HQ, D = pooled_q.shape
    HKV = pooled_k.shape[1]
    _check(pooled_q.shape[0] >= plan.num_q_blocks, f"pooled_q has {pooled_q.shape[0]} rows, plan needs {plan.num_q_blocks}")
    _check(pooled_k.shape[0] >= plan.num_k_blocks, f"pooled_k has {pooled_k.shape[0]} rows, plan needs {plan.num_k_blocks}")
    _check(pooled_k.shape[2] == D, f"Invalid shape of pooled_k: head dim {pooled_k.shape[2]} != pooled_q's {D}")
    _check(HKV >= 1 and HQ % HKV == 0, f"HQ={HQ} q heads is not a multiple of HKV={HKV} kv heads")
    _check(plan.num_q_heads == HQ, f"plan was built for {plan.num_q_heads} q heads, pooled_q has {HQ}")
    for name, t in (("pooled_q", pooled_q), ("pooled_k", pooled_k), ("band_high", band_high), ("band_low", band_low)):
        _check(t.dtype == torch.float32, f"Invalid dtype of {name}: expected float32, got {t.dtype}")
    for name, t in (("band_high", band_high), ("band_low", band_low)):
        _check(t.dim() == 1 and t.numel() == D and t.is_contiguous(), f"Invalid {name}: expected contiguous [{D}], got {tuple(t.shape)}")
    for name, v in (("high_threshold", high_threshold), ("low_threshold", low_threshold)):
        _check(0.0 < float(v) <= 1.0, f"{name}={v!r} is out of range: a top-p mass in (0, 1]")
    _check(
        sel_idx.dtype == torch.int16 and sel_idx.dim() == 1 and sel_idx.numel() >= plan.sel_capacity,
        f"Invalid sel_idx: expected int16 [>= {plan.sel_capacity}], got {sel_idx.dtype} {tuple(sel_idx.shape)}",
    )
    _check(
        sel_cnt.dtype == torch.int32 and sel_cnt.dim() == 1 and sel_cnt.numel() >= plan.num_q_blocks * HQ,
        f"Invalid sel_cnt: expected int32 [>= {plan.num_q_blocks * HQ}], got {sel_cnt.dtype} {tuple(sel_cnt.shape)}",
    )
    if temps_out is not None:
        _check(
            temps_out.dtype == torch.float32
            and temps_out.dim() == 3
            and temps_out.shape[0] >= plan.num_q_blocks
            and tuple(temps_out.shape[1:]) == (HQ, 2)
            and temps_out.is_contiguous(),
            f"Invalid temps_out: expected contiguous float32 [>= {plan.num_q_blocks}, {HQ}, 2], got "
            f"{temps_out.dtype} {tuple(temps_out.shape)}",
        )
    _check(precision in _PRECISIONS, f"precision={precision!r} must be one of {_PRECISIONS}")
    dev = pooled_q.device
    for name, t in (("pooled_k", pooled_k), ("band_high", band_high), ("band_low", band_low), ("sel_idx", sel_idx),
                    ("sel_cnt", sel_cnt), ("plan", plan.qb_abs)):
        _check(t.device == dev, f"{name} is on {t.device}, pooled_q on {dev}")
    if plan.num_q_blocks == 0:
        return sel_idx, sel_cnt

    cfg = selection_launch_config(HQ, HKV, plan.max_k_blocks, resident_max_blocks)
    all_causal = high_threshold >= 1.0 or low_threshold >= 1.0
    common = dict(
        pooled_q=pooled_q,
        pooled_k=pooled_k,
        band_hi=band_high,
        band_lo=band_low,
        qb_req=plan.qb_req,
        qb_abs=plan.qb_abs,
        cu_kb=plan.cu_kb,
        dense=plan.dense,
        sel_off=plan.sel_off,
        sel_idx=sel_idx,
        sel_cnt=sel_cnt,
        temps_out=temps_out if temps_out is not None else sel_cnt,
        NQB=plan.num_q_blocks,
        stride_qb=pooled_q.stride(0),
        stride_qh=pooled_q.stride(1),
        stride_qd=pooled_q.stride(2),
        stride_kb=pooled_k.stride(0),
        stride_kh=pooled_k.stride(1),
        stride_kd=pooled_k.stride(2),
        thr_hi=float(high_threshold),
        thr_lo=float(low_threshold),
        HQ=HQ,
        G=HQ // HKV,
        G_PAD=cfg["G_PAD"],
        BLOCK_G=cfg["BLOCK_G"],
        QR=cfg["QR"],
        BN=cfg["BN"],
        D=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        CALIBRATE=bool(calibrate),
        KEEP_SINK=bool(keep_sink),
        KEEP_DIAG=bool(keep_diagonal),
        ALL_CAUSAL=all_causal,
        WRITE_TEMPS=temps_out is not None,
        PRECISION=precision,
        num_warps=cfg["num_warps"],
    )
    grid = (triton.cdiv(plan.num_q_blocks, cfg["BLOCK_G"]), HKV)
    if cfg["path"] == "resident":
        _select_resident_kernel[grid](NK_PAD=cfg["NK_PAD"], **common)
    else:
        _select_multipass_kernel[grid](NCAND=cfg["NCAND"], **common)
    return sel_idx, sel_cnt
