"""Prism block selection: calibrated dual-band scoring, top-p per band, union -> BSR block indices.

Steps 2-5 of Prism (``prism_vllm.reference.select_blocks``), fused: for every query block g and
q head h, with I = qb_abs[g] (its absolute block) and kv head h // G,

    t_b[g, h]   = sqrt(d_b / D) * rms(q_b)/rms(q) * rms(k_b)/rms(k)      (energy calibration)
                  rms(q*) over the pooled query block, rms(k*) over pooled key blocks 0..I
    logits_b[j] = <q_b, k_b[j]> / (sqrt(d_b) * t_b)                       j = 0..I (causal)
    p_b         = softmax(logits_b)
    keep_b      = { j : p_b[j] >= t*_b },  t*_b = max{ t : sum(p_b[p_b >= t]) >= threshold_b }
    selected    = keep_high | keep_low | {0 if keep_sink} | {I - local_blocks < j <= I if keep_diagonal}
                  (every causal block for dense requests and plan.qb_dense rows: dense tails)
    block budget b (optional): of ``selected``, keep the sink/diagonal and the blocks whose
                  max(p_high, p_low) reaches the k-th largest, k = ceil(b * (I + 1)) (>= 1)

t*_b is the reference's "probability at which the descending cumulative sum first reaches the
threshold": the mass kept above a threshold t only changes at probability values, so the
largest t whose kept mass reaches the threshold is exactly that block's probability. The kernel
finds it without sorting, by bisection over the int32 bit patterns of t (non-negative floats
order like their bit patterns): exact, at most 31 steps. The budget's cut (the k-th largest
rank value, forced blocks ranked 2.0 above any probability, unselected ones 0) is found the same
way, counting blocks instead of summing mass; blocks tied at that value (near-uniform scores,
e.g. dummy weights) are then cut by a second bisection over the column, keeping the most recent.

Nothing of size [heads x q blocks x k blocks] touches global memory: a program of
``_select_kernel`` owns BLOCK_G query blocks of one request and the G q heads of one kv head (so
each pooled key is loaded once for all of them), and keeps its rows of scores on chip, on one of
two paths (constexpr MULTIPASS; the shared steps are the @triton.jit helpers below it):

* resident path (rows of up to 2048 key blocks, 256K tokens): the whole row of both bands stays
  in registers ([2 * QR, NK_PAD]); it is the accumulator of one tl.dot per 16-wide head-dim
  chunk over all NK_PAD key blocks at once; softmax, bisection and the ascending index emission
  (tl.cumsum over the selected mask) all run on it. Rows are split by length into levels
  (NK/2, NK] with NK_PAD = NK, one launch each, so a register row is at least half causal and
  short rows get more query blocks per program (the lowest level takes every short row);
* multi-pass path (longer rows, e.g. 1M-token contexts): the same math streaming 32-block key
  tiles, recomputing the scores in each pass (online max/sum, then bisection passes that test
  NCAND thresholds at once, then emission with a running offset).

The calibration's key energies (|k|^2 over all dims and over each band, per pooled key) come
from ``pool_keys_paged(..., energy_out=...)`` when given; otherwise the kernel computes them from
the pooled keys in an extra pass. Scores use tl.dot in fp32 with tf32x3 by default (three tf32
tensor-core products, ~fp32 accuracy); "ieee" reproduces the reference's fp32 FMA arithmetic. With
``pooled_k_split`` (``pool_keys_paged(..., split_out=...)``: each pooled key as an exact sum of two
tf32 values, computed once) the resident path forms the same three products with plain tf32
dots instead of re-splitting every key in every program that reads it.

Shape legend (one launch, see kernels/plan.py):

    HQ    q heads; HKV kv heads; G = HQ // HKV; D head dim
    NQB / NKB query / key blocks over all requests; B = plan.block_size
    pooled_q: [NQB, HQ, D] float32     pooled_k: [NKB, HKV, D] float32
    band_high, band_low: [D] float32 0/1 masks (prism_vllm.rope.Bands)
    sel_idx: int16 [>= plan.sel_capacity]; row (g, h) at sel_off[g]*HQ + h*(qb_abs[g]+1)
    sel_cnt: int32 [>= NQB * HQ]; temps_out: float32 [>= NQB, HQ, 2] (optional)
    key_energy: float32 [>= NKB, HKV, 3] (optional)

Rows: row m of a program's [2 * QR, ...] tensors is band m // QR (0 high, 1 low) of q row
i = m % QR, which is query block g0 + i // G_PAD and q head kvh * G + i % G_PAD. When both bands
are one (``PrismParams.one_band``: rule 'meanpool', every head dim in both) the kernel is
launched with NB = 1: [QR, ...] rows of the one band at the larger of the two thresholds, twice the
q rows per program in the same registers (the union of the two bands' sets is that set: the same
selection, half the work).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import (
    AtLeast,
    check,
    check_gqa,
    check_params,
    check_plan,
    check_selection_buffers,
    check_tensor,
    launch,
    strides,
)
from .params import PrismParams
from .plan import PrefillPlan, sel_count_at, sel_row_start

__all__ = ["select_blocks", "selection_launches", "SelectionLaunch", "SelectionTuning", "DEFAULT_TUNING"]

_PRECISIONS = ("ieee", "tf32x3", "tf32")


# ----------------------------------------------------------------------------------------------
# helpers: rows of a program, scores, calibration
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rows(
    g0, kvh, r, NQB, qb_req, qb_abs, lvl_lo, lvl_hi, G: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr, QR: tl.constexpr, N: tl.constexpr,
):
    """For N row slots (N = QR: q rows; N = 2 * QR: q rows of both bands), slot m being q row
    i = m % QR: (g, h, active, I) with I = qb_abs[g], or I = -1 for slots that are padding,
    belong to another request than r, or whose row length I + 1 is outside this launch's
    level (lvl_lo, lvl_hi]."""
    i = tl.arange(0, N) % QR
    gi = i // G_PAD
    hh = i % G_PAD
    g = g0 + gi
    ok = (gi < BLOCK_G) & (hh < G) & (g < NQB)
    req = tl.load(qb_req + g, mask=ok, other=-1)
    ok = ok & (req == r)
    qb = tl.load(qb_abs + g, mask=ok, other=-1)
    ok = ok & (qb + 1 > lvl_lo) & (qb + 1 <= lvl_hi)
    qb = tl.where(ok, qb, -1)
    return g, kvh * G + hh, ok, qb


@triton.jit
def _band_q(q_rows, okm, is_hi, band_hi, band_lo, offs, dm, stride_qd):
    """[M, len(offs)] pooled-query chunk (head dims offs, valid where dm) of each row, times its
    row's band mask: the left operand of a band score."""
    hm = tl.load(band_hi + offs, mask=dm, other=0.0)
    lm = tl.load(band_lo + offs, mask=dm, other=0.0)
    qc = tl.load(q_rows[:, None] + offs[None, :] * stride_qd, mask=okm[:, None] & dm[None, :], other=0.0)
    return qc * tl.where(is_hi[:, None], hm[None, :], lm[None, :])


