"""Prism as a vLLM 0.26 attention backend: FlashAttention plus a Prism path for long prefills.

Three classes, subclasses of vLLM's FlashAttention ones (registered as vLLM's CUSTOM backend by
prism_vllm.plugin, selected with ``--attention-backend prism``):

* ``PrismAttentionBackend``: FlashAttention's capabilities (so vLLM validates exactly what it
  validates for FLASH_ATTN: every model FLASH_ATTN serves starts), Prism's builder and impl.
* ``PrismMetadataBuilder``: once per step, on the host, splits the batch into a FlashAttention
  prefix (decodes, short prefills) and a Prism suffix (long prefill chunks; see ``routing``),
  builds FlashAttention's metadata for the prefix once and a ``PrefillPlan`` for the suffix,
  and copies the plan to the device.
* ``PrismAttentionImpl``: ``forward`` runs FlashAttention unchanged on the prefix (or on the
  whole batch for layers Prism cannot serve) and launches the Prism kernels on the suffix,
  into the same output. No host sync, no allocation, no loop over requests.

The attend step runs on vLLM's own FA3 where the layer's FlashAttention is FA3 (Hopper:
``kernels/attend_fa3.py``, virtual varlen sequences over the paged cache) and on Prism's Triton
kernel elsewhere (``kernels/sparse_prefill.py``).

Layers Prism cannot help (sliding-window / chunked-local / encoder / cross attention, ALiBi,
no RoPE, soft-capped logits or learned sinks without FA3 (sinks: with FA3 in a view layout only),
fp8 KV caches other than per-tensor e4m3 on FA3,
decode context parallelism, multimodal prefix-LM, head sizes the kernels lack) stay on
FlashAttention, logged once per reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.kv_cache_interface import AttentionSpec

from prism_vllm.config import AUTO_ATTEND_LAYOUTS, PrismConfig
from prism_vllm.kernels import FA3Launch, PrismParams, PrismWorkspace, prism_estimate, prism_prefill
from prism_vllm.kernels.attend_fa3 import HALVES_MAX_HEAD_DIM, AttendPlan, make_attend_plan, virtual_kv
from prism_vllm.kernels.plan import BlockSelection, PrefillPlan, make_plan
from prism_vllm.kernels.prefill import SUPPORTED_HEAD_DIMS, Fp8Scales
from prism_vllm.stats import STATS

from . import break_even
from .eligibility import SINK_LAYOUTS, group_reason, layer_reason, layer_rope_reason, prism_config_of
from .rope_source import bands_for
from .routing import PrefillRoute, route_prism_suffix, split_launches
from .workspace import POOL, WorkspaceNeed

__all__ = [
    "PrismAttentionBackend",
    "PrismAttentionImpl",
    "PrismMetadata",
    "PrismMetadataBuilder",
    "PrismStep",
    "PrismLaunch",
]

logger = logging.getLogger("prism_vllm.attention_backend")

_logged_reasons: set[str] = set()
_log_lock = threading.Lock()


def _first_time(reason: str) -> bool:
    with _log_lock:
        if reason in _logged_reasons:
            return False
        _logged_reasons.add(reason)
        return True


def note_fallback(reason: str, where: str = "") -> None:
    """Count one layer served by FlashAttention; log each distinct reason once per process."""
    STATS.record_fallback(reason)
    if not _first_time(reason):
        return
    logger.info(
        "Prism: FlashAttention (dense) serves %s: %s",
        f"layer {where} and any other such layer" if where else "such layers",
        reason,
    )


def _new_workspace(need: WorkspaceNeed, device: torch.device) -> PrismWorkspace:
    sizes = PrismWorkspace.sizes_for(
        need.max_num_batched_tokens,
        need.max_model_len,
        need.max_num_seqs,
        need.num_q_heads,
        num_kv_heads=need.num_kv_heads,
        head_dim=need.head_dim,
        attend_dtype=need.attend_dtype,
        block_size=need.block_size,
        attend_layouts=need.attend_layouts,
    )
    return PrismWorkspace.allocate(sizes, device)


_NEVER = 1 << 62  # a min_context_len no sequence reaches
_announced: list = []


def _announce(cfg: Any) -> None:
    """Log the effective settings once per process (preset resolved) and keep them for stats."""
    STATS.record_config(cfg.to_dict())
    if cfg in _announced:
        return
    _announced.append(cfg)
    over = cfg.preset_overrides()
    logger.info("Prism settings (preset %r%s): %s", cfg.preset,
                f", overriding {sorted(over)}" if over else "",
                ", ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items() if k != "preset"))


def shape_key(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: Any, fa3: bool, fp8: bool = False,
              sinks: bool = False) -> str:
    """What the break-even of a layer depends on (measured once per key and process); ``fp8``:
    the KV cache is fp8; ``sinks``: the layer has learned sinks (view layouts only)."""
    name = str(dtype).replace("torch.", "")
    extra = (" fp8-kv" if fp8 else "") + (" sinks" if sinks else "")
    return f"{num_q_heads}q/{num_kv_heads}kv d={head_dim} {name}{extra} {'fa3' if fa3 else 'triton'}"


def auto_layouts(sinks: bool, head_dim: int) -> tuple[str, ...]:
    """The FA3 attend layouts ``attend_layout="auto"`` picks from: for layers with learned sinks
    the first of SINK_LAYOUTS alone (the others cannot carry a sink per q head), else
    AUTO_ATTEND_LAYOUTS, and "head_halves" too up to HALVES_MAX_HEAD_DIM (where FA3's 64-row tile
    can beat its 192-row one); timed at startup, ``break_even.choose_layout``."""
    if sinks:
        return (SINK_LAYOUTS[0],)
    return AUTO_ATTEND_LAYOUTS + (("head_halves",) if head_dim <= HALVES_MAX_HEAD_DIM else ())


def attend_layout(cfg: PrismConfig, shape: str, head_dim: int, sinks: bool = False) -> str:
    """The FA3 attend layout of a layer shape: the configured one, else (``"auto"``) the only
    candidate, or the one measured for the shape at startup, else the first candidate."""
    if cfg.attend_layout != "auto":
        return cfg.attend_layout
    candidates = auto_layouts(sinks, head_dim)
    choice = break_even.layout_for(shape) if len(candidates) > 1 else None
    return choice.layout if choice is not None else candidates[0]


def _prior_density(params: PrismParams) -> float:
    """Block density assumed before Prism's first sampled launch."""
    if params.all_blocks:
        return 1.0
    if params.block_budget is not None:
        return min(break_even.PRIOR_DENSITY, float(params.block_budget))
    return break_even.PRIOR_DENSITY


