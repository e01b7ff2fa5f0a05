"""RoPE frequency bands: which head dimensions form Prism's high and low band.

RoPE rotates dimension *pairs*; pair i turns by inv_freq[i] radians per token. Which two
dims form pair i depends on the model's rotary layout:

- NeoX style (Llama, Qwen, ...): dims (i, i + r/2)
- GPT-J style (GPT-J, GLM, Cohere, ...): dims (2i, 2i + 1)

where r is the rotary dimension. Dims >= r of a partial-rotary model are not rotated
(zero frequency) and always belong to the low band. Bands are chosen from the frequencies
themselves (sorted), so scaled RoPE (Llama-3, YaRN, ...) is handled by passing the scaled
frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .config import PrismConfig

__all__ = ["RopeLayout", "Bands", "rope_inv_freq", "rope_bands", "prism_bands", "inv_freq_from_cos_sin_cache"]


@dataclass(frozen=True)
class RopeLayout:
    """How a model applies RoPE to one attention head."""

    head_size: int
    rotary_dim: int
    is_neox_style: bool = True
    base: float = 10000.0

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or not (2 <= self.rotary_dim <= self.head_size):
            raise ValueError(
                f"rotary_dim={self.rotary_dim} must be even and in [2, head_size={self.head_size}]"
            )

    def pairs(self) -> torch.Tensor:
        """[r/2, 2] long: the two head dims rotated together by pair i."""
        half = self.rotary_dim // 2
        i = torch.arange(half)
        if self.is_neox_style:
            return torch.stack([i, i + half], dim=1)
        return torch.stack([2 * i, 2 * i + 1], dim=1)


@dataclass(frozen=True)
class Bands:
    """Boolean masks over the head dims (shape [head_size]) of the two bands."""

    high: torch.Tensor
    low: torch.Tensor

    @property
    def high_dims(self) -> int:
        return int(self.high.sum())

    @property
    def low_dims(self) -> int:
        return int(self.low.sum())


def rope_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Unscaled RoPE frequencies: inv_freq[i] = base^(-2i/r), float64 [r/2]."""
    return base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def inv_freq_from_cos_sin_cache(cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Recover the (possibly scaled) frequencies from vLLM's ``rotary_emb.cos_sin_cache``.

    ``cos_sin_cache`` is [max_pos, r] with cos in the first r/2 columns and sin in the last
    r/2 (vLLM's layout); row 1 holds angle = inv_freq[i] * 1. Every RoPE frequency is <= 1
    rad/token, so atan2 recovers it without wrap-around.
    """
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[0] < 2 or cos_sin_cache.shape[1] % 2:
        raise ValueError(f"expected cos_sin_cache of shape [max_pos >= 2, r], got {tuple(cos_sin_cache.shape)}")
    half = cos_sin_cache.shape[1] // 2
    row = cos_sin_cache[1].detach().to("cpu", torch.float64)
    # Some scalings (YaRN) multiply cos/sin by an mscale; atan2 is invariant to it.
    return torch.atan2(row[half:], row[:half]).abs()


def rope_bands(
    layout: RopeLayout,
    high_dims: int,
    low_dims: int,
    inv_freq: Optional[torch.Tensor] = None,
) -> Bands:
    """High/low band masks for ``layout``.

    The high band is the ``high_dims/2`` fastest-rotating pairs; the low band is the
    ``low_dims/2`` slowest-rotating pairs plus every unrotated dim. Bands may overlap (the
    paper's 64/96 of 128 share 16 pairs).

    Args:
        layout: rotary layout of the head.
        high_dims, low_dims: even band sizes counted in rotary dims, each <= rotary_dim.
        inv_freq: [r/2] frequencies per pair (e.g. scaled ones from the model); default
            ``rope_inv_freq(layout.rotary_dim, layout.base)``.
    """
    r = layout.rotary_dim
    for name, v in (("high_dims", high_dims), ("low_dims", low_dims)):
        if v % 2 or not (2 <= v <= r):
            raise ValueError(f"{name}={v} must be even and in [2, rotary_dim={r}]")
    if inv_freq is None:
        inv_freq = rope_inv_freq(r, layout.base)
    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64).flatten()
    if inv_freq.numel() != r // 2:
        raise ValueError(f"inv_freq has {inv_freq.numel()} entries, expected rotary_dim/2 = {r // 2}")
    if not torch.isfinite(inv_freq).all() or math.isclose(float(inv_freq.abs().max()), 0.0):
        raise ValueError("inv_freq must be finite and not all zero")
    # Stable sort, fastest first; ties keep pair order so the result is deterministic.
    order = torch.sort(-inv_freq, stable=True).indices
    pairs = layout.pairs()
    high = torch.zeros(layout.head_size, dtype=torch.bool)
    low = torch.zeros(layout.head_size, dtype=torch.bool)
    high[pairs[order[: high_dims // 2]].flatten()] = True
    low[pairs[order[r // 2 - low_dims // 2 :]].flatten()] = True
    low[r:] = True  # unrotated dims: zero frequency
    return Bands(high=high, low=low)


def prism_bands(layout: RopeLayout, cfg: "PrismConfig", inv_freq: Optional[torch.Tensor] = None) -> Bands:
    """The bands a PrismConfig asks for on a layout: its two RoPE bands (rule 'paper'), or every
    head dim in both (rule 'meanpool': one band, plain mean pooling)."""
    if cfg.rule == "meanpool":
        alld = torch.ones(layout.head_size, dtype=torch.bool)
        return Bands(high=alld, low=alld.clone())
    hi, lo = cfg.band_dims(layout.rotary_dim)
    return rope_bands(layout, hi, lo, inv_freq)
