"""Read a layer's RoPE layout from the model itself (no guessing from the model name).

vLLM models build their rotary embedding as ``self.rotary_emb = get_rope(...)`` next to
``self.attn = Attention(...)`` in the same attention module. The plugin's module-registration
hook (prism_vllm.plugin) hands each Prism impl a weak reference to that owning module; here we
read ``owner.rotary_emb``: ``rotary_dim``, ``is_neox_style`` and the (possibly scaled)
frequencies recovered from ``cos_sin_cache``. Anything that does not look like a plain
per-pair rotation yields a *reason* instead, and the layer stays on FlashAttention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from prism_vllm.config import PrismConfig
from prism_vllm.rope import Bands, RopeLayout, inv_freq_from_cos_sin_cache, prism_bands, rope_inv_freq

__all__ = ["RotarySource", "resolve_rotary", "bands_for"]

# Max angle error (rad) when checking that cos_sin_cache rows 2 and 3 rotate at 2x and 3x the
# row-1 frequency; loose enough for a bf16 cache (~3 significant digits).
_ANGLE_TOL = 0.05


@dataclass(frozen=True)
class RotarySource:
    """What Prism needs from a layer's rotary embedding."""

    layout: RopeLayout
    inv_freq: torch.Tensor
    """[rotary_dim/2] float64 CPU frequencies per pair (scaling applied)."""
    description: str


def _check_rotation(cache: torch.Tensor, inv_freq: torch.Tensor) -> bool:
    """Rows 2.. of a cos/sin cache must rotate at k * inv_freq (a plain RoPE, maybe scaled)."""
    half = cache.shape[1] // 2
    rows = min(cache.shape[0], 4)
    if rows < 3:
        return True
    c = cache[2:rows].detach().to("cpu", torch.float64)
    k = torch.arange(2, rows, dtype=torch.float64).unsqueeze(1)
    got = torch.atan2(c[:, half:], c[:, :half])
    want = k * inv_freq.unsqueeze(0)
    diff = torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi
    return bool(diff.abs().max() <= _ANGLE_TOL)


# Flags some vLLM 0.26 attention modules test before calling self.rotary_emb (so a layer can own
# a rotary_emb and still skip it: the NoPE global layers of hybrid sliding-window models). The
# first group applies RoPE only to sliding-window layers unless the flag is set (exaone4,
# cohere2_moe, commandr/Cohere2); the second turns RoPE off when false (step3p5, olmo_hybrid).
_ROPE_ON_SLIDING_UNLESS = ("apply_rope_all_layers", "force_rope", "v1")
_ROPE_ON_IF = ("use_rope", "_use_rope")


def _rope_skipped(owner: Any) -> Optional[str]:
    cls = type(owner).__name__
    sliding = bool(getattr(owner, "sliding_window", None))
    for attr in _ROPE_ON_SLIDING_UNLESS:
        if hasattr(owner, attr) and not getattr(owner, attr) and not sliding:
            return f"{cls}.{attr}=False: its forward applies RoPE only to sliding-window layers (NoPE layer)"
    for attr in _ROPE_ON_IF:
        if hasattr(owner, attr) and not getattr(owner, attr):
            return f"{cls}.{attr}=False: its forward skips rotary_emb (NoPE layer)"
    if getattr(getattr(owner, "config", None), "use_mem_rope", True) is False:
        return f"{cls}.config.use_mem_rope=False: its forward skips rotary_emb (NoPE layer)"
    return None


def resolve_rotary(owner: Any, head_size: int) -> Union[RotarySource, str]:
    """The rotary layout of the attention module ``owner``, or a reason why there is none.

    Args:
        owner: the module that holds the vLLM ``Attention`` layer (None if unknown).
        head_size: the layer's head dim D.
    """
    if owner is None:
        return "no owning attention module was recorded (the RoPE layout is unknown)"
    rot = getattr(owner, "rotary_emb", None)
    cls = type(owner).__name__
    if rot is None:
        return f"{cls} has no rotary_emb (no RoPE: ALiBi, NoPE or learned positions)"
    skipped = _rope_skipped(owner)
    if skipped is not None:
        return skipped
    rcls = type(rot).__name__
    rotary_dim = getattr(rot, "rotary_dim", None)
    neox = getattr(rot, "is_neox_style", None)
    if not isinstance(rotary_dim, int) or not isinstance(neox, bool):
        return f"{cls}.rotary_emb ({rcls}) has no integer rotary_dim / boolean is_neox_style"
    if rotary_dim % 2 or not (2 <= rotary_dim <= head_size):
        return f"{cls}.rotary_emb ({rcls}) has rotary_dim={rotary_dim}, not even in [2, head_size={head_size}]"
    base = float(getattr(rot, "base", 10000.0) or 10000.0)
    layout = RopeLayout(head_size=head_size, rotary_dim=rotary_dim, is_neox_style=neox, base=base)
    cache = getattr(rot, "cos_sin_cache", None)
    if isinstance(cache, torch.Tensor) and cache.device.type != "meta":
        if cache.dim() != 2 or cache.shape[1] != rotary_dim or cache.shape[0] < 2:
            return f"{cls}.rotary_emb ({rcls}) has a cos_sin_cache of shape {tuple(cache.shape)}, expected [positions, {rotary_dim}]"
        inv_freq = inv_freq_from_cos_sin_cache(cache)
        if not _check_rotation(cache, inv_freq):
            return f"{cls}.rotary_emb ({rcls}) is not a plain per-pair rotation (cos_sin_cache rows disagree)"
        how = "cos_sin_cache"
    else:
        inv_freq = rope_inv_freq(rotary_dim, base)
        how = f"base={base:g} (no cos_sin_cache)"
    if not torch.isfinite(inv_freq).all() or float(inv_freq.max()) <= 0.0:
        return f"{cls}.rotary_emb ({rcls}) has degenerate frequencies"
    desc = f"{rcls}: rotary_dim={rotary_dim}/{head_size}, {'NeoX' if neox else 'GPT-J'} pairs, frequencies from {how}"
    return RotarySource(layout=layout, inv_freq=inv_freq, description=desc)


def bands_for(src: RotarySource, cfg: PrismConfig) -> Bands:
    """Band masks of a layer (raises ValueError naming the setting for impossible band sizes)."""
    return prism_bands(src.layout, cfg, src.inv_freq)
