"""Where Prism may serve, in one place: the rules for a layer, for a KV-cache group and (in
``routing``) for the rows of a batch. Every rule returns None (Prism may serve) or the reason it
may not, a full sentence naming what Prism cannot do there; the backend logs each reason once
and counts the layers it keeps on FlashAttention by reason (``prism_vllm.stats``).

    layer_reason       fixed at construction: attention type, window, position bias, soft-cap,
                       sinks, KV-cache dtype, context parallelism, head size, multimodal prefix
    layer_rope_reason  once the weights are loaded: the model's rotary embedding, the cache dtype
                       and the fp8 scales of the layer
    group_reason       a KV-cache group: its layout and its layers' head shape
    routing.route_prism_suffix   per step: which requests of a batch (long prefill chunks)

The one remaining fallback is a Prism launch that raises (a kernel that does not build on this
GPU): the impl serves that layer with FlashAttention from then on (``PrismAttentionImpl.forward``).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Optional, Sequence

import torch

from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from prism_vllm.config import ADDITIONAL_CONFIG_KEY, PrismConfig
from prism_vllm.kernels.attend_fa3 import VIEW_LAYOUTS
from prism_vllm.kernels.prefill import SUPPORTED_HEAD_DIMS

from .rope_source import RotarySource, resolve_rotary

__all__ = ["prism_config_of", "layer_reason", "layer_rope_reason", "group_reason"]

FP8_KV_DTYPES = ("fp8", "fp8_e4m3")
#: FA3 attend layouts that give each q head its own learned sink (one FA3 call per q head / kv
#: group on views of q and out); "auto" takes the first for layers with sinks.
SINK_LAYOUTS = VIEW_LAYOUTS


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> PrismConfig:
    return PrismConfig.from_dict(json.loads(raw))


def prism_config_of(vllm_config: Any) -> PrismConfig:
    """``additional_config["prism"]`` parsed once per process (every layer and builder asks)."""
    if vllm_config is None:
        return PrismConfig()
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(ADDITIONAL_CONFIG_KEY)
    if raw is None or isinstance(raw, PrismConfig):
        return raw if raw is not None else _parse("null")
    try:
        key = json.dumps(raw, sort_keys=True)
    except TypeError:  # not JSON (a bad value): let from_dict say what is wrong
        return PrismConfig.from_dict(raw)
    return _parse(key)


def layer_reason(impl: Any, vllm_config: Any, *, fa3: bool, attend_layout: str = "auto") -> Optional[str]:
    """What keeps a layer on FlashAttention whatever the weights (``impl``: vLLM's FlashAttention
    impl fields). ``fa3``: the layer's attend step would run on FA3; ``attend_layout``: the
    configured FA3 attend layout (PrismConfig.attend_layout)."""
    if impl.attn_type != AttentionType.DECODER:
        kind = getattr(impl.attn_type, "value", impl.attn_type)
        return f"{kind} attention (Prism is for causal decoder self-attention)"
    if impl.sliding_window != (-1, -1):
        return "sliding-window layers (Prism selects among all earlier blocks)"
    if impl.alibi_slopes is not None:
        return "ALiBi position bias (Prism's bands need RoPE)"
    if impl.logits_soft_cap and not fa3:
        return "logits soft-capping without FA3 (Prism's Triton kernel has no soft-cap)"
    if impl.sinks is not None:
        # FA3 takes one sink logit per head of a call (s_aux [heads]): the view layouts make one
        # call per q head / kv group, the copy layouts put sequences of every q head in one call
        if not fa3:
            return "learned attention sinks without FA3 (Prism's Triton attend step has no sinks)"
        if impl.sinks.dtype != torch.bfloat16:
            return f"learned attention sinks in {impl.sinks.dtype} (FA3 takes bfloat16 sinks)"
        if attend_layout not in SINK_LAYOUTS + ("auto",):
            return (f"learned attention sinks with attend_layout={attend_layout!r} (FA3 holds one sink per head "
                    f"of a call): set attend_layout to \"auto\" or one of {', '.join(map(repr, SINK_LAYOUTS))}")
    if is_quantized_kv_cache(impl.kv_cache_dtype):
        if not fa3:
            return (f"quantized KV cache kv_cache_dtype={impl.kv_cache_dtype} without FA3 (Prism's Triton "
                    f"attend step reads float16/bfloat16 caches only)")
        if impl.kv_cache_dtype not in FP8_KV_DTYPES or current_platform.fp8_dtype() != torch.float8_e4m3fn:
            return (f"quantized KV cache kv_cache_dtype={impl.kv_cache_dtype} (Prism reads fp8 e4m3 caches "
                    f"with per-tensor scales only)")
    if impl.dcp_world_size > 1:
        return "decode context parallelism shards the KV cache"
    if fa3:
        if impl.head_size % 8 or impl.head_size > 256:
            return f"head size {impl.head_size} (Prism's FA3 attend step supports multiples of 8 up to 256)"
    elif impl.head_size not in SUPPORTED_HEAD_DIMS:
        return f"head size {impl.head_size} (Prism's Triton kernel supports {list(SUPPORTED_HEAD_DIMS)})"
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and getattr(model_config, "is_mm_prefix_lm", False):
        return "multimodal prefix-LM (bidirectional image spans)"
    return None


def layer_rope_reason(impl: Any, owner: Any, layer: Any, *, fp8: bool) -> "RotarySource | str":
    """The layer's rotary source once the model exists, or why Prism cannot serve it: no RoPE
    Prism can read, a cache dtype other than the activations', per-head fp8 scales."""
    if fp8:
        scales = [getattr(layer, n, None) for n in ("_q_scale", "_k_scale", "_v_scale")]
        if layer is not None and any(t is None or t.numel() != 1 for t in scales):
            return "fp8 KV cache with per-head scales (Prism's pooling takes one scale per tensor)"
    else:
        cache_dtype = getattr(layer, "kv_cache_torch_dtype", None)
        act_dtype = getattr(layer, "dtype", None)
        if cache_dtype is not None and act_dtype is not None and cache_dtype != act_dtype:
            return f"KV cache dtype {cache_dtype} differs from the activations' {act_dtype}"
    return resolve_rotary(owner, impl.head_size)


def group_reason(spec: AttentionSpec, dcp_world_size: int, shapes: Sequence[tuple[int, int, int]]) -> Optional[str]:
    """What keeps a whole KV-cache group on FlashAttention (its layout, or layers of different
    head shapes, which one plan per step cannot serve)."""
    if type(spec) is not FullAttentionSpec:
        return f"{type(spec).__name__} layers (sliding-window, chunked-local, sink, encoder or cross attention KV layout)"
    if dcp_world_size > 1:
        return "decode context parallelism shards the KV cache"
    if len(set(shapes)) > 1:
        return "attention layers of one KV-cache group with different head counts"
    return None
