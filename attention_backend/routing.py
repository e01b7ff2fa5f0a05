"""Which rows of a vLLM batch Prism serves: host-only decisions made once per step.

vLLM orders a batch so that decodes come first and prefill chunks last (model runner V2 sorts
by query length; V1 reorders decode -> short extend -> long extend -> first chunks once a
builder sets ``reorder_batch_threshold``). Prism serves a *suffix* of requests ``[start,
end)``, so FlashAttention keeps one contiguous prefix ``[0, start)`` with its own metadata, and
Prism's query rows are one contiguous token range.

Rules (``n`` requests, ``q`` query lengths, ``S`` sequence lengths = context + chunk):

* ``end``: one past the last request with query rows (padding requests of a padded batch have
  ``q == 0`` and trail the batch);
* a request is *eligible* when ``q >= min_query_len``, ``S >= min_context_len`` and ``q >
  decode_threshold`` (decode and speculative-decode rows never leave FlashAttention, whose CUDA
  graphs serve them);
* ``start`` is the first eligible request after the last request that must stay on
  FlashAttention (``q <= decode_threshold``); requests in ``[start, end)`` that are not
  eligible are served by Prism with every causal block (``dense``), which is exact;
* no eligible request there: no Prism launch this step.

Everything here reads CPU tensors (``query_start_loc_cpu`` and the CPU upper bound of the
sequence lengths, exact for prefill rows); nothing touches the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["PrefillRoute", "route_prism_suffix", "split_launches"]


@dataclass(frozen=True)
class PrefillRoute:
    """The Prism part of one batch (requests ``start .. end-1``)."""

    start: int
    end: int
    token_start: int
    """First query row of the Prism part (``query_start_loc[start]``)."""
    token_end: int
    """One past its last query row (``query_start_loc[end]``)."""
    cu_seqlens_q: np.ndarray
    """[end-start+1] int64 query offsets relative to ``token_start``."""
    ctx_lens: np.ndarray
    """[end-start] int64 tokens already cached before each chunk."""
    dense: np.ndarray
    """[end-start] bool: request served with every causal block (not eligible by itself)."""

    @property
    def num_reqs(self) -> int:
        return self.end - self.start

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def sparse_tokens(self) -> int:
        q = np.diff(self.cu_seqlens_q)
        return int(q[~self.dense].sum())

    def from_index(self, k: int) -> Optional["PrefillRoute"]:
        """The route restricted to its requests from the first eligible one at index >= k
        (FlashAttention then takes the requests before it), or None if there is none."""
        elig = np.flatnonzero(~self.dense[k:])
        if elig.size == 0:
            return None
        k = k + int(elig[0])
        if k == 0:
            return self
        base = int(self.cu_seqlens_q[k])
        return PrefillRoute(
            start=self.start + k,
            end=self.end,
            token_start=self.token_start + base,
            token_end=self.token_end,
            cu_seqlens_q=self.cu_seqlens_q[k:] - base,
            ctx_lens=self.ctx_lens[k:],
            dense=self.dense[k:],
        )

    def until(self, k: int) -> "PrefillRoute":
        """The route's first ``k`` requests (1 <= k <= num_reqs): FlashAttention-only uses
        (the shadow step's estimation) that need not read the requests after them."""
        if not 1 <= k <= self.num_reqs:
            raise ValueError(f"until({k}) of a route of {self.num_reqs} requests")
        return PrefillRoute(
            start=self.start,
            end=self.start + k,
            token_start=self.token_start,
            token_end=self.token_start + int(self.cu_seqlens_q[k]),
            cu_seqlens_q=self.cu_seqlens_q[: k + 1],
            ctx_lens=self.ctx_lens[:k],
            dense=self.dense[:k],
        )

    def drop_first(self) -> Optional["PrefillRoute"]:
        """The route without its first request (see ``from_index``)."""
        return self.from_index(1)

    def block_counts(self, block_size: int, num_q_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per request: (query blocks, key blocks, selection entries) of its PrefillPlan rows;
        a plan's totals are the sums over its requests (see kernels/plan.py)."""
        B = block_size
        q = np.diff(self.cu_seqlens_q)
        seq = self.ctx_lens + q
        qb0 = self.ctx_lens // B
        nq = (seq - 1) // B - qb0 + 1
        nk = (seq + B - 1) // B
        sel = num_q_heads * (nq * (qb0 + 1) + nq * (nq - 1) // 2)
        return nq, nk, sel


def route_prism_suffix(
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    num_reqs: int,
    *,
    min_query_len: int,
    min_context_len: int,
    decode_threshold: int,
) -> Optional[PrefillRoute]:
    """Decide the Prism suffix of a batch (see the module docstring).

    Args:
        query_start_loc_cpu: [>= num_reqs+1] int CPU query offsets.
        seq_lens_cpu: [>= num_reqs] int CPU sequence lengths (context + chunk); an upper bound
            is fine for decode rows, it must be exact for prefill rows.
        num_reqs: requests in the batch (padding requests included).
        min_query_len, min_context_len: PrismConfig thresholds.
        decode_threshold: longest query that counts as a (speculative) decode row.
    Returns:
        The route, or None when Prism serves no request this step.
    """
    if num_reqs == 0:
        return None
    qsl = query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64, copy=False)
    seq = seq_lens_cpu[:num_reqs].numpy().astype(np.int64, copy=False)
    q = np.diff(qsl)
    live = np.flatnonzero(q > 0)
    if live.size == 0:
        return None
    end = int(live[-1]) + 1
    q, seq = q[:end], seq[:end]
    must_stay = q <= max(decode_threshold, 0)
    eligible = (~must_stay) & (q >= min_query_len) & (seq >= min_context_len)
    stay = np.flatnonzero(must_stay)
    first_free = int(stay[-1]) + 1 if stay.size else 0
    cand = np.flatnonzero(eligible[first_free:])
    if cand.size == 0:
        return None
    start = first_free + int(cand[0])
    ctx = seq[start:end] - q[start:end]
    if (ctx < 0).any():
        raise AssertionError(f"sequence lengths below query lengths: seq={seq.tolist()} q={q.tolist()}")
    cu = qsl[start : end + 1] - qsl[start]
    return PrefillRoute(
        start=start,
        end=end,
        token_start=int(qsl[start]),
        token_end=int(qsl[end]),
        cu_seqlens_q=cu,
        ctx_lens=ctx,
        dense=~eligible[start:end],
    )


def split_launches(
    route: PrefillRoute,
    *,
    block_size: int,
    num_q_heads: int,
    max_reqs: int,
    max_q_blocks: int,
    max_k_blocks: int,
    max_sel_capacity: int,
) -> tuple[Optional[PrefillRoute], list[tuple[int, int]]]:
    """Cut the Prism part into launches that each fit a preallocated workspace.

    Returns the (possibly shortened) route and the launches as request ranges ``[i0, i1)``
    relative to it, in batch order. A request too large for the workspace on its own (it
    cannot happen for workspaces sized by ``PrismWorkspace.sizes_for`` from the scheduler's
    limits) moves the start of the Prism part past it: FlashAttention serves it and everything
    before it. None when nothing is left for Prism.
    """
    r: Optional[PrefillRoute] = route
    while r is not None:
        nq, nk, sel = r.block_counts(block_size, num_q_heads)
        too_big = np.flatnonzero((nq > max_q_blocks) | (nk > max_k_blocks) | (sel > max_sel_capacity))
        if too_big.size == 0:
            break
        r = r.from_index(int(too_big[-1]) + 1)
    if r is None:
        return None, []
    launches: list[tuple[int, int]] = []
    i0, aq, ak, asel = 0, 0, 0, 0
    for i in range(r.num_reqs):
        full = (
            i - i0 + 1 > max_reqs
            or aq + nq[i] > max_q_blocks
            or ak + nk[i] > max_k_blocks
            or asel + sel[i] > max_sel_capacity
        )
        if full and i > i0:
            launches.append((i0, i))
            i0, aq, ak, asel = i, 0, 0, 0
        aq, ak, asel = aq + int(nq[i]), ak + int(nk[i]), asel + int(sel[i])
    launches.append((i0, r.num_reqs))
    return r, launches
