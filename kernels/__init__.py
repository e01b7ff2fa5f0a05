"""Triton kernels of Prism and their launchers (no vLLM import here).

Modules, one kernel family each:
    plan            host-side launch metadata (PrefillPlan, make_plan)
    pooling         mean-pooled queries (ragged chunks) and keys (paged KV cache)
    selection       calibrated dual-band scoring, top-p, union -> BSR block indices
    sparse_prefill  block-sparse attention over the paged KV cache
    prefill         the whole Prism prefill (estimation + attention) into a caller's output
"""

from .plan import PrefillPlan, make_plan
from .pooling import pool_keys_paged, pool_queries
from .prefill import PrismParams, PrismWorkspace, last_selection, prism_estimate, prism_prefill
from .selection import select_blocks
from .sparse_prefill import sparse_prefill

__all__ = [
    "PrefillPlan",
    "make_plan",
    "pool_queries",
    "pool_keys_paged",
    "select_blocks",
    "sparse_prefill",
    "PrismParams",
    "PrismWorkspace",
    "prism_estimate",
    "prism_prefill",
    "last_selection",
]
