"""The whole Prism prefill of one launch: estimation (pool, calibrate, select) + sparse attention.

This is what the vLLM backend calls for the rows it routes to Prism:

    params = PrismParams.make(bands=bands, scale=scale, config=cfg, device=device)  # per layer
    sizes = PrismWorkspace.sizes_for(max_num_batched_tokens, max_model_len, max_num_seqs,
                                     num_q_heads, num_kv_heads=..., head_dim=...)
    ws = PrismWorkspace.allocate(sizes, device)                          # once per device
    if ws.fits(plan):                                                    # host ints only
        prism_prefill(q, k_cache, v_cache, block_table, plan, params, ws, out)

All intermediate buffers live in the workspace (preallocated, shared by every layer since layers
run one after another), so a step allocates nothing and reads nothing back to the host.

Shape legend: T query rows, HQ / HKV heads, D head dim, NQB / NKB query / key blocks of the plan;
q: [T, HQ, D]; k_cache, v_cache: [NP, PS, HKV, D] (vLLM's FlashAttention cache views);
block_table: [R, max_pages] int32; out: [T, HQ, D].
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from ._launch import LaunchReplay, check, check_tensor, recording
from .attend_fa3 import (
    VIEW_LAYOUTS,
    AttendCapacity,
    AttendPlan,
    AttendWorkspace,
    FlashAttnVarlen,
    VirtualKV,
    attend_capacity,
    attend_fa3,
    virtual_kv,
)
from .params import BLOCK_SIZE, PrismParams
from .plan import BlockSelection, PrefillPlan
from .pooling import pool_keys_paged, pool_queries
from .selection import SelectionTuning, select_blocks
from .sparse_prefill import HEAD_DIMS, sparse_prefill

__all__ = [
    "FA3Launch",
    "Fp8Scales",
    "PrismParams",
    "PrismWorkspace",
    "prism_estimate",
    "prism_attend",
    "prism_prefill",
    "SUPPORTED_HEAD_DIMS",
]

logger = logging.getLogger(__name__)

#: Head dims of the whole prefill on the Triton attend step: the estimation kernels take any D, the
#: sparse attention kernel (kernels/sparse_prefill.py) is built for these.
SUPPORTED_HEAD_DIMS: tuple[int, ...] = HEAD_DIMS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive(where: str, **sizes: int) -> None:
    for name, v in sizes.items():
        check(int(v) >= 1, f"{where}: {name}={v} must be >= 1")


class PrismWorkspace:
    """Preallocated buffers of the Prism estimation, sized for the largest launch to serve.

    Buffers (views of them are handed to the kernels):
        pooled_q: float32 [max_q_blocks, HQ, D]     pooled_k: float32 [max_k_blocks, HKV, D]
        key_energy: float32 [max_k_blocks, HKV, 3]  (calibration statistics of pooled keys)
        pooled_k_split: float32 [max_k_blocks, HKV, 2, D]  (pooled keys as tf32 hi + lo pairs)
        sel_idx:  int16 [max_sel_capacity]          sel_cnt:  int32 [max_q_blocks * HQ]
        temps:    float32 [max_q_blocks, HQ, 2]     (logit multipliers, for stats)
        attend:   the FA3 attend step's buffers for ``attend_layouts`` (``AttendWorkspace``, at
                  most 248 MiB plus the per-sequence arrays), when ``attend_capacity`` is given:
                  None on the Triton path
    """

    def __init__(
        self,
        max_q_blocks: int,
        max_k_blocks: int,
        max_reqs: int,
        max_sel_capacity: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: Union[str, torch.device],
        block_size: int = BLOCK_SIZE,
        attend_capacity: Optional[AttendCapacity] = None,
        attend_dtype: Optional[torch.dtype] = None,
        attend_layouts: Sequence[str] = ("head",),
    ) -> None:
        _check_positive("PrismWorkspace", max_q_blocks=max_q_blocks, max_k_blocks=max_k_blocks, max_reqs=max_reqs,
                        max_sel_capacity=max_sel_capacity, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, block_size=block_size)
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"PrismWorkspace: num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.max_q_blocks = int(max_q_blocks)
        self.max_k_blocks = int(max_k_blocks)
        self.max_reqs = int(max_reqs)
        self.max_sel_capacity = int(max_sel_capacity)
        self.num_q_heads = int(num_q_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.block_size = int(block_size)
        f32 = dict(dtype=torch.float32, device=device)
        self.pooled_q = torch.empty(self.max_q_blocks, num_q_heads, head_dim, **f32)
        self.pooled_k = torch.empty(self.max_k_blocks, num_kv_heads, head_dim, **f32)
        self.key_energy = torch.empty(self.max_k_blocks, num_kv_heads, 3, **f32)
        self.pooled_k_split = torch.empty(self.max_k_blocks, num_kv_heads, 2, head_dim, **f32)
        self.temps = torch.empty(self.max_q_blocks, num_q_heads, 2, **f32)
        self.sel_idx = torch.empty(self.max_sel_capacity, dtype=torch.int16, device=device)
        self.sel_cnt = torch.empty(self.max_q_blocks * num_q_heads, dtype=torch.int32, device=device)
        # id(plan) -> (plan, {launch key: replay}); the plan is held, so its id stays its own
        self._replays: dict[int, tuple[PrefillPlan, dict[tuple, LaunchReplay]]] = {}
        self.attend: Optional[AttendWorkspace] = None
        if attend_capacity is not None:
            if attend_dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"PrismWorkspace: the FA3 attend buffers need the model dtype (float16 or "
                                 f"bfloat16), got attend_dtype={attend_dtype}")
            self.attend = AttendWorkspace(attend_capacity, num_q_heads, head_dim, attend_dtype, device, block_size,
                                          layouts=attend_layouts)
        logger.debug("Prism workspace: %.1f MB on %s (%s)", self.nbytes / 2**20, device, self.limits())

    @classmethod
    def allocate(cls, sizes: dict, device: Union[str, torch.device]) -> "PrismWorkspace":
        """``PrismWorkspace(**sizes, device=device)`` for a ``sizes_for`` result that was given
        num_kv_heads and head_dim."""
        missing = [k for k in ("num_kv_heads", "head_dim") if sizes.get(k) is None]
        if missing:
            raise ValueError(
                f"PrismWorkspace.allocate: sizes lack {missing}; pass num_kv_heads= and head_dim= to "
                f"PrismWorkspace.sizes_for (pooled keys need HKV * D floats per block)"
            )
        return cls(**sizes, device=device)

    @staticmethod
    def sizes_for(
        max_num_batched_tokens: int,
        max_model_len: int,
        max_num_seqs: int,
        num_q_heads: int,
        *,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        block_size: int = BLOCK_SIZE,
        max_long_reqs: int = 1,
        attend_dtype: Optional[torch.dtype] = None,
        attend_layouts: Sequence[str] = ("head",),
    ) -> dict:
        """Capacities for a scheduler configuration: the constructor's kwargs less ``device``
        (num_kv_heads / head_dim are passed through; ``allocate`` needs them).

        Bounds, with T = max_num_batched_tokens, N = cdiv(max_model_len, B), R = min(max_num_seqs, T):
          * query blocks: a chunk of L rows spans at most (L + 2B - 2) // B blocks, so any step
            has <= min(T, (T + R * (2B - 2)) // B) of them (always enough);
          * key blocks: ``max_long_reqs`` requests of up to N blocks, plus at most one key block
            per query block for requests without cached context (chunks of fresh prompts);
          * selection entries: HQ * sum of (qb_abs + 1) over the step's query blocks, at most
            ``max_long_reqs`` requests whose chunks end at the longest context (one
            "triangle" of blocks N, N-1, ... each) sharing T // B + 2 * max_long_reqs blocks.
        Launches beyond the key/selection bounds (several long requests in one step) do not
        ``fit``: the backend serves them with FlashAttention or in smaller launches.
        At T = max_model_len = 128K, HQ = 32, HKV = 8, D = 128 this is ~63 MB in all.
        With ``attend_dtype`` (the model dtype) the FA3 attend buffers are added
        (``attend_fa3.attend_capacity``: <= 248 MiB plus the per-sequence arrays) for the
        ``attend_layouts`` it will serve (``AttendWorkspace``: the view layouts need no copies).
        """
        _check_positive("PrismWorkspace.sizes_for", max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, max_num_seqs=max_num_seqs, num_q_heads=num_q_heads,
                        max_long_reqs=max_long_reqs, block_size=block_size)
        B, T = int(block_size), int(max_num_batched_tokens)
        n = _cdiv(int(max_model_len), B)
        R = min(int(max_num_seqs), T)
        q_blocks = min(T, (T + R * (2 * B - 2)) // B)
        long_q = min(q_blocks, T // B + 2 * max_long_reqs)
        # Request k's i-th query block from its end sees at most n - i blocks.
        entries = sum(max(1, n - i // max_long_reqs) for i in range(long_q))
        attend = None
        if attend_dtype is not None:
            if head_dim is None:
                raise ValueError("PrismWorkspace.sizes_for: attend_dtype needs head_dim")
            attend = attend_capacity(
                max_num_batched_tokens=T,
                max_q_blocks=q_blocks,
                max_k_blocks=n,
                num_q_heads=int(num_q_heads),
                head_dim=int(head_dim),
                element_size=torch.empty(0, dtype=attend_dtype).element_size(),
                block_size=B,
                layouts=attend_layouts,
            )
        return dict(
            max_q_blocks=q_blocks,
            max_k_blocks=max_long_reqs * n + q_blocks,
            max_reqs=R,
            max_sel_capacity=int(num_q_heads) * entries,
            num_q_heads=int(num_q_heads),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=B,
            attend_capacity=attend,
            attend_dtype=attend_dtype,
            attend_layouts=tuple(attend_layouts),
        )

    def limits(self) -> dict:
        return dict(
            max_q_blocks=self.max_q_blocks,
            max_k_blocks=self.max_k_blocks,
            max_reqs=self.max_reqs,
            max_sel_capacity=self.max_sel_capacity,
        )

    @property
    def nbytes(self) -> int:
        bufs = (self.pooled_q, self.pooled_k, self.key_energy, self.pooled_k_split, self.temps, self.sel_idx,
                self.sel_cnt)
        return sum(t.numel() * t.element_size() for t in bufs) + (self.attend.nbytes if self.attend else 0)

    #: Plans whose recorded launches are kept: a step's launches (usually one, several when a step's
    #: long requests exceed the workspace). When a new plan would exceed it, all are dropped (the
    #: older plans belong to finished steps; what a replay holds is the plan and workspace views).
    MAX_REPLAY_PLANS = 4

    def replay(self, plan: PrefillPlan, key: tuple) -> Optional[LaunchReplay]:
        """The estimation launches recorded for ``plan`` under ``key`` (``prism_estimate``)."""
        entry = self._replays.get(id(plan))
        return entry[1].get(key) if entry is not None and entry[0] is plan else None

    def remember(self, plan: PrefillPlan, key: tuple, replay: LaunchReplay) -> None:
        entry = self._replays.get(id(plan))
        if entry is None or entry[0] is not plan:
            if len(self._replays) >= self.MAX_REPLAY_PLANS:
                self._replays.clear()  # a new step: the old plans' launches are done with
            entry = self._replays[id(plan)] = (plan, {})
        entry[1][key] = replay

    @contextlib.contextmanager
    def recording_for(self, plan: PrefillPlan, key: Optional[tuple], inputs: Sequence[Optional[torch.Tensor]],
                      keep: Any = None) -> Iterator[None]:
        """Record the launches made inside the block and remember them as ``plan``'s replay under
        ``key``, with ``inputs`` the tensors a later call swaps in (``LaunchReplay``); nothing
        is recorded for ``key`` None, nor remembered when two inputs are the same tensor (which
        one a kwarg stands for would be ambiguous)."""
        if key is None:
            yield
            return
        with recording() as calls:
            yield
        if len({id(t) for t in inputs if t is not None}) == sum(t is not None for t in inputs):
            self.remember(plan, key, LaunchReplay(calls, inputs, keep))

    def forget_replays(self) -> None:
        """Drop every recorded launch (the next call of each plan checks and records again)."""
        self._replays.clear()

    def fits(self, plan: PrefillPlan) -> bool:
        """Whether ``plan`` fits the buffers (host ints only; no device access)."""
        return (
            plan.num_q_heads == self.num_q_heads
            and plan.block_size == self.block_size
            and plan.num_reqs <= self.max_reqs
            and plan.num_q_blocks <= self.max_q_blocks
            and plan.num_k_blocks <= self.max_k_blocks
            and plan.sel_capacity <= self.max_sel_capacity
        )


def _check_launch(q: torch.Tensor, k_cache: torch.Tensor, plan: PrefillPlan, params: PrismParams,
                  workspace: "PrismWorkspace") -> None:
    check(
        plan.block_size == params.block_size == workspace.block_size,
        f"block sizes differ: plan {plan.block_size}, params {params.block_size}, workspace {workspace.block_size}; "
        f"build all three from PrismConfig.block_size",
    )
    if not workspace.fits(plan):
        raise ValueError(
            f"the Prism workspace {workspace.limits()} is too small for this launch (query blocks "
            f"{plan.num_q_blocks}, key blocks {plan.num_k_blocks}, selection entries {plan.sel_capacity}, "
            f"requests {plan.num_reqs}); check workspace.fits(plan) before calling and serve the rest densely"
        )
    ws = workspace
    check_tensor("q", q, shape=("T", ws.num_q_heads, ws.head_dim))
    check_tensor("k_cache", k_cache, shape=("num_pages", "page_size", ws.num_kv_heads, ws.head_dim))


def prism_estimate(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: PrefillPlan,
    params: PrismParams,
    workspace: PrismWorkspace,
    *,
    precision: str = "tf32x3",
    tuning: Optional[SelectionTuning] = None,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
) -> BlockSelection:
    """Prism's block estimation of every chunk of ``plan``: pool queries and keys, calibrate,
    select (``reference.select_blocks`` per request) into the workspace.

    Args: as ``prism_prefill`` (q, the K half of the paged cache, its page table, the plan, the
    layer's params, the workspace), the tl.dot precision of the scores and the selection's launch
    knobs (see select_blocks), the fp8 scales of q and K (see ``pool_queries``).

    Returns:
        The launch's BlockSelection (views of the workspace). When every row selects every causal
        block (``params.all_blocks``) nothing is launched and the selection says so. Otherwise up to
        three pooling/selection launches plus one per row-length level; no host sync, no allocation.
    """
    nqb, hq = plan.num_q_blocks, workspace.num_q_heads
    sel_cnt = workspace.sel_cnt[: nqb * hq]
    # Every layer of a step repeats the same launches with its own q, cache and band masks: the
    # first call of a step checks everything and records its launches, the others replay them.
    inputs = (q, k_cache, block_table, q_scale, k_scale, params.band_high, params.band_low)
    key = (precision, tuning, params.estimation_key, *(_layout(t) for t in inputs[:5]))
    replay = workspace.replay(plan, key)
    if replay is not None:
        replay(*inputs)
        return BlockSelection(plan=plan, indices=workspace.sel_idx, counts=sel_cnt)
    _check_launch(q, k_cache, plan, params, workspace)
    if params.all_blocks:  # nothing to score or write: attention reads no selection
        return BlockSelection(plan=plan, indices=workspace.sel_idx, counts=sel_cnt, all_blocks=True)
    with workspace.recording_for(plan, key, inputs):
        _estimate(q, k_cache, block_table, plan, params, workspace, sel_cnt, precision, tuning, q_scale, k_scale)
    return BlockSelection(plan=plan, indices=workspace.sel_idx, counts=sel_cnt)


def _layout(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _estimate(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, plan: PrefillPlan,
              params: PrismParams, workspace: PrismWorkspace, sel_cnt: torch.Tensor, precision: str,
              tuning: Optional[SelectionTuning], q_scale: Optional[torch.Tensor],
              k_scale: Optional[torch.Tensor]) -> None:
    """prism_estimate's launches (checked by each launcher). Replayed for a step's later layers:
    keep every device operation here a ``_launch.launch`` of a pooling / selection launcher."""
    nqb, nkb = plan.num_q_blocks, plan.num_k_blocks
    key_energy = workspace.key_energy[:nkb] if params.calibrate else None
    split = workspace.pooled_k_split[:nkb] if precision == "tf32x3" else None
    pool_queries(q=q, plan=plan, out=workspace.pooled_q[:nqb], q_scale=q_scale)
    pool_keys_paged(
        k_cache=k_cache,
        block_table=block_table,
        plan=plan,
        out=workspace.pooled_k[:nkb],
        energy_out=key_energy,
        params=params,
        split_out=split,
        k_scale=k_scale,
    )
    select_blocks(
        pooled_q=workspace.pooled_q[:nqb],
        pooled_k=workspace.pooled_k[:nkb],
        plan=plan,
        params=params,
        sel_idx=workspace.sel_idx,
        sel_cnt=sel_cnt,
        temps_out=workspace.temps[:nqb],
        key_energy=key_energy,
        pooled_k_split=split,
        precision=precision,
        tuning=tuning,
    )


@dataclass(frozen=True)
class Fp8Scales:
    """Per-tensor dequantisation scales of an fp8 KV cache (value = fp8 * scale): 1-element
    float32 device tensors, vLLM's ``layer._q_scale`` (None when q is not fp8), ``_k_scale``,
    ``_v_scale``. Read on the device: updating them in place needs no new launch setup."""

    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class FA3Launch:
    """What the FA3 attend step needs beyond the Triton path's arguments."""

    flash_attn_varlen_func: FlashAttnVarlen
    """vLLM's ``flash_attn_varlen_func`` with ``fa_version=3`` bound (or a stand-in)."""
    attend: AttendPlan
    """The launch's buckets (``attend_fa3.make_attend_plan``, built on the host in the builder),
    planned for the layout the step attends in (``AttendPlan.layout``)."""
    kv: Optional[VirtualKV] = None
    """The cache's virtual-page view when the caller made it already (``attend_fa3.virtual_kv``)."""


def prism_attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    selection: BlockSelection,
    params: PrismParams,
    workspace: PrismWorkspace,
    out: torch.Tensor,
    *,
    fa3: Optional[FA3Launch] = None,
    scales: Optional["Fp8Scales"] = None,
) -> torch.Tensor:
    """Exact attention of every chunk over its selected blocks: through FA3 (``attend_fa3``) when
    ``fa3`` is given, else through the Triton kernel (``sparse_prefill``). ``scales``: an fp8
    cache (FA3 only)."""
    if fa3 is not None:
        if not params.keep_diagonal:
            raise ValueError("the FA3 attend step needs keep_diagonal=True (rows end on their diagonal block)")
        if workspace.attend is None:
            raise ValueError("the workspace has no FA3 attend buffers; allocate it with attend_dtype")
        vkv = fa3.kv if fa3.kv is not None else virtual_kv(k_cache, v_cache, selection.plan.block_size)
        if isinstance(vkv, str):
            raise ValueError(f"the FA3 attend step cannot address this KV cache: {vkv}")
        sc = scales or Fp8Scales()
        # As the estimation: every layer of a step runs the same launches (same plans, workspace,
        # shapes) with its own q, out, cache and selection rows; the first call checks everything
        # and records them, the others replay them (no checks, no argument building). Not for fp8
        # descales (derived per call) nor the view layouts (per-head views of q / out) nor a launch
        # that is one plain causal FA3 call.
        plan = selection.plan
        attend = fa3.attend
        replayable = (scales is None and params.sinks is None and not (attend.all_blocks or selection.all_blocks)
                      and attend.layout not in VIEW_LAYOUTS)
        inputs = (q, out, vkv.k, vkv.v, block_table, selection.indices, selection.counts)
        key = None
        if replayable:
            key = ("attend", id(attend), id(fa3.flash_attn_varlen_func), params.scale, params.softcap,
                   vkv.page_mult, vkv.head_mult, vkv.slot_mult, vkv.phys_page_size, vkv.num_kv_heads,
                   *(_layout(t) for t in inputs))
            replay = workspace.replay(plan, key)
            if replay is not None:
                replay(*inputs)
                return out
        with workspace.recording_for(plan, key, inputs, keep=(attend, fa3.flash_attn_varlen_func)):
            attend_fa3(
                q, vkv, block_table, selection, attend, params.scale, out,
                flash_attn_varlen_func=fa3.flash_attn_varlen_func, workspace=workspace.attend,
                softcap=params.softcap, q_scale=sc.q, k_scale=sc.k, v_scale=sc.v, layout=attend.layout,
                sinks=params.sinks,
            )
        return out
    if scales is not None:
        raise ValueError("the Triton attend step reads no fp8 cache; use the FA3 attend step")
    if params.softcap:
        raise ValueError("the Triton attend step has no logit soft-cap; use the FA3 attend step")
    if params.sinks is not None:
        raise ValueError("the Triton attend step has no learned sinks; use the FA3 attend step in a view layout")
    return sparse_prefill(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        plan=selection.plan,
        sel_idx=selection.indices,
        sel_cnt=selection.counts,
        scale=params.scale,
        out=out,
        all_blocks=selection.all_blocks,
    )


def prism_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: PrefillPlan,
    params: PrismParams,
    workspace: PrismWorkspace,
    out: torch.Tensor,
    *,
    fa3: Optional[FA3Launch] = None,
    scales: Optional["Fp8Scales"] = None,
    precision: str = "tf32x3",
    tuning: Optional[SelectionTuning] = None,
) -> BlockSelection:
    """Prism block-sparse prefill of every chunk of ``plan`` (``reference.prism_attention_batch``).

    Args:
        q: [T >= plan.num_tokens, HQ, D] float16/bfloat16, any strides with stride(-1) == 1.
        k_cache, v_cache: [NP, PS, HKV, D] views of the paged cache (vLLM:
            ``kv_cache.transpose(1, 2).split(D, -1)``); the chunks' own K/V already written.
        block_table: [>= R, max_pages] int32 page table of the plan's requests.
        plan: PrefillPlan on q's device; ``workspace.fits(plan)`` must hold.
        params: the layer's PrismParams.
        workspace: preallocated buffers (see PrismWorkspace).
        out: [>= plan.num_tokens, HQ, D] output; rows [0, plan.num_tokens) are written.
        fa3: attend through FlashAttention 3 (see ``prism_attend``); None: the Triton kernel.
        scales: fp8 dequantisation scales when q / the cache are fp8 (vLLM ``--kv-cache-dtype fp8``).
        precision, tuning: tl.dot precision of the block scores and the selection's launch knobs
            (see ``select_blocks``).

    Returns:
        The launch's BlockSelection (``prism_estimate``); ``out`` holds the attention. No host
        sync, no allocation.
    """
    sc = scales or Fp8Scales()
    selection = prism_estimate(q, k_cache, block_table, plan, params, workspace, precision=precision, tuning=tuning,
                               q_scale=sc.q, k_scale=sc.k)
    prism_attend(q, k_cache, v_cache, block_table, selection, params, workspace, out, fa3=fa3, scales=scales)
    return selection
