"""Per-process Prism statistics, cheap on the hot path and read on demand.

The vLLM glue updates one process-global accumulator:

* per scheduler step (in the metadata builder, from host integers it already has): how many
  query tokens went through Prism's block-sparse path, through Prism with every block
  (``dense`` rows inside a Prism launch), and through FlashAttention;
* on sampled steps only (every ``sample_every`` Prism steps), per layer launch: the number of
  selected (query block, head, key block) triples, added into a device tensor *without* a host
  sync, next to the host-known number of causal triples; and the GPU time of one layer's Prism
  launch, bracketed by CUDA events that are read later, never waited on in the step.

``collect_stats()`` turns all of it into a plain dict (it synchronises on the few device
counters, so call it from a monitoring path, e.g. ``collective_rpc`` on the workers, not from
the model's forward). ``reset_stats()`` starts over.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Deque

import torch

__all__ = [
    "collect_stats",
    "collect_stats_rpc",
    "reset_stats",
    "set_sample_every",
    "record_fallback",
    "STATS",
]

_MAX_PENDING_EVENTS = 64


class PrismStats:
    """The accumulator (one per process: ``STATS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sample_every = 16
        self.reset()

    def reset(self) -> None:
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
            self._selected: dict[torch.device, torch.Tensor] = {}
            self._pending: Deque[tuple[Any, Any]] = collections.deque()
            self.launch_ms_total = 0.0
            self.launch_ms_samples = 0
            self.fallbacks: dict[str, int] = {}
            self.kernel_failures = 0
            self.break_even: dict[str, Any] = {}
            self.attend_layouts: dict[str, Any] = {}
            self.config: dict[str, Any] = {}
            # density_hint(): an asynchronous host copy of the selected-block counter
            self._hint_host: Any = None
            self._hint_event: Any = None
            self._hint_causal = 0
            self._hint_value: Any = None

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
        """int64 [1] device tensor to ``add_`` selected-block counts into (no host sync)."""
        t = self._selected.get(device)
        if t is None:
            t = torch.zeros(1, dtype=torch.int64, device=device)
            self._selected[device] = t
        return t

    def add_causal_blocks(self, n: int) -> None:
        self.sampled_layer_launches += 1
        self.causal_blocks += n

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

    def density_hint(self) -> Any:
        """Block density of the sampled launches as far as the host can see it without waiting
        (None before the first sample): the builder reads it once per step. The device counter is
        copied to pinned host memory asynchronously; a finished copy updates the value."""
        ev = self._hint_event
        if ev is not None and ev.query():
            self._hint_value = float(self._hint_host.sum()) / self._hint_causal
            self._hint_event = None
        if self._hint_event is None and self.causal_blocks > self._hint_causal and self._selected:
            counters = list(self._selected.values())
            if counters[0].is_cuda:
                if self._hint_host is None:
                    self._hint_host = torch.zeros(len(counters), dtype=torch.int64, pin_memory=True)
                for i, t in enumerate(counters[: self._hint_host.numel()]):
                    self._hint_host[i : i + 1].copy_(t, non_blocking=True)
                self._hint_causal = self.causal_blocks
                self._hint_event = torch.cuda.Event()
                self._hint_event.record()
            else:  # CPU tensors: reading them does not wait for a GPU
                self._hint_causal = self.causal_blocks
                self._hint_value = sum(int(t.item()) for t in counters) / self._hint_causal
        return self._hint_value

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
            selected = sum(int(t.item()) for t in self._selected.values())
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
    """Zero every counter of this process."""
    STATS.reset()


def set_sample_every(n: int) -> None:
    """Sample block density and timing every ``n`` Prism steps (0 disables sampling)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"sample_every={n!r} must be an integer >= 0 (0 disables sampling)")
    STATS.sample_every = n


def record_fallback(reason: str, layers: int = 1) -> None:
    """Count ``layers`` attention layers served by FlashAttention for ``reason``."""
    STATS.record_fallback(reason, layers)