@triton.jit
def _score_tile(
    q_rows, okm, is_hi, band_hi, band_lo, pooled_k, kb0, kvh, c0, ncol, stride_qd, stride_kb, stride_kh,
    stride_kd, M: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Raw band scores [M, BN] = <q_band(row), k(col)> of key blocks c0 .. c0+BN-1 (< ncol).

    The head dim is walked in DC-wide chunks so that the dot operands held in registers stay
    small (a full-width fp32 operand would take hundreds of registers per thread and spill).
    """
    cols = c0 + tl.arange(0, BN)
    k_rows = pooled_k + (kb0 + cols).to(tl.int64) * stride_kb + kvh * stride_kh
    kmask = cols < ncol
    s = tl.zeros((M, BN), dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, DC):
        offs = d0 + tl.arange(0, DC)
        dm = offs < D
        kc = tl.load(k_rows[:, None] + offs[None, :] * stride_kd, mask=kmask[:, None] & dm[None, :], other=0.0)
        qc = _band_q(q_rows, okm, is_hi, band_hi, band_lo, offs, dm, stride_qd)
        s = tl.dot(qc, tl.trans(kc), s, input_precision=PRECISION)
    return s


@triton.jit
def _key_energy_tile(
    key_energy, pooled_k, band_hi, band_lo, kb0, kvh, c0, ncol, qbm, is_hi, stride_eb, stride_eh, stride_kb,
    stride_kh, stride_kd, BN: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr,
    HAS_KE: tl.constexpr,
):
    """Per row, the key energy of the visible blocks (c0 <= col <= I) of this tile: over all
    dims, over the row's band dims. Read from key_energy ([NKB, HKV, 3]: all, high, low; see
    pool_keys_paged) when HAS_KE, else computed from the pooled keys."""
    cols = c0 + tl.arange(0, BN)
    kmask = cols < ncol
    if HAS_KE:
        e_ptr = key_energy + (kb0 + cols).to(tl.int64) * stride_eb + kvh * stride_eh
        e_all = tl.load(e_ptr, mask=kmask, other=0.0)
        e_hi = tl.load(e_ptr + 1, mask=kmask, other=0.0)
        e_lo = tl.load(e_ptr + 2, mask=kmask, other=0.0)
    else:
        k_rows = pooled_k + (kb0 + cols).to(tl.int64) * stride_kb + kvh * stride_kh
        e_all = tl.zeros((BN,), dtype=tl.float32)
        e_hi = tl.zeros((BN,), dtype=tl.float32)
        e_lo = tl.zeros((BN,), dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, DC):
            offs = d0 + tl.arange(0, DC)
            dm = offs < D
            hm = tl.load(band_hi + offs, mask=dm, other=0.0)
            lm = tl.load(band_lo + offs, mask=dm, other=0.0)
            kc = tl.load(k_rows[:, None] + offs[None, :] * stride_kd, mask=kmask[:, None] & dm[None, :], other=0.0)
            k2 = kc * kc
            e_all += tl.sum(k2, axis=1)
            e_hi += tl.sum(k2 * hm[None, :], axis=1)
            e_lo += tl.sum(k2 * lm[None, :], axis=1)
    vis = cols[None, :] <= qbm[:, None]
    ea = tl.sum(tl.where(vis, e_all[None, :], 0.0), axis=1)
    eb = tl.sum(tl.where(vis, tl.where(is_hi[:, None], e_hi[None, :], e_lo[None, :]), 0.0), axis=1)
    return ea, eb


@triton.jit
def _multiplier(q_e_all, q_e_band, ek_all, ek_b, qb, d_b, D: tl.constexpr, CALIBRATE: tl.constexpr):
    """Logit multiplier 1 / (sqrt(d_b) * t_b) per row (t_b = 1 without calibration), from the
    row's pooled-query energies (all dims, band dims) and key energies over blocks 0..I."""
    if CALIBRATE:
        eps = 1e-6  # the reference's clamp on rms values and temperatures
        nblk = tl.maximum(qb + 1, 1).to(tl.float32)  # padding rows (qb = -1): no 0/0
        rq = tl.maximum(tl.sqrt(q_e_all / D), eps)
        rq_b = tl.sqrt(q_e_band / d_b)
        rk = tl.maximum(tl.sqrt(ek_all / (nblk * D)), eps)
        rk_b = tl.sqrt(ek_b / (nblk * d_b))
        t = tl.maximum(tl.sqrt(d_b / D) * (rq_b / rq) * (rk_b / rk), eps)
        mult = 1.0 / (tl.sqrt(d_b) * t)
    else:
        mult = 1.0 / tl.sqrt(d_b)
    return mult


@triton.jit
def _row_setup(
    g0, kvh, r, NQB, qb_req, qb_abs, lvl_lo, lvl_hi, pooled_q, band_hi, band_lo, stride_qb, stride_qh,
    stride_qd, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_G: tl.constexpr, QR: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, NB: tl.constexpr,
):
    """The program's [M = NB * QR] rows for request r: (row pointers into pooled_q, active, I,
    is_high_band, band size, query energy over all dims, over the row's band dims). NB = 1 (one
    band, ``PrismParams.one_band``): every row is a high-band row."""
    M: tl.constexpr = NB * QR
    gm, hm, okm, qbm = _rows(g0, kvh, r, NQB, qb_req, qb_abs, lvl_lo, lvl_hi, G, G_PAD, BLOCK_G, QR, M)
    is_hi = tl.arange(0, M) < QR
    q_rows = pooled_q + gm.to(tl.int64) * stride_qb + hm * stride_qh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    hi_m = tl.load(band_hi + offs_d, mask=dmask, other=0.0)
    lo_m = tl.load(band_lo + offs_d, mask=dmask, other=0.0)
    d_b = tl.where(is_hi, tl.sum(hi_m, axis=0), tl.sum(lo_m, axis=0))  # band sizes: no host read
    qv = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=okm[:, None] & dmask[None, :], other=0.0)
    q2 = qv * qv
    q_e_all = tl.sum(q2, axis=1)
    q_e_band = tl.sum(q2 * tl.where(is_hi[:, None], hi_m[None, :], lo_m[None, :]), axis=1)
    return gm, hm, okm, qbm, q_rows, is_hi, d_b, q_e_all, q_e_band


@triton.jit
def _calibrated_multiplier(
    temps_out, key_energy, pooled_k, band_hi, band_lo, kb0, kvh, n_cols, qbm, gm, hm, okm, is_hi, d_b, q_e_all,
    q_e_band, live, stride_eb, stride_eh, stride_kb, stride_kh, stride_kd, HQ: tl.constexpr, M: tl.constexpr,
    TILE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr, CALIBRATE: tl.constexpr,
    HAS_KE: tl.constexpr, WRITE_TEMPS: tl.constexpr, NB: tl.constexpr,
):
    """Logit multiplier of every row (energy calibration over key blocks 0..I, read in TILE-wide
    tiles of the first n_cols columns), written to temps_out[g, h, band] for the live rows (one
    band: to both entries, the values the two identical bands would have)."""
    ek_all = tl.zeros((M,), dtype=tl.float32)
    ek_b = tl.zeros((M,), dtype=tl.float32)
    if CALIBRATE:
        for c0 in range(0, n_cols, TILE):
            ea, eb = _key_energy_tile(
                key_energy, pooled_k, band_hi, band_lo, kb0, kvh, c0, n_cols, qbm, is_hi, stride_eb, stride_eh,
                stride_kb, stride_kh, stride_kd, TILE, D, BLOCK_D, DC, HAS_KE,
            )
            ek_all += ea
            ek_b += eb
    mult = _multiplier(q_e_all, q_e_band, ek_all, ek_b, qbm, d_b, D, CALIBRATE)
    if WRITE_TEMPS:
        tptr = temps_out + (gm.to(tl.int64) * HQ + hm) * 2 + tl.where(is_hi, 0, 1)
        tl.store(tptr, mult, mask=okm & live)
        if NB == 1:
            tl.store(tptr + 1, mult, mask=okm & live)
    return mult