def _limits(vllm_config: Any) -> Optional[tuple[int, int]]:
    """(max_model_len, max_num_batched_tokens) of the engine, when known."""
    try:
        return (int(vllm_config.model_config.max_model_len),
                int(vllm_config.scheduler_config.max_num_batched_tokens))
    except (AttributeError, TypeError):
        return None


def _page_size(vllm_config: Any) -> int:
    """The engine's KV-cache block size (tokens per page of the cache FlashAttention reads), 16
    when not known yet: the startup measurements lay out their synthetic cache with it."""
    size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    return int(size) if isinstance(size, int) and size > 0 else 16


def _layer_device(owner: Any) -> torch.device:
    """Where a layer's tensors live: its rotary cache's device, else the current CUDA device."""
    cache = getattr(getattr(owner, "rotary_emb", None), "cos_sin_cache", None)
    if isinstance(cache, torch.Tensor) and cache.device.type != "meta":
        return cache.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=1)
def _FA3() -> Any:
    """vLLM's own ``flash_attn_varlen_func`` (the one its FlashAttention backend calls), FA3."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    return functools.partial(flash_attn_varlen_func, fa_version=3)


def _workspace_need(vllm_config: Any, num_q_heads: int, num_kv_heads: int, head_dim: int, *, attend: bool,
                    cfg: PrismConfig, sinks: bool = False) -> WorkspaceNeed:
    """The worst case one launch must fit under vLLM's scheduler limits (FA3 attend buffers in
    the model dtype for the layouts ``cfg.attend_layout`` may use, when ``attend``: with learned
    ``sinks`` "auto" is SINK_LAYOUTS[0] alone, whose views need no q / output copies)."""
    sched = vllm_config.scheduler_config
    dtype = getattr(vllm_config.model_config, "dtype", None)
    return WorkspaceNeed(
        max_num_batched_tokens=int(sched.max_num_batched_tokens),
        max_model_len=int(vllm_config.model_config.max_model_len),
        max_num_seqs=int(sched.max_num_seqs),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        attend_dtype=dtype if attend and dtype in (torch.float16, torch.bfloat16) else None,
        block_size=cfg.block_size,
        attend_layouts=auto_layouts(sinks, head_dim) if cfg.attend_layout == "auto" else (cfg.attend_layout,),
    )


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------
@dataclass
class PrismLaunch:
    """One Prism kernel launch: a run of consecutive requests of the Prism part."""

    token_start: int
    """First query row of the launch in the batch."""
    token_end: int
    plan: PrefillPlan
    """On the device; request i of the plan is request ``first_req + i`` of the batch."""
    block_table: torch.Tensor
    """[plan.num_reqs, max_blocks] int32 device view of the batch's block table."""
    attend: Optional[AttendPlan] = None
    """Buckets of the FA3 attend step (None: the Triton kernel attends this launch)."""
    sampling: Optional["SampleRows"] = None
    """Sampled steps: where its selected-block counts go (see prism_vllm.stats)."""


@dataclass
class SampleRows:
    """A sampled launch's density bookkeeping (PrismStats.add_sample)."""

    bucket: torch.Tensor
    """[NQB] int64 device: each query block's length bucket (the last slot: not counted)."""
    causal: list[int]
    """Causal (query block, head, key block) triples per length bucket, counted rows only."""


@dataclass
class PrismStep:
    """The Prism part of one step (shared by every layer of the group)."""

    start: int
    """First request served by Prism; requests [0, start) go to FlashAttention."""
    end: int
    token_start: int
    token_end: int
    launches: list[PrismLaunch]
    workspace: Any
    sample: bool = False
    """Sample block density and launch time this step (see prism_vllm.stats)."""
    shadow: bool = False
    """FlashAttention serves the whole batch; the launches only estimate (density samples)."""
    timed: bool = False


