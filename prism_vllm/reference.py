"""Prism in plain PyTorch: the readable specification every kernel is tested against.

One request at a time, no paging, float32 math. Notation (one prefill chunk of a request):

    ctx   tokens already in the KV cache before this chunk (absolute position of its first row)
    L     query rows in this chunk (positions ctx .. ctx+L-1)
    S     ctx + L, keys visible to the chunk (positions 0 .. S-1)
    B     Prism block size (128); block j covers absolute positions [jB, jB+B)
    qb0   ctx // B, absolute index of the chunk's first (possibly partial) query block
    nq    query blocks of the chunk: (ctx+L-1)//B - qb0 + 1
    nk    key blocks: ceil(S / B)
    q: [L, HQ, D]   k, v: [S, HKV, D]   G = HQ // HKV (GQA group; q head h reads kv head h // G)

The algorithm (paper arXiv 2602.08426, DESIGN.md):

1. Mean-pool queries and keys per absolute block over the tokens that exist (a chunk that
   starts mid-block pools only its own rows of that block; the last block may be partial).
2. Energy calibration per (q head, query block i): for band b in {high, low},
   t_b = sqrt(d_b/D) * (rms(q_b)/rms(q)) * (rms(k_b)/rms(k)), the query ratio over the pooled
   query block i, the key ratio over the pooled key blocks that exist causally for it
   (0 .. qb0+i, kv head h // G), rms over blocks and the band's dims. Scoping the statistics
   causally (instead of over the whole chunk, as the official code does for one-shot prefill)
   makes the selection of a query block independent of how the scheduler cut the prompt at
   block boundaries (chunked prefill, prefix-cache hits).
3. Per band, logits[i, j] = <q_b[i], k_b[j]> / (sqrt(d_b) * t_b), causal over blocks
   (key block j <= absolute query block qb0+i), softmax over j.
4. Top-p per band: keep every block whose probability is >= t*, where t* is the probability
   at which the descending cumulative sum first reaches the band's threshold (ties at t* are
   all kept; a threshold of 1.0 keeps every causal block).
5. Union of both bands, plus the sink block 0 and the diagonal block (if configured).
   With a block budget b, a row with n = I + 1 causal blocks keeps at most
   k = ceil(b * n) (float32 arithmetic, >= 1) of them: the forced blocks (sink, diagonal) and
   the union's blocks with the highest max(p_high, p_low), equal values ordered by block index
   (the most recent first).
   With dense_tail, a chunk whose last query block is partial ((ctx + L) % B != 0) selects
   every causal block for that block.
6. Exact softmax(scale * q k^T) v over the keys of the selected blocks, causal per token.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .config import PrismConfig
from .rope import Bands

__all__ = [
    "num_blocks",
    "pool_blocks",
    "band_temperatures",
    "band_logits",
    "top_p_threshold",
    "top_p_mask",
    "budget_counts",
    "cap_to_budget",
    "select_blocks",
    "finish_selection",
    "block_sparse_attention",
    "dense_causal_attention",
    "prism_attention",
    "prism_attention_batch",
    "paged_varlen_attention",
]

_EPS = 1e-6


def num_blocks(ctx: int, L: int, block: int) -> tuple[int, int, int]:
    """(qb0, nq, nk) for a chunk of L >= 1 rows after ctx cached tokens."""
    if L < 1 or ctx < 0:
        raise ValueError(f"need L >= 1 and ctx >= 0, got L={L}, ctx={ctx}")
    qb0 = ctx // block
    nq = (ctx + L - 1) // block - qb0 + 1
    nk = -(-(ctx + L) // block)
    return qb0, nq, nk


def pool_blocks(x: torch.Tensor, start: int, block: int) -> torch.Tensor:
    """Mean of x's rows per absolute block.

    Args:
        x: [N, H, D], row t at absolute position start + t.
    Returns:
        [nb, H, D] float32, block (start // block) + i in row i, averaged over its rows in x.
    """
    n = x.shape[0]
    pos = torch.arange(start, start + n, device=x.device)
    blk = pos // block - start // block
    nb = int(blk[-1]) + 1
    out = torch.zeros((nb,) + tuple(x.shape[1:]), dtype=torch.float32, device=x.device)
    out.index_add_(0, blk, x.float())
    cnt = torch.bincount(blk, minlength=nb).to(torch.float32)
    return out / cnt.view(-1, *([1] * (x.dim() - 1)))


def band_temperatures(
    qp: torch.Tensor, kp: torch.Tensor, qb0: int, bands: Bands, calibrate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query block, q head) temperatures (t_high, t_low), each [nq, HQ] float32.

    qp: [nq, HQ, D] pooled queries of absolute blocks qb0.., kp: [nk, HKV, D] pooled keys.
    """
    nq, hq, d = qp.shape
    if not calibrate:
        one = torch.ones(nq, hq, dtype=torch.float32, device=qp.device)
        return one, one.clone()
    g = hq // kp.shape[1]
    last = qb0 + torch.arange(nq, device=qp.device)  # last causal key block of each row
    # Causal prefix sums of key energy per kv head: [nk, HKV] -> rows 0..I inclusive.
    def k_mean_sq(m: torch.Tensor) -> torch.Tensor:
        e = kp[..., m].pow(2).sum(-1).cumsum(0)[last]  # [nq, HKV]
        return (e / ((last + 1).unsqueeze(1) * int(m.sum()))).repeat_interleave(g, dim=1)

    def q_mean_sq(m: torch.Tensor) -> torch.Tensor:
        return qp[..., m].pow(2).mean(-1)  # [nq, HQ]

    alld = torch.ones(d, dtype=torch.bool, device=qp.device)
    rq = q_mean_sq(alld).sqrt().clamp_min(_EPS)
    rk = k_mean_sq(alld).sqrt().clamp_min(_EPS)
    temps = []
    for m in (bands.high.to(qp.device), bands.low.to(qp.device)):
        db = int(m.sum())
        t = math.sqrt(db / d) * (q_mean_sq(m).sqrt() / rq) * (k_mean_sq(m).sqrt() / rk)
        temps.append(t.clamp_min(_EPS))
    return temps[0], temps[1]


def band_logits(
    qp: torch.Tensor, kp: torch.Tensor, mask: torch.Tensor, temp: torch.Tensor, qb0: int
) -> torch.Tensor:
    """[HQ, nq, nk] float32 logits of one band, -inf above the block diagonal.

    temp: [nq, HQ] temperatures of the band (see band_temperatures)."""
    hq, nq, nk = qp.shape[1], qp.shape[0], kp.shape[0]
    g = hq // kp.shape[1]
    m = mask.to(qp.device)
    qb = qp[..., m].permute(1, 0, 2)  # [HQ, nq, db]
    kb = kp[..., m].repeat_interleave(g, dim=1).permute(1, 0, 2)  # [HQ, nk, db]
    logits = qb @ kb.transpose(1, 2) / (math.sqrt(int(m.sum())) * temp.t().unsqueeze(-1))
    causal = torch.arange(nk, device=qp.device)[None, :] <= (qb0 + torch.arange(nq, device=qp.device))[:, None]
    return logits.masked_fill(~causal, float("-inf"))


def top_p_threshold(probs: torch.Tensor, p: float) -> torch.Tensor:
    """[...]: the probability t* of the block at which the descending cumulative mass of
    ``probs`` ([..., n], rows summing to 1) first reaches p; 0 when p >= 1."""
    if p >= 1.0:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    srt = torch.sort(probs, dim=-1, descending=True).values
    csum = srt.cumsum(-1)
    k = (csum < p).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
    return srt.gather(-1, k).squeeze(-1)


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Bool [..., n]: the smallest set of largest probabilities whose mass reaches p (ties
    at the boundary all kept; p >= 1 keeps every entry with probability > 0 or finite logit)."""
    t = top_p_threshold(probs, p)
    return probs >= t.unsqueeze(-1)


def budget_counts(n_causal: torch.Tensor, budget: float) -> torch.Tensor:
    """Blocks a row with ``n_causal`` causal key blocks may keep under ``budget``:
    ceil(budget * n) computed in float32 (as the kernels do), at least 1. Int64 like n_causal."""
    b = torch.tensor(budget, dtype=torch.float32)
    return torch.ceil(b * n_causal.to(torch.float32)).to(torch.int64).clamp_min(1)


def cap_to_budget(
    sel: torch.Tensor, forced: torch.Tensor, score: torch.Tensor, causal: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Keep, per row of ``sel`` ([..., n] bool), the forced blocks and the selected blocks among
    the k first in rank order: forced blocks first (rank 2.0), then the others by ``score``
    (unselected causal blocks rank 0, blocks past the diagonal -1); equal ranks are ordered by
    block index, the most recent (highest) first, so a row keeps at most max(k, forced) blocks
    even when scores tie (near-uniform attention, dummy weights).

    forced, causal: bool like sel; score: float32 in [0, 1] like sel; k: [...] int64 (>= 1)."""
    rank = torch.where(forced, torch.full_like(score, 2.0), torch.where(sel, score, torch.zeros_like(score)))
    rank = torch.where(causal, rank, torch.full_like(score, -1.0))
    n = rank.shape[-1]
    rev = torch.arange(n - 1, -1, -1, device=rank.device)
    # Stable descending sort of the column-reversed row: ties come out highest column first.
    order = rev[torch.sort(rank[..., rev], dim=-1, descending=True, stable=True).indices]
    first_k = torch.arange(n, device=rank.device) < k.unsqueeze(-1)
    keep = torch.zeros_like(sel).scatter_(-1, order, first_k)
    return forced | (sel & keep)


def select_blocks(
    qp: torch.Tensor,
    kp: torch.Tensor,
    qb0: int,
    bands: Bands,
    cfg: PrismConfig,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """Selected key blocks, bool [HQ, nq, nk] (False above the diagonal).

    seq_len: ctx + L of the chunk, for cfg.dense_tail (None: no dense tail)."""
    nq, nk = qp.shape[0], kp.shape[0]
    t_hi, t_lo = band_temperatures(qp, kp, qb0, bands, cfg.calibrated)
    rows = qb0 + torch.arange(nq, device=qp.device)
    causal = torch.arange(nk, device=qp.device)[None, :] <= rows[:, None]
    sel = torch.zeros((qp.shape[1], nq, nk), dtype=torch.bool, device=qp.device)
    score = torch.zeros(sel.shape, dtype=torch.float32, device=qp.device)
    for m, t, p in ((bands.high, t_hi, cfg.high_threshold), (bands.low, t_lo, cfg.low_threshold)):
        probs = torch.softmax(band_logits(qp, kp, m, t, qb0), dim=-1)
        sel |= top_p_mask(probs, p) if p < 1.0 else causal.expand_as(sel)
        score = torch.maximum(score, probs)
    return finish_selection(sel, score, qb0, cfg, seq_len)


def finish_selection(
    sel: torch.Tensor, score: torch.Tensor, qb0: int, cfg: PrismConfig, seq_len: Optional[int] = None
) -> torch.Tensor:
    """Steps 5's common end of any scoring rule: add the sink and diagonal blocks (and the
    ``local_blocks`` - 1 blocks before the diagonal), cap to the
    block budget (ranking by ``score``), give a partial last block every causal block
    (dense tail). sel: bool [HQ, nq, nk] of the rule's top-p blocks; score: float32 like sel."""
    nq, nk = sel.shape[1], sel.shape[2]
    rows = qb0 + torch.arange(nq, device=sel.device)
    causal = torch.arange(nk, device=sel.device)[None, :] <= rows[:, None]
    forced = torch.zeros_like(sel)
    if cfg.keep_sink:
        forced[:, :, 0] = True
    if cfg.keep_diagonal:  # the diagonal and the local_blocks - 1 blocks before it
        forced |= torch.arange(nk, device=sel.device)[None, :] > rows[:, None] - cfg.local_blocks
    forced &= causal
    sel = (sel | forced) & causal
    if cfg.block_budget is not None:
        k = budget_counts(rows + 1, cfg.block_budget).expand(sel.shape[:-1])
        sel = cap_to_budget(sel, forced, score, causal.expand_as(sel), k)
    if cfg.dense_tail and seq_len is not None and seq_len % cfg.block_size:
        sel[:, -1] = causal[-1]
    return sel


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: int,
    block_mask: torch.Tensor,
    block: int,
    scale: float,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact attention of q over the keys of the selected blocks, causal per token (``softcap``
    > 0: scores become softcap * tanh(s / softcap), as FlashAttention's soft-capping;
    ``sinks``: learned attention sinks, see ``softmax_with_sinks``).

    q: [L, HQ, D] at positions ctx..ctx+L-1; k, v: [S, HKV, D], S = ctx + L;
    block_mask: bool [HQ, nq, nk] over absolute query blocks qb0.. and key blocks 0..nk-1.
    Returns [L, HQ, D] in q's dtype (math in float32).
    """
    L, hq, _ = q.shape
    S, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    qpos = torch.arange(ctx, ctx + L, device=q.device)
    kpos = torch.arange(S, device=q.device)
    qi = qpos // block - ctx // block  # row's query block (relative)
    kj = kpos // block
    allowed = block_mask[:, qi][:, :, kj] & (kpos[None, :] <= qpos[:, None])  # [HQ, L, S]
    qf = q.float().permute(1, 0, 2)
    kf = k.float().repeat_interleave(g, dim=1).permute(1, 0, 2)
    vf = v.float().repeat_interleave(g, dim=1).permute(1, 0, 2)
    s = (qf @ kf.transpose(1, 2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    out = softmax_with_sinks(s, sinks) @ vf
    return out.permute(1, 0, 2).to(q.dtype)


def softmax_with_sinks(s: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim of scores s [H, ..., N] (already scaled and soft-capped; -inf
    where masked). ``sinks`` [H] (learned attention sinks, gpt-oss style, FA3's ``s_aux``): head
    h's softmax has one more logit sinks[h] in its normaliser, attached to no value, so a row's
    probabilities sum to less than one: p_j = exp(s_j) / (exp(sinks[h]) + sum_k exp(s_k)) (a
    row that sees no key: zeros with sinks, NaN without, as torch.softmax)."""
    if sinks is None:
        return torch.softmax(s, dim=-1)
    sink = sinks.float().view(-1, *([1] * (s.dim() - 1))).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    """Dense causal attention through torch's SDPA (an independent check of the above).

    q: [L, HQ, D] at positions ctx..; k, v: [ctx+L, HKV, D]. Returns [L, HQ, D].
    """
    L, hq, _ = q.shape
    S = k.shape[0]
    g = hq // k.shape[1]
    mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=ctx)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k.float().repeat_interleave(g, dim=1).transpose(0, 1),
        v.float().repeat_interleave(g, dim=1).transpose(0, 1),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1).to(q.dtype)