# ----------------------------------------------------------------------------------------------
# helpers: top-p, union, budget, emission
# ----------------------------------------------------------------------------------------------
@triton.jit
def _feasible_floor(thr, qb):
    """Bits of a threshold known to be feasible (kept mass >= thr), to start the bisection
    above 0: the blocks below t weigh less than n * t in all, so t = (1 - thr) / (2n) keeps at
    least 1 - (1 - thr) / 2 = thr + (1 - thr) / 2 (n = I + 1 blocks). For thr <= 0.998 that
    margin, >= 1e-3, is at least twice the float32 error of a sum of n <= 8192 masses
    (n * 2^-24 <= 4.9e-4: contexts up to 1M tokens), so t is feasible; above 0.998 the
    bisection starts from 0. Saves ~3 of ~30 bisection steps (the 'quality' preset runs 0.998)."""
    n = tl.maximum(qb + 1, 1).to(tl.float32)
    t = tl.where(thr <= 0.998, (1.0 - thr) / (2.0 * n), 0.0)
    return t.to(tl.int32, bitcast=True)


@triton.jit
def _kept(pb, t, p, USE_ASM: tl.constexpr):
    """p where bits(p) >= t, else 0. On the GPU as one setp + selp per element: left to LLVM, the
    select over a large register tensor is packed into bit masks and costs twice as much (the
    bisection below runs it ~30 times over every resident element)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm="{ .reg .pred q; setp.ge.s32 q, $1, $2; selp.f32 $0, $3, 0f00000000, q; }",
            constraints="=r,r,r,r",
            args=[pb, t, p],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        return tl.where(pb >= t, p, 0.0)


@triton.jit
def _halve(lo, hi, mid, ok):
    """One bisection step per row over [lo, hi), lo feasible and hi not: mid was tested (ok: feasible)."""
    return tl.where(ok, mid, lo), tl.where(ok, hi, mid)


@triton.jit
def _bisect(pb, p, lo, hi, thr, stop, M: tl.constexpr, N: tl.constexpr, USE_ASM: tl.constexpr):
    """Top-p bisection of resident rows over probability bit patterns ``pb`` [M, N] until every
    row's bracket [lo, hi) (lo feasible: kept mass >= thr; hi not) is at most ``stop`` wide."""
    while tl.max(hi - lo, axis=0) > stop:
        mid = lo + (hi - lo) // 2
        mass = tl.sum(_kept(pb, tl.broadcast_to(mid[:, None], (M, N)), p, USE_ASM), axis=1)
        lo, hi = _halve(lo, hi, mid, mass >= thr)
    return lo, hi


@triton.jit
def _snap(pb, p, lo, hi, thr, M: tl.constexpr, N: tl.constexpr, USE_ASM: tl.constexpr):
    """The exactness step after a search stopped early, per row: [lo, hi) with lo feasible (kept
    mass >= thr) and hi not. x, the smallest probability in [lo, hi), keeps what lo keeps (none
    lies between them), so x is feasible; if x + 1 is not, x is the exact threshold t*: [x, x + 1).
    Else x + 1 is feasible: [x + 1, hi), for the bisection to finish. Rows whose bracket is one
    value wide already hold t* and are left alone."""
    x = tl.min(tl.where((pb >= lo[:, None]) & (pb < hi[:, None]), pb, 0x7FFFFFFF), axis=1)
    todo = ((hi - lo) > 1) & (x < hi)
    t = tl.where(todo, x + 1, hi)
    fin = tl.sum(_kept(pb, tl.broadcast_to(t[:, None], (M, N)), p, USE_ASM), axis=1) < thr
    return tl.where(todo, tl.where(fin, x, x + 1), lo), tl.where(todo & fin, x + 1, hi)


