"""Triton kernels of Prism and their launchers (no vLLM import here).

Modules, one kernel family each:
    plan            host-side launch metadata (PrefillPlan, make_plan)
    pooling         mean-pooled queries (ragged chunks) and keys (paged KV cache)
    selection       calibrated dual-band scoring, top-p, union -> BSR block indices
    sparse_prefill  block-sparse attention over the paged KV cache
    prefill         the whole Prism prefill (estimation + attention) into a caller's output
"""

from .plan import PrefillPlan, make_plan
from .sparse_prefill import sparse_prefill

__all__ = ["PrefillPlan", "make_plan", "sparse_prefill"]
