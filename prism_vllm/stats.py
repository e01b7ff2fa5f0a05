"""Per-process Prism statistics, cheap on the hot path and read on demand.

The vLLM glue updates one process-global accumulator:

* per scheduler step (in the metadata builder, from host integers it already has): how many
  query tokens went through Prism's block-sparse path, through Prism with every block
  (``dense`` rows inside a Prism launch), and through FlashAttention;
* on sampled steps only (every ``sample_every`` Prism steps), per layer launch: the number of
  selected (query block, head, key block) triples, added into a device tensor *without* a host
  sync, next to the host-known number of causal triples; and the GPU time of one layer's Prism
  launch, bracketed by CUDA events that are read later, never waited on in the step.

The same samples also go, by sequence length, into ``STATS.by_length`` (a ``LengthDensity``):
what ``min_context_len="auto"`` has learned about the density Prism selects at each length. It
is not a report, so ``reset_stats()`` keeps it.

``collect_stats()`` turns all of it into a plain dict (it synchronises on the few device
counters, so call it from a monitoring path, e.g. ``collective_rpc`` on the workers, not from
the model's forward). ``reset_stats()`` starts over.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Deque, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "LENGTH_BUCKETS",
    "LengthDensity",
    "collect_stats",
    "collect_stats_rpc",
    "reset_stats",
    "set_sample_every",
    "record_fallback",
    "STATS",
]

_MAX_PENDING_EVENTS = 64

#: Sequence lengths (context + chunk) that ``min_context_len="auto"`` times at startup
#: (``attention_backend.break_even.LENGTHS``); sampled densities are kept per nearest one.
LENGTH_BUCKETS = (4096, 8192, 16384, 32768, 65536, 131072)


class LengthDensity:
    """Block density Prism selects, per sequence-length bucket (the nearest of ``lengths`` in log
    scale), from sampled launches: the density falls with length (SmolLM2 at the default
    selection, one 128K prompt: 0.85 of the blocks at 8K, 0.29 at 128K, speed.json), so one
    global figure would be wrong at both ends.

    Device side: an int64 counter of ``len(lengths) + 1`` slots per device (the last one takes
    rows that are not counted, e.g. dense requests in a Prism launch), added into without a host
    sync. Host side: the causal triples per bucket, known when a step is planned. ``densities()``
    reads the counters through an asynchronous copy, as the builder calls it once per step.
    """

    def __init__(self, lengths: Sequence[int] = LENGTH_BUCKETS) -> None:
        self.lengths = tuple(int(L) for L in lengths)
        self._log = np.log2(np.asarray(self.lengths, dtype=np.float64))
        self._counters: dict[torch.device, torch.Tensor] = {}
        self.causal = [0] * len(self.lengths)
        """Causal (query block, head, key block) triples sampled per bucket (host, at planning)."""
        self._values: list[Optional[float]] = [None] * len(self.lengths)
        self._host: Any = None
        self._events: list[Any] = []  # copies in flight, one per device
        self._added: dict[torch.device, Any] = {}  # per device: an event after its latest index_add_
        self._causal_at_copy: list[int] = list(self.causal)

    def bucket(self, seq_lens: Any) -> np.ndarray:
        """Bucket index of each sequence length (nearest bucket length in log2, clamped)."""
        x = np.log2(np.maximum(np.asarray(seq_lens, dtype=np.float64), 1.0))
        return np.abs(x[..., None] - self._log).argmin(-1)

    def counter(self, device: torch.device) -> torch.Tensor:
        """int64 [len(lengths) + 1] device tensor to ``index_add_`` selected counts into."""
        t = self._counters.get(device)
        if t is None:
            t = torch.zeros(len(self.lengths) + 1, dtype=torch.int64, device=device)
            self._counters[device] = t
        return t

    def add_causal(self, per_bucket: Sequence[int]) -> None:
        for i, n in enumerate(per_bucket):
            self.causal[i] += int(n)

    def mark_added(self, device: torch.device) -> None:
        """After an ``index_add_`` into ``counter(device)`` on its current stream: the next copy
        waits for it (the builder, which copies, may run on another stream than the forward)."""
        if device.type != "cuda":
            return
        ev = self._added.get(device)
        if ev is None:
            ev = self._added[device] = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))

    def exact(self) -> list[Optional[float]]:
        """``densities()`` read synchronously (a monitoring path, never the step)."""
        sel = [0] * (len(self.lengths) + 1)
        for t in list(self._counters.values()):
            sel = [a + b for a, b in zip(sel, t.tolist())]
        return [s / c if c else None for s, c in zip(sel, self.causal)]

    def densities(self) -> list[Optional[float]]:
        """Per bucket: selected / causal over the samples the host can see without waiting (None
        where nothing was sampled yet). Starts a new asynchronous copy when there is news."""
        if self._events and all(ev.query() for ev in self._events):
            sel = self._host.sum(0)
            self._values = [float(sel[i]) / c if c else None for i, c in enumerate(self._causal_at_copy)]
            self._events = []
        if not self._events and self.causal != self._causal_at_copy and self._counters:
            devices = list(self._counters)
            if devices[0].type == "cuda":
                if self._host is None or self._host.shape[0] != len(devices):
                    self._host = torch.zeros(len(devices), len(self.lengths) + 1, dtype=torch.int64, pin_memory=True)
                for i, dev in enumerate(devices):
                    stream = torch.cuda.current_stream(dev)
                    if dev in self._added:
                        stream.wait_event(self._added[dev])
                    with torch.cuda.stream(stream):
                        self._host[i].copy_(self._counters[dev], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    self._events.append(ev)
                self._causal_at_copy = list(self.causal)
            else:  # CPU tensors: reading them does not wait for a GPU
                counters = list(self._counters.values())
                sel = sum(t for t in counters)
                self._causal_at_copy = list(self.causal)
                self._values = [int(sel[i]) / c if c else None for i, c in enumerate(self.causal)]
        return list(self._values)


class PrismStats:
    """The accumulator (one per process: ``STATS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sample_every = 16
        # What the server decided at startup and learned since: not counters, so reset() keeps them.
        self.by_length = LengthDensity()
        self.break_even: dict[str, Any] = {}
        self.attend_layouts: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters (see ``reset_stats``)."""
        with self._lock:
            self.started_at = time.time()
            self.steps = 0
            self.prism_steps = 0
            self.prism_requests = 0
            self.prism_dense_requests = 0
            self.prism_tokens = 0
            self.prism_dense_tokens = 0
            self.flash_tokens = 0
            self.sampled_steps = 0
            self.sampled_layer_launches = 0
            self.causal_blocks = 0
            self.shadow_steps = 0
            self._selected: dict[torch.device, torch.Tensor] = {}
            self._pending: Deque[tuple[Any, Any]] = collections.deque()
            self.launch_ms_total = 0.0
            self.launch_ms_samples = 0
            self.fallbacks: dict[str, int] = {}
            self.kernel_failures = 0

    # -- hot path (builder, once per step) -------------------------------------------------
    def record_step(
        self,
        prism_tokens: int,
        prism_dense_tokens: int,
        flash_tokens: int,
        prism_requests: int,
        prism_dense_requests: int,
    ) -> bool:
        """Count one step's rows; returns whether this step samples block density/timing."""
        self.steps += 1
        self.flash_tokens += flash_tokens
        if prism_requests == 0:
            return False
        self.prism_steps += 1
        self.prism_requests += prism_requests
        self.prism_dense_requests += prism_dense_requests
        self.prism_tokens += prism_tokens
        self.prism_dense_tokens += prism_dense_tokens
        sample = self.sample_every > 0 and (self.prism_steps - 1) % self.sample_every == 0
        if sample:
            self.sampled_steps += 1
        return sample

    # -- hot path (impl, sampled steps only) -------------------------------------------------
    def selected_counter(self, device: torch.device) -> torch.Tensor:
        """int64 [len(LENGTH_BUCKETS) + 1] device tensor of selected blocks per length bucket
        (see LengthDensity; the last slot is not counted), added into without a host sync."""
        t = self._selected.get(device)
        if t is None:
            t = torch.zeros(len(self.by_length.lengths) + 1, dtype=torch.int64, device=device)
            self._selected[device] = t
        return t

    def add_sample(self, selected: torch.Tensor, bucket: torch.Tensor, causal: Sequence[int],
                   served: bool = True) -> None:
        """One sampled layer launch: ``selected`` [R] int64 selected blocks of R rows (device),
        ``bucket`` [R] int64 their length buckets (the last slot: rows not counted), ``causal``
        the host-known causal triples per bucket. Device work only (``index_add_``). ``served``
        False: a shadow step's estimation (FlashAttention served the rows), which only teaches
        ``by_length``; the reported density stays that of the blocks Prism attended."""
        if served:
            self.selected_counter(selected.device).index_add_(0, bucket, selected)
            self.sampled_layer_launches += 1
            self.causal_blocks += int(sum(causal))
        self.by_length.counter(selected.device).index_add_(0, bucket, selected)
        self.by_length.mark_added(selected.device)
        self.by_length.add_causal(causal)

    def add_timing(self, start: Any, end: Any) -> None:
        """Keep a recorded (start, end) CUDA event pair; resolved in ``collect``."""
        if len(self._pending) >= _MAX_PENDING_EVENTS:
            self._resolve_timings(block=False)
            if len(self._pending) >= _MAX_PENDING_EVENTS:
                self._pending.popleft()
        self._pending.append((start, end))

    def _resolve_timings(self, block: bool) -> None:
        keep: Deque[tuple[Any, Any]] = collections.deque()
        for start, end in self._pending:
            if block:
                end.synchronize()
            elif not end.query():
                keep.append((start, end))
                continue
            self.launch_ms_total += float(start.elapsed_time(end))
            self.launch_ms_samples += 1
        self._pending = keep

    def record_config(self, config: dict[str, Any]) -> None:
        """The effective PrismConfig (preset resolved) this process serves with."""
        self.config = dict(config)

    def record_break_even(self, shape: str, summary: dict[str, Any]) -> None:
        """The automatic min_context_len decision of a layer shape (for /prism/stats)."""
        self.break_even[shape] = summary

    def record_attend_layout(self, shape: str, summary: dict[str, Any]) -> None:
        """The FA3 attend layout of a layer shape and its timings (for /prism/stats)."""
        self.attend_layouts[shape] = summary

    # -- cold path -------------------------------------------------------------------------
    def record_fallback(self, reason: str, layers: int = 1) -> None:
        with self._lock:
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + layers

    def record_kernel_failure(self) -> None:
        with self._lock:
            self.kernel_failures += 1

    def collect(self) -> dict[str, Any]:
        with self._lock:
            self._resolve_timings(block=True)
            selected = sum(int(t[:-1].sum()) for t in self._selected.values())
            by_length = self.by_length.exact()
            total = self.prism_tokens + self.prism_dense_tokens + self.flash_tokens
            return {
                "since": self.started_at,
                "steps": self.steps,
                "prism_steps": self.prism_steps,
                "prism_requests": self.prism_requests,
                "prism_dense_requests": self.prism_dense_requests,
                "prism_tokens": self.prism_tokens,
                "prism_dense_tokens": self.prism_dense_tokens,
                "flash_tokens": self.flash_tokens,
                "prism_token_fraction": (self.prism_tokens / total) if total else 0.0,
                "sampled_steps": self.sampled_steps,
                "sampled_layer_launches": self.sampled_layer_launches,
                "selected_blocks": selected,
                "causal_blocks": self.causal_blocks,
                "block_density": (selected / self.causal_blocks) if self.causal_blocks else None,
                "shadow_steps": self.shadow_steps,
                "density_by_length": {
                    str(L): round(d, 4) for L, d in zip(self.by_length.lengths, by_length) if d is not None
                },
                "prism_launch_ms_mean": (
                    self.launch_ms_total / self.launch_ms_samples if self.launch_ms_samples else None
                ),
                "prism_launch_ms_samples": self.launch_ms_samples,
                "sample_every": self.sample_every,
                "fallback_layers": dict(self.fallbacks),
                "kernel_failures": self.kernel_failures,
                "break_even": dict(self.break_even),
                "attend_layouts": dict(self.attend_layouts),
                "config": dict(self.config),
            }


STATS = PrismStats()


def collect_stats() -> dict[str, Any]:
    """Snapshot of this process's Prism statistics (safe to call from a vLLM worker).

    Keys: ``steps`` (builder calls of Prism-capable layer groups), ``prism_steps`` (of those,
    steps with a Prism launch), ``prism_tokens`` / ``prism_dense_tokens`` / ``flash_tokens``
    (query tokens through Prism's sparse path / through Prism with every block / through
    FlashAttention), ``prism_requests``, ``block_density`` (selected / causal (query block,
    head, key block) triples over sampled layer launches; None before the first sample),
    ``prism_launch_ms_mean`` (GPU time of one sampled layer's Prism launch: estimation +
    sparse attention), ``fallback_layers`` (reason -> number of layers served by
    FlashAttention), ``kernel_failures`` (Prism launches that raised; those layers then went
    dense), ``break_even`` (layer shape -> the automatic min_context_len decision: the length,
    the density it used and the timings behind it), ``attend_layouts`` (layer shape -> the FA3
    attend step's layout, with the per-layout timings when "auto" measured it), ``config`` (the effective PrismConfig, preset
    resolved), plus the sampling bookkeeping.
    """
    return STATS.collect()


def collect_stats_rpc(worker: Any = None) -> dict[str, Any]:
    """``collect_stats`` in the shape of a vLLM ``collective_rpc`` callable, which receives the
    worker as its first argument: ``llm.collective_rpc(collect_stats_rpc)`` returns one dict
    per worker (one per tensor-parallel rank)."""
    return STATS.collect()


def reset_stats() -> None:
    """Zero every counter of this process (the startup decisions, the effective config and the
    densities ``min_context_len="auto"`` has learned by length stay)."""
    STATS.reset()


def set_sample_every(n: int) -> None:
    """Sample block density and timing every ``n`` Prism steps (0 disables sampling; the shadow
    steps of ``min_context_len="auto"`` still sample what they are for)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"sample_every={n!r} must be an integer >= 0 (0 disables sampling)")
    STATS.sample_every = n


def record_fallback(reason: str, layers: int = 1) -> None:
    """Count ``layers`` attention layers served by FlashAttention for ``reason``."""
    STATS.record_fallback(reason, layers)