@triton.jit
def _candidates(lo, hi, cand_i, NCAND: tl.constexpr):
    """[rows, NCAND] rising values cutting each row's [lo, hi) into NCAND + 1 parts (int64 spans:
    bit-pattern brackets exceed 2^31 / NCAND)."""
    span = (hi - lo).to(tl.int64)
    return (lo.to(tl.int64)[:, None] + span[:, None] * (cand_i[None, :] + 1) // (NCAND + 1)).to(tl.int32)


@triton.jit
def _narrow(lo, hi, cand, ok, cand_i, NCAND: tl.constexpr):
    """NCAND bisection steps at once: [lo, hi) after testing the candidates (ok [rows, NCAND]:
    feasible). What is tested falls as the candidate rises, so the feasible ones form a prefix."""
    n_ok = tl.sum(ok.to(tl.int32), axis=1)
    new_lo = tl.sum(tl.where(cand_i[None, :] == n_ok[:, None] - 1, cand, 0), axis=1)
    new_hi = tl.sum(tl.where(cand_i[None, :] == n_ok[:, None], cand, 0), axis=1)
    return tl.where(n_ok > 0, new_lo, lo), tl.where(n_ok < NCAND, new_hi, hi)


@triton.jit
def _forced(cols, qbq, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, LOCAL: tl.constexpr):
    """[QR, N] blocks kept whatever the scores: the sink (column 0) and the diagonal (I), with
    the LOCAL - 1 blocks before it (I - LOCAL < column <= I)."""
    f = (cols[None, :] < 0) & (qbq[:, None] >= -1)
    if KEEP_SINK:
        f = f | (cols[None, :] == 0)
    if KEEP_DIAG:
        f = f | ((cols[None, :] <= qbq[:, None]) & (cols[None, :] > qbq[:, None] - LOCAL))
    return f


@triton.jit
def _union(p, lo, cols, qbq, QR: tl.constexpr, N: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr,
           NB: tl.constexpr, LOCAL: tl.constexpr):
    """([QR, N] int32 selected, [QR, N] forced): the blocks either band's top-p keeps (bits(p) >=
    the row's threshold bits lo; rows m and m + QR of p are the two bands of one q row; NB = 1:
    the one band's) and the forced ones. Blocks past the diagonal (p = 0, kept only when lo = 0)
    are the caller's to cut."""
    keep = (p.to(tl.int32, bitcast=True) >= lo[:, None]).to(tl.int32)
    forced = _forced(cols, qbq, KEEP_SINK, KEEP_DIAG, LOCAL)
    if NB == 2:
        keep = tl.max(tl.reshape(keep, (2, QR, N)), axis=0)
    return tl.where(forced, 1, keep), forced


@triton.jit
def _budget_rank_bits(p, sel, forced, causal, QR: tl.constexpr, N: tl.constexpr, NB: tl.constexpr):
    """Bit patterns [QR, N] of the budget's rank values: 2.0 for forced blocks, max(p_high,
    p_low) for the union's other blocks, 0 for unselected causal blocks, -1.0 (a negative int)
    past the diagonal. p: [NB * QR, N] probabilities of the bands (rows m and m + QR)."""
    if NB == 2:
        score = tl.max(tl.reshape(p, (2, QR, N)), axis=0)
    else:
        score = p
    rank = tl.where(forced, 2.0, tl.where(sel != 0, score, 0.0))
    return tl.where(causal, rank, -1.0).to(tl.int32, bitcast=True)


@triton.jit
def _budget_k(budget, qbq, live):
    """Blocks a row may keep, ceil(budget * (I + 1)) in fp32 (>= 1), and the bisection's
    starting bracket [lo, hi): lo = 0 is feasible (every causal block counts), hi = bits(2.0) + 1
    is not; rows that are not live get [0, 1) (nothing to search, everything kept)."""
    k = tl.maximum(tl.ceil(budget * (qbq + 1).to(tl.float32)), 1.0).to(tl.int32)
    lo = tl.zeros_like(qbq)
    hi = tl.where(live, 0x40000001, 1)
    return k, lo, hi


@triton.jit
def _budget_keep(rb, blo, clo, cols):
    """[QR, N] the budget's kept blocks: rank above the cut value, or equal to it at a column
    >= clo (ties go to the most recent blocks)."""
    return (rb > blo[:, None]) | ((rb == blo[:, None]) & (cols[None, :] >= clo[:, None]))


@triton.jit
def _emit(sel_idx, base, count, sel, cols, QR: tl.constexpr, N: tl.constexpr):
    """BSR emission of a [QR, N] tile of selected columns: ascending block ids at row offsets
    base + count + exclusive prefix sum. Returns count + the tile's selected blocks."""
    pos = count[:, None] + tl.cumsum(sel, axis=1) - sel
    vals = tl.zeros((QR, N), dtype=tl.int16) + cols.to(tl.int16)[None, :]
    tl.store(sel_idx + base[:, None] + pos, vals, mask=sel != 0)
    return count + tl.sum(sel, axis=1)


# ----------------------------------------------------------------------------------------------
# multi-pass helpers: the same values recomputed tile by tile
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_probs(
    q_rows, okm, is_hi, qbm, band_hi, band_lo, pooled_k, kb0, kvh, c0, ncol, stride_qd, stride_kb, stride_kh,
    stride_kd, mult, mx, rz, M: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    DC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Probabilities [M, BN] of key blocks c0.. (0 past each row's diagonal); the same code, so
    the same values, in every pass."""
    s = _score_tile(
        q_rows, okm, is_hi, band_hi, band_lo, pooled_k, kb0, kvh, c0, ncol, stride_qd, stride_kb, stride_kh,
        stride_kd, M, BN, D, BLOCK_D, DC, PRECISION,
    )
    s = s * mult[:, None]
    causal = (c0 + tl.arange(0, BN))[None, :] <= qbm[:, None]
    return tl.where(causal, tl.exp(s - mx[:, None]), 0.0) * rz[:, None]


@triton.jit
def _tile_rank(
    q_rows, okm, is_hi, qbm, qbq, lo, band_hi, band_lo, pooled_k, kb0, kvh, c0, ncol, stride_qd, stride_kb,
    stride_kh, stride_kd, mult, mx, rz, QR: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    DC: tl.constexpr, PRECISION: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, NB: tl.constexpr,
    LOCAL: tl.constexpr,
):
    """Of key blocks c0 .. c0+BN-1, per q row: (union of the bands' top-p with the forced
    blocks [QR, BN] int32, forced [QR, BN], the budget's rank bits [QR, BN])."""
    M: tl.constexpr = NB * QR
    cols = c0 + tl.arange(0, BN)
    p = _tile_probs(
        q_rows, okm, is_hi, qbm, band_hi, band_lo, pooled_k, kb0, kvh, c0, ncol, stride_qd, stride_kb, stride_kh,
        stride_kd, mult, mx, rz, M, BN, D, BLOCK_D, DC, PRECISION,
    )
    sel, forced = _union(p, lo, cols, qbq, QR, BN, KEEP_SINK, KEEP_DIAG, NB, LOCAL)
    rb = _budget_rank_bits(p, sel, forced, cols[None, :] <= qbq[:, None], QR, BN, NB)
    return sel, forced, rb


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
# NQB unspecialised: one binary whatever a step's query-block count (Triton would otherwise compile
# a variant per NQB == 1 / NQB % 16 == 0 / other, the ones the startup warm-up missed mid-serving)
@triton.jit(do_not_specialize=["NQB"])
def _select_kernel(
    pooled_q,
    pooled_k,
    pooled_k_split,
    band_hi,
    band_lo,
    qb_req,
    qb_abs,
    cu_kb,
    dense,
    qb_dense,
    sel_off,
    sel_idx,
    sel_cnt,
    temps_out,
    key_energy,
    NQB,
    lvl_lo,
    lvl_hi,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_sb,
    stride_sh,
    stride_sp,
    stride_eb,
    stride_eh,
    thr_hi,
    thr_lo,
    budget,
    HQ: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    QR: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DC: tl.constexpr,
    CALIBRATE: tl.constexpr,
    HAS_KE: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
    WRITE_TEMPS: tl.constexpr,
    PRECISION: tl.constexpr,
    TOPP_STOP: tl.constexpr,
    SNAP: tl.constexpr,
    BUDGET: tl.constexpr,
    EB: tl.constexpr,
    MULTIPASS: tl.constexpr,
    NK_PAD: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    BN: tl.constexpr,
    NCAND: tl.constexpr,
    ALL_CAUSAL: tl.constexpr,
    NB: tl.constexpr,
    LOCAL: tl.constexpr,
):
    """Rows of length I + 1 in (lvl_lo, lvl_hi] of BLOCK_G query blocks x the G q heads of kv head
    program_id(1); key energies read in EB-block tiles. Two paths (constexpr MULTIPASS, see the
    module docstring), the same math:

    * resident (NK_PAD >= lvl_hi, SPLIT_K, USE_ASM): everything on chip, one row per [M, NK_PAD]
      register row, scores from one tl.dot per DC-wide head-dim chunk;
    * multi-pass (BN, NCAND; ALL_CAUSAL: every causal block, nothing scored): BN-block key tiles,
      scores recomputed in every pass.

    NB: bands scored, 2, or 1 when both are one (``PrismParams.one_band``: the same rows twice).
    """
    M: tl.constexpr = NB * QR
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    g0 = pid * BLOCK_G
    r_first = tl.load(qb_req + g0)
    r_last = tl.load(qb_req + tl.minimum(g0 + BLOCK_G, NQB) - 1)

    # A group of query blocks may straddle requests; each request's rows are done in turn
    # (one iteration unless the group holds a request boundary). Groups without a row of this
    # launch's level do nothing.
    for r in range(r_first, r_last + 1):
        gq, hq, okq, qbq = _rows(g0, kvh, r, NQB, qb_req, qb_abs, lvl_lo, lvl_hi, G, G_PAD, BLOCK_G, QR, QR)
        if tl.max(qbq, axis=0) >= 0:
            gm, hm, okm, qbm, q_rows, is_hi, d_b, q_e_all, q_e_band = _row_setup(
                g0, kvh, r, NQB, qb_req, qb_abs, lvl_lo, lvl_hi, pooled_q, band_hi, band_lo, stride_qb, stride_qh,
                stride_qd, G, G_PAD, BLOCK_G, QR, D, BLOCK_D, NB,
            )
            ncol = tl.max(qbm, axis=0) + 1  # key blocks visible to any row of the group
            kb0 = tl.load(cu_kb + r)
            # dense requests (and ALL_CAUSAL launches): every causal block, nothing scored or loaded
            estimate = tl.load(dense + r) == 0
            if ALL_CAUSAL:
                estimate = estimate & False
            n_est = tl.where(estimate, ncol, 0)  # key blocks to score
            mult = _calibrated_multiplier(
                temps_out, key_energy, pooled_k, band_hi, band_lo, kb0, kvh, n_est, qbm, gm, hm, okm, is_hi, d_b,
                q_e_all, q_e_band, estimate, stride_eb, stride_eh, stride_kb, stride_kh, stride_kd, HQ, M,
                EB, D, BLOCK_D, DC, CALIBRATE, HAS_KE, WRITE_TEMPS, NB,
            )
            thr = tl.where(is_hi, thr_hi, thr_lo)
            row_dense = (tl.load(qb_dense + gq, mask=okq, other=0) != 0) | (not estimate)
            budget_live = okq & ~row_dense
            base = sel_row_start(tl.load(sel_off + gq, mask=okq, other=0), hq, qbq, HQ)
            count = tl.zeros((QR,), dtype=tl.int32)
            if MULTIPASS:
                cand_i = tl.arange(0, NCAND)
                n_tiles = tl.cdiv(n_est, BN)

                # -- pass 1: online max and normaliser of each row's softmax --
                mx = tl.full((M,), float("-inf"), dtype=tl.float32)
                z = tl.zeros((M,), dtype=tl.float32)
                for t in range(0, n_tiles):
                    s = _score_tile(
                        q_rows, okm, is_hi, band_hi, band_lo, pooled_k, kb0, kvh, t * BN, ncol, stride_qd,
                        stride_kb, stride_kh, stride_kd, M, BN, D, BLOCK_D, DC, PRECISION,
                    )
                    s = s * mult[:, None]
                    s = tl.where((t * BN + tl.arange(0, BN))[None, :] <= qbm[:, None], s, float("-inf"))
                    m_new = tl.maximum(mx, tl.max(s, axis=1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    z = z * tl.exp(mx - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
                    mx = m_new
                mx = tl.where(mx == float("-inf"), 0.0, mx)
                rz = 1.0 / tl.where(z > 0.0, z, 1.0)

                # -- passes 2..: the top-p threshold's bits, NCAND at a time (lo feasible, hi not) --
                live = okm & estimate & (thr < 1.0)  # top-p 1.0 keeps every block: no search
                lo = tl.where(live, _feasible_floor(thr, qbm), 0)
                hi = tl.where(live, 0x3F800001, 1)  # bits(1.0) + 1: no probability reaches it
                while tl.max(hi - lo, axis=0) > TOPP_STOP:
                    cand = _candidates(lo, hi, cand_i, NCAND)
                    mass = tl.zeros((M, NCAND), dtype=tl.float32)
                    for t in range(0, n_tiles):
                        p = _tile_probs(
                            q_rows, okm, is_hi, qbm, band_hi, band_lo, pooled_k, kb0, kvh, t * BN, ncol, stride_qd,
                            stride_kb, stride_kh, stride_kd, mult, mx, rz, M, BN, D, BLOCK_D, DC, PRECISION,
                        )
                        pb = p.to(tl.int32, bitcast=True)
                        mass += tl.sum(tl.where(pb[:, :, None] >= cand[:, None, :], p[:, :, None], 0.0), axis=1)
                    lo, hi = _narrow(lo, hi, cand, mass >= thr[:, None], cand_i, NCAND)

                # -- block budget: the k-th largest rank value's bits, then the column cut among ties --
                k, blo, bhi = _budget_k(budget, qbq, budget_live)
                clo = tl.zeros_like(blo)
                chi = tl.where(budget_live, ncol + 1, 1)
                if BUDGET:
                    while tl.max(bhi - blo, axis=0) > 1:
                        cand = _candidates(blo, bhi, cand_i, NCAND)
                        cnt = tl.zeros((QR, NCAND), dtype=tl.int32)
                        for t in range(0, n_tiles):
                            _, _, rb = _tile_rank(
                                q_rows, okm, is_hi, qbm, qbq, lo, band_hi, band_lo, pooled_k, kb0, kvh, t * BN,
                                ncol, stride_qd, stride_kb, stride_kh, stride_kd, mult, mx, rz, QR, BN, D, BLOCK_D,
                                DC, PRECISION, KEEP_SINK, KEEP_DIAG, NB, LOCAL,
                            )
                            cnt += tl.sum((rb[:, :, None] >= cand[:, None, :]).to(tl.int32), axis=1)
                        blo, bhi = _narrow(blo, bhi, cand, cnt >= k[:, None], cand_i, NCAND)
                    n_gt = tl.zeros_like(blo)
                    for t in range(0, n_tiles):
                        _, _, rb = _tile_rank(
                            q_rows, okm, is_hi, qbm, qbq, lo, band_hi, band_lo, pooled_k, kb0, kvh, t * BN, ncol,
                            stride_qd, stride_kb, stride_kh, stride_kd, mult, mx, rz, QR, BN, D, BLOCK_D, DC,
                            PRECISION, KEEP_SINK, KEEP_DIAG, NB, LOCAL,
                        )
                        n_gt += tl.sum((rb > blo[:, None]).to(tl.int32), axis=1)
                    need = k - n_gt
                    while tl.max(chi - clo, axis=0) > 1:
                        cand = _candidates(clo, chi, cand_i, NCAND)
                        cnt = tl.zeros((QR, NCAND), dtype=tl.int32)
                        for t in range(0, n_tiles):
                            cols = t * BN + tl.arange(0, BN)
                            _, _, rb = _tile_rank(
                                q_rows, okm, is_hi, qbm, qbq, lo, band_hi, band_lo, pooled_k, kb0, kvh, t * BN,
                                ncol, stride_qd, stride_kb, stride_kh, stride_kd, mult, mx, rz, QR, BN, D, BLOCK_D,
                                DC, PRECISION, KEEP_SINK, KEEP_DIAG, NB, LOCAL,
                            )
                            eq = (rb == blo[:, None])[:, :, None] & (cols[None, :, None] >= cand[:, None, :])
                            cnt += tl.sum(eq.to(tl.int32), axis=1)
                        clo, chi = _narrow(clo, chi, cand, cnt >= need[:, None], cand_i, NCAND)

                # -- last pass: union of both bands, sink, diagonal, budget; ascending emission --
                for t in range(0, tl.cdiv(ncol, BN)):
                    cols = t * BN + tl.arange(0, BN)
                    if estimate:
                        sel, forced, rb = _tile_rank(
                            q_rows, okm, is_hi, qbm, qbq, lo, band_hi, band_lo, pooled_k, kb0, kvh, t * BN, ncol,
                            stride_qd, stride_kb, stride_kh, stride_kd, mult, mx, rz, QR, BN, D, BLOCK_D, DC,
                            PRECISION, KEEP_SINK, KEEP_DIAG, NB, LOCAL,
                        )
                        if BUDGET:
                            sel = tl.where(_budget_keep(rb, blo, clo, cols) | forced, sel, 0)
                        sel = tl.where(row_dense[:, None], 1, sel)
                    else:
                        sel = tl.full((QR, BN), 1, dtype=tl.int32)
                    sel = tl.where(cols[None, :] <= qbq[:, None], sel, 0)
                    count = _emit(sel_idx, base, count, sel, cols, QR, BN)
            else:
                cols = tl.arange(0, NK_PAD)
                k_rows = pooled_k + (kb0 + cols).to(tl.int64) * stride_kb + kvh * stride_kh
                kmask = cols < n_est

                # -- scores of the whole row at once: the accumulator IS the resident row --
                raw = tl.zeros((M, NK_PAD), dtype=tl.float32)
                if SPLIT_K:
                    # Keys pre-split into tf32 pairs (pool_keys_paged split_out): per head-dim chunk and
                    # part, q_hi.k_part (+ q_lo.k_hi for the high part) in plain tf32 -- tf32x3 without
                    # re-splitting the keys in every program. One part per iteration keeps the shared
                    # memory per pipeline stage at [NK_PAD, DC].
                    s_rows = pooled_k_split + (kb0 + cols).to(tl.int64) * stride_sb + kvh * stride_sh
                    for v in range(0, 2 * BLOCK_D // DC):
                        offs = (v // 2) * DC + tl.arange(0, DC)
                        part = v % 2
                        dm = offs < D
                        kc = tl.load(s_rows[:, None] + part * stride_sp + offs[None, :],
                                     mask=kmask[:, None] & dm[None, :], other=0.0)
                        qc = _band_q(q_rows, okm, is_hi, band_hi, band_lo, offs, dm, stride_qd)
                        q_hi = (qc.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                        q_lo = tl.where(part == 0, qc - q_hi, 0.0)
                        raw = tl.dot(q_lo, tl.trans(kc), raw, input_precision="tf32")
                        raw = tl.dot(q_hi, tl.trans(kc), raw, input_precision="tf32")
                else:
                    for d0 in range(0, BLOCK_D, DC):
                        offs = d0 + tl.arange(0, DC)
                        dm = offs < D
                        kc = tl.load(k_rows[:, None] + offs[None, :] * stride_kd, mask=kmask[:, None] & dm[None, :],
                                     other=0.0)
                        qc = _band_q(q_rows, okm, is_hi, band_hi, band_lo, offs, dm, stride_qd)
                        raw = tl.dot(qc, tl.trans(kc), raw, input_precision=PRECISION)

                # -- softmax per row over its causal blocks (probability 0 elsewhere) --
                logits = tl.where(cols[None, :] <= qbm[:, None], raw * mult[:, None], float("-inf"))
                mx = tl.max(logits, axis=1)
                mx = tl.where(mx == float("-inf"), 0.0, mx)
                e = tl.exp(logits - mx[:, None])
                z = tl.sum(e, axis=1)
                p = e * (1.0 / tl.where(z > 0.0, z, 1.0))[:, None]

                # -- top-p threshold by bisection over float bit patterns: lo feasible, hi not --
                pb = p.to(tl.int32, bitcast=True)
                lo = _feasible_floor(thr, qbm)
                hi = tl.maximum(tl.max(pb, axis=1) + 1, lo + 1)
                hi = tl.where(thr >= 1.0, lo + 1, hi)  # top-p 1.0 keeps every block: no search
                lo, hi = _bisect(pb, p, lo, hi, thr, TOPP_STOP, M, NK_PAD, USE_ASM)
                if SNAP:  # coarse search, then exact: one snap, and bisection only where it did not settle
                    lo, hi = _snap(pb, p, lo, hi, thr, M, NK_PAD, USE_ASM)
                    lo, hi = _bisect(pb, p, lo, hi, thr, 1, M, NK_PAD, USE_ASM)
                sel, forced = _union(p, lo, cols, qbq, QR, NK_PAD, KEEP_SINK, KEEP_DIAG, NB, LOCAL)
                sel = tl.where(row_dense[:, None], 1, sel)
                causal = cols[None, :] <= qbq[:, None]
                if BUDGET:
                    # -- block budget: the k-th largest rank value, then the column cut among ties --
                    rb = _budget_rank_bits(p, sel, forced, causal, QR, NK_PAD, NB)
                    k, blo, bhi = _budget_k(budget, qbq, budget_live)
                    while tl.max(bhi - blo, axis=0) > 1:
                        mid = blo + (bhi - blo) // 2
                        blo, bhi = _halve(blo, bhi, mid, tl.sum((rb >= mid[:, None]).to(tl.int32), axis=1) >= k)
                    need = k - tl.sum((rb > blo[:, None]).to(tl.int32), axis=1)
                    eq = rb == blo[:, None]
                    clo = tl.zeros_like(blo)
                    chi = tl.where(budget_live, NK_PAD + 1, 1)
                    while tl.max(chi - clo, axis=0) > 1:
                        mid = clo + (chi - clo) // 2
                        ok = tl.sum((eq & (cols[None, :] >= mid[:, None])).to(tl.int32), axis=1) >= need
                        clo, chi = _halve(clo, chi, mid, ok)
                    sel = tl.where(_budget_keep(rb, blo, clo, cols) | forced, sel, 0)
                count = _emit(sel_idx, base, count, tl.where(causal, sel, 0), cols, QR, NK_PAD)
            tl.store(sel_cnt + sel_count_at(gq, hq, HQ), count, mask=okq)


_DC = 16  # head-dim chunk of one tl.dot: small fp32 operands in registers / shared memory
_MIN_LEVEL = 16


@dataclass(frozen=True)
class SelectionTuning:
    """Launch knobs of the selection kernels (what ``benchmarks/estimation_sweep.py`` sweeps).

    Measured on an H200 (2026-12-02, Triton 3.6; ``benchmarks/results/estimation-sweep-h200.json``,
    ``ncu-select-h200.txt``): no knob beats the defaults at 128K. The level-0 program there
    ([16, 1024] resident fp32 at 8 warps) compiles to 255 registers plus 344 bytes of stack per
    thread (spills; 228 registers even at NK_PAD = 256, so the resident row is not the only
    consumer), runs one block per SM and is latency bound; its rows span all 8 warps in the
    tl.dot accumulator's layout, so every search pass is a cross-warp reduction. Two search
    variants measured there (three thresholds per pass: 1.98 ms; a pass count fixed up front:
    1.82 ms; default 1.83 ms at 128K) did not pay and were removed.

    The shipped one-band selection, Llama-3.1-8B layer at 128K on an H200 (2026-12-03,
    ``benchmarks/results/selection-tunings-h200.json``, commit ed8bbc8): estimation (pool q, pool
    k, select) 1.07 / 1.11 / 1.21 ms with the former defaults (an exact 23-bit search, the levels'
    query blocks per program as the register budget allows) on inputs selecting 1% / 36% / 100% of
    the blocks; 0.95 / 0.97 / 1.07 ms with a 12-bit search finished exactly and min_programs 264
    (the 23-bit search's selection up to a few blocks per input, the net count within one: the
    other tl.dot shape's rounding flips knife-edge blocks, as other precisions do); at 32K 0.30 ->
    0.21 ms."""

    resident_elems: int = 16384
    """fp32 elements of resident scores per program ([bands * QR, NK_PAD]); more query blocks per
    program share each key load, but past ~64 per thread ptxas spills."""
    elems_per_thread: int = 64
    """Resident elements per thread that pick num_warps (4..16)."""
    resident_max_blocks: int = 2048
    """Longest row kept on chip (its [NK_PAD, 16] fp32 key chunk is a tl.dot operand in shared
    memory); longer rows, and rows that do not fit one query block per program in twice
    resident_elems, take the multi-pass path."""
    max_q_rows: int = 32
    """Cap of a program's q rows in two-band terms: bands * QR <= 2 * max_q_rows (QR up to 32
    with two bands, 64 with one)."""
    levels: int = 4
    """Resident launches: rows are split by length into (NK/2, NK], ... so that a register row
    is at least half causal; the lowest level takes all shorter rows."""
    multipass_warps: int = 8
    topp_mantissa_bits: int = 12
    """Resolution of the top-p threshold search: 23 bisects to the float bit; fewer bits stop the
    bisection once [lo, hi) is narrower than 2^-bits relative (12 bits: ~11 fewer of ~27 steps).
    What happens then is ``topp_exact``'s (by default the exact threshold all the same)."""
    topp_exact: bool = True
    """After a search stopped early (topp_mantissa_bits < 23), find the exact threshold anyway:
    resident rows snap to the smallest probability in the bracket and test once whether the next
    bit pattern still keeps the mass (nearly always settled: a bracket of 2^-12 relative rarely
    holds two probabilities); a program with a row not settled bisects on to the bit (all its rows
    pay those passes); multi-pass rows search to the bit. The selection is the exact one whatever
    the bits. False: keep every block with p >= the coarse bracket's low end, i.e. also blocks
    within 2^-bits relative below t* (a superset)."""
    min_programs: int = 264
    """Resident levels that would run fewer programs than this (counted for one request from
    position 0: NK/2 query blocks at level (NK/2, NK], NK at the lowest, times the kv heads) get
    fewer query blocks per program, halved while that is so (not below one tl.dot's 16 rows), so
    that short levels spread over more SMs (264: two per SM of an H200). 0: off."""


DEFAULT_TUNING = SelectionTuning()


@dataclass(frozen=True)
class SelectionLaunch:
    """One launch of a selection: the kernel (``path``), the rows it serves and its settings."""

    path: str
    """"resident" or "multipass": _select_kernel's path (MULTIPASS)."""
    lvl_lo: int
    lvl_hi: int
    """Rows of length I + 1 in (lvl_lo, lvl_hi] are this launch's."""
    block_g: int
    """Query blocks per program."""
    qr: int
    """q rows of one band per program (block_g * G padded, >= 16 // bands so that the program's
    bands * QR rows are >= 16 for tl.dot)."""
    num_warps: int
    num_stages: int
    bands: int = 2
    """Bands scored per q row: 2, or 1 when both bands are one (``PrismParams.one_band``)."""
    nk_pad: int = 0
    """Resident: key blocks held per register row."""
    eb: int = 0
    """Key blocks per tile of the calibration's key-energy pass."""
    bn: int = 0
    """Multi-pass: key blocks per streamed tile."""
    ncand: int = 0
    """Multi-pass: thresholds tested per pass."""
    all_causal: bool = False
    """Multi-pass: every row selects every causal block (nothing scored)."""


def _resident_launch(t: SelectionTuning, g_pad: int, nk_pad: int, lvl_lo: int, lvl_hi: int,
                     nb: int, num_kv_heads: int) -> SelectionLaunch:
    # a program holds nb * QR register rows: one band doubles the q rows in the same registers
    block_g = max(1, min(2 * t.max_q_rows // (nb * g_pad), t.resident_elems // (nb * g_pad * nk_pad)))
    # QR is at least 16 // nb rows (tl.dot): fill them with query blocks rather than padding (the
    # same registers, fewer programs; long rows, where the budget allows less than that)
    min_g = max(1, (16 // nb) // g_pad)
    block_g = max(block_g, min_g)
    block_g = 1 << (block_g.bit_length() - 1)  # power of two
    level_q_blocks = nk_pad if lvl_lo == 0 else nk_pad - lvl_lo  # one request from position 0
    while block_g > min_g and -(-level_q_blocks // block_g) * num_kv_heads < t.min_programs:
        block_g //= 2
    qr = max(16 // nb, block_g * g_pad)  # nb * QR >= 16 rows for tl.dot
    elems = nb * qr * nk_pad
    warps = max(4, min(16, elems // (32 * t.elems_per_thread)))
    stages = 2 if nk_pad * _DC * 4 * 2 <= 160 * 1024 else 1
    return SelectionLaunch(path="resident", lvl_lo=lvl_lo, lvl_hi=lvl_hi, block_g=block_g, qr=qr, nk_pad=nk_pad,
                           eb=min(64, nk_pad), num_warps=warps, num_stages=stages, bands=nb)


def selection_launches(
    num_q_heads: int,
    num_kv_heads: int,
    max_k_blocks: int,
    all_blocks: bool = False,
    resident_max_blocks: Optional[int] = None,
    tuning: Optional[SelectionTuning] = None,
    one_band: bool = False,
) -> list[SelectionLaunch]:
    """The launches of one selection for a plan's shape (host ints only): every row belongs to
    exactly one. ``resident_max_blocks`` lowers the longest resident row (tests use it to
    exercise the multi-pass path on small shapes); ``one_band``: ``PrismParams.one_band`` (one
    band scored, twice the q rows per program)."""
    t = DEFAULT_TUNING if tuning is None else tuning
    nb = 1 if one_band else 2
    G = num_q_heads // num_kv_heads
    g_pad = triton.next_power_of_2(G)
    nk_top = max(_MIN_LEVEL, triton.next_power_of_2(max(1, max_k_blocks)))
    cap = min(t.resident_max_blocks, resident_max_blocks or t.resident_max_blocks)
    # One query block per program must fit, in up to twice the budget (at 16 warps).
    cap = min(cap, 2 * t.resident_elems // (nb * max(16 // nb, g_pad)))
    mp_block_g = max(1, 32 // (nb * g_pad))
    multipass = SelectionLaunch(path="multipass", lvl_lo=0, lvl_hi=2**31 - 1, block_g=mp_block_g,
                                qr=max(16 // nb, mp_block_g * g_pad), eb=32, bn=32, ncand=8, all_causal=all_blocks,
                                num_warps=t.multipass_warps, num_stages=2, bands=nb)
    if all_blocks:  # nothing to score: the multi-pass kernel's tiled emission serves any length
        return [multipass]
    launches = []
    nk = nk_top
    if nk > cap:
        launches.append(dataclasses.replace(multipass, lvl_lo=cap))
        nk = cap
    lowest = max(_MIN_LEVEL, nk >> (t.levels - 1))
    while nk >= lowest and nk >= _MIN_LEVEL:
        launches.append(_resident_launch(t, g_pad, nk, nk // 2 if nk > lowest else 0, nk, nb, num_kv_heads))
        nk //= 2
    return launches


def select_blocks(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    plan: PrefillPlan,
    params: PrismParams,
    sel_idx: torch.Tensor,
    sel_cnt: torch.Tensor,
    temps_out: Optional[torch.Tensor] = None,
    *,
    key_energy: Optional[torch.Tensor] = None,
    pooled_k_split: Optional[torch.Tensor] = None,
    precision: str = "tf32x3",
    resident_max_blocks: Optional[int] = None,
    tuning: Optional[SelectionTuning] = None,
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
        params: the layer's PrismParams (validated when built): band masks, top-p thresholds,
            calibration, sink / diagonal, block budget.
        sel_idx: int16 [>= plan.sel_capacity], written (only the first sel_cnt entries per row).
        sel_cnt: int32 [>= NQB * HQ], written.
        temps_out: optional float32 [>= NQB, HQ, 2], contiguous: receives the logit multipliers
            1 / (sqrt(d_band) * t_band) (high, low) of estimated rows (not written for dense
            requests, nor at all when a threshold is 1.0, which selects every block anyway).
        key_energy: optional float32 [>= NKB, HKV, 3] per-block key energies (all dims, high
            band, low band) from ``pool_keys_paged(..., energy_out=...)`` with the same params;
            without it the kernels recompute them from pooled_k (one more pass over the keys).
        pooled_k_split: optional float32 [>= NKB, HKV, 2, D] tf32 (hi, lo) parts of pooled_k from
            ``pool_keys_paged(..., split_out=...)``; with precision "tf32x3" the resident path then
            scores with plain tf32 products of pre-split keys (same accuracy, fewer instructions).
        precision: tl.dot precision of the fp32 scores: "tf32x3" (default: tensor cores, three
            tf32 products per fp32 product, ~fp32 accuracy), "ieee" (fp32 FMA on CUDA cores, the
            reference's arithmetic, several times slower) or "tf32" (fastest, ~1e-3 relative:
            flips blocks near the top-p boundary). The CPU interpreter computes all three in fp32.
        resident_max_blocks: override of the longest row kept on chip (tests).
        tuning: launch knobs (default DEFAULT_TUNING; see SelectionTuning).

    Returns:
        (sel_idx, sel_cnt). A few kernel launches (one per row-length level, see
        ``selection_launches``); no host sync, no allocation.
    """
    check_tensor("pooled_q", pooled_q, shape=(AtLeast(plan.num_q_blocks), "HQ", "D"), dtype=torch.float32)
    _, HQ, D = pooled_q.shape
    dev = pooled_q.device
    check_tensor("pooled_k", pooled_k, shape=(AtLeast(plan.num_k_blocks), "HKV", D), dtype=torch.float32, device=dev)
    HKV = pooled_k.shape[1]
    check_gqa(HQ, HKV)
    check_plan(plan, dev, num_q_heads=HQ, rows_of="pooled_q")
    check_params(params, D, dev, head_dim_of="pooled_q")
    check_selection_buffers(sel_idx, sel_cnt, plan, dev)
    nqb, nkb = AtLeast(plan.num_q_blocks), AtLeast(plan.num_k_blocks)
    if temps_out is not None:
        check_tensor("temps_out", temps_out, shape=(nqb, HQ, 2), dtype=torch.float32, device=dev, contiguous=True)
    if key_energy is not None:
        check_tensor("key_energy", key_energy, shape=(nkb, HKV, 3), dtype=torch.float32, device=dev,
                     last_stride_1=True)
    if pooled_k_split is not None:
        check_tensor("pooled_k_split", pooled_k_split, shape=(nkb, HKV, 2, D), dtype=torch.float32, device=dev,
                     last_stride_1=True)
    check(precision in _PRECISIONS, f"precision={precision!r} must be one of {_PRECISIONS}")
    if plan.num_q_blocks == 0:
        return sel_idx, sel_cnt

    p = params
    common = dict(
        pooled_q=pooled_q,
        pooled_k=pooled_k,
        band_hi=p.band_high,
        band_lo=p.band_low,
        **plan.tensors("qb_req", "qb_abs", "cu_kb", "dense", "qb_dense", "sel_off"),
        sel_idx=sel_idx,
        sel_cnt=sel_cnt,
        temps_out=temps_out if temps_out is not None else pooled_q,
        key_energy=key_energy if key_energy is not None else pooled_k,
        NQB=plan.num_q_blocks,
        **strides(pooled_q, "qb", "qh", "qd"),
        **strides(pooled_k, "kb", "kh", "kd"),
        **strides(key_energy, "eb", "eh"),
        # float: an int 1 would compile as a constexpr. One band: the union of two top-p sets over
        # the same probabilities is the set at the larger threshold.
        thr_hi=float(max(p.high_threshold, p.low_threshold) if p.one_band else p.high_threshold),
        thr_lo=float(p.low_threshold),
        budget=float(p.block_budget) if p.block_budget is not None else 1.0,
        BUDGET=p.block_budget is not None,
        HQ=HQ,
        G=HQ // HKV,
        G_PAD=triton.next_power_of_2(HQ // HKV),
        D=D,
        BLOCK_D=max(_DC, triton.next_power_of_2(D)),
        DC=_DC,
        CALIBRATE=bool(p.calibrate),
        HAS_KE=key_energy is not None,
        KEEP_SINK=bool(p.keep_sink),
        KEEP_DIAG=bool(p.keep_diagonal),
        LOCAL=int(p.local_blocks),
        WRITE_TEMPS=temps_out is not None,
        PRECISION=precision,
    )
    tun = tuning or DEFAULT_TUNING
    stop = 1 << (23 - min(23, max(1, tun.topp_mantissa_bits)))  # bit patterns: 2^-bits relative
    # PTX inline assembly: NVIDIA GPUs only (not the interpreter, not ROCm).
    use_asm = pooled_q.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
    split_k = pooled_k_split is not None and precision == "tf32x3"
    # A threshold of 1.0 keeps every causal block: nothing to score, unless a budget ranks them.
    for ln in selection_launches(HQ, HKV, plan.max_k_blocks, p.all_blocks, resident_max_blocks, tuning,
                                 one_band=p.one_band):
        resident = ln.path == "resident"
        launch(
            _select_kernel,
            (triton.cdiv(plan.num_q_blocks, ln.block_g), HKV),
            **common,
            pooled_k_split=pooled_k_split if split_k else pooled_k,
            **strides(pooled_k_split if split_k else None, "sb", "sh", "sp"),
            lvl_lo=ln.lvl_lo,
            lvl_hi=ln.lvl_hi,
            BLOCK_G=ln.block_g,
            QR=ln.qr,
            EB=ln.eb,
            MULTIPASS=not resident,
            NK_PAD=ln.nk_pad,
            SPLIT_K=split_k and resident,
            USE_ASM=use_asm and resident,
            BN=ln.bn,
            NCAND=ln.ncand,
            ALL_CAUSAL=ln.all_causal,
            # exact: the resident path snaps after its coarse search, the multi-pass one searches to the bit
            TOPP_STOP=stop if resident or not tun.topp_exact else 1,
            SNAP=resident and tun.topp_exact and stop > 1,
            NB=ln.bands,
            num_warps=ln.num_warps,
            num_stages=ln.num_stages,
        )
    return sel_idx, sel_cnt
