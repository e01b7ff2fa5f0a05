"""Worker side of ``GET /prism/stats``: a vLLM worker extension adding one collective RPC.

``prism-vllm serve`` passes ``--worker-extension-cls prism_vllm.server.worker.PrismStatsExtension``
(with plain ``vllm serve``, pass it yourself). vLLM then mixes this class into its worker class,
and the API server reaches every worker with ``engine_client.collective_rpc("prism_stats")``.
A string method name keeps the call inside vLLM's safe msgpack serialization (sending a
function would need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), and the reply is plain data.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

__all__ = ["PrismStatsExtension", "to_plain"]

logger = logging.getLogger(__name__)


def to_plain(x: Any) -> Any:
    """``x`` with tensors, numpy values, tuples and non-string keys turned into JSON data
    (msgpack- and JSON-safe); non-finite floats become None."""
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    tolist = getattr(x, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist):
        return to_plain(tolist())
    return str(x)


def _ranks() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        from vllm.distributed import parallel_state as ps

        out["tp_rank"] = ps.get_tensor_model_parallel_rank()
        out["tp_size"] = ps.get_tensor_model_parallel_world_size()
        out["pp_rank"] = ps.get_pp_group().rank_in_group
        out["pp_size"] = ps.get_pp_group().world_size
    except Exception:  # not initialised (tests) or another vLLM layout: ranks are optional
        pass
    return out


class PrismStatsExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``; adds ``prism_stats``.

    Only this one public name exists, since vLLM refuses extensions whose attributes collide
    with the worker's own.
    """

    def prism_stats(self) -> dict[str, Any]:
        """This worker's Prism counters: ``{"rank", "tp_rank", ..., "pid", "available",
        "stats", "error"}``, where ``stats`` is ``prism_vllm.stats.collect_stats()``."""
        info: dict[str, Any] = {"rank": getattr(self, "rank", None), "pid": os.getpid()}
        info.update(_ranks())
        try:
            from prism_vllm.stats import collect_stats
        except ImportError as e:
            info.update(available=False, stats={}, error=f"prism_vllm.stats unavailable: {e}")
            return info
        try:
            info.update(available=True, stats=to_plain(collect_stats()), error=None)
        except Exception as e:  # a broken counter must never take the worker down
            logger.exception("prism_vllm.stats.collect_stats() failed")
            info.update(available=False, stats={}, error=f"collect_stats failed: {e!r}")
        return info
