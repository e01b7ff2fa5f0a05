"""GET /prism/stats and the prism_* Prometheus series, with a fake engine client.

The fake's ``collective_rpc`` returns per-worker dicts shaped like the worker extension's
replies; the expected aggregates are computed by hand in each test.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from argparse import Namespace
from contextlib import asynccontextmanager

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from prism_vllm.server.http import RPC_METHOD, STATS_PATH, PrismHttpPlugin  # noqa: E402
from prism_vllm.server.observability import aggregate  # noqa: E402
from prism_vllm.server.worker import PrismStatsExtension, to_plain  # noqa: E402


def _worker(rank, tp, pp, *, sparse, dense_prism, flash, selected, causal, ms, n, fallback):
    return {
        "rank": rank, "tp_rank": tp, "pp_rank": pp, "pid": 1000 + rank, "available": True, "error": None,
        "stats": {
            "steps": 12, "prism_steps": 4, "prism_requests": 3, "prism_tokens": sparse,
            "prism_dense_tokens": dense_prism, "flash_tokens": flash, "selected_blocks": selected,
            "causal_blocks": causal, "block_density": selected / causal, "prism_launch_ms_mean": ms,
            "prism_launch_ms_samples": n, "fallback_layers": fallback,
        },
    }


# Tensor parallel 2: both ranks see the same tokens, each selects for its own heads.
TP2 = [
    _worker(0, 0, 0, sparse=9000, dense_prism=500, flash=1500, selected=30, causal=100, ms=2.0, n=4,
            fallback={"sliding_window": 6}),
    _worker(1, 1, 0, sparse=9000, dense_prism=500, flash=1500, selected=50, causal=100, ms=4.0, n=4,
            fallback={"sliding_window": 6}),
]


def test_aggregate_tensor_parallel_counts_tokens_once_and_sums_blocks():
    agg = aggregate(TP2)
    assert agg["workers_total"] == agg["workers_reporting"] == 2
    assert agg["tokens"] == {"sparse": 9000, "dense": 2000, "dense_prism": 500, "dense_flash_attention": 1500,
                             "sparse_fraction": 9000 / 11000}
    assert agg["selected_blocks"] == 80 and agg["causal_blocks"] == 200
    assert agg["block_density"] == pytest.approx(0.4)  # not the mean of 0.3 and 0.5 by accident
    assert agg["launch_ms_mean"] == pytest.approx(3.0) and agg["launch_ms_samples"] == 8
    assert agg["fallback_layers"] == {"sliding_window": 6}
    assert agg["estimation_ms_mean"] is None and agg["density_histogram"] is None


def test_aggregate_weights_density_by_blocks_and_pipeline_stages_sum_layers():
    ws = [
        _worker(0, 0, 0, sparse=100, dense_prism=0, flash=10, selected=10, causal=100, ms=1.0, n=1, fallback={"x": 2}),
        _worker(1, 0, 1, sparse=100, dense_prism=0, flash=10, selected=90, causal=300, ms=3.0, n=3, fallback={"x": 3}),
        {"rank": 2, "available": False, "error": "prism_vllm.stats unavailable", "stats": {}},
    ]
    agg = aggregate(ws)
    assert agg["workers_total"] == 3 and agg["workers_reporting"] == 2
    assert agg["block_density"] == pytest.approx(100 / 400)
    assert agg["launch_ms_mean"] == pytest.approx((1.0 + 9.0) / 4)
    assert agg["fallback_layers"] == {"x": 5}  # layers of different stages add up
    assert agg["tokens"]["sparse"] == 100


def test_aggregate_density_histograms_add_up():
    ws = copy.deepcopy(TP2)
    ws[0]["stats"]["density_histogram"] = {"edges": [0, 0.5, 1.0], "counts": [3, 1], "sum": 1.5}
    ws[1]["stats"]["density_histogram"] = {"edges": [0, 0.5, 1.0], "counts": [0, 2], "sum": 1.6}
    h = aggregate(ws)["density_histogram"]
    assert h["counts"] == [3, 3] and h["sum"] == pytest.approx(3.1)


class FakeEngine:
    """Stands in for vLLM's EngineClient: async collective_rpc(method, timeout=...)."""

    def __init__(self, replies=None, error=None):
        self.replies, self.error, self.calls = replies, error, []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        if self.error:
            raise self.error
        return copy.deepcopy(self.replies)


def _app(plugin, engine):
    @asynccontextmanager
    async def lifespan(app):
        await plugin.init_state(engine, app.state, Namespace())
        yield

    app = FastAPI(lifespan=lifespan)
    plugin.attach_router(app)
    return app


