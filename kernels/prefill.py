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

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

from .plan import PrefillPlan
from .pooling import pool_keys_paged, pool_queries
from .selection import SelectionTuning, select_blocks

if TYPE_CHECKING:  # only for type hints: kernels never import the vLLM glue
    from prism_vllm.config import PrismConfig
    from prism_vllm.rope import Bands

__all__ = [
    "PrismParams",
    "PrismWorkspace",
    "prism_estimate",
    "prism_prefill",
    "last_selection",
    "SUPPORTED_HEAD_DIMS",
]

logger = logging.getLogger(__name__)

#: Head dims of the whole prefill: the estimation kernels take any D, the sparse attention kernel
#: (kernels/sparse_prefill.py, imported lazily below) is built for these.
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 128, 256)


@dataclass
class PrismParams:
    """Per-layer Prism settings in the form the kernels take (built once per layer)."""

    band_high: torch.Tensor
    """float32 [D] 0/1 mask of the high-frequency band, on the device."""
    band_low: torch.Tensor
    """float32 [D] 0/1 mask of the low-frequency band, on the device."""
    high_threshold: float
    low_threshold: float
    calibrate: bool
    keep_sink: bool
    keep_diagonal: bool
    scale: float
    """Softmax scale of the attention (usually D ** -0.5)."""
    block_budget: Optional[float] = None
    """Cap on the selected share of each row's causal blocks (PrismConfig.block_budget)."""

    @classmethod
    def make(
        cls, *, bands: "Bands", scale: float, config: "PrismConfig", device: Union[str, torch.device]
    ) -> "PrismParams":
        """From the layer's RoPE bands (prism_vllm.rope.rope_bands) and a PrismConfig."""
        cfg = config
        return cls(
            band_high=bands.high.to(device=device, dtype=torch.float32).contiguous(),
            band_low=bands.low.to(device=device, dtype=torch.float32).contiguous(),
            high_threshold=float(cfg.high_threshold),
            low_threshold=float(cfg.low_threshold),
            calibrate=bool(cfg.calibrate),
            keep_sink=bool(cfg.keep_sink),
            keep_diagonal=bool(cfg.keep_diagonal),
            scale=float(scale),
            block_budget=None if cfg.block_budget is None else float(cfg.block_budget),
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PrismWorkspace:
    """Preallocated buffers of the Prism estimation, sized for the largest launch to serve.

    Buffers (views of them are handed to the kernels):
        pooled_q: float32 [max_q_blocks, HQ, D]     pooled_k: float32 [max_k_blocks, HKV, D]
        key_energy: float32 [max_k_blocks, HKV, 3]  (calibration statistics of pooled keys)
        pooled_k_split: float32 [max_k_blocks, HKV, 2, D]  (pooled keys as tf32 hi + lo pairs)
        sel_idx:  int16 [max_sel_capacity]          sel_cnt:  int32 [max_q_blocks * HQ]
        temps:    float32 [max_q_blocks, HQ, 2]     (logit multipliers, for stats)
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
        block_size: int = 128,
    ) -> None:
        for name, v in (
            ("max_q_blocks", max_q_blocks),
            ("max_k_blocks", max_k_blocks),
            ("max_reqs", max_reqs),
            ("max_sel_capacity", max_sel_capacity),
            ("num_q_heads", num_q_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if int(v) < 1:
                raise ValueError(f"PrismWorkspace: {name}={v} must be >= 1")
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
        block_size: int = 128,
        max_long_reqs: int = 1,
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
        """
        for name, v in (
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
            ("max_num_seqs", max_num_seqs),
            ("num_q_heads", num_q_heads),
            ("max_long_reqs", max_long_reqs),
        ):
            if int(v) < 1:
                raise ValueError(f"PrismWorkspace.sizes_for: {name}={v} must be >= 1")
        B, T = int(block_size), int(max_num_batched_tokens)
        n = _cdiv(int(max_model_len), B)
        R = min(int(max_num_seqs), T)
        q_blocks = min(T, (T + R * (2 * B - 2)) // B)
        long_q = min(q_blocks, T // B + 2 * max_long_reqs)
        # Request k's i-th query block from its end sees at most n - i blocks.
        entries = sum(max(1, n - i // max_long_reqs) for i in range(long_q))
        return dict(
            max_q_blocks=q_blocks,
            max_k_blocks=max_long_reqs * n + q_blocks,
            max_reqs=R,
            max_sel_capacity=int(num_q_heads) * entries,
            num_q_heads=int(num_q_heads),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=B,
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
        return sum(t.numel() * t.element_size() for t in bufs)

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


def _check_launch(q: torch.Tensor, k_cache: torch.Tensor, plan: PrefillPlan, workspace: "PrismWorkspace") -> None:
    if not workspace.fits(plan):
        raise ValueError(
            f"the Prism workspace {workspace.limits()} is too small for this launch (query blocks "
            f"{plan.num_q_blocks}, key blocks {plan.num_k_blocks}, selection entries {plan.sel_capacity}, "
            f"requests {plan.num_reqs}); check workspace.fits(plan) before calling and serve the rest densely"
        )
    if q.shape[1:] != (workspace.num_q_heads, workspace.head_dim) or k_cache.shape[2] != workspace.num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} / k_cache {tuple(k_cache.shape)} do not match the workspace's "
            f"HQ={workspace.num_q_heads}, HKV={workspace.num_kv_heads}, D={workspace.head_dim}"
        )


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prism's block estimation of every chunk of ``plan``: pool queries and keys, calibrate,
    select (``reference.select_blocks`` per request) into the workspace.

    Args: as ``prism_prefill`` (q, the K half of the paged cache, its page table, the plan, the
    layer's params, the workspace), the tl.dot precision of the scores and the selection's launch
    knobs (see select_blocks).

    Returns:
        (sel_idx, sel_cnt) views of the workspace: the BSR selection ``sparse_prefill`` reads.
        Up to three pooling/selection launches plus one per row-length level; no host sync, no
        allocation.
    """
    _check_launch(q, k_cache, plan, workspace)
    nqb, nkb, hq = plan.num_q_blocks, plan.num_k_blocks, workspace.num_q_heads
    sel_cnt = workspace.sel_cnt[: nqb * hq]
    key_energy = workspace.key_energy[:nkb] if params.calibrate else None
    split = workspace.pooled_k_split[:nkb] if precision == "tf32x3" else None
    all_blocks = (params.high_threshold >= 1.0 or params.low_threshold >= 1.0) and params.block_budget is None
    if not all_blocks:  # a threshold of 1.0 selects every causal block: no scores needed (no budget)
        pool_queries(q=q, plan=plan, out=workspace.pooled_q[:nqb])
        pool_keys_paged(
            k_cache=k_cache,
            block_table=block_table,
            plan=plan,
            out=workspace.pooled_k[:nkb],
            energy_out=key_energy,
            band_high=params.band_high,
            band_low=params.band_low,
            split_out=split,
        )
    select_blocks(
        pooled_q=workspace.pooled_q[:nqb],
        pooled_k=workspace.pooled_k[:nkb],
        plan=plan,
        band_high=params.band_high,
        band_low=params.band_low,
        high_threshold=params.high_threshold,
        low_threshold=params.low_threshold,
        calibrate=params.calibrate,
        keep_sink=params.keep_sink,
        keep_diagonal=params.keep_diagonal,
        sel_idx=workspace.sel_idx,
        sel_cnt=sel_cnt,
        temps_out=workspace.temps[:nqb],
        key_energy=key_energy,
        pooled_k_split=split,
        block_budget=params.block_budget,
        precision=precision,
        tuning=tuning,
    )
    return workspace.sel_idx, sel_cnt


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
    precision: str = "tf32x3",
    tuning: Optional[SelectionTuning] = None,
) -> torch.Tensor:
    """Prism block-sparse prefill of every chunk of ``plan`` (``reference.prism_attention_batch``).

    Args:
        q: [T >= plan.num_tokens, HQ, D] float16/bfloat16, any strides with stride(-1) == 1.
        k_cache, v_cache: [NP, PS, HKV, D] views of the paged cache (vLLM:
            ``kv_cache.transpose(1, 2).split(D, -1)``); the chunks' own K/V already written.
        block_table: [>= R, max_pages] int32 page table of the plan's requests.
        plan: PrefillPlan on q's device; ``workspace.fits(plan)`` must hold.
        params: the layer's PrismParams.
        workspace: preallocated buffers (see PrismWorkspace); after the call they hold this
            launch's pooled blocks and selection (``last_selection``).
        out: [>= plan.num_tokens, HQ, D] output; rows [0, plan.num_tokens) are written.
        precision, tuning: tl.dot precision of the block scores and the selection's launch knobs
            (see ``select_blocks``).

    Returns:
        out. ``prism_estimate`` then ``sparse_prefill``; no host sync, no allocation.
    """
    from .sparse_prefill import sparse_prefill  # lazily: written in parallel, optional at import

    sel_idx, sel_cnt = prism_estimate(
        q, k_cache, block_table, plan, params, workspace, precision=precision, tuning=tuning
    )
    return sparse_prefill(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        plan=plan,
        sel_idx=sel_idx,
        sel_cnt=sel_cnt,
        scale=params.scale,
        out=out,
    )


def last_selection(workspace: PrismWorkspace, plan: PrefillPlan) -> dict:
    """Views of the selection of the last ``prism_prefill(plan, ...)`` on ``workspace``.

    Returns a dict of device tensors (no host sync; read them after the step if needed):
        counts: int32 [NQB, HQ] selected key blocks per (query block, q head)
        causal: int32 [NQB] causal key blocks per query block (qb_abs + 1)
        sel_idx: int16 [plan.sel_capacity] BSR indices (row (g, h) at sel_off[g]*HQ + h*(qb_abs[g]+1))
        temps: float32 [NQB, HQ, 2] logit multipliers (high, low) of estimated rows
    Stale for rows of dense requests' temps, and for temps when a threshold is 1.0.
    """
    nqb, hq = plan.num_q_blocks, workspace.num_q_heads
    return dict(
        counts=workspace.sel_cnt[: nqb * hq].view(nqb, hq),
        causal=plan.qb_abs + 1,
        sel_idx=workspace.sel_idx[: plan.sel_capacity],
        temps=workspace.temps[:nqb],
    )
