"""Host-side plan of one Prism launch (the plan/run split: host work once, kernels only read).

A launch covers R prefill chunks ("requests") whose query rows are contiguous in ``q``.
Everything a kernel needs to map a program id to its request, block and output slot is
computed here on the CPU from the scheduler's CPU tensors, then copied to the device once
per step (non-blocking). No kernel or launcher reads anything back to the host.

Block bookkeeping (B = block size, see prism_vllm.reference for the math):

    request r: rows cu_seqlens_q[r] .. cu_seqlens_q[r+1]-1 of q at absolute positions ctx_lens[r] ..
    query blocks of r: absolute qb0_r .. qb0_r + nq_r - 1, flattened over requests -> g in [0, NQB)
    key blocks of r:   0 .. nk_r - 1,                        flattened           -> kb in [0, NKB)
    selection row (g, h): BSR row of q head h in query block g, with capacity qb_abs[g] + 1
        (the causal maximum); its indices live at
        sel_idx[sel_off[g]*HQ + h*(qb_abs[g]+1) : ... + sel_cnt[g*HQ + h]], ascending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from .params import BLOCK_SIZE

__all__ = ["PrefillPlan", "make_plan", "BlockSelection", "sel_row_start", "sel_count_at"]

IntSeq = Union[Sequence[int], torch.Tensor]


@dataclass
class PrefillPlan:
    """Metadata of one launch. Device tensors are int32; sizes are host ints."""

    block_size: int
    num_reqs: int
    num_tokens: int
    """Query rows covered (cu_seqlens_q[-1])."""
    num_q_blocks: int
    """NQB: query blocks over all requests."""
    num_k_blocks: int
    """NKB: key blocks over all requests."""
    max_k_blocks: int
    """max_r nk_r: longest selection row."""
    sel_capacity: int
    """Length of sel_idx needed: HQ * sum_g (qb_abs[g] + 1)."""
    num_q_heads: int

    cu_seqlens_q: torch.Tensor  # [R+1] query row offsets
    ctx_lens: torch.Tensor  # [R] tokens cached before the chunk
    seqused_k: torch.Tensor  # [R] ctx + chunk length
    dense: torch.Tensor  # [R] 1: select every causal block for this request (no estimation)
    qb_dense: torch.Tensor  # [NQB] 1: this query block selects every causal block (dense tail)
    cu_qb: torch.Tensor  # [R+1] query-block offsets
    cu_kb: torch.Tensor  # [R+1] key-block offsets
    qb_req: torch.Tensor  # [NQB] request of each query block
    qb_abs: torch.Tensor  # [NQB] absolute index of each query block
    sel_off: torch.Tensor  # [NQB+1] cumulative (qb_abs + 1)
    kb_req: torch.Tensor  # [NKB] request of each key block

    def to(self, device: Union[str, torch.device], non_blocking: bool = True) -> "PrefillPlan":
        kw = {}
        for k, v in self.__dict__.items():
            if isinstance(v, torch.Tensor):
                if torch.device(device).type == "cuda" and v.device.type == "cpu" and non_blocking:
                    v = v.pin_memory()
                v = v.to(device, non_blocking=non_blocking)
            kw[k] = v
        return PrefillPlan(**kw)

    def tensors(self, *names: str) -> dict[str, torch.Tensor]:
        """The named device arrays as keyword arguments of a kernel: kernels name their plan
        parameters as the plan does (one vocabulary from plan to kernel)."""
        return {n: getattr(self, n) for n in names}


def make_plan(
    cu_seqlens_q: IntSeq,
    ctx_lens: IntSeq,
    num_q_heads: int,
    block_size: int = BLOCK_SIZE,
    dense: Optional[IntSeq] = None,
    dense_tail: bool = False,
) -> PrefillPlan:
    """Build a plan on the CPU.

    Args:
        cu_seqlens_q: [R+1] query row offsets of the chunks (cu_seqlens_q[0] is usually 0).
        ctx_lens: [R] tokens already in the KV cache before each chunk.
        num_q_heads: HQ.
        block_size: Prism block size B.
        dense: [R] optional flags; 1 makes a request attend to every causal block.
        dense_tail: a chunk's last query block attends to every causal block when it is
            partial (the chunk ends mid-block; PrismConfig.dense_tail).
    """
    cu_seqlens_q = torch.as_tensor(cu_seqlens_q, dtype=torch.int64).cpu()
    ctx = torch.as_tensor(ctx_lens, dtype=torch.int64).cpu()
    R = ctx.numel()
    if cu_seqlens_q.numel() != R + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries, expected num_reqs + 1 = {R + 1}")
    qlen = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if R and (qlen < 1).any():
        raise ValueError(f"every chunk needs >= 1 query row, got lengths {qlen.tolist()}")
    if (ctx < 0).any():
        raise ValueError(f"ctx_lens must be >= 0, got {ctx.tolist()}")
    B = block_size
    seq = ctx + qlen
    qb0 = ctx // B
    nq = (seq - 1) // B - qb0 + 1
    nk = (seq + B - 1) // B
    zero = torch.zeros(1, dtype=torch.int64)
    cu_qb = torch.cat([zero, nq.cumsum(0)])
    cu_kb = torch.cat([zero, nk.cumsum(0)])
    NQB, NKB = int(cu_qb[-1]), int(cu_kb[-1])
    qb_req = torch.repeat_interleave(torch.arange(R), nq)
    qb_abs = torch.arange(NQB) - cu_qb[qb_req] + qb0[qb_req]
    sel_off = torch.cat([zero, (qb_abs + 1).cumsum(0)])
    kb_req = torch.repeat_interleave(torch.arange(R), nk)
    if (int(nk.max()) if R else 0) > 32767:
        raise ValueError(
            f"a sequence of {int(seq.max())} tokens has more than 32767 Prism blocks; block indices "
            f"are int16, so Prism supports up to {32767 * B} tokens per sequence"
        )
    dense_t = torch.zeros(R, dtype=torch.int64) if dense is None else torch.as_tensor(dense, dtype=torch.int64).cpu()
    qb_dense = torch.zeros(NQB, dtype=torch.int64)
    if dense_tail and R:
        partial = (seq % B) != 0
        qb_dense[(cu_qb[1:] - 1)[partial]] = 1
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return PrefillPlan(
        block_size=B,
        num_reqs=R,
        num_tokens=int(cu_seqlens_q[-1]),
        num_q_blocks=NQB,
        num_k_blocks=NKB,
        max_k_blocks=(int(nk.max()) if R else 0),
        sel_capacity=int(sel_off[-1]) * num_q_heads,
        num_q_heads=num_q_heads,
        cu_seqlens_q=i32(cu_seqlens_q),
        ctx_lens=i32(ctx),
        seqused_k=i32(seq),
        dense=i32(dense_t),
        qb_dense=i32(qb_dense),
        cu_qb=i32(cu_qb),
        cu_kb=i32(cu_kb),
        qb_req=i32(qb_req),
        qb_abs=i32(qb_abs),
        sel_off=i32(sel_off),
        kb_req=i32(kb_req),
    )


@dataclass
class BlockSelection:
    """Which key blocks each (query block, q head) of a launch attends: the one contract between
    estimation (``prism_estimate`` writes it) and attention (``sparse_prefill``,
    ``attend_fa3`` read it), also used by tests, benchmarks and stats.

    BSR rows over the plan's query blocks: row (g, h) lists ``counts[g * HQ + h]`` absolute key
    block ids, ascending (so the diagonal block, when selected, comes last), at
    ``indices[row_start(g, h) : row_start(g, h) + counts[g * HQ + h]]`` with
    ``row_start(g, h) = plan.sel_off[g] * HQ + h * (plan.qb_abs[g] + 1)`` (each row has room for
    its qb_abs[g] + 1 causal blocks). Rows of dense requests (``plan.dense``) and dense tails
    (``plan.qb_dense``) hold every causal block. With ``all_blocks`` every row selects every
    causal block and ``indices`` / ``counts`` were not written (estimation was skipped).
    """

    plan: PrefillPlan
    indices: torch.Tensor
    """int16 [>= plan.sel_capacity]."""
    counts: torch.Tensor
    """int32 [>= plan.num_q_blocks * HQ]."""
    all_blocks: bool = False

    @property
    def num_q_heads(self) -> int:
        return self.plan.num_q_heads

    def row_starts(self) -> torch.Tensor:
        """int64 [NQB, HQ]: offset of row (g, h) in ``indices``."""
        p = self.plan
        h = torch.arange(p.num_q_heads, device=p.sel_off.device)
        return p.sel_off[:-1].long()[:, None] * p.num_q_heads + h[None, :] * (p.qb_abs.long()[:, None] + 1)

    def selected_counts(self) -> torch.Tensor:
        """int32 [NQB, HQ] selected key blocks per (query block, q head); no host sync."""
        p = self.plan
        if self.all_blocks:
            return (p.qb_abs + 1)[:, None].expand(p.num_q_blocks, p.num_q_heads)
        return self.counts[: p.num_q_blocks * p.num_q_heads].view(p.num_q_blocks, p.num_q_heads)

    def check_rows(self) -> None:
        """Raise ValueError unless every row has a count in [0, qb_abs[g] + 1] and lists strictly
        ascending causal blocks (what attention relies on: the diagonal, when selected, comes last).
        Tests and benchmarks call it on a kernel's output; nothing to check with ``all_blocks``."""
        if self.all_blocks or self.plan.num_q_blocks == 0:
            return
        p, hq = self.plan, self.plan.num_q_heads
        cnt = self.selected_counts().long()  # [NQB, HQ]
        cap = p.qb_abs.long()[:, None] + 1
        bad = (cnt < 0) | (cnt > cap)
        if bad.any():
            g, h = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"selection row (g={g}, h={h}): count {int(cnt[g, h])} outside [0, {int(cap[g, 0])}]")
        idx = self.indices.long()
        starts = self.row_starts()
        j = torch.arange(int(cap.max()), device=idx.device)
        for h in range(hq):  # per head: bounded temporaries at 128K
            valid = j[None, :] < cnt[:, h, None]  # [NQB, max row]
            row = idx[(starts[:, h, None] + j[None, :]).clamp_max(idx.numel() - 1)]
            bad = valid & ((row < 0) | (row >= cap))  # outside the causal blocks 0..qb_abs[g]
            bad[:, 1:] |= valid[:, 1:] & (row[:, 1:] <= row[:, :-1])  # not strictly ascending
            if bad.any():
                g = int(bad.any(1).nonzero()[0])
                got = row[g, : int(cnt[g, h])].tolist()
                raise ValueError(f"selection row (g={g}, h={h}) is not strictly ascending causal blocks: {got}")

    def to_masks(self, device: Union[str, torch.device] = "cpu") -> list[torch.Tensor]:
        """Per request, bool [HQ, nq_r, nk_r] on ``device``: True where the row selects the key
        block (entries past a row's count are ignored; see ``check_rows``)."""
        p = self.plan
        hq = p.num_q_heads
        cu_qb, cu_kb = p.cu_qb.tolist(), p.cu_kb.tolist()
        dev = self.indices.device
        qb_abs = p.qb_abs.long().to(dev)
        cnt = self.selected_counts().long().to(dev)
        idx = self.indices.long()
        starts = self.row_starts().to(dev)
        masks = []
        for r in range(p.num_reqs):
            g0, g1 = cu_qb[r], cu_qb[r + 1]
            nq, nk = g1 - g0, cu_kb[r + 1] - cu_kb[r]
            j = torch.arange(nk, device=dev)
            if self.all_blocks:
                causal = j[None, :] <= qb_abs[g0:g1, None]
                masks.append(causal.expand(hq, nq, nk).to(device))
                continue
            m = torch.zeros(hq, nq, nk, dtype=torch.bool, device=dev)
            rows = torch.arange(nq, device=dev)[:, None].expand(nq, nk)
            for h in range(hq):  # per head: bounded temporaries at 128K
                valid = j[None, :] < cnt[g0:g1, h, None]  # [nq, nk]: the row's first cnt entries
                col = idx[(starts[g0:g1, h, None] + j[None, :]).clamp_max(idx.numel() - 1)].clamp(0, nk - 1)
                m[h][rows[valid], col[valid]] = True
            masks.append(m.to(device))
        return masks

    @classmethod
    def from_masks(cls, masks: Sequence[torch.Tensor], plan: PrefillPlan) -> "BlockSelection":
        """The selection of per-request masks (bool [HQ, nq_r, nk_r]; entries past the diagonal
        are ignored), on the plan's device. The unused tail of each row holds the row's
        *unselected* causal blocks, ascending, so a reader that goes past ``counts`` attends to
        wrong blocks and shows it."""
        hq = plan.num_q_heads
        dev = plan.qb_abs.device
        indices = torch.zeros(max(plan.sel_capacity, 1), dtype=torch.int16, device=dev)
        counts = torch.zeros(max(plan.num_q_blocks * hq, 1), dtype=torch.int32, device=dev)
        cu_qb = plan.cu_qb.tolist()
        starts = cls(plan=plan, indices=indices, counts=counts).row_starts()
        qb_abs = plan.qb_abs.long()
        for r, m in enumerate(masks):
            g0, g1 = cu_qb[r], cu_qb[r + 1]
            m = m.to(device=dev, dtype=torch.bool)
            nq, nk = m.shape[1], m.shape[2]
            cols = torch.arange(nk, device=dev)
            causal = cols[None, :] <= qb_abs[g0:g1, None]  # [nq, nk]
            for h in range(hq):  # per head: bounded temporaries at 128K
                sel = m[h] & causal
                cnt = sel.sum(-1)
                # selected blocks first, then the unselected causal ones, each ascending
                pos = torch.where(sel, sel.cumsum(-1) - 1, cnt[:, None] + (causal & ~sel).cumsum(-1) - 1)
                dest = starts[g0:g1, h, None] + pos
                indices[dest[causal]] = cols.expand(nq, nk)[causal].to(torch.int16)
                counts[(torch.arange(g0, g1, device=dev)) * hq + h] = cnt.to(torch.int32)
        return cls(plan=plan, indices=indices, counts=counts)


# ----------------------------------------------------------------------------------------------
# the same layout on the device: what kernels that write or read a selection call
# ----------------------------------------------------------------------------------------------
@triton.jit
def sel_row_start(sel_off_g, h, qb, HQ: tl.constexpr):
    """Offset of selection row (g, h) in ``BlockSelection.indices`` from sel_off[g] (loaded by the
    caller) and qb = qb_abs[g]: ``BlockSelection.row_starts`` on the device. int64, since
    sel_off[g] * HQ overflows int32 at long contexts."""
    return sel_off_g.to(tl.int64) * HQ + h.to(tl.int64) * (qb + 1)


@triton.jit
def sel_count_at(g, h, HQ: tl.constexpr):
    """Offset of row (g, h)'s count in ``BlockSelection.counts``."""
    return g.to(tl.int64) * HQ + h
