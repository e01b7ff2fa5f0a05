"""Aggregation of per-worker Prism statistics and their Prometheus exposition.

Input: the list returned by ``collective_rpc("prism_stats")``, one entry per worker (see
:mod:`prism_vllm.server.worker`), each carrying ``stats = prism_vllm.stats.collect_stats()``.

How workers combine (tensor parallel ranks see the *same* tokens but different heads; pipeline
stages see the same tokens but different layers):

- token and request counts (``prism_tokens``, ``flash_tokens``, ``steps``, ...): **max** over
  workers, i.e. rank 0's value; summing would count every token TP x PP times;
- block counts (``selected_blocks``, ``causal_blocks``): **summed**, since each worker selects
  for its own (layer, head) slice; the aggregated density is their ratio;
- launch time: mean weighted by samples (ranks run their launches concurrently);
- fallback layers: max over the TP ranks of one pipeline stage, summed over stages.

With data parallelism, ``collective_rpc`` reaches only the first engine's workers.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterator, Mapping, Optional, Sequence

__all__ = [
    "aggregate",
    "stats_response",
    "PrismCollector",
    "TOKEN_SERIES",
]

#: (stats key, path label, kernel label) of ``prism_prefill_tokens_total``.
TOKEN_SERIES = (
    ("prism_tokens", "sparse", "prism"),
    ("prism_dense_tokens", "dense", "prism"),
    ("flash_tokens", "dense", "flash_attention"),
)
_MAX_KEYS = (
    "steps",
    "prism_steps",
    "prism_requests",
    "prism_dense_requests",
    "prism_tokens",
    "prism_dense_tokens",
    "flash_tokens",
    "sampled_steps",
    "shadow_steps",
)
_SUM_KEYS = ("selected_blocks", "causal_blocks", "sampled_layer_launches")


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _histogram(workers: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Sum of per-worker ``density_histogram`` ``{"edges": [...], "counts": [...]}`` with equal
    edges (None when no worker reports one)."""
    edges: Optional[list[float]] = None
    counts: Optional[list[float]] = None
    for w in workers:
        h = w.get("density_histogram")
        if not isinstance(h, Mapping):
            continue
        e, c = list(h.get("edges") or []), list(h.get("counts") or [])
        if len(e) != len(c) + 1:
            continue
        if edges is None:
            edges, counts = e, [0.0] * len(c)
        if e != edges:
            continue
        counts = [a + (_num(b) or 0.0) for a, b in zip(counts, c)]  # type: ignore[arg-type]
    if edges is None:
        return None
    sums = [_num((w.get("density_histogram") or {}).get("sum")) for w in workers]
    total = sum(v for v in sums if v is not None) if all(v is not None for v in sums) else None
    return {"edges": edges, "counts": counts, "sum": total}


