"""Block-sparse prefill attention through FlashAttention 3 (vLLM's own FA3, handed in by the caller).

Prism's attend step as FA3 varlen calls over *virtual sequences*: every (query block g, q head h)
of a launch is one sequence with one head, whose keys are the key blocks row (g, h) selected,
ascending (the diagonal block last), read through a paged block table that lists only those
blocks' pages. FA's causal mask is aligned to the bottom right (query i of a sequence sees key j
iff j <= i + seqlen_k - seqlen_q), so with the diagonal block last and

    seqlen_k = B * (selected blocks - 1) + (keys of the diagonal block up to the row's last query)

each query sees every key of the earlier selected blocks and the diagonal block's keys up to its
own position: block-sparse causal attention (``reference.block_sparse_attention``), for full
query blocks, a chunk's partial last block and a chunk that starts mid-block alike (blocks are
absolute). Rows need their diagonal block, so this path requires ``keep_diagonal``.

Picking the kv head with a page id: a cache page holds every kv head. FA3 reads the cache through
its strides (it only requires stride(-1) == 1), so a strided view whose *virtual page* v starts at
element ``v * sv`` addresses one kv head: physical page p, kv head kvh, slot offset o start at
``p * sp + kvh * sh + o * ss`` = ``v * sv`` with sv = gcd of those strides (``virtual_kv``). A
virtual page holds VPS = gcd(PS, B) tokens (the page size, or 128 for pages above 128 tokens), so
a Prism block is PPB = B // VPS virtual pages. Virtual pages overlap in memory; FA3's paged path
for pages smaller than its key tile gathers rows and does not care.

One bucket of query blocks (``make_attend_plan``, host) at a time, three launches and an FA3 call:
  1. ``_virtual_seqs_kernel``: per sequence its ``cu_seqlens_q_virt`` entry, ``seqused_k_virt`` and page-table
     row, and its q rows copied head-major into the workspace;
  2. FA3 into a head-major output buffer of the workspace;
  3. ``_scatter_out_kernel``: the rows back into the caller's ``out``.
Sequences are ordered kv head, query block descending, group member: the G heads of a kv group
read the same K/V pages back to back (L2) and the longest rows start first. A launch in which every
row selects every causal block (thresholds of 1.0) is plain causal attention: ``attend_dense_fa3``
calls FA3 once on q / out and the requests' own page table.

Layouts in the vLLM backend: ``PrismConfig.attend_layout``; "auto" times "head" and "head_views"
per layer shape at startup and keeps the faster (``attention_backend/break_even.choose_layout``).

Group layout (``layout="group"``, opt-in: it attends more than the selection): one sequence per (query block g, kv head kvh) carrying the group's G q heads as G heads
(FA3 called with num_heads = G over the same one-kv-head cache view, so it packs them into its M
tile; at d=64 a one-head 128-row sequence underfills it). Its keys are the ascending union of the
G heads' rows for block g (``_union_rows_kernel``: a zeroed per-program bitmap, marks, cumsum,
clear), so every head attends the union: block-sparse attention under the union mask, a superset
of each head's selection. The q copy, tables and scatter are the head layout's with one-member
groups whose rows are G heads wide (HS = HKV sequence heads of HPS = G q heads), one more launch
(the union) per bucket.

Half-block layout (``layout="head_halves"``; a candidate of "auto" at head sizes up to 64): the
head layout's sequences each cut in two at the middle of their block (absolute rows a*B .. a*B +
B/2 - 1 and a*B + B/2 .. a*B + B - 1, a half may be empty), same keys, each half's seqlen_k
counting the diagonal block's keys up to its own last row, so the bottom-right causal mask still
holds. The q copy, the table content and the scatter are the head layout's (a program still
handles one (query block, q head) and writes its two sequences' entries); FA3 is called with
max_seqlen_q = B / 2, which at d = 64 (and d = 128; ``use_one_mma_wg`` in FA3's
hopper/heuristics.h) selects its one-warpgroup tile of 64 query rows instead of 192 rows; at other
head sizes it only adds sequences. Measured on an H200 (benchmarks/RESULTS.md, ``db58eb6``): at
d = 64 0.69 of dense FA3 per block against "head"'s 0.65-0.66 with every block selected, mixed at
low density; at d = 128 slower than "head" everywhere.

View layouts (``layout="head_views"`` / ``"group_views"``):
the head / group layout's keys without the q copy and the scatter. FA3 takes q and out with any
row and head strides (stride(-1) == 1), so a bucket is one FA3 call per q head h on
``q[row_lo:row_hi, h:h+1]`` / ``out[...]`` (head_views) or per kv head on
``q[row_lo:row_hi, kvh*G:(kvh+1)*G]`` over the union rows (group_views; FA3 packs the G heads).
A call's sequences are the bucket's query blocks ascending on their real rows (a bucket's query
blocks are consecutive in the launch, so are their rows; a chunk's mid-block start and partial
last block are short sequences), with one ``cu_seqlens_q`` for every call. ``_virtual_seqs_kernel``
with VIEWS (the q copy compiled out, ORDER 1: call-major) writes every call's seqused_k and table
rows in one launch; nothing is scattered; buckets are not bounded by copy rows (fewer call rounds).

Shape legend (one launch, see kernels/plan.py):

    T     query rows of the launch; HQ / HKV heads, G = HQ // HKV; D head dim (<= 256, D % 8 == 0)
    B     Prism block (128); PS page size; VPS = gcd(PS, B); PPB = B // VPS
    q, out: [T, HQ, D]   k_cache, v_cache: [NP, PS, HKV, D]   block_table: [R, max_pages] int32
    bucket: query blocks [g_lo, g_hi) (n_b), their rows [row_lo, row_hi) (T_b rows), S_b = HS * n_b
    HS, HPS: sequence heads and q heads per sequence: HQ, 1 (head, head_views); HKV, G (group, group_views)
    q_virt, o_virt: [HS * T_b, HPS, D]   cu_seqlens_q_virt: [S_b + 1]   seqused_k_virt: [S_b]
    page_table: [S_b, W_b * PPB] int32 (W_b: the bucket's widest possible row, in key blocks)
    view layouts: no q_virt / o_virt; call i: q, out [row_lo:row_hi, i * HPS : (i + 1) * HPS] (views),
    cu_seqlens_q [n_b + 1] (rows from row_lo, shared), seqused_k [HS, n_b][i], page_table [HS, n_b, W_b * PPB][i]
    group layout: union_idx [S_b, W_b] int16 (row u = (g - g_lo) * HKV + kvh), union_cnt [S_b],
    union_bits: [min(sequences, 16 MiB // K), K] int8, K = AttendCapacity.key_blocks
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import triton
import triton.language as tl

from prism_vllm.config import ATTEND_LAYOUTS
from ._launch import AtLeast, check_block_table, check_gqa, check_plan, check_tensor, launch, launch_call, strides
from .params import BLOCK_SIZE
from .plan import BlockSelection, PrefillPlan, sel_count_at, sel_row_start

__all__ = [
    "ATTEND_LAUNCH",
    "AttendBucket",
    "AttendLaunch",
    "AttendCapacity",
    "AttendPlan",
    "AttendWorkspace",
    "VirtualKV",
    "attend_capacity",
    "attend_dense_fa3",
    "attend_fa3",
    "bucket_views",
    "fa3_descales",
    "make_attend_plan",
    "row_width_bounds",
    "union_rows",
    "virtual_kv",
]

#: Smallest page size vLLM's FlashAttention takes (block sizes are multiples of 16): the table
#: capacity is counted in virtual pages of this size, so it holds any page size.
MIN_PAGE = 16
#: Bytes of one bucket's q copy plus output copy, and of its page table (the workspace's bound).
COPY_BYTES = 128 << 20
TABLE_BYTES = 120 << 20
#: Bytes of the group layout's union bitmaps (one int8 row of ``key_blocks`` per union program).
UNION_BITS_BYTES = 16 << 20
ORDERS = {"kv_desc": 0, "head_asc": 1}
#: "head": one virtual sequence per (query block, q head) over that head's selection; "group": one
#: per (query block, kv head) carrying the group's G q heads over the union of their selections.
#: "head_views" / "group_views": the same keys, one FA3 call per q head / kv head on views of the
#: caller's q and out (sequences = the bucket's query blocks on their real rows; no copy of either).
LAYOUTS = ATTEND_LAYOUTS
#: "head_halves": "head" with each (query block, q head) cut into two sequences, the block's rows
#: of its first and its second half (same keys; the q copy, table rows and scatter are "head"'s).
#: Layouts attending a kv group over the union of its heads' selections, and those without copies.
UNION_LAYOUTS = ("group", "group_views")
VIEW_LAYOUTS = ("head_views", "group_views")
#: Virtual sequences per (query block, sequence head) of a layout (every other layout: 1; read
#: through ``subsequences``).
SUBSEQUENCES = {"head_halves": 2}
#: Largest head size at which "head_halves" can pay: FA3 rounds head sizes up to 64 / 96 / 128 / ...
#: and tiles 192 query rows at 64 (a one-head 128-row sequence fills 2/3 of it); its 64-row tile
#: (``use_one_mma_wg``, hopper/heuristics.h: d of 64 or 128, seqlen_q x q heads per kv head <= 64)
#: is the only gain, and at d = 128 the 128-row tile is already full with one block's rows.
HALVES_MAX_HEAD_DIM = 64
#: FA3's ``num_splits`` (split-KV) for our calls (``fa3_num_splits``). Left to FA3 (0), its
#: heuristic sizes the split for one sequence of max_seqlen_q rows ("pretending that batch = 1",
#: flash_api.cpp ``get_num_splits``), which our calls of hundreds of 128-row sequences are not, and
#: every call allocates fp32 accumulators of splits x heads x rows x D, outside vLLM's memory
#: profiling (attention does not run there): 55 splits, ~1 GiB, on SmolLM2's 8K step; ~109 splits,
#: ~6.6 GiB, for a Llama-3.1-8B bucket of <= 31 query blocks at 128K (above 992 sequences FA3 itself
#: uses 1). FA3's per-sequence dynamic split (flash_prepare_scheduler.cu) keeps one split per
#: sequence wherever a call's key blocks outnumber the SMs many times over, so a copy layout's call
#: with at least SPLIT_FREE_WAVES x SMs sequences gets COPY_SPLITS (none: no accumulators, no
#: combine pass). Smaller calls (a short chunk after a long cached context: one or two query
#: blocks) and the view layouts' calls (one head's or group's sequences) may gain from splitting
#: long rows: up to COPY_MAX_SPLITS / VIEW_MAX_SPLITS, and never more accumulator bytes than
#: SPLIT_ACCUM_BYTES. Chosen from FA3's source; on the H200 at db58eb6 the attend step with this
#: bound timed as before per block (benchmarks/RESULTS.md) and a load test's server memory stayed
#: flat; not yet timed against FA3's own heuristic (``benchmarks/bench_kernels.py --attend-sweep``).
COPY_SPLITS = 1
SPLIT_FREE_WAVES = 2
COPY_MAX_SPLITS = 128
VIEW_MAX_SPLITS = 8
SPLIT_ACCUM_BYTES = 64 << 20


@dataclass(frozen=True)
class AttendLaunch:
    """Launch settings of the two copy kernels (``_virtual_seqs_kernel``, ``_scatter_out_kernel``):
    memory-bound row copies, one program per virtual sequence."""

    block_j: int = 32
    """Selected key blocks per page-table tile."""
    block_t: int = 32
    """q / output rows per copy tile."""
    block_n: int = 256
    """Key blocks per bitmap tile of the union kernel (``_union_rows_kernel``)."""
    num_warps: int = 4

    def __post_init__(self) -> None:
        # the union kernel clears a bitmap tile right after reading it: every element of the tile
        # must belong to one thread (no replicated lanes), i.e. block_n >= the program's threads
        if self.block_n < 32 * self.num_warps:
            raise ValueError(f"AttendLaunch.block_n={self.block_n} must be >= 32 * num_warps ({32 * self.num_warps})")


#: The settings of every head dim (a copy's BLOCK_D is the head dim's next power of two).
ATTEND_LAUNCH = AttendLaunch()


# ----------------------------------------------------------------------------------------------
# host side: capacity and the per-launch bucket plan (built once per step, in the builder)
# ----------------------------------------------------------------------------------------------
def subsequences(layout: str) -> int:
    """Virtual sequences per (query block, sequence head) of ``layout`` (SUBSEQUENCES)."""
    return SUBSEQUENCES.get(layout, 1)


@dataclass(frozen=True)
class AttendCapacity:
    """What one bucket may hold (the workspace's sizes)."""

    rows: int
    """q rows per bucket (the q and output copies hold HQ * rows rows of D each)."""
    sequences: int
    """Virtual sequences per bucket."""
    table_blocks: int
    """Key blocks summed over a bucket's page-table rows (each B // MIN_PAGE entries)."""
    key_blocks: int = 0
    """Key blocks of the longest sequence (the length of the group layout's union bitmap rows)."""


def attend_capacity(
    *,
    max_num_batched_tokens: int,
    max_q_blocks: int,
    max_k_blocks: int,
    num_q_heads: int,
    head_dim: int,
    element_size: int,
    block_size: int = BLOCK_SIZE,
    layouts: Sequence[str] = ("head",),
) -> AttendCapacity:
    """Bucket capacity for a scheduler configuration, within COPY_BYTES + TABLE_BYTES (248 MiB) plus the per-sequence arrays.

    rows: every row of a step if the two copies fit COPY_BYTES, else as many as fit (a 128K
    one-shot prefill of a 32-head d=128 bf16 layer: 8192 rows, 16 buckets); sequences: one per
    (query block, q head) of a full bucket, times the most SUBSEQUENCES of ``layouts``; table: the
    widest rows (``max_k_blocks``) for every sequence, capped by TABLE_BYTES (a bucket then holds
    fewer query blocks).
    """
    row_bytes = 2 * num_q_heads * head_dim * element_size
    rows = max(1, min(int(max_num_batched_tokens), COPY_BYTES // row_bytes))
    qbs = min(int(max_q_blocks), rows + 1)  # a bucket's query blocks each hold >= 1 row
    sequences = qbs * num_q_heads * max(subsequences(x) for x in layouts)
    ppb = block_size // MIN_PAGE
    table_blocks = max(1, min(sequences * int(max_k_blocks), TABLE_BYTES // (4 * ppb)))
    return AttendCapacity(rows=rows, sequences=sequences, table_blocks=table_blocks, key_blocks=int(max_k_blocks))


@dataclass(frozen=True)
class AttendBucket:
    """Query blocks [g_lo, g_hi) of a launch (attended in descending order), rows [row_lo, row_hi)."""

    g_lo: int
    g_hi: int
    row_lo: int
    row_hi: int
    width: int
    """Key blocks per page-table row: at least any row's selected count."""
    max_rows: int
    """Rows of its longest virtual sequence (FA3's max_seqlen_q): its largest query block's, at
    most B / SUBSEQUENCES in a layout that cuts query blocks ("head_halves")."""


@dataclass(frozen=True)
class AttendPlan:
    """How one launch's attention runs on FA3 (host ints only)."""

    buckets: tuple[AttendBucket, ...]
    all_blocks: bool
    """Every row selects every causal block: one plain causal FA3 call, no buckets."""
    max_seqlen_q: int
    """Longest chunk of the launch (the plain call's max_seqlen_q)."""
    max_seqlen_k: int
    """Longest sequence of the launch (context + chunk)."""
    layout: str = "head"
    """The sequence layout the bucket widths were planned for (see LAYOUTS)."""


def _qb_rows(plan: PrefillPlan) -> tuple[np.ndarray, np.ndarray]:
    """[NQB] first q row (in the launch) and row count of every query block (host)."""
    B = plan.block_size
    r = plan.qb_req.cpu().numpy().astype(np.int64)
    a = plan.qb_abs.cpu().numpy().astype(np.int64)
    ctx = plan.ctx_lens.cpu().numpy().astype(np.int64)[r]
    seq = plan.seqused_k.cpu().numpy().astype(np.int64)[r]
    lo = np.maximum(a * B, ctx)
    hi = np.minimum(a * B + B, seq)
    return plan.cu_seqlens_q.cpu().numpy().astype(np.int64)[r] + lo - ctx, hi - lo


def row_width_bounds(plan: PrefillPlan, block_budget: Optional[float]) -> np.ndarray:
    """[NQB] most key blocks any row of each query block can select (host).

    Dense rows (dense requests, dense tails) and rows without a budget: every causal block. With a
    block budget b a row keeps at most max(ceil(b * n), 2) of its n causal blocks (the cap plus the
    forced sink and diagonal, see reference.cap_to_budget); one block of slack covers rounding.
    """
    a = plan.qb_abs.cpu().numpy().astype(np.int64)
    n = a + 1
    if block_budget is None:
        return n
    dense = plan.dense.cpu().numpy()[plan.qb_req.cpu().numpy()] != 0
    dense |= plan.qb_dense.cpu().numpy() != 0
    k = np.ceil(np.float32(block_budget) * n.astype(np.float32)).astype(np.int64)
    return np.where(dense, n, np.minimum(n, np.maximum(k + 1, 2)))


def make_attend_plan(
    plan: PrefillPlan,
    capacity: AttendCapacity,
    *,
    block_budget: Optional[float] = None,
    all_blocks: bool = False,
    layout: str = "head",
    num_kv_heads: Optional[int] = None,
) -> Optional[AttendPlan]:
    """Cut a launch into buckets that each fit ``capacity`` (host; ``plan`` may be on the CPU).

    Query blocks are taken from the last one down; a bucket grows while its rows, sequences and
    page-table blocks (sequences x the widest row's bound) fit. None when a single query block
    does not fit (rows longer than TABLE_BYTES allows; the caller serves the launch otherwise).

    ``layout="group"`` (needs ``num_kv_heads``): HKV sequences per query block, each as wide as
    the union of its G heads' rows can be (min(causal blocks, G x a row's bound)); None also when
    the capacity's union bitmaps (``key_blocks``) are shorter than the launch's longest sequence.
    "head_views" / "group_views" plan as "head" / "group" without the rows bound (no copy holds
    the rows): a bucket is one FA3 call per q head / kv head, so fewer buckets mean fewer calls.
    """
    hq = plan.num_q_heads
    hs = _seq_heads(hq, num_kv_heads, layout)  # sequence heads per query block (checks the layout)
    seq = plan.seqused_k.cpu().numpy()
    cu = plan.cu_seqlens_q.cpu().numpy()
    max_q = int((cu[1:] - cu[:-1]).max()) if plan.num_reqs else 0
    max_k = int(seq.max()) if plan.num_reqs else 0
    if all_blocks or plan.num_q_blocks == 0:
        return AttendPlan(buckets=(), all_blocks=all_blocks, max_seqlen_q=max_q, max_seqlen_k=max_k, layout=layout)
    row0, rows = _qb_rows(plan)
    width = row_width_bounds(plan, block_budget)
    if layout in UNION_LAYOUTS:
        if num_kv_heads is None:
            raise ValueError(f"make_attend_plan(layout={layout!r}) needs num_kv_heads (the union covers a kv group)")
        check_gqa(hq, num_kv_heads)
        if capacity.key_blocks < 1:
            raise ValueError(f"make_attend_plan(layout={layout!r}) needs AttendCapacity.key_blocks >= 1 (the union "
                             f"bitmaps' length), got {capacity}; build the capacity with attend_capacity")
        if plan.max_k_blocks > capacity.key_blocks:
            return None
        # a union row holds at most every causal block, and at most its G heads' rows together
        width = np.minimum(row_width_bounds(plan, None), (hq // num_kv_heads) * width)
    max_rows = capacity.rows if layout not in VIEW_LAYOUTS else plan.num_tokens
    sub = subsequences(layout)
    hs *= sub  # sequences per query block
    buckets: list[AttendBucket] = []
    g_hi = plan.num_q_blocks
    while g_hi > 0:
        g, w, mr = g_hi - 1, 0, 0
        while g >= 0:
            w2, n = max(w, int(width[g])), g_hi - g
            t = int(row0[g_hi - 1] + rows[g_hi - 1] - row0[g])
            if t > max_rows or n * hs > capacity.sequences or n * hs * w2 > capacity.table_blocks:
                break
            w, mr = w2, max(mr, int(rows[g]))
            g -= 1
        if g == g_hi - 1:
            return None
        g_lo = g + 1
        buckets.append(
            AttendBucket(g_lo=g_lo, g_hi=g_hi, row_lo=int(row0[g_lo]),
                         row_hi=int(row0[g_hi - 1] + rows[g_hi - 1]), width=w,
                         max_rows=min(mr, plan.block_size // sub))
        )
        g_hi = g_lo
    return AttendPlan(buckets=tuple(buckets), all_blocks=False, max_seqlen_q=max_q, max_seqlen_k=max_k, layout=layout)


class AttendWorkspace:
    """Preallocated buffers of one bucket (see AttendCapacity); shared by every layer.

    ``layouts``: the layouts (LAYOUTS) it serves. Every layout: the sequences' cu_seqlens_q,
    seqused_k (``sequences`` int32 each) and page table (``table_blocks`` x PPB int32, <= TABLE_BYTES).
    "head" / "group" add the q and output copies (HQ x ``rows`` rows of D each, <= COPY_BYTES);
    the view layouts need none: "head_views" alone is <= TABLE_BYTES + 8 x (sequences + 1) bytes.
    "group" / "group_views" add the union buffers: the bucket's union rows (int16, one entry per
    page-table key block: ``table_blocks`` x 2 bytes, 1/16 of the page table) and counts
    (``sequences`` int32), and the union bitmaps: ``bitmap_rows`` = min(sequences,
    UNION_BITS_BYTES // key_blocks) zeroed int8 rows of ``key_blocks`` (<= 16 MiB: 16 MiB for a
    128K one-shot Llama-3.1-8B step, ~2 MiB for 8K-token steps), which the union kernel leaves zeroed
    after every launch.
    """

    def __init__(self, capacity: AttendCapacity, num_q_heads: int, head_dim: int, dtype: torch.dtype,
                 device: Union[str, torch.device], block_size: int = BLOCK_SIZE,
                 layouts: Sequence[str] = ("head",)) -> None:
        unknown = set(layouts) - set(LAYOUTS)
        if unknown or not layouts:
            raise ValueError(f"Invalid attend workspace layouts {tuple(layouts)!r}: expected some of {LAYOUTS}")
        self.capacity = capacity
        self.num_q_heads = int(num_q_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.layouts = tuple(layouts)
        self._q_bytes: Optional[torch.Tensor] = None
        self.o_virt: Optional[torch.Tensor] = None
        if set(layouts) - set(VIEW_LAYOUTS):  # a layout that copies q and the output
            n = capacity.rows * num_q_heads
            self._q_bytes = torch.empty(n * head_dim * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8,
                                        device=device)
            self.o_virt = torch.empty(n, 1, head_dim, dtype=dtype, device=device)
        # the virtual sequences' FA3 arguments (the plan's cu_seqlens_q / seqused_k are the requests')
        self.cu_seqlens_q_virt = torch.empty(capacity.sequences + 1, dtype=torch.int32, device=device)
        self.seqused_k_virt = torch.empty(capacity.sequences, dtype=torch.int32, device=device)
        self.page_table = torch.empty(capacity.table_blocks * (block_size // MIN_PAGE), dtype=torch.int32,
                                      device=device)
        self.union_idx: Optional[torch.Tensor] = None
        self.union_cnt: Optional[torch.Tensor] = None
        self.union_bits: Optional[torch.Tensor] = None
        if set(layouts) & set(UNION_LAYOUTS):
            if capacity.key_blocks < 1:
                raise ValueError(f"the group layout needs AttendCapacity.key_blocks >= 1 (the longest sequence's key "
                                 f"blocks), got {capacity}; build it with attend_capacity")
            kb = capacity.key_blocks
            self.union_idx = torch.empty(capacity.table_blocks, dtype=torch.int16, device=device)
            self.union_cnt = torch.empty(capacity.sequences, dtype=torch.int32, device=device)
            bitmap_rows = max(1, min(capacity.sequences, UNION_BITS_BYTES // kb))
            self.union_bits = torch.zeros(bitmap_rows, kb, dtype=torch.int8, device=device)

    def q_rows(self, n_rows: int, dtype: torch.dtype, heads: int = 1) -> torch.Tensor:
        """[n_rows, heads, D] contiguous view of the q copy in ``dtype`` (the model dtype, or fp8
        for quantized queries)."""
        assert self._q_bytes is not None, "a view-layout workspace has no q copy"
        n = n_rows * heads * self.head_dim
        return self._q_bytes.view(dtype)[:n].view(n_rows, heads, self.head_dim)

    def o_rows(self, n_rows: int, heads: int = 1) -> torch.Tensor:
        """[n_rows, heads, D] contiguous view of the output copy."""
        assert self.o_virt is not None, "a view-layout workspace has no output copy"
        return self.o_virt.view(-1)[: n_rows * heads * self.head_dim].view(n_rows, heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        bufs = (self._q_bytes, self.o_virt, self.cu_seqlens_q_virt, self.seqused_k_virt, self.page_table,
                self.union_idx, self.union_cnt, self.union_bits)
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)


# ----------------------------------------------------------------------------------------------
# the cache seen one kv head per page
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VirtualKV:
    """K / V caches seen as [NV, VPS, 1, D]: virtual page ``p * page_mult + kvh * head_mult +
    (o // VPS) * slot_mult`` holds tokens o .. o + VPS - 1 of physical page p, kv head kvh."""

    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    """The cache views it was made from ([NP, PS, HKV, D])."""
    v_cache: torch.Tensor
    page_size: int
    """VPS: tokens per virtual page."""
    phys_page_size: int
    """PS: tokens per cache page."""
    num_kv_heads: int
    page_mult: int
    head_mult: int
    slot_mult: int


def virtual_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int = BLOCK_SIZE) -> Union[VirtualKV, str]:
    """The virtual-page view of a paged cache ([NP, PS, HKV, D] views, FlashAttention's), or the
    reason (a sentence) why the cache's strides do not allow one."""
    NP, PS, HKV, D = k_cache.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape) or v_cache.stride() != k_cache.stride():
        return "K and V cache views with different shapes or strides"
    sp, ss, sh, sd = k_cache.stride()
    if sd != 1:
        return f"a KV cache without a contiguous head dim (strides {k_cache.stride()})"
    vps = math.gcd(PS, block_size)
    terms = [sp] + ([sh] if HKV > 1 else []) + ([vps * ss] if PS > vps else [])
    sv = 0
    for t in terms:
        sv = math.gcd(sv, t)
    if sv <= 0:
        return f"degenerate KV cache strides {k_cache.stride()}"
    page_mult, head_mult, slot_mult = sp // sv, (sh // sv if HKV > 1 else 0), (vps * ss // sv if PS > vps else 0)
    last = (NP - 1) * page_mult + (HKV - 1) * head_mult + (PS // vps - 1) * slot_mult
    if last >= 2**31 - 1:
        return f"a KV cache too large for int32 virtual page ids ({last + 1} virtual pages)"
    size, stride = (last + 1, vps, 1, D), (sv, ss, sh if HKV > 1 else D, 1)
    k = k_cache.as_strided(size, stride, k_cache.storage_offset())
    v = v_cache.as_strided(size, stride, v_cache.storage_offset())
    return VirtualKV(k=k, v=v, k_cache=k_cache, v_cache=v_cache, page_size=vps, phys_page_size=PS, num_kv_heads=HKV, page_mult=page_mult, head_mult=head_mult, slot_mult=slot_mult)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _virtual_seq(s, g_lo, g_hi, row_lo, row_hi, cu_seqlens_q, ctx_lens, seqused_k, qb_req, qb_abs,
                 G: tl.constexpr, B: tl.constexpr, ORDER: tl.constexpr):
    """Sequence s of a bucket -> its query block g, q head h, request r and rows.

    ORDER 0: s = (kvh, query block descending, group member); 1: s = (q head, query block
    ascending). Returns g, h, kvh, r, a (absolute block), seq, p_hi, rows, qrow (first q row in the
    launch) and off (first row in the head-major copy)."""
    n_b = g_hi - g_lo
    if ORDER == 0:
        kvh = s // (n_b * G)
        rem = s % (n_b * G)
        g = g_hi - 1 - rem // G
        m = rem % G
        h = kvh * G + m
    else:
        h = s // n_b
        g = g_lo + s % n_b
        kvh = h // G
        m = h % G
    r = tl.load(qb_req + g)
    a = tl.load(qb_abs + g)
    ctx = tl.load(ctx_lens + r)
    seq = tl.load(seqused_k + r)
    p_lo = tl.maximum(a * B, ctx)
    p_hi = tl.minimum(a * B + B, seq)
    rows = p_hi - p_lo
    qrow = tl.load(cu_seqlens_q + r) + p_lo - ctx
    T_b = row_hi - row_lo
    if ORDER == 0:
        # kv head kvh owns G * T_b rows; in it the blocks after g (descending) come first, then
        # the group members of g one after another
        off = kvh * G * T_b + (row_hi - qrow - rows) * G + m * rows
    else:
        off = h * T_b + qrow - row_lo
    return g, h, kvh, r, a, seq, p_hi, rows, qrow, off


@triton.jit
def _copy_rows(src, src_row, src_stride, dst, dst_row, dst_stride, n, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_T: tl.constexpr):
    """Rows src_row .. src_row+n-1 of src (row stride src_stride, D contiguous elements each) to
    rows dst_row .. of dst, BLOCK_T rows at a time."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    for t0 in range(0, n, BLOCK_T):
        t = t0 + offs_t
        mk = (t < n)[:, None] & (offs_d < D)[None, :]
        x = tl.load(src + (src_row + t).to(tl.int64)[:, None] * src_stride + offs_d[None, :], mask=mk)
        tl.store(dst + (dst_row + t).to(tl.int64)[:, None] * dst_stride + offs_d[None, :], x, mask=mk)


@triton.jit(do_not_specialize=["g_lo", "n_u", "stride_ut"])
def _union_rows_kernel(
    union_idx,
    union_cnt,
    union_bits,
    sel_idx,
    sel_cnt,
    sel_off,
    dense,
    qb_dense,
    qb_req,
    qb_abs,
    g_lo,
    n_u,
    stride_ut,
    stride_bits,
    HQ: tl.constexpr,
    G: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Union row u = (g - g_lo) * HKV + kvh of a bucket: the ascending union of the selection rows
    (g, kvh * G .. kvh * G + G - 1) and its count.

    Each program owns one zeroed int8 bitmap row (its ``union_bits`` row, as long as the longest
    sequence's key blocks) and takes rows u = pid, pid + nprog, ...: it marks every head's
    indices, then walks the row's a + 1 causal blocks in tiles, emitting the marked ones in order
    (a cumsum gives each its slot) and zeroing the tile behind it, so the bitmap is clean for the
    next row and the next launch. Dense rows (dense requests, dense tails) are every causal block."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    bits = union_bits + pid.to(tl.int64) * stride_bits
    offs_j = tl.arange(0, BLOCK_J)
    offs_n = tl.arange(0, BLOCK_N)
    for i in range(0, tl.cdiv(n_u - pid, nprog)):
        u = pid + i * nprog
        g = g_lo + u // (HQ // G)
        kvh = u % (HQ // G)
        a = tl.load(qb_abs + g)
        n = a + 1
        dst = union_idx + u.to(tl.int64) * stride_ut
        row_dense = (tl.load(dense + tl.load(qb_req + g)) != 0) | (tl.load(qb_dense + g) != 0)
        cnt = n * 0
        if row_dense:
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + offs_n
                tl.store(dst + cols, cols.to(tl.int16), mask=cols < n)
            cnt = n
        else:
            off_g = tl.load(sel_off + g)
            for m in range(G):
                h = kvh * G + m
                c = tl.load(sel_cnt + sel_count_at(g, h, HQ))
                src = sel_idx + sel_row_start(off_g, h, a, HQ)
                for j0 in range(0, c, BLOCK_J):
                    jj = j0 + offs_j
                    idx = tl.load(src + jj, mask=jj < c, other=0).to(tl.int32)
                    tl.store(bits + idx, tl.full([BLOCK_J], 1, tl.int8), mask=jj < c)
            tl.debug_barrier()  # every head's marks are visible to every thread of the program
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + offs_n
                live = cols < n
                hit = tl.load(bits + cols, mask=live, other=0).to(tl.int32)
                pos = cnt + tl.cumsum(hit, 0) - 1  # ascending: the k-th marked block goes to slot k
                tl.store(dst + pos, cols.to(tl.int16), mask=live & (hit != 0))
                tl.store(bits + cols, tl.zeros([BLOCK_N], tl.int8), mask=live)  # clean for the next row
                cnt += tl.sum(hit, 0)
            tl.debug_barrier()  # cleared before the next row marks
        tl.store(union_cnt + u, cnt)


# per-bucket scalars unspecialised (the table strides follow the bucket's width), and the alignment
# of the step's block_table row slice: one binary per layout whatever the step, compiled by the
# startup warm-up rather than mid-serving
@triton.jit(do_not_specialize=["g_lo", "g_hi", "row_lo", "row_hi", "stride_pt", "stride_ut", "page_mult", "head_mult",
                               "slot_mult"], do_not_specialize_on_alignment=["block_table"])
def _virtual_seqs_kernel(
    q,
    q_virt,
    cu_seqlens_q_virt,
    seqused_k_virt,
    page_table,
    block_table,
    sel_idx,
    sel_cnt,
    sel_off,
    union_idx,
    union_cnt,
    cu_seqlens_q,
    ctx_lens,
    seqused_k,
    dense,
    qb_dense,
    qb_req,
    qb_abs,
    g_lo,
    g_hi,
    row_lo,
    row_hi,
    stride_qt,
    stride_qh,
    stride_bt,
    stride_pt,
    stride_ut,
    page_mult,
    head_mult,
    slot_mult,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    B: tl.constexpr,
    PS: tl.constexpr,
    VPS: tl.constexpr,
    PPB: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ORDER: tl.constexpr,
    GROUP: tl.constexpr,
    VIEWS: tl.constexpr,
    HALVES: tl.constexpr = False,
):
    """One program per virtual sequence: cu_seqlens_q_virt, seqused_k_virt, page-table row, q copy.

    HALVES (the head layout's "head_halves"): program s is still the head layout's sequence s, and
    writes the entries of sequences 2s and 2s + 1, its block's rows before and from the middle
    of the block (same keys and table row; each seqused_k ends at its own last row).

    GROUP: the sequences are (query block, kv head) carrying the group's G heads over the union
    rows, i.e. the head layout with HQ // G one-member groups whose "head" is the kv head and
    whose rows are G heads wide (so the same ``_virtual_seq`` arithmetic, with G = 1).

    VIEWS (with ORDER 1): no q copy; sequence s = (sequence head, query block ascending) is row s
    of the page table / seqused_k, i.e. FA3 call s // n_b's sequence s % n_b, and the one
    cu_seqlens_q all calls share counts the query blocks' real rows from the bucket's first row
    (the calls read q[row_lo:row_hi, heads of the call])."""
    SEQ_G: tl.constexpr = 1 if GROUP else G  # sequences of a kv group per query block
    HPS: tl.constexpr = G if GROUP else 1  # q heads per sequence
    s = tl.program_id(0)
    g, h, kvh, r, a, seq, p_hi, rows, qrow, off = _virtual_seq(
        s, g_lo, g_hi, row_lo, row_hi, cu_seqlens_q, ctx_lens, seqused_k, qb_req, qb_abs, SEQ_G, B, ORDER
    )
    if VIEWS:
        if s < g_hi - g_lo:  # the first call's sequences write the shared cu_seqlens_q
            tl.store(cu_seqlens_q_virt + s, qrow - row_lo)
        if s == 0:  # the end of the last query block: every row of the bucket
            tl.store(cu_seqlens_q_virt + (g_hi - g_lo), row_hi - row_lo)
    elif HALVES:
        # rows of the first half: from the chunk's first row of the block to the block's middle
        r0 = tl.minimum(tl.maximum(a * B + B // 2 - (p_hi - rows), 0), rows)
        tl.store(cu_seqlens_q_virt + 2 * s, off)
        tl.store(cu_seqlens_q_virt + 2 * s + 1, off + r0)
        if s == 0:
            tl.store(cu_seqlens_q_virt + 2 * (g_hi - g_lo) * HQ, HQ * (row_hi - row_lo))
    else:
        tl.store(cu_seqlens_q_virt + s, off)
        if s == 0:  # the end of the last sequence: every row of the bucket, every sequence head
            tl.store(cu_seqlens_q_virt + (g_hi - g_lo) * (HQ // HPS), (HQ // HPS) * (row_hi - row_lo))

    # the row's key blocks: every causal one for dense rows, else the selection or the group's
    # union (ascending, the diagonal last, so FA's bottom-right causal mask is the block's own
    # causal mask)
    row_dense = (tl.load(dense + r) != 0) | (tl.load(qb_dense + g) != 0)
    if GROUP:
        u = (g - g_lo) * (HQ // G) + kvh  # the union row (see _union_rows_kernel)
        cnt = tl.where(row_dense, a + 1, tl.load(union_cnt + u))
        row_ptr = union_idx + u.to(tl.int64) * stride_ut
    else:
        cnt = tl.where(row_dense, a + 1, tl.load(sel_cnt + sel_count_at(g, h, HQ)))
        row_ptr = sel_idx + sel_row_start(tl.load(sel_off + g), h, a, HQ)
    if HALVES:  # the first half sees the diagonal block's keys up to its own last row
        tl.store(seqused_k_virt + 2 * s, (cnt - 1) * B + tl.minimum(p_hi - a * B, B // 2))
        tl.store(seqused_k_virt + 2 * s + 1, (cnt - 1) * B + (p_hi - a * B))
    else:
        tl.store(seqused_k_virt + s, (cnt - 1) * B + (p_hi - a * B))

    SUB: tl.constexpr = 2 if HALVES else 1  # table rows per program (the same content)
    pt_row = page_table + (s * SUB).to(tl.int64) * stride_pt
    bt_row = block_table + r.to(tl.int64) * stride_bt
    kofs = tl.arange(0, PPB)
    for j0 in range(0, cnt, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        live = jj < cnt
        sel = tl.load(row_ptr + jj, mask=live & (row_dense == 0), other=0).to(tl.int32)
        blk = tl.where(row_dense, jj, sel)
        tok = blk[:, None] * B + kofs[None, :] * VPS  # first token of each virtual page
        ok = live[:, None] & (tok < seq)  # pages past the sequence end may not exist (never read)
        phys = tl.load(bt_row + tok // PS, mask=ok, other=0).to(tl.int64)
        virt = phys * page_mult + kvh * head_mult + ((tok % PS) // VPS) * slot_mult
        for half in tl.static_range(SUB):  # not `u`: the group layout's union row is a tensor of that name
            tl.store(pt_row + half * stride_pt + jj[:, None] * PPB + kofs[None, :], virt.to(tl.int32), mask=ok)

    # the block's rows of head h (of heads h * G .. h * G + G - 1, token-major, in the group
    # layout), sequence-major; VIEWS: FA3 reads them in place (constexpr: no copy compiled)
    if not VIEWS:
        for m in tl.static_range(HPS):
            _copy_rows(q + (h * HPS + m) * stride_qh, qrow, stride_qt, q_virt + m * D, off, HPS * D, rows, D,
                       BLOCK_D, BLOCK_T)


@triton.jit(do_not_specialize=["g_lo", "g_hi", "row_lo", "row_hi"])
def _scatter_out_kernel(
    o_virt,
    out,
    cu_seqlens_q,
    ctx_lens,
    seqused_k,
    qb_req,
    qb_abs,
    g_lo,
    g_hi,
    row_lo,
    row_hi,
    stride_ot,
    stride_oh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ORDER: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One program per virtual sequence: its output rows back to out[rows, h] (GROUP: to
    out[rows, h * G .. h * G + G - 1], h the kv head)."""
    SEQ_G: tl.constexpr = 1 if GROUP else G
    HPS: tl.constexpr = G if GROUP else 1
    s = tl.program_id(0)
    g, h, kvh, r, a, seq, p_hi, rows, qrow, off = _virtual_seq(
        s, g_lo, g_hi, row_lo, row_hi, cu_seqlens_q, ctx_lens, seqused_k, qb_req, qb_abs, SEQ_G, B, ORDER
    )
    for m in tl.static_range(HPS):
        _copy_rows(o_virt + m * D, off, HPS * D, out + (h * HPS + m) * stride_oh, qrow, stride_ot, rows, D, BLOCK_D,
                   BLOCK_T)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
FlashAttnVarlen = Callable[..., Any]


def fa3_descales(q_scale: Optional[torch.Tensor], k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
              n_seq: int, n_kv: int) -> dict[str, torch.Tensor]:
    """FA3's descale arguments ([sequences, kv heads] views of per-tensor scales, no copy), as
    vLLM's FlashAttention passes them; nothing for unquantized inputs."""
    out = {}
    for name, t in (("q_descale", q_scale), ("k_descale", k_scale), ("v_descale", v_scale)):
        if t is not None:
            out[name] = t.reshape(1, 1).expand(n_seq, n_kv)
    return out


def _check_launch(q: torch.Tensor, out: torch.Tensor, vkv: VirtualKV, block_table: torch.Tensor,
                  plan: PrefillPlan, ws: Optional[AttendWorkspace]) -> None:
    # fp8 q (quantized queries with an fp8 KV cache): FA3 writes the model dtype
    check_tensor("q", q, shape=("T", "HQ", "D"), dtype=(torch.float16, torch.bfloat16, torch.float8_e4m3fn),
                 last_stride_1=True)
    T, HQ, D = q.shape
    check_tensor("out", out, shape=(AtLeast(plan.num_tokens), HQ, D),
                 dtype=q.dtype if q.dtype != torch.float8_e4m3fn else (torch.float16, torch.bfloat16),
                 device=q.device, last_stride_1=True)
    if vkv.k.dtype != q.dtype:
        raise ValueError(f"KV cache dtype {vkv.k.dtype} differs from q's {q.dtype}; FA3 needs them equal")
    if D % 8 or D > 256:
        raise ValueError(f"FA3 attend needs a head dim <= 256 and a multiple of 8, got {D}")
    check_gqa(HQ, vkv.num_kv_heads)
    check_plan(plan, q.device, num_q_heads=HQ, num_rows=T)
    check_block_table(block_table, plan, q.device)
    if ws is not None and not (ws.num_q_heads == HQ and ws.head_dim == D and ws.dtype == out.dtype):
        raise ValueError(f"attend workspace built for HQ={ws.num_q_heads}, D={ws.head_dim}, {ws.dtype}; out is "
                         f"{list(out.shape)} {out.dtype}")


def _seq_heads(HQ: int, num_kv_heads: int, layout: str) -> int:
    """Virtual sequences per query block: one per q head, or one per kv head (group layouts)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid attend layout {layout!r}: expected one of {LAYOUTS}")
    return num_kv_heads if layout in UNION_LAYOUTS else HQ


def union_rows(selection: BlockSelection, bucket: AttendBucket, ws: AttendWorkspace,
               num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group layout's key blocks of a bucket (one launch): per (query block g, kv head kvh)
    the ascending union of the selection rows of the group's G q heads.

    Returns views of the workspace: ``indices`` int16 [S_u, bucket.width] (row u = (g - g_lo) *
    HKV + kvh; entries past its count are unspecified) and ``counts`` int32 [S_u], S_u = HKV x
    the bucket's query blocks. Dense rows are every causal block. ``bucket`` must come from
    ``make_attend_plan(layout="group")`` (or "group_views": its width bounds a union); ``ws`` from
    ``AttendWorkspace(layouts=("group",))`` (or "group_views")."""
    plan = selection.plan
    HQ = plan.num_q_heads
    check_gqa(HQ, num_kv_heads)
    if ws.union_bits is None or ws.union_idx is None or ws.union_cnt is None:
        raise ValueError("the attend workspace has no group-layout buffers; allocate it with "
                         "AttendWorkspace(layouts=('group',)) or ('group_views',)")
    n_u = (bucket.g_hi - bucket.g_lo) * num_kv_heads
    width = bucket.width
    if plan.max_k_blocks > ws.union_bits.shape[1] or n_u > ws.union_cnt.numel() or n_u * width > ws.union_idx.numel():
        raise ValueError(f"bucket {bucket} of a launch with {plan.max_k_blocks} key blocks does not fit the group "
                         f"layout's buffers of {ws.capacity}; plan it with make_attend_plan(layout='group')")
    idx = ws.union_idx[: n_u * width].view(n_u, width)
    cnt = ws.union_cnt[:n_u]
    if selection.all_blocks:
        raise ValueError("an all-blocks selection has no rows to unite; attend it with attend_dense_fa3")
    launch(
        _union_rows_kernel,
        (min(n_u, ws.union_bits.shape[0]),),
        union_idx=idx,
        union_cnt=cnt,
        union_bits=ws.union_bits,
        sel_idx=selection.indices,
        sel_cnt=selection.counts,
        **plan.tensors("sel_off", "dense", "qb_dense", "qb_req", "qb_abs"),
        g_lo=bucket.g_lo,
        n_u=n_u,
        stride_ut=idx.stride(0),
        stride_bits=ws.union_bits.stride(0),
        HQ=HQ,
        G=HQ // num_kv_heads,
        BLOCK_J=ATTEND_LAUNCH.block_j,
        BLOCK_N=ATTEND_LAUNCH.block_n,
        num_warps=ATTEND_LAUNCH.num_warps,
    )
    return idx, cnt


def virtual_sequences(
    q: torch.Tensor,
    vkv: VirtualKV,
    block_table: torch.Tensor,
    selection: BlockSelection,
    bucket: AttendBucket,
    ws: AttendWorkspace,
    *,
    order: str = "kv_desc",
    layout: str = "head",
) -> dict[str, torch.Tensor]:
    """Step 1 of a bucket: write its virtual sequences into the workspace (one launch; the group
    layouts first form the union rows, ``union_rows``: two).

    Returns FA3's inputs as views of the workspace: ``q`` and ``out`` [HS * T_b, HPS, D],
    ``cu_seqlens_q`` [S_b + 1], ``seqused_k`` [S_b], ``block_table`` [S_b, width * PPB], with
    HS sequence heads of HPS q heads each: HQ of 1 ("head"), HKV of G ("group"); "head_halves":
    the head layout's rows with S_b twice the sequences (each (query block, q head) cut at its
    block's middle), the table rows of a pair alike.

    View layouts ("head_views": HS = HQ of 1, "group_views": HKV of G; ``order`` does not apply,
    a call's sequences are its query blocks ascending): no q / out (FA3 call i reads and writes
    ``bucket_views(q, bucket, HPS)[i]``), ``cu_seqlens_q`` [n_b + 1] shared by the HS calls,
    ``seqused_k`` [HS, n_b] and ``block_table`` [HS, n_b, width * PPB] (call i: entry i),
    n_b = the bucket's query blocks."""
    plan = selection.plan
    HQ, D = q.shape[1], q.shape[2]
    hs = _seq_heads(HQ, vkv.num_kv_heads, layout)
    hps = HQ // hs
    views = layout in VIEW_LAYOUTS
    B = plan.block_size
    ppb = B // vkv.page_size
    n_b = bucket.g_hi - bucket.g_lo
    n_prog = n_b * hs  # one program per (query block, sequence head)
    n_seq = n_prog * subsequences(layout)
    n_rows = (bucket.row_hi - bucket.row_lo) * hs
    width = bucket.width * ppb
    cap = ws.capacity
    if n_seq > cap.sequences or (not views and n_rows * hps > cap.rows * HQ) or n_seq * width > ws.page_table.numel():
        raise ValueError(f"bucket {bucket} does not fit the attend workspace {cap}; plan it with make_attend_plan")
    if layout not in ws.layouts:
        raise ValueError(f"the attend workspace serves layouts {ws.layouts}, not {layout!r}; allocate it with "
                         f"AttendWorkspace(layouts=(..., {layout!r}))")
    table = ws.page_table[: n_seq * width].view(n_seq, width)
    q_virt = None if views else ws.q_rows(n_rows, q.dtype, hps)
    u_idx, u_cnt = union_rows(selection, bucket, ws, vkv.num_kv_heads) if layout in UNION_LAYOUTS else (None, None)
    launch(
        _virtual_seqs_kernel,
        (n_prog,),
        q=None if views else q,
        q_virt=q_virt,
        cu_seqlens_q_virt=ws.cu_seqlens_q_virt,
        seqused_k_virt=ws.seqused_k_virt,
        page_table=table,
        block_table=block_table,
        sel_idx=selection.indices,
        sel_cnt=selection.counts,
        union_idx=u_idx,
        union_cnt=u_cnt,
        **plan.tensors("sel_off", "cu_seqlens_q", "ctx_lens", "seqused_k", "dense", "qb_dense", "qb_req", "qb_abs"),
        g_lo=bucket.g_lo,
        g_hi=bucket.g_hi,
        row_lo=bucket.row_lo,
        row_hi=bucket.row_hi,
        **strides(None if views else q, "qt", "qh"),
        **strides(block_table, "bt"),
        **strides(table, "pt"),
        **strides(u_idx, "ut"),
        page_mult=vkv.page_mult,
        head_mult=vkv.head_mult,
        slot_mult=vkv.slot_mult,
        HQ=HQ,
        G=HQ // vkv.num_kv_heads,
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        B=B,
        PS=vkv.phys_page_size,
        VPS=vkv.page_size,
        PPB=ppb,
        BLOCK_J=ATTEND_LAUNCH.block_j,
        BLOCK_T=ATTEND_LAUNCH.block_t,
        ORDER=1 if views else ORDERS[order],  # views: call-major, query blocks ascending (cu_seqlens_q grows)
        GROUP=layout in UNION_LAYOUTS,
        VIEWS=views,
        HALVES=subsequences(layout) == 2,
        num_warps=ATTEND_LAUNCH.num_warps,
    )
    if views:
        return dict(
            cu_seqlens_q=ws.cu_seqlens_q_virt[: n_b + 1],
            seqused_k=ws.seqused_k_virt[:n_seq].view(hs, n_b),
            block_table=table.view(hs, n_b, width),
        )
    return dict(
        q=q_virt,
        out=ws.o_rows(n_rows, hps),
        cu_seqlens_q=ws.cu_seqlens_q_virt[: n_seq + 1],
        seqused_k=ws.seqused_k_virt[:n_seq],
        block_table=table,
    )


def bucket_views(x: torch.Tensor, bucket: AttendBucket, heads: int) -> list[torch.Tensor]:
    """The per-call q (or out) of a view layout: x[row_lo:row_hi, i * heads : (i + 1) * heads]
    for call i (views of ``x`` [T, HQ, D], no copy; heads = HPS: 1 for "head_views", G for
    "group_views"). A bucket's query blocks are consecutive in the launch, so are their rows."""
    rows = x[bucket.row_lo : bucket.row_hi]
    return [rows[:, i : i + heads] for i in range(0, x.shape[1], heads)]


def scatter_out(o_virt: torch.Tensor, out: torch.Tensor, plan: PrefillPlan, bucket: AttendBucket,
                num_kv_heads: int, *, order: str = "kv_desc", layout: str = "head") -> None:
    """Step 3 of a bucket: its sequence-major output rows (``virtual_sequences``' ``out``) into
    ``out`` [T, HQ, D] (one launch)."""
    HQ, D = out.shape[1], out.shape[2]
    n_seq = (bucket.g_hi - bucket.g_lo) * _seq_heads(HQ, num_kv_heads, layout)
    launch(
        _scatter_out_kernel,
        (n_seq,),
        o_virt=o_virt,
        out=out,
        **plan.tensors("cu_seqlens_q", "ctx_lens", "seqused_k", "qb_req", "qb_abs"),
        g_lo=bucket.g_lo,
        g_hi=bucket.g_hi,
        row_lo=bucket.row_lo,
        row_hi=bucket.row_hi,
        **strides(out, "ot", "oh"),
        G=HQ // num_kv_heads,
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        B=plan.block_size,
        BLOCK_T=ATTEND_LAUNCH.block_t,
        ORDER=ORDERS[order],
        GROUP=layout == "group",
        num_warps=ATTEND_LAUNCH.num_warps,
    )


def _fa3_bucket(flash_attn_varlen_func: FlashAttnVarlen, vkv: VirtualKV, scale: float, softcap: float, B: int,
                bucket: AttendBucket, cu_seqlens_q: torch.Tensor, *, q: torch.Tensor, out: torch.Tensor,
                seqused_k: torch.Tensor, block_table: torch.Tensor, descales: dict, num_splits: int,
                sinks: Optional[torch.Tensor] = None) -> None:
    """One FA3 call over virtual sequences of ``bucket`` (every sparse layout's call); ``sinks``:
    the learned sinks of the call's q heads (FA3's ``s_aux``); ``num_splits``: ``fa3_num_splits``."""
    launch_call(flash_attn_varlen_func, **descales, **_s_aux(sinks), q=q, k=vkv.k, v=vkv.v,
                max_seqlen_q=bucket.max_rows, cu_seqlens_q=cu_seqlens_q, max_seqlen_k=bucket.width * B,
                seqused_k=seqused_k, block_table=block_table, softmax_scale=scale, causal=True, softcap=softcap,
                out=out, num_splits=num_splits)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 / H200; elsewhere, e.g. the
    CPU-interpreted tests, that figure)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def fa3_num_splits(layout: str, sequences: int, q: torch.Tensor) -> int:
    """FA3's ``num_splits`` for one call of ``layout`` over ``sequences`` virtual sequences with
    queries ``q`` ([rows, heads, D]): see COPY_SPLITS. Host arithmetic, once per bucket (a step's
    later layers replay the recorded call)."""
    if layout not in VIEW_LAYOUTS and sequences >= SPLIT_FREE_WAVES * _num_sms(q.device):
        return COPY_SPLITS
    cap = VIEW_MAX_SPLITS if layout in VIEW_LAYOUTS else COPY_MAX_SPLITS
    split_bytes = 4 * q.shape[0] * q.shape[1] * q.shape[2]  # one split's fp32 out_accum
    return max(1, min(cap, SPLIT_ACCUM_BYTES // max(split_bytes, 1)))


def _s_aux(sinks: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """FA3's ``s_aux`` argument for learned sinks; nothing without them (the call stays as it was)."""
    return {} if sinks is None else {"s_aux": sinks}


def attend_fa3(
    q: torch.Tensor,
    vkv: VirtualKV,
    block_table: torch.Tensor,
    selection: BlockSelection,
    attend: AttendPlan,
    scale: float,
    out: torch.Tensor,
    *,
    flash_attn_varlen_func: FlashAttnVarlen,
    workspace: AttendWorkspace,
    softcap: float = 0.0,
    order: str = "kv_desc",
    layout: str = "head",
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-sparse causal attention of every chunk of ``selection.plan`` through FA3.

    Same math as ``sparse_prefill`` (``reference.block_sparse_attention``); rows must hold their
    diagonal block (``keep_diagonal``; dense rows always do). ``layout="group"`` attends every
    q head of a kv group over the union of the group's rows instead (block-sparse attention
    under the union mask: a superset of each head's blocks).

    Args:
        q: [T >= plan.num_tokens, HQ, D] float16/bfloat16, any strides with stride(-1) == 1.
        vkv: ``virtual_kv(k_cache, v_cache)`` of the paged cache (the chunks' own K/V written).
        block_table: [>= R, max_pages] int32 page table of the plan's requests.
        selection: the launch's BlockSelection (``prism_estimate``), on q's device.
        attend: ``make_attend_plan`` of the launch (host).
        scale: softmax scale; softcap: FA's logit soft-cap (0: none).
        out: [>= plan.num_tokens, HQ, D] like q; rows [0, plan.num_tokens) are written.
        flash_attn_varlen_func: vLLM's ``flash_attn_varlen_func`` with ``fa_version=3`` bound (or a
            stand-in with the same keyword semantics, e.g. ``reference.paged_varlen_attention``).
        workspace: the attend buffers (see AttendCapacity).
        order: sequence order, "kv_desc" (kv head, query block descending, group member) or
            "head_asc" (q head, query block ascending), for benchmarks.
        layout: "head" (one sequence per (query block, q head)) or "group" (one per (query block,
            kv head), G heads each, over the union of their selections; ``attend`` from
            ``make_attend_plan(layout="group")``, ``workspace`` with "group" in its layouts);
            "head_views" / "group_views": the same attention, one FA3 call per q head / kv head
            on views of q and out (no copies; ``order`` does not apply).
        q_scale, k_scale, v_scale: per-tensor fp8 dequantisation scales (1-element device tensors,
            vLLM's ``layer._q_scale`` etc.) for an fp8 cache / fp8 q: FA3's descales.
        sinks: learned attention sinks [HQ] (``reference.softmax_with_sinks``), as FA3's ``s_aux``,
            which holds one sink per head of a call: only the view layouts (and the plain causal
            call) can give each q head its own; "head" / "group" raise.

    Per bucket: two Triton launches (group layout: three) and one FA3 call; view layouts: one
    launch (group_views: two) and HQ (HKV) FA3 calls. No host sync. Every launch and call goes
    through ``_launch.launch`` / ``launch_call``, so a caller can record and replay them
    (``prefill.prism_attend`` does for a step's later layers).
    ``attend.all_blocks``: ``attend_dense_fa3`` instead.
    """
    plan = selection.plan
    _check_launch(q, out, vkv, block_table, plan, workspace)
    if sinks is not None:  # FA3's s_aux: bf16, contiguous (vLLM's flash-attention checks the same)
        check_tensor("sinks", sinks, shape=(q.shape[1],), dtype=torch.bfloat16, device=q.device, contiguous=True)
    if attend.all_blocks or selection.all_blocks:
        return attend_dense_fa3(q, vkv, block_table, plan, attend, scale, out,
                                flash_attn_varlen_func=flash_attn_varlen_func, softcap=softcap,
                                q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, sinks=sinks)
    if sinks is not None and layout not in VIEW_LAYOUTS:
        raise ValueError(f"learned sinks need a view layout ({', '.join(VIEW_LAYOUTS)}): FA3 takes one sink per "
                         f"head of a call, and layout {layout!r} puts sequences of different q heads in one call")
    if attend.layout != layout:
        raise ValueError(f"attend plan made for layout {attend.layout!r}, called with layout {layout!r}; plan it "
                         f"with make_attend_plan(layout={layout!r})")
    fa = (flash_attn_varlen_func, vkv, scale, softcap, plan.block_size)
    if layout in VIEW_LAYOUTS:
        hps = q.shape[1] // _seq_heads(q.shape[1], vkv.num_kv_heads, layout)
        # call i's q heads i*hps .. (i+1)*hps - 1 carry their own sinks
        call_sinks = [None if sinks is None else sinks[i : i + hps] for i in range(0, q.shape[1], hps)]
        for bucket in attend.buckets:
            a = virtual_sequences(q, vkv, block_table, selection, bucket, workspace, layout=layout)
            n_b = bucket.g_hi - bucket.g_lo
            descales = fa3_descales(q_scale, k_scale, v_scale, n_b, 1)  # the same for every call of the bucket
            calls = zip(bucket_views(q, bucket, hps), bucket_views(out, bucket, hps), a["seqused_k"], a["block_table"],
                        call_sinks)
            for q_i, out_i, seqused_k, table, sinks_i in calls:
                _fa3_bucket(*fa, bucket, a["cu_seqlens_q"], q=q_i, out=out_i, seqused_k=seqused_k,
                            block_table=table, descales=descales, sinks=sinks_i,
                            num_splits=fa3_num_splits(layout, n_b, q_i))
        return out
    for bucket in attend.buckets:
        a = virtual_sequences(q, vkv, block_table, selection, bucket, workspace, order=order, layout=layout)
        _fa3_bucket(*fa, bucket, a["cu_seqlens_q"], q=a["q"], out=a["out"], seqused_k=a["seqused_k"],
                    block_table=a["block_table"], num_splits=fa3_num_splits(layout, a["seqused_k"].shape[0], a["q"]),
                    descales=fa3_descales(q_scale, k_scale, v_scale, a["seqused_k"].shape[0], 1))
        scatter_out(a["out"], out, plan, bucket, vkv.num_kv_heads, order=order, layout=layout)
    return out


def attend_dense_fa3(
    q: torch.Tensor,
    vkv: VirtualKV,
    block_table: torch.Tensor,
    plan: PrefillPlan,
    attend: AttendPlan,
    scale: float,
    out: torch.Tensor,
    *,
    flash_attn_varlen_func: FlashAttnVarlen,
    softcap: float = 0.0,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Every chunk of ``plan`` with plain causal attention: one FA3 call on q / out and the
    requests' own page table over the real cache (what FlashAttention itself runs, learned
    ``sinks`` [HQ] included)."""
    n = plan.num_tokens
    flash_attn_varlen_func(
        **fa3_descales(q_scale, k_scale, v_scale, plan.num_reqs, vkv.num_kv_heads),
        **_s_aux(sinks),
        q=q[:n],
        k=vkv.k_cache,
        v=vkv.v_cache,
        max_seqlen_q=attend.max_seqlen_q,
        cu_seqlens_q=plan.cu_seqlens_q,
        max_seqlen_k=attend.max_seqlen_k,
        seqused_k=plan.seqused_k,
        block_table=block_table[: plan.num_reqs],
        softmax_scale=scale,
        causal=True,
        softcap=softcap,
        out=out[:n],
    )
    return out
