"""vLLM endpoint plugin ``prism_http``: ``GET /prism/stats`` and ``prism_*`` series on ``/metrics``.

Entry point (pyproject): ``vllm.endpoint_plugins: prism_http = prism_vllm.server.http:PrismHttpPlugin``.
vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``prism-vllm serve`` sets it);
with plain ``vllm serve``::

    VLLM_PLUGINS=prism,prism_http vllm serve MODEL --attention-backend prism \\
        --worker-extension-cls prism_vllm.server.worker.PrismStatsExtension

The routes read the workers through ``engine_client.collective_rpc("prism_stats")`` (the method
comes from the worker extension). ``/prism/stats`` reads them on every request; a background
task polls every :data:`POLL_SECONDS` to keep the Prometheus series current, since a
Prometheus scrape cannot await. Nothing in vLLM's server is patched.
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from .observability import PrismCollector, aggregate, stats_response

__all__ = ["PrismHttpPlugin", "STATS_PATH", "POLL_SECONDS", "RPC_METHOD"]

logger = logging.getLogger(__name__)

STATS_PATH = "/prism/stats"
RPC_METHOD = "prism_stats"
POLL_SECONDS = 5.0
RPC_TIMEOUT_SECONDS = 10.0
#: (registry, collector) registered last in this process.
_ACTIVE: Optional[tuple[Any, PrismCollector]] = None
_FIX = (
    "start the server with `prism-vllm serve`, or add `--worker-extension-cls "
    "prism_vllm.server.worker.PrismStatsExtension` to `vllm serve`"
)


class PrismHttpPlugin:
    """The endpoint plugin (zero-argument factory: the class itself)."""

    name = "prism_http"
    #: No task requirement: Prism serves any attention model. On vLLM's CPU-only render
    #: server there is no engine; the route then answers 503.
    required_tasks = None

    def __init__(self, registry: Any = None) -> None:
        """registry: the prometheus_client registry for the prism_* series (default: the global
        one, which vLLM's /metrics serves in single-API-server mode)."""
        self.registry = registry
        self.engine_client: Any = None
        self.collector = PrismCollector()
        self._registered = False
        self._poller: Optional[asyncio.Task] = None
        self.last_error: Optional[str] = None

    # -- vLLM's EndpointPlugin protocol ----------------------------------------------------
    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        router.add_api_route(STATS_PATH, self.stats_endpoint, methods=["GET"], name="prism_stats")
        app.include_router(router)
        self._register_collector()

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.engine_client = engine_client
        state.prism_http = self
        if engine_client is not None and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name="prism-stats-poller")

    # -- implementation ----------------------------------------------------------------------
    def _register_collector(self) -> None:
        global _ACTIVE
        if self._registered:
            return
        from prometheus_client import REGISTRY

        registry = self.registry if self.registry is not None else REGISTRY
        if self.registry is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several API server processes share /metrics through prometheus' multiprocess
            # files, which only cover metrics created in those processes.
            logger.warning(
                "prism_http: with several API server processes the prism_* Prometheus series "
                "are not exported; %s still answers",
                STATS_PATH,
            )
            return
        if _ACTIVE is not None and _ACTIVE[0] is registry:
            registry.unregister(_ACTIVE[1])  # an app built again in this process replaces ours
        registry.register(self.collector)
        _ACTIVE = (registry, self.collector)
        self._registered = True

    async def fetch(self) -> tuple[list[dict[str, Any]], Optional[str]]:
        """Ask every worker; returns (replies, error message or None). Never raises."""
        if self.engine_client is None:
            return [], "no engine in this server process (render-only server)"
        try:
            replies = await self.engine_client.collective_rpc(RPC_METHOD, timeout=RPC_TIMEOUT_SECONDS)
        except Exception as e:  # the RPC's error comes back from the engine; keep serving
            msg = f"collective_rpc({RPC_METHOD!r}) failed: {e}"
            if "not implemented" in str(e).lower() or "attribute" in str(e).lower():
                msg += f"; the workers lack the stats extension: {_FIX}"
            self.last_error = msg
            return [], msg
        replies = [r if isinstance(r, dict) else {"available": False, "error": repr(r)} for r in replies or []]
        self.last_error = None
        self.collector.update(aggregate(replies))
        return replies, None

    async def stats_endpoint(self, request: Request) -> JSONResponse:
        replies, error = await self.fetch()
        body = stats_response(replies, error)
        return JSONResponse(body, status_code=503 if error else 200)

    async def _poll_loop(self) -> None:
        warned = False
        while True:
            _, error = await self.fetch()
            if error and not warned:
                logger.warning("prism_http: %s", error)
                warned = True
            await asyncio.sleep(POLL_SECONDS)