def prism_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: int,
    bands: Bands,
    cfg: PrismConfig,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole algorithm for one chunk. Returns (out [L, HQ, D], block_mask [HQ, nq, nk])."""
    L, hq, d = q.shape
    if k.shape[0] != ctx + L:
        raise ValueError(f"k has {k.shape[0]} rows, expected ctx + L = {ctx + L}")
    if hq % k.shape[1]:
        raise ValueError(f"HQ={hq} is not a multiple of HKV={k.shape[1]}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    B = cfg.block_size
    qp = pool_blocks(q, ctx, B)
    kp = pool_blocks(k, 0, B)
    mask = select_blocks(qp, kp, ctx // B, bands, cfg, seq_len=ctx + L)
    return block_sparse_attention(q, k, v, ctx, mask, B, scale), mask


def prism_attention_batch(
    q: torch.Tensor,
    cu_seqlens_q: Sequence[int],
    ctx_lens: Sequence[int],
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    bands: Bands,
    cfg: PrismConfig,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Several requests: q rows cu_seqlens_q[r]:cu_seqlens_q[r+1] belong to request r, whose keys/values are
    ks[r], vs[r] ([ctx_lens[r] + L_r, HKV, D]). Returns (out like q, per-request masks)."""
    out = torch.empty_like(q)
    masks = []
    for r in range(len(ctx_lens)):
        a, b = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
        o, m = prism_attention(q[a:b], ks[r], vs[r], int(ctx_lens[r]), bands, cfg, scale)
        out[a:b] = o
        masks.append(m)
    return out, masks


