"""Triton kernels of Prism and their launchers (no vLLM import here).

Modules, one kernel family each:
    params          the layer's settings as the kernels take them (PrismParams, BLOCK_SIZE)
    plan            host-side launch metadata (PrefillPlan, make_plan) and the selection type (BlockSelection)
    pooling         mean-pooled queries (ragged chunks) and keys (paged KV cache)
    selection       calibrated dual-band scoring, top-p, union -> BSR block indices (BlockSelection)
    sparse_prefill  block-sparse attention over the paged KV cache (Triton; GPUs without FA3, CPU tests)
    attend_fa3      block-sparse attention through vLLM's FA3 as virtual varlen sequences (Hopper)
    prefill         the whole Prism prefill (estimation + attention) into a caller's output
    _launch         what every launcher shares: argument checks, stride keywords
"""

from .params import PrismParams
from .plan import BlockSelection, PrefillPlan, make_plan
from .pooling import pool_keys_paged, pool_queries
from .prefill import FA3Launch, PrismWorkspace, prism_attend, prism_estimate, prism_prefill
from .selection import select_blocks
from .sparse_prefill import sparse_prefill

__all__ = [
    "BlockSelection",
    "FA3Launch",
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
    "prism_attend",
]
