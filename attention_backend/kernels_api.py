"""The only place the vLLM glue touches the Prism kernels (``prism_vllm.kernels.prefill``).

Imported lazily (from the builder/impl constructors), so registering the plugin and reading
the backend class import neither Triton nor the kernels.
"""

from __future__ import annotations

import torch

from prism_vllm.config import PrismConfig
from prism_vllm.kernels.plan import PrefillPlan
from prism_vllm.kernels.prefill import (
    SUPPORTED_HEAD_DIMS,
    PrismParams,
    PrismWorkspace,
    last_selection,
    prism_prefill,
)
from prism_vllm.rope import Bands

from .workspace import WorkspaceNeed

__all__ = [
    "SUPPORTED_HEAD_SIZES",
    "PrismParams",
    "PrismWorkspace",
    "make_params",
    "new_workspace",
    "launch",
    "selected_counts",
]

SUPPORTED_HEAD_SIZES: tuple[int, ...] = tuple(SUPPORTED_HEAD_DIMS)


def make_params(bands: Bands, scale: float, cfg: PrismConfig, device: torch.device) -> PrismParams:
    """Per-layer launch parameters (band masks on ``device``, thresholds, softmax scale)."""
    return PrismParams.make(bands=bands, scale=scale, config=cfg, device=device)


def new_workspace(need: WorkspaceNeed, device: torch.device) -> PrismWorkspace:
    sizes = PrismWorkspace.sizes_for(
        need.max_num_batched_tokens,
        need.max_model_len,
        need.max_num_seqs,
        need.num_q_heads,
        num_kv_heads=need.num_kv_heads,
        head_dim=need.head_dim,
    )
    return PrismWorkspace.allocate(sizes, device)


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: PrefillPlan,
    params: PrismParams,
    ws: PrismWorkspace,
    out: torch.Tensor,
) -> None:
    prism_prefill(q, k_cache, v_cache, block_table, plan, params, ws, out)


def selected_counts(ws: PrismWorkspace, plan: PrefillPlan) -> torch.Tensor:
    """int32 [NQB, HQ] selected key blocks per (query block, q head) of the last launch."""
    return last_selection(ws, plan)["counts"]