@dataclass
class PrismMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata of the *whole* batch, plus Prism's split of it.

    The inherited fields describe every request (what FlashAttention runs for layers Prism
    does not serve). With ``prism`` set, ``prism_head`` is FlashAttention's metadata of the
    prefix [0, prism.start) (None when Prism serves every request).
    """

    prism: Optional[PrismStep] = None
    prism_head: Optional[FlashAttentionMetadata] = None


_FA_FIELDS = tuple(f.name for f in dataclasses.fields(FlashAttentionMetadata))


def _wrap(md: FlashAttentionMetadata, **extra: Any) -> PrismMetadata:
    out = PrismMetadata(**{name: getattr(md, name) for name in _FA_FIELDS}, **extra)
    return out


# ----------------------------------------------------------------------------------------------
# Backend
# ----------------------------------------------------------------------------------------------
class PrismAttentionBackend(FlashAttentionBackend):
    """FlashAttention for decode and short prefills, Prism block-sparse prefill for long ones."""

    @staticmethod
    def get_name() -> str:
        # vLLM maps the layer's backend back to the enum with AttentionBackendEnum[get_name()];
        # Prism is registered as the CUSTOM member (the plugin aliases the name 'PRISM' to it).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["PrismAttentionImpl"]:
        return PrismAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["PrismMetadataBuilder"]:
        return PrismMetadataBuilder

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        # Prism's selection and split launches are not batch-invariant.
        return False


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------
class PrismMetadataBuilder(FlashAttentionMetadataBuilder):
    """Splits each batch into a FlashAttention prefix and a Prism suffix (host work only)."""

    # V1 shallow-copies cached metadata for other KV-cache groups; Prism's plan is per build.
    supports_update_block_table: bool = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: AttentionSpec) -> AttentionCGSupport:
        # Full CUDA graphs only for uniform (decode) batches, which Prism never touches; a
        # mixed batch captured in a full graph would freeze Prism's host-side routing.
        base = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        cap = AttentionCGSupport.UNIFORM_BATCH
        return base if base.value <= cap.value else cap

    def use_cascade_attention(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # V1 model runner: put decodes (incl. speculative ones) first and prefill chunks last,
        # so long chunks form a suffix. V2 always sorts that way and ignores the threshold.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.prism_config = prism_config_of(vllm_config)
        _announce(self.prism_config)
        self.decode_threshold = int(self.reorder_batch_threshold or 1)
        self.prism_on = False
        self.prism_reason: Optional[str] = None
        self.prism_num_heads = 0
        self.workspace: Any = None

        # Read the layers' own state (each impl resolved itself once its weights were loaded);
        # a builder never changes a layer.
        impls = self._prism_impls(vllm_config, layer_names)
        ready = [(name, impl) for name, _, impl in impls if impl.prism_layer is not None]
        shapes = [(impl.num_heads, impl.num_kv_heads, impl.head_size) for _, impl in ready]
        reason = group_reason(kv_cache_spec, self.dcp_world_size, shapes)
        if reason is not None:
            self.prism_reason = reason
            for name, _ in ready:
                note_fallback(reason, name)
            return
        if not ready:
            return
        self.prism_on = True
        self.prism_num_heads, self._num_kv_heads = shapes[0][0], shapes[0][1]
        fa3 = any(impl.prism_fa3 for _, impl in ready)
        sinks = any(impl.sinks is not None for _, impl in ready)
        # layers only the FA3 attend step serves: a step it cannot plan goes to FlashAttention
        self._fa3_only = any(impl._fa3_only for _, impl in ready)
        # What the layers' launches do (every Prism layer of a group has the same config): read,
        # not re-derived from the config.
        self._params: PrismParams = ready[0][1].prism_layer.params
        fp8 = any(impl._fp8 for _, impl in ready)  # the layers' own (--kv-cache-dtype-skip-layers)
        self._shape_key = shape_key(*shapes[0], getattr(vllm_config.model_config, "dtype", None), fa3, fp8, sinks)
        self._auto_min_context: Optional[int] = None
        self._auto_densities: Optional[tuple] = None
        self._auto_table: Optional[tuple] = None  # (table, its lengths' buckets, buckets it could pay at)
        # min_context_len="auto" exploration: dense steps per length bucket since its last shadow
        # step (None: never shadowed), see break_even's module doc.
        self._dense_steps: list[Optional[int]] = [None] * len(STATS.by_length.lengths)
        self._layout = attend_layout(self.prism_config, self._shape_key, shapes[0][2], sinks)
        if fa3:
            choice = break_even.layout_for(self._shape_key)
            STATS.record_attend_layout(self._shape_key, choice.summary() if choice is not None and (
                self.prism_config.attend_layout == "auto") else {"layout": self._layout, "shape": self._shape_key})
        need = _workspace_need(vllm_config, *shapes[0], attend=fa3, cfg=self.prism_config, sinks=sinks)
        lane = POOL.lane_for(self, tuple(layer_names))
        self.workspace = POOL.get(device, lane, need, _new_workspace)
        logger.debug(
            "prism: %d of %d layers of this group on Prism (workspace lane %d)", len(ready), len(impls), lane
        )

    @staticmethod
    def _prism_impls(vllm_config: VllmConfig, layer_names: list[str]) -> list[tuple[str, Any, "PrismAttentionImpl"]]:
        ctx = getattr(vllm_config.compilation_config, "static_forward_context", None) or {}
        out = []
        for name in layer_names:
            layer = ctx.get(name)
            impl = getattr(layer, "impl", None)
            if isinstance(impl, PrismAttentionImpl):
                out.append((name, layer, impl))
        return out

    # -- per step ------------------------------------------------------------------------------
    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
        **kwargs: Any,
    ) -> PrismMetadata:
        cm = common_attn_metadata
        route = self._route(cm, fast_build)
        if route is None:
            shadow = self._shadow(common_prefix_len, cm, fast_build, kwargs)
            if shadow is not None:
                return shadow
            md = self._fa_build(common_prefix_len, cm, fast_build, kwargs)
            if self.prism_on:
                STATS.record_step(0, 0, int(cm.query_start_loc_cpu[cm.num_reqs]), 0, 0)
            return _wrap(md)
        return self._build_split(cm, route, fast_build, kwargs)

    def _fa_build(self, common_prefix_len: int, cm: CommonAttentionMetadata, fast_build: bool, kwargs: dict) -> FlashAttentionMetadata:
        if kwargs:
            return super().build(common_prefix_len, cm, fast_build, **kwargs)  # type: ignore[call-arg]
        return super().build(common_prefix_len, cm, fast_build)

    def _route(self, cm: CommonAttentionMetadata, fast_build: bool) -> Optional[PrefillRoute]:
        # fast_build: speculative-decoding drafter steps; cascade/causal tensors: not Prism's.
        if not self.prism_on or fast_build or cm.causal is not True:
            return None
        upper = cm.seq_lens_cpu_upper_bound
        if upper is None:
            return None
        cfg = self.prism_config
        route = route_prism_suffix(
            cm.query_start_loc_cpu,
            upper,
            cm.num_reqs,
            min_query_len=cfg.min_query_len,
            min_context_len=self._min_context_len(),
            decode_threshold=self.decode_threshold,
        )
        return route

    def _min_context_len(self) -> int:
        """PrismConfig.min_context_len, with "auto" decided from this shape's measured timings at
        the density Prism has been selecting at each length (host arithmetic; see break_even)."""
        cfg = self.prism_config
        if cfg.min_context_len != "auto":
            return int(cfg.min_context_len)
        table = break_even.table_for(self._shape_key)
        if table is None:
            return cfg.fixed_min_context_len
        density, sampled = self._densities(table)
        key = (id(table), *density)
        if key == self._auto_densities and self._auto_min_context is not None:
            return self._auto_min_context
        self._auto_densities = key
        tokens = table.break_even(density)
        value = tokens if tokens is not None else _NEVER
        STATS.record_break_even(self._shape_key, table.summary(density, sampled))
        if value != self._auto_min_context:
            before, self._auto_min_context = self._auto_min_context, value
            # INFO for the first decision and for a real move (on / off, or 10% of the length);
            # each new density sample shifts the interpolated length a little
            moved = before is None or (before == _NEVER) != (value == _NEVER) or abs(value - before) > 0.1 * before
            (logger.info if moved else logger.debug)(
                "Prism: min_context_len=auto for %s: %s (dense / Prism ms at block density by length, "
                "* sampled there: %s)", self._shape_key,
                f"Prism from {value} tokens" if tokens is not None else "FlashAttention at every measured length",
                ", ".join(f"{L // 1024}K {d:.2f}/{table.prism_ms(i, r):.2f} @{r:.2f}{'*' if sampled[i] else ''}"
                          for i, (L, d, r) in enumerate(zip(table.lengths, table.dense_ms, density))))
        return value

    def _densities(self, table: break_even.TimingTable) -> tuple[list[float], list[bool]]:
        """The block density to decide with at each of the table's lengths, and whether it was
        sampled there (see break_even.densities_for)."""
        learned = STATS.by_length.densities()
        per = [learned[b] for b in self._table_buckets(table)[0]]
        return break_even.densities_for(per, _prior_density(self._params)), [d is not None for d in per]

    def _table_buckets(self, table: break_even.TimingTable) -> tuple[list[int], set[int]]:
        """The length bucket of each of the table's lengths, and the buckets of those where Prism
        could pay (``TimingTable.could_pay``); worked out once per table."""
        if self._auto_table is None or self._auto_table[0] is not table:
            buckets = [int(b) for b in STATS.by_length.bucket(table.lengths)]
            self._auto_table = (table, buckets, {b for i, b in enumerate(buckets) if table.could_pay(i)})
        return self._auto_table[1], self._auto_table[2]

    def _shadow(self, common_prefix_len: int, cm: CommonAttentionMetadata, fast_build: bool,
                kwargs: dict) -> Optional[PrismMetadata]:
        """A shadow step's metadata when one is due (``_shadow_route``), else None. Planning it
        must never fail a step FlashAttention serves anyway: an error is logged once and the
        step goes on without it."""
        try:
            planned = self._shadow_route(cm, fast_build)
            if planned is None:
                return None
            route, buckets = planned
            md = self._build_split(cm, route, fast_build, kwargs, shadow_prefix_len=common_prefix_len)
        except Exception as e:  # noqa: BLE001 - a density sample is never worth a failed step
            if _first_time(f"shadow:{type(e).__name__}"):
                logger.exception("Prism: could not plan a shadow step (%s: %s); FlashAttention serves the step",
                                 type(e).__name__, e)
            return None
        if md.prism is not None:  # planned (not cut by the workspace): these lengths are being sampled
            for b in buckets:
                self._dense_steps[b] = 0
        return md

    def _shadow_route(self, cm: CommonAttentionMetadata, fast_build: bool) -> Optional[tuple[PrefillRoute, list[int]]]:
        """With min_context_len="auto", on a step FlashAttention serves whole: the prefill chunks
        whose length Prism could pay at (``TimingTable.could_pay``) and that are due for a density
        sample (never sampled there, or EXPLORE_EVERY dense steps since this builder's last
        sample there), as a route ending on the last of them, and their length buckets; None
        otherwise."""
        cfg = self.prism_config
        if (cfg.min_context_len != "auto" or not self.prism_on or fast_build or cm.causal is not True
                or self._params.all_blocks or cm.seq_lens_cpu_upper_bound is None
                or cm.max_query_len <= self.decode_threshold or cm.max_query_len < cfg.min_query_len):
            return None  # (the last two: decode-only steps, the most common, cost one comparison)
        table = break_even.table_for(self._shape_key)
        if table is None:
            return None
        could = self._table_buckets(table)[1]
        if not could:
            return None
        route = route_prism_suffix(cm.query_start_loc_cpu, cm.seq_lens_cpu_upper_bound, cm.num_reqs,
                                   min_query_len=cfg.min_query_len, min_context_len=break_even.MIN_AUTO,
                                   decode_threshold=self.decode_threshold)
        if route is None:
            return None
        buckets = STATS.by_length.bucket(route.ctx_lens + np.diff(route.cu_seqlens_q))
        explore = np.zeros(route.num_reqs, dtype=bool)
        due = []
        for b in sorted({int(b) for b in buckets[~route.dense]} & could):
            seen = self._dense_steps[b]
            if (STATS.by_length.causal[b] == 0) if seen is None else seen >= break_even.EXPLORE_EVERY:
                explore |= (buckets == b) & ~route.dense
                due.append(b)
            else:
                self._dense_steps[b] = (seen or 0) + 1
        if not explore.any():
            return None
        last = int(np.flatnonzero(explore)[-1]) + 1  # no estimation for the requests after it
        cut = route.until(last) if last < route.num_reqs else route
        return dataclasses.replace(cut, dense=~explore[:last]).from_index(0), due

    def _build_split(self, cm: CommonAttentionMetadata, route: PrefillRoute, fast_build: bool, kwargs: dict,
                     shadow_prefix_len: Optional[int] = None) -> PrismMetadata:
        """The step's Prism launches over ``route``; with ``shadow_prefix_len`` (the step's
        common prefix) a shadow step: FlashAttention serves the whole batch as it would without
        Prism, and the launches only estimate, to sample the density (see _shadow_route)."""
        shadow = shadow_prefix_len is not None
        ws = self.workspace
        lim = ws.limits()
        B = self.prism_config.block_size
        fitted, groups = split_launches(
            route,
            block_size=B,
            num_q_heads=self.prism_num_heads,
            max_reqs=lim["max_reqs"],
            max_q_blocks=lim["max_q_blocks"],
            max_k_blocks=lim["max_k_blocks"],
            max_sel_capacity=lim["max_sel_capacity"],
        )
        if fitted is None:
            md = self._fa_build(shadow_prefix_len or 0, cm, fast_build, kwargs)
            STATS.record_step(0, 0, int(cm.query_start_loc_cpu[cm.num_reqs]), 0, 0)
            return _wrap(md)
        route = fitted
        s, e = route.start, route.end
        dense = route.dense
        plans = []
        for i0, i1 in groups:
            cu = route.cu_seqlens_q[i0 : i1 + 1] - route.cu_seqlens_q[i0]
            plan = make_plan(cu, route.ctx_lens[i0:i1], self.prism_num_heads, B, dense=dense[i0:i1].astype(np.int64),
                             dense_tail=self.prism_config.dense_tail)
            assert ws.fits(plan), (ws.limits(), plan.num_q_blocks, plan.num_k_blocks, plan.sel_capacity)
            attend = None
            if ws.attend is not None and not shadow:  # FA3 buckets, planned on the host (None: Triton)
                attend = make_attend_plan(plan, ws.attend.capacity, block_budget=self._params.block_budget,
                                          all_blocks=self._params.all_blocks, layout=self._layout,
                                          num_kv_heads=self._num_kv_heads)
            plans.append((i0, i1, cu, plan, attend))
        if not shadow and self._fa3_only and any(p[4] is None for p in plans):
            # rows too wide for the attend workspace on layers only the FA3 attend step serves
            # (fp8, soft-cap, sinks, head size): FlashAttention serves the step, counted as its own
            if _first_time("fa3-only step"):
                logger.info("Prism: FlashAttention serves steps whose rows the FA3 attend workspace cannot take "
                            "on layers only the FA3 attend step serves")
            STATS.record_step(0, 0, int(cm.query_start_loc_cpu[cm.num_reqs]), 0, 0)
            return _wrap(self._fa_build(0, cm, fast_build, kwargs))
        if shadow:
            head, full = None, self._fa_build(shadow_prefix_len, cm, fast_build, kwargs)
        elif s > 0:
            head = self._fa_build(0, self._head_common(cm, s, route.token_start), fast_build, kwargs)
            # The whole batch for layers Prism does not serve: same tensors, no AOT schedule
            # (one FA build per step: FA3's persistent scheduler buffer now holds the head's).
            full = dataclasses.replace(
                head,
                num_actual_tokens=cm.num_actual_tokens,
                max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc,
                max_seq_len=cm.max_seq_len,
                seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor,
                slot_mapping=cm.slot_mapping,
                scheduler_metadata=None,
                max_num_splits=0,
            )
        else:
            head = None
            full = self._fa_build(0, cm, fast_build, kwargs)

        if shadow:
            STATS.record_step(0, 0, int(cm.query_start_loc_cpu[cm.num_reqs]), 0, 0)
            STATS.shadow_steps += 1
            sample = True
        else:
            sample = STATS.record_step(
                prism_tokens=route.sparse_tokens,
                prism_dense_tokens=route.num_tokens - route.sparse_tokens,
                flash_tokens=route.token_start,
                prism_requests=route.num_reqs,
                prism_dense_requests=int(dense.sum()),
            )
        launches = []
        for i0, i1, cu, plan, attend in plans:
            sampling = self._sampling(plan, route, i0, i1) if sample else None
            t0 = route.token_start + int(route.cu_seqlens_q[i0])
            launches.append(
                PrismLaunch(
                    token_start=t0,
                    token_end=t0 + int(cu[-1]),
                    plan=plan.to(self.device),
                    block_table=cm.block_table_tensor[s + i0 : s + i1],
                    attend=attend,
                    sampling=sampling,
                )
            )
        step = PrismStep(
            start=s,
            end=e,
            token_start=route.token_start,
            token_end=route.token_end,
            launches=launches,
            workspace=ws,
            sample=sample,
            shadow=shadow,
        )
        return _wrap(full, prism=step, prism_head=head)

    def _sampling(self, plan: PrefillPlan, route: PrefillRoute, i0: int, i1: int) -> "SampleRows":
        """A sampled launch's bookkeeping (host work on sampled steps only): each query block's
        length bucket (its request's context + chunk; dense requests' blocks go to the uncounted
        last slot) and the causal triples per bucket."""
        n = len(STATS.by_length.lengths)
        seq = route.ctx_lens[i0:i1] + np.diff(route.cu_seqlens_q[i0 : i1 + 1])
        req_bucket = np.where(route.dense[i0:i1], n, STATS.by_length.bucket(seq))
        qb_bucket = req_bucket[plan.qb_req.numpy().astype(np.int64)]
        causal = np.bincount(qb_bucket, weights=(plan.qb_abs.numpy().astype(np.int64) + 1) * plan.num_q_heads,
                             minlength=n + 1)
        bucket = torch.from_numpy(qb_bucket)
        if self.device.type == "cuda":
            bucket = bucket.pin_memory()  # an asynchronous copy (pageable memory would synchronise)
        return SampleRows(bucket=bucket.to(self.device, non_blocking=True), causal=[int(c) for c in causal[:n]])

    @staticmethod
    def _head_common(cm: CommonAttentionMetadata, s: int, t: int) -> CommonAttentionMetadata:
        """The first s requests (t query rows) of a batch, with max lengths from CPU data."""
        qsl_cpu = cm.query_start_loc_cpu[: s + 1]
        upper = cm.seq_lens_cpu_upper_bound
        assert upper is not None
        q = qsl_cpu[1:] - qsl_cpu[:-1]

        def rows(x: Any) -> Any:
            return None if x is None else x[:s]

        return cm.replace(
            query_start_loc=cm.query_start_loc[: s + 1],
            query_start_loc_cpu=qsl_cpu,
            seq_lens=cm.seq_lens[:s],
            num_reqs=s,
            num_actual_tokens=t,
            max_query_len=int(q.max()),
            max_seq_len=int(upper[:s].max()),
            block_table_tensor=cm.block_table_tensor[:s],
            slot_mapping=cm.slot_mapping[:t],
            positions=None if cm.positions is None else cm.positions[..., :t],  # [T] or M-RoPE [3, T]
            is_prefilling=rows(cm.is_prefilling),
            seq_lens_cpu_upper_bound=upper[:s],
            encoder_seq_lens=rows(cm.encoder_seq_lens),
            encoder_seq_lens_cpu=rows(cm.encoder_seq_lens_cpu),
            dcp_local_seq_lens=rows(cm.dcp_local_seq_lens),
            dcp_local_seq_lens_cpu=rows(cm.dcp_local_seq_lens_cpu),
            rswa_prefix_lens=rows(cm.rswa_prefix_lens),
            mm_req_doc_ranges=None
            if cm.mm_req_doc_ranges is None
            else {i: r for i, r in cm.mm_req_doc_ranges.items() if i < s},
            _seq_lens_cpu=rows(cm._seq_lens_cpu),
            _num_computed_tokens_cpu=rows(cm._num_computed_tokens_cpu),
            _num_computed_tokens_cache=None,
            _token_to_req_indices_cache=None,
        )


# ----------------------------------------------------------------------------------------------
# Impl
# ----------------------------------------------------------------------------------------------
@dataclass
class PrismLayer:
    """What one layer needs at launch time (resolved once, at builder construction)."""

    params: Any
    description: str


class PrismAttentionImpl(FlashAttentionImpl):
    """FlashAttention's impl with a Prism path for the suffix planned by the builder."""

    prism_layer: Optional[PrismLayer]
    prism_reason: Optional[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config_or_none()
        # Invalid --additional-config prism values stop startup here (model construction).
        self.prism_config = prism_config_of(vllm_config)
        self.prism_layer = None
        self.prism_reason = None
        self._rope_owner: Optional[weakref.ReferenceType] = None
        self._layer_attr: Optional[str] = None
        # The attend step runs on FA3 where this layer's FlashAttention is FA3 (Hopper) and rows
        # end on their diagonal block; elsewhere on Prism's Triton kernel.
        self.prism_fa3 = self.vllm_flash_attn_version == 3 and self.prism_config.keep_diagonal
        self._fp8 = is_quantized_kv_cache(self.kv_cache_dtype)
        # What only the FA3 attend step serves (the Triton one has no fp8 cache, soft-cap or sinks,
        # and fewer head sizes): a launch FA3 cannot take is then FlashAttention's, not Triton's.
        self._fa3_only = self.prism_fa3 and bool(self._fp8 or self.logits_soft_cap or self.sinks is not None
                                                 or self.head_size not in SUPPORTED_HEAD_DIMS)
        self._limits = _limits(vllm_config)
        self._page_size = _page_size(vllm_config)
        reason = layer_reason(self, vllm_config, fa3=self.prism_fa3, attend_layout=self.prism_config.attend_layout)
        if reason is not None:
            self.prism_disable(reason)
        elif vllm_config is not None:
            self._reserve_workspace(vllm_config)

    def prism_disable(self, reason: str, where: str = "") -> None:
        """Serve this layer with FlashAttention only (logged once per reason)."""
        if self.prism_reason is None:
            self.prism_reason = reason
            note_fallback(reason, where)
        self.prism_layer = None

    def prism_set_rope_owner(self, owner: "weakref.ReferenceType", attr_name: str) -> None:
        """Called by the plugin's module hook: ``owner`` holds this layer (and its rotary_emb)."""
        if self._rope_owner is None:
            self._rope_owner = owner
            self._layer_attr = attr_name

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """vLLM calls this once the model's weights are loaded (for dummy weights too): resolve
        the layer's RoPE bands and launch parameters, or why it stays on FlashAttention."""
        super().process_weights_after_loading(act_dtype)
        if not self.prism_resolve() or self._limits is None or self.prism_layer.params.band_high.device.type != "cuda":
            return
        cfg = self.prism_config
        # Before vLLM sizes its KV cache, so the synthetic inputs fit; once per shape and process.
        key, probe = self._startup_probe(act_dtype)
        # each logs its outcome once per shape
        sinks = self.sinks is not None
        candidates = auto_layouts(sinks, int(self.head_size))
        if self.prism_fa3 and cfg.attend_layout == "auto" and len(candidates) > 1:
            break_even.choose_layout(key, candidates, **probe)
        layout = attend_layout(cfg, key, int(self.head_size), sinks)
        if cfg.min_context_len == "auto":
            break_even.measure(key, **probe, layout=layout)
        else:  # nothing to time, but the kernels should compile now rather than on the first long request
            break_even.warm_up(key, min_len=cfg.min_context_len, **probe, layout=layout)

    def _startup_probe(self, act_dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        """(shape key, the keyword arguments of break_even's startup measurements) of this
        resolved layer: its shape, the engine's limits and page size, vLLM's FlashAttention call,
        the FA3 attend step if the layer attends on FA3, and the cache's fp8 dtype if quantized."""
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        key = shape_key(self.num_heads, self.num_kv_heads, self.head_size, act_dtype, self.prism_fa3, self._fp8,
                        self.sinks is not None)
        return key, dict(
            num_q_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size, dtype=act_dtype,
            scale=self.scale, params=self.prism_layer.params, max_model_len=self._limits[0],
            max_num_batched_tokens=self._limits[1], flash_attn_varlen_func=flash_attn_varlen_func,
            fa_version=self.vllm_flash_attn_version, fa3_attend=_FA3() if self.prism_fa3 else None,
            device=self.prism_layer.params.band_high.device, page_size=self._page_size,
            fp8=current_platform.fp8_dtype() if self._fp8 else None,
        )

    def prism_resolve(self) -> bool:
        """Resolve this layer's Prism state once (idempotent); False if it stays dense.

        Raises ValueError for band sizes the model's rotary dim cannot hold (a config error).
        """
        if self.prism_reason is not None:
            return False
        if self.prism_layer is not None:
            return True
        owner = self._rope_owner() if self._rope_owner is not None else None
        layer = getattr(owner, self._layer_attr, None) if owner is not None and self._layer_attr else None
        name = getattr(layer, "layer_name", "")
        src = layer_rope_reason(self, owner, layer, fp8=self._fp8)
        if isinstance(src, str):
            self.prism_disable(src, name)
            return False
        bands = bands_for(src, self.prism_config)
        device = _layer_device(owner)
        params = PrismParams.make(bands=bands, scale=self.scale, config=self.prism_config, device=device,
                                  softcap=self.logits_soft_cap, sinks=self.sinks)
        self.prism_layer = PrismLayer(params=params, description=src.description)
        logger.debug("prism: %s on Prism (%s)", name, src.description)
        return True

    def _reserve_workspace(self, vllm_config: VllmConfig) -> None:
        # Allocated while the model is built, so vLLM's memory profiling (which skips
        # attention) counts it. The builder reuses this lane-0 buffer.
        try:
            need = _workspace_need(vllm_config, int(self.num_heads), int(self.num_kv_heads), int(self.head_size),
                                   attend=self.prism_fa3, cfg=self.prism_config, sinks=self.sinks is not None)
            device = torch.empty(0).device  # the model loader's device context
        except AttributeError:
            return
        if device.type == "meta":
            return
        POOL.get(device, 0, need, _new_workspace)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: Optional[torch.Tensor] = None,
        output_block_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        step: Optional[PrismStep] = getattr(attn_metadata, "prism", None)
        lp = self.prism_layer
        if step is None or lp is None:
            # Profiling (metadata None), no Prism rows this step, or a layer Prism does not
            # serve: FlashAttention over the whole batch, exactly as FLASH_ATTN would run it.
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if step.shadow:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
            self._shadow_estimate(step, layer, query, kv_cache)
            return output
        k_cache, v_cache, scales = self._cache_views(layer, query, kv_cache)
        fa3s = [self._fa3_launch(L, k_cache, v_cache) for L in step.launches]
        if self._fa3_only and None in fa3s:
            # The builder hands FlashAttention the steps whose rows the attend workspace cannot take
            # on such layers, so this is a KV cache FA3 cannot view: the same for every step.
            self.prism_disable("a KV cache layout the FA3 attend step cannot view, on a layer only it can serve "
                               "(fp8 cache, soft-cap, learned sinks or head size)")
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        head = attn_metadata.prism_head
        if head is not None:
            super().forward(layer, query, key, value, kv_cache, head, output, output_scale, output_block_scale)
        timed = step.sample and not step.timed and output.is_cuda
        if timed:
            step.timed = True
            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            ev0.record()
        ws = step.workspace
        try:
            for L, fa3 in zip(step.launches, fa3s):  # one per workspace-sized run of requests (usually one)
                t0, t1 = L.token_start, L.token_end
                sel = prism_prefill(query[t0:t1], k_cache, v_cache, L.block_table, L.plan, lp.params, ws,
                                    output[t0:t1], fa3=fa3, scales=scales)
                if step.sample:
                    self._sample_density(L, sel, served=True)
        except Exception as e:  # noqa: BLE001 - e.g. a kernel that does not compile on this GPU
            # Never fail a request Prism was only meant to speed up: this layer goes dense for
            # good, and FlashAttention recomputes the whole batch with the full metadata.
            logger.exception("Prism: kernel launch failed; FlashAttention serves this layer from now on")
            STATS.record_kernel_failure()
            self.prism_disable(f"Prism kernel launch failed ({type(e).__name__}: {e})")
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if timed:
            ev1.record()
            STATS.add_timing(ev0, ev1)
        return output

    def _cache_views(self, layer: torch.nn.Module, query: torch.Tensor,
                     kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[Fp8Scales]]:
        """The K and V halves of vLLM's paged cache as Prism reads them, and the fp8 scales."""
        k_cache, v_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        scales = None
        if self._fp8:  # vLLM stores fp8 as uint8 and hands fp8 queries (as FlashAttention reads them)
            fp8 = current_platform.fp8_dtype()
            k_cache, v_cache = k_cache.view(fp8), v_cache.view(fp8)
            scales = Fp8Scales(q=layer._q_scale if query.dtype == fp8 else None, k=layer._k_scale, v=layer._v_scale)
        return k_cache, v_cache, scales

    def _shadow_estimate(self, step: PrismStep, layer: torch.nn.Module, query: torch.Tensor,
                         kv_cache: torch.Tensor) -> None:
        """A shadow step's estimation (after FlashAttention wrote the output): the density Prism
        would select, sampled by length. A failure turns the layer's Prism path off, as below."""
        lp = self.prism_layer
        k_cache, _, scales = self._cache_views(layer, query, kv_cache)
        sc = scales or Fp8Scales()
        try:
            for L in step.launches:
                sel = prism_estimate(query[L.token_start : L.token_end], k_cache, L.block_table, L.plan, lp.params,
                                     step.workspace, q_scale=sc.q, k_scale=sc.k)
                self._sample_density(L, sel, served=False)
        except Exception as e:  # noqa: BLE001 - the output is FlashAttention's already; never fail the step
            logger.exception("Prism: estimation failed on a shadow step; FlashAttention serves this layer from now on")
            STATS.record_kernel_failure()
            self.prism_disable(f"Prism kernel launch failed ({type(e).__name__}: {e})")

    def _fa3_launch(self, launch: PrismLaunch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> Optional[FA3Launch]:
        """FA3 for this launch, or None (Triton): FA3 off for the layer, no bucket plan (rows too
        wide for the workspace), or a cache layout whose strides allow no virtual-page view. The
        view is made here once per forward (stride arithmetic and two as_strided, no device work)."""
        if not self.prism_fa3 or launch.attend is None:
            return None
        kv = virtual_kv(k_cache, v_cache, launch.plan.block_size)
        if isinstance(kv, str):
            if _first_time(kv):
                logger.info("Prism: the Triton kernel attends instead of FA3 for a KV cache with %s", kv)
            return None
        return FA3Launch(flash_attn_varlen_func=_FA3(), attend=launch.attend, kv=kv)

    @staticmethod
    def _sample_density(launch: PrismLaunch, sel: BlockSelection, served: bool) -> None:
        rows = launch.sampling
        STATS.add_sample(sel.selected_counts().sum(1, dtype=torch.int64), rows.bucket, rows.causal, served=served)