def aggregate(replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine the workers' ``prism_stats`` replies into one view (rules: module docstring).

    Returns:
        ``{"workers_total", "workers_reporting", "tokens": {"sparse", "dense", "dense_prism",
        "dense_flash_attention", "sparse_fraction"}, "block_density", "selected_blocks",
        "causal_blocks", "launch_ms_mean", "launch_ms_samples", "estimation_ms_mean",
        "estimation_ms_samples", "density_histogram", "fallback_layers", "break_even",
        "density_by_length", "attend_layouts", "config", ...max counters}``.
    """
    stats = [r.get("stats") or {} for r in replies if r.get("available")]
    out: dict[str, Any] = {"workers_total": len(replies), "workers_reporting": len(stats)}
    for k in _MAX_KEYS:
        vals = [v for v in (_num(s.get(k)) for s in stats) if v is not None]
        out[k] = int(max(vals)) if vals else 0
    for k in _SUM_KEYS:
        out[k] = int(sum(_num(s.get(k)) or 0 for s in stats))
    sparse = out["prism_tokens"]
    dense_prism, dense_fa = out["prism_dense_tokens"], out["flash_tokens"]
    total = sparse + dense_prism + dense_fa
    out["tokens"] = {
        "sparse": sparse,
        "dense": dense_prism + dense_fa,
        "dense_prism": dense_prism,
        "dense_flash_attention": dense_fa,
        "sparse_fraction": sparse / total if total else 0.0,
    }
    out["block_density"] = out["selected_blocks"] / out["causal_blocks"] if out["causal_blocks"] else None
    for name, mean_key, n_key in (
        ("launch", "prism_launch_ms_mean", "prism_launch_ms_samples"),
        ("estimation", "estimation_ms_mean", "estimation_ms_samples"),
    ):
        tot = n = 0.0
        for s in stats:
            m, c = _num(s.get(mean_key)), _num(s.get(n_key))
            if m is not None and c:
                tot += m * c
                n += c
        out[f"{name}_ms_mean"] = tot / n if n else None
        out[f"{name}_ms_samples"] = int(n)
    out["density_histogram"] = _histogram(stats)
    # Fallback layers: max within a pipeline stage (TP ranks hold the same layers), sum over stages.
    per_stage: dict[Any, dict[str, int]] = defaultdict(dict)
    for r in replies:
        if not r.get("available"):
            continue
        stage = per_stage[r.get("pp_rank", 0)]
        for reason, n in ((r.get("stats") or {}).get("fallback_layers") or {}).items():
            stage[reason] = max(stage.get(reason, 0), int(_num(n) or 0))
    fallback: dict[str, int] = defaultdict(int)
    for stage in per_stage.values():
        for reason, n in stage.items():
            fallback[reason] += n
    out["fallback_layers"] = dict(fallback)
    # The automatic min_context_len per layer shape (rank 0's: every rank measures the same shape).
    out["break_even"] = next((dict(s["break_even"]) for s in stats if s.get("break_even")), {})
    # What the decision learned by length (the first reporting worker's, rank 0's when it reports:
    # the ranks see the same text, each its own heads).
    out["density_by_length"] = next((dict(s["density_by_length"]) for s in stats if s.get("density_by_length")), {})
    out["attend_layouts"] = next((dict(s["attend_layouts"]) for s in stats if s.get("attend_layouts")), {})
    out["config"] = next((dict(s["config"]) for s in stats if s.get("config")), {})
    return out


def stats_response(replies: Sequence[Mapping[str, Any]], error: Optional[str] = None) -> dict[str, Any]:
    """The JSON body of ``GET /prism/stats``."""
    return {
        "time": time.time(),
        "aggregate": aggregate(replies),
        "workers": [dict(r) for r in replies],
        "error": error,
        "notes": {
            "tokens": "query tokens, counted once (rank 0's view): every tensor-parallel rank "
            "and pipeline stage sees the same tokens",
            "block_density": "selected / causal (query block, head, key block) triples over "
            "sampled layer launches, summed over workers (each holds its own heads/layers)",
        },
    }


class PrismCollector:
    """A ``prometheus_client`` collector exposing the latest aggregate.

    Series (no ``vllm:`` prefix, which vLLM unregisters):
    ``prism_prefill_tokens_total{path, kernel}``, ``prism_block_density``,
    ``prism_selected_blocks_total``, ``prism_causal_blocks_total``,
    ``prism_launch_seconds`` (summary), ``prism_estimation_seconds`` (summary, when workers
    time estimation alone), ``prism_block_density_histogram`` (when workers report one),
    ``prism_fallback_layers{reason}``, ``prism_workers_reporting``.
    """

    def __init__(self) -> None:
        self.latest: Optional[dict[str, Any]] = None

    def update(self, agg: dict[str, Any]) -> None:
        self.latest = agg

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        agg = self.latest
        up = GaugeMetricFamily(
            "prism_workers_reporting", "Workers whose Prism statistics were read at the last poll"
        )
        up.add_metric([], float(agg["workers_reporting"]) if agg else 0.0)
        yield up
        if not agg:
            return
        tok = CounterMetricFamily(
            "prism_prefill_tokens",
            "Query tokens by attention path: sparse = Prism block-sparse prefill; dense = every "
            "block (kernel=flash_attention: decode rows and short prefills, kernel=prism: Prism "
            "launches that kept every block); counted once across TP ranks",
            labels=["path", "kernel"],
        )
        for key, path, kernel in TOKEN_SERIES:
            tok.add_metric([path, kernel], float(agg.get(key, 0)))
        yield tok
        for name, key, doc in (
            ("prism_selected_blocks", "selected_blocks", "Selected (query block, head, key block) triples, sampled launches"),
            ("prism_causal_blocks", "causal_blocks", "Causal (query block, head, key block) triples, sampled launches"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(agg.get(key, 0)))
            yield c
        if agg.get("block_density") is not None:
            g = GaugeMetricFamily(
                "prism_block_density",
                "Share of causal 128x128 blocks Prism selects (sampled launches, all workers)",
            )
            g.add_metric([], float(agg["block_density"]))
            yield g
        for name, doc in (
            ("launch", "GPU time of one sampled layer's Prism launch (estimation + sparse attention)"),
            ("estimation", "GPU time of one sampled layer's block estimation (pool, score, select)"),
        ):
            n = agg.get(f"{name}_ms_samples") or 0
            mean = agg.get(f"{name}_ms_mean")
            if n and mean is not None:
                s = SummaryMetricFamily(f"prism_{name}_seconds", doc)
                s.add_metric([], count_value=float(n), sum_value=float(mean) * n / 1000.0)
                yield s
        hist = agg.get("density_histogram")
        if hist:
            cum, buckets = 0.0, []
            for edge, cnt in zip(hist["edges"][1:], hist["counts"]):
                cum += cnt
                buckets.append((repr(float(edge)), cum))
            buckets.append(("+Inf", cum))
            h = HistogramMetricFamily(
                "prism_block_density_histogram",
                "Block density per sampled (layer, head) selection",
            )
            h.add_metric([], buckets=buckets, sum_value=_num(hist.get("sum")))
            yield h
        fb = GaugeMetricFamily(
            "prism_fallback_layers", "Attention layers served by FlashAttention, by reason", labels=["reason"]
        )
        for reason, n in sorted((agg.get("fallback_layers") or {}).items()):
            fb.add_metric([reason], float(n))
        yield fb