def paged_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    max_seqlen_q: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_k: int,
    seqused_k: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    out: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    **unused: object,
) -> torch.Tensor:
    """FlashAttention's paged varlen forward (``flash_attn_varlen_func`` with ``seqused_k`` and
    ``block_table``) in plain PyTorch, written from its documented semantics; float32 math.

    Sequence b: queries q[cu_seqlens_q[b] : cu_seqlens_q[b+1]] (Lq rows), keys 0 .. n-1 with
    n = seqused_k[b], key j read from page ``block_table[b, j // PS]``, slot ``j % PS`` of
    k / v ([num_pages, PS, HKV, D], any strides). Causal masks are aligned to the bottom right:
    query i sees key j iff j <= i + n - Lq; a row that sees no key is written as zeros. q head h
    reads kv head h // (HQ // HKV). ``softcap`` > 0: scores become softcap * tanh(s / softcap).
    ``*_descale`` ([batch, HKV] float32, fp8 inputs): q, k, v of sequence b, kv head j are
    multiplied by their [b, j] entry. ``s_aux`` ([HQ] of the call): one learned sink logit per q
    head in the softmax's normaliser (``softmax_with_sinks``). Writes into ``out`` when given and
    returns it.
    """
    hq, d = q.shape[1], q.shape[2]
    page, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q) if out is None else out
    cu = cu_seqlens_q.tolist()
    used = seqused_k.tolist()
    for b in range(len(used)):
        a, e = cu[b], cu[b + 1]
        lq, n = e - a, used[b]
        if lq <= 0:
            continue
        assert lq <= max_seqlen_q and n <= max_seqlen_k, (lq, max_seqlen_q, n, max_seqlen_k)
        pos = torch.arange(n, device=q.device)
        pages = block_table[b, pos // page].long()

        def scaled(x: torch.Tensor, ds: Optional[torch.Tensor]) -> torch.Tensor:  # x: [N, H, D]
            x = x.float()
            if ds is None:
                return x
            return x * ds[b].float().repeat_interleave(x.shape[1] // ds.shape[1])[None, :, None]

        kk = scaled(k[pages, pos % page], k_descale).repeat_interleave(g, dim=1).transpose(0, 1)  # [HQ, n, D]
        vv = scaled(v[pages, pos % page], v_descale).repeat_interleave(g, dim=1).transpose(0, 1)
        qq = scaled(q[a:e], q_descale)
        s = (qq.transpose(0, 1) @ kk.transpose(1, 2)) * scale  # [HQ, Lq, n]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            seen = pos[None, :] <= torch.arange(lq, device=q.device)[:, None] + (n - lq)
            s = s.masked_fill(~seen, float("-inf"))
        p = softmax_with_sinks(s, s_aux).nan_to_num(0.0)  # rows that see nothing: zeros
        out[a:e] = (p @ vv).transpose(0, 1).to(out.dtype)
    return out