def _wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def _samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_stats_endpoint_json_and_prometheus_series():
    registry = CollectorRegistry()
    plugin = PrismHttpPlugin(registry=registry)
    engine = FakeEngine(TP2)
    with TestClient(_app(plugin, engine)) as client:
        _wait_for(lambda: engine.calls)  # the background poller ran once at start-up
        r = client.get(STATS_PATH)
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"time", "aggregate", "workers", "error", "notes"}
    assert body["error"] is None and len(body["workers"]) == 2
    assert [w["tp_rank"] for w in body["workers"]] == [0, 1]
    assert body["aggregate"]["tokens"]["sparse"] == 9000 and body["aggregate"]["block_density"] == pytest.approx(0.4)
    assert set(engine.calls) == {RPC_METHOD}

    s = _samples(generate_latest(registry).decode())
    assert s[("prism_prefill_tokens_total", (("kernel", "prism"), ("path", "sparse")))] == 9000
    assert s[("prism_prefill_tokens_total", (("kernel", "prism"), ("path", "dense")))] == 500
    assert s[("prism_prefill_tokens_total", (("kernel", "flash_attention"), ("path", "dense")))] == 1500
    assert s[("prism_block_density", ())] == pytest.approx(0.4)
    assert s[("prism_launch_seconds_count", ())] == 8
    assert s[("prism_launch_seconds_sum", ())] == pytest.approx(8 * 3.0 / 1000)
    assert s[("prism_fallback_layers", (("reason", "sliding_window"),))] == 6
    assert s[("prism_workers_reporting", ())] == 2
    assert not any(name.startswith("vllm:") for name, _ in s)


def test_missing_worker_extension_gives_503_with_the_fix():
    plugin = PrismHttpPlugin(registry=CollectorRegistry())
    engine = FakeEngine(error=RuntimeError("Method 'prism_stats' is not implemented."))
    with TestClient(_app(plugin, engine)) as client:
        r = client.get(STATS_PATH)
    assert r.status_code == 503
    assert "--worker-extension-cls prism_vllm.server.worker.PrismStatsExtension" in r.json()["error"]


def test_render_only_server_without_engine_answers_503():
    plugin = PrismHttpPlugin(registry=CollectorRegistry())
    with TestClient(_app(plugin, None)) as client:
        r = client.get(STATS_PATH)
    assert r.status_code == 503 and "no engine" in r.json()["error"]


@pytest.mark.vllm
def test_plugin_loads_through_vllm_entry_point_and_serves_on_vllm_metrics(monkeypatch):
    """vLLM's own loader finds the entry point when VLLM_PLUGINS names it, and its /metrics
    route (the one `vllm serve` mounts) shows the prism_* series."""
    from vllm.entrypoints.serve.instrumentator.metrics import attach_router as attach_metrics
    from vllm.plugins import load_endpoint_plugins

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "prism_http")
    plugins = load_endpoint_plugins(("generate",))
    assert [type(p) for p in plugins] == [PrismHttpPlugin]
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert load_endpoint_plugins(("generate",)) == []

    plugin = plugins[0]
    engine = FakeEngine(TP2)

    @asynccontextmanager
    async def lifespan(app):
        await plugin.init_state(engine, app.state, Namespace())
        yield

    app = FastAPI(lifespan=lifespan)
    attach_metrics(app)
    plugin.attach_router(app)
    with TestClient(app) as client:
        _wait_for(lambda: engine.calls)
        text = client.get("/metrics").text
    s = _samples(text)
    assert s[("prism_prefill_tokens_total", (("kernel", "prism"), ("path", "sparse")))] == 9000
    assert s[("prism_block_density", ())] == pytest.approx(0.4)


class _FakeEvent:
    """Stands in for a recorded CUDA event: ``start.elapsed_time(end)`` is the scripted time."""

    def __init__(self, ms: float = 0.0):
        self.ms = ms

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return end.ms - self.ms


@pytest.fixture
def fresh_stats():
    """This process's Prism counters, zeroed before and after the test."""
    stats = pytest.importorskip("prism_vllm.stats")
    every = stats.STATS.sample_every
    stats.reset_stats()
    yield stats
    stats.reset_stats()
    stats.set_sample_every(every)


def test_worker_extension_reports_a_scripted_sequence_of_steps(fresh_stats):
    """Known steps in, known counts out of the RPC reply and of the aggregate over it."""
    s = fresh_stats.STATS
    fresh_stats.set_sample_every(2)
    # step 1: two Prism requests (one of them kept every block), sampled (first Prism step)
    assert s.record_step(prism_tokens=1000, prism_dense_tokens=100, flash_tokens=50,
                         prism_requests=2, prism_dense_requests=1) is True
    # step 2: decode only, no Prism launch
    assert s.record_step(prism_tokens=0, prism_dense_tokens=0, flash_tokens=30,
                         prism_requests=0, prism_dense_requests=0) is False
    # step 3: one Prism request, second Prism step: not sampled at sample_every=2
    assert s.record_step(prism_tokens=500, prism_dense_tokens=0, flash_tokens=10,
                         prism_requests=1, prism_dense_requests=0) is False
    # two sampled layer launches of step 1: 7 of 20 and 5 of 10 causal blocks, 2.0 and 4.0 ms
    for selected, causal, ms in ((7, 20, 2.0), (5, 10, 4.0)):
        s.add_sample(torch.tensor([selected]), torch.tensor([3]), [0, 0, 0, causal, 0, 0])
        s.add_timing(_FakeEvent(1.0), _FakeEvent(1.0 + ms))
    fresh_stats.record_fallback("sliding_window", 3)
    fresh_stats.record_fallback("sliding_window")
    fresh_stats.record_fallback("alibi", 2)

    ext = PrismStatsExtension()
    ext.rank = 3
    reply = ext.prism_stats()
    assert reply["rank"] == 3 and reply["available"] is True and reply["error"] is None
    assert json.loads(json.dumps(reply, allow_nan=False)) == reply  # plain JSON data
    got = reply["stats"]
    want = {
        "steps": 3, "prism_steps": 2, "prism_requests": 3, "prism_dense_requests": 1,
        "prism_tokens": 1500, "prism_dense_tokens": 100, "flash_tokens": 90, "sampled_steps": 1,
        "sampled_layer_launches": 2, "selected_blocks": 12, "causal_blocks": 30,
        "prism_launch_ms_samples": 2, "sample_every": 2, "kernel_failures": 0,
        "fallback_layers": {"sliding_window": 4, "alibi": 2},
    }
    assert {k: got[k] for k in want} == want
    assert got["block_density"] == pytest.approx(0.4)
    assert got["prism_launch_ms_mean"] == pytest.approx(3.0)
    assert got["prism_token_fraction"] == pytest.approx(1500 / 1690)

    agg = aggregate([reply])
    assert agg["workers_reporting"] == 1
    assert agg["tokens"] == {"sparse": 1500, "dense": 190, "dense_prism": 100, "dense_flash_attention": 90,
                             "sparse_fraction": pytest.approx(1500 / 1690)}
    assert agg["block_density"] == pytest.approx(0.4) and agg["launch_ms_mean"] == pytest.approx(3.0)
    assert agg["fallback_layers"] == {"sliding_window": 4, "alibi": 2}


@pytest.mark.vllm
def test_worker_extension_does_not_collide_with_vllm_worker():
    """vLLM asserts at worker start that no extension attribute exists on its Worker."""
    from vllm.v1.worker.gpu_worker import Worker

    names = [a for a in dir(PrismStatsExtension) if not a.startswith("__")]
    assert names == ["prism_stats"]
    assert not any(hasattr(Worker, a) for a in names)


def test_to_plain_converts_tensors_numpy_and_nonfinite():
    import numpy as np
    import torch

    x = {"t": torch.tensor([1, 2]), "n": np.float32(0.5), 3: (1, float("nan")), "s": torch.tensor(2.5)}
    assert to_plain(x) == {"t": [1, 2], "n": 0.5, "3": [1, None], "s": 2.5}


def test_fetch_reports_errors_and_recovers():
    """A failing RPC is reported, not raised, and the next poll recovers."""
    plugin = PrismHttpPlugin(registry=CollectorRegistry())
    engine = FakeEngine(error=RuntimeError("boom"))
    plugin.engine_client = engine

    async def two_fetches():
        r1 = await plugin.fetch()
        engine.error, engine.replies = None, TP2
        r2 = await plugin.fetch()
        return r1, r2

    (rep1, err1), (rep2, err2) = asyncio.run(two_fetches())
    assert rep1 == [] and "boom" in err1
    assert len(rep2) == 2 and err2 is None and plugin.collector.latest["tokens"]["sparse"] == 9000


def test_effective_settings_reach_the_stats():
    """/prism/stats shows the PrismConfig a worker serves with, preset resolved."""
    from prism_vllm import PrismConfig
    from prism_vllm.stats import PrismStats

    st = PrismStats()
    st.record_config(PrismConfig(preset="fast", low_threshold=0.97).to_dict())
    s = st.collect()
    assert s["config"]["preset"] == "fast" and s["config"]["high_threshold"] == 0.95 and s["config"]["low_threshold"] == 0.97
    agg = aggregate([{"available": True, "stats": s}, {"available": True, "stats": {**s, "config": {}}}])
    assert agg["config"] == s["config"]


def test_the_automatic_break_even_reaches_the_aggregate():
    """min_context_len="auto": the decision, the densities learned by length and the shadow steps
    of the workers reach /prism/stats' aggregate (steps counted once, the learned densities
    rank 0's)."""
    import torch

    from prism_vllm.stats import LENGTH_BUCKETS, PrismStats

    st = PrismStats()
    st.record_break_even("s", {"min_context_len": 71808, "rows": []})
    st.shadow_steps = 2
    st.add_sample(torch.tensor([21]), torch.tensor([LENGTH_BUCKETS.index(131072)]), [0, 0, 0, 0, 0, 100],
                  served=False)
    s0, s1 = st.collect(), {**st.collect(), "density_by_length": {"131072": 0.5}}
    agg = aggregate([{"available": True, "stats": s0}, {"available": True, "stats": s1}])
    assert agg["shadow_steps"] == 2 and agg["break_even"] == {"s": {"min_context_len": 71808, "rows": []}}
    assert agg["density_by_length"] == {"131072": 0.21} and agg["block_density"] is None
