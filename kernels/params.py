"""A layer's Prism settings in the form the kernels take: one typed object from PrismConfig down to
the launches (``prism_estimate`` -> ``pool_keys_paged`` / ``select_blocks`` -> kernel arguments).

Built once per layer (``PrismParams.make``, from the layer's RoPE bands and the validated
PrismConfig) and validated once, when built: the launchers read it and do not check it again.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:  # only for type hints: kernels never import the vLLM glue
    from prism_vllm.config import PrismConfig
    from prism_vllm.rope import Bands

__all__ = ["BLOCK_SIZE", "PrismParams"]

#: Prism block size (tokens per query / key block) the kernels are built for, and the default of
#: every plan, workspace and attend buffer (``PrismConfig.block_size`` accepts only this value).
BLOCK_SIZE = 128


def _fail(msg: str) -> None:
    raise ValueError(f"PrismParams: {msg}")


@dataclass(frozen=True)
class PrismParams:
    """Per-layer Prism settings in the form the kernels take (built once per layer).

    Direct construction (tests, benchmarks) is validated like ``PrismConfig``: a bad value raises
    ValueError naming the field.
    """

    band_high: torch.Tensor
    """float32 [D] 0/1 mask of the high-frequency band, contiguous, on the device."""
    band_low: torch.Tensor
    """float32 [D] 0/1 mask of the low-frequency band, contiguous, on the device."""
    high_threshold: float
    """Top-p mass kept per row in the high band, in (0, 1] (PrismConfig.high_threshold)."""
    low_threshold: float
    """Top-p mass kept per row in the low band, in (0, 1] (PrismConfig.low_threshold)."""
    calibrate: bool
    """Energy calibration of the band logits (False: temperature 1)."""
    keep_sink: bool
    """Always keep key block 0."""
    keep_diagonal: bool
    """Always keep the query block's own key block."""
    scale: float
    """Softmax scale of the attention (usually D ** -0.5), > 0."""
    block_budget: Optional[float] = None
    """Cap on the selected share of each row's causal blocks, in (0, 1], or None
    (PrismConfig.block_budget)."""
    softcap: float = 0.0
    """Logit soft-cap of the layer (0: none); only the FA3 attend step applies it."""
    block_size: int = BLOCK_SIZE
    """Prism block size B (PrismConfig.block_size); plans and the workspace must agree with it."""
    local_blocks: int = 1
    """Key blocks always kept ending on the diagonal (PrismConfig.local_blocks): 1 the diagonal
    alone; more needs keep_diagonal."""
    one_band: bool = False
    """The two bands are one: the same mask (rule 'meanpool': every head dim in both), so both
    score and calibrate alike and their union is the top-p set at the larger threshold; the
    selection then scores one band at max(high_threshold, low_threshold) (half the rows per
    program). ``make`` sets it when the masks agree; set by hand it is checked. Exactly the
    two-band selection with an exact top-p search (``SelectionTuning.topp_exact``, the default); a
    coarse one (``topp_exact=False``) may stop at another point of the same tolerance."""
    sinks: Optional[torch.Tensor] = None
    """The layer's learned attention sinks, [HQ] on the bands' device (vLLM's ``impl.sinks``,
    gpt-oss style: one logit per q head in the softmax's normaliser), or None. Only the FA3 attend
    step in a view layout applies them (FA3's ``s_aux`` holds one sink per head of a call, bf16
    and contiguous, as vLLM's own call passes them); the selection ignores them."""

    def __post_init__(self) -> None:
        for name in ("band_high", "band_low"):
            t = getattr(self, name)
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()):
                _fail(f"{name} must be a contiguous float32 [D] 0/1 mask (prism_vllm.rope.Bands), got "
                      f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        if self.band_high.shape != self.band_low.shape or self.band_high.device != self.band_low.device:
            _fail(f"band_high {list(self.band_high.shape)} on {self.band_high.device} and band_low "
                  f"{list(self.band_low.shape)} on {self.band_low.device} must have one head dim and one device")
        for name in ("high_threshold", "low_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                _fail(f"{name}={v!r} is out of range: a top-p probability mass in (0, 1] (1.0 keeps every block)")
        b = self.block_budget
        if b is not None and not (math.isfinite(b) and 0.0 < b <= 1.0):
            _fail(f"block_budget={b!r} is out of range: a share of the causal key blocks in (0, 1], or None")
        if not (math.isfinite(self.scale) and self.scale > 0.0):
            _fail(f"scale={self.scale!r} must be > 0 (the softmax scale, usually head_dim ** -0.5)")
        if not (math.isfinite(self.softcap) and self.softcap >= 0.0):
            _fail(f"softcap={self.softcap!r} must be >= 0 (0: no soft-cap)")
        if not (isinstance(self.local_blocks, int) and self.local_blocks >= 1) or (
                self.local_blocks > 1 and not self.keep_diagonal):
            _fail(f"local_blocks={self.local_blocks!r} must be an int >= 1, and 1 without keep_diagonal")
        if self.one_band and not torch.equal(self.band_high, self.band_low):
            _fail("one_band=True needs the same mask in both bands (band_high == band_low); leave one_band "
                  "False for two bands")
        if self.sinks is not None and not (
                isinstance(self.sinks, torch.Tensor) and self.sinks.dim() == 1 and self.sinks.is_floating_point()
                and self.sinks.device == self.band_high.device):
            _fail(f"sinks must be a floating [HQ] tensor on {self.band_high.device} (the layer's learned sinks), got "
                  f"{getattr(self.sinks, 'dtype', type(self.sinks).__name__)} {list(getattr(self.sinks, 'shape', []))} "
                  f"on {getattr(self.sinks, 'device', None)}")
        if self.block_size < 16 or self.block_size % 16:
            _fail(f"block_size={self.block_size!r} must be a positive multiple of 16 (the kernels take {BLOCK_SIZE})")

    @property
    def head_dim(self) -> int:
        return self.band_high.numel()

    @functools.cached_property
    def estimation_key(self) -> tuple:
        """What the estimation's launches take from these params besides the band masks (which
        are kernel arguments): equal keys, same launches (``prefill.prism_estimate`` replays)."""
        return (self.high_threshold, self.low_threshold, self.calibrate, self.keep_sink, self.keep_diagonal,
                self.block_budget, self.block_size, self.head_dim, self.band_high.device, self.one_band,
                self.local_blocks)

    @property
    def all_blocks(self) -> bool:
        """Every row selects every causal block (a threshold of 1.0 in either band, no budget): no
        estimation, plain causal attention. The one place this is derived."""
        return (self.high_threshold >= 1.0 or self.low_threshold >= 1.0) and self.block_budget is None

    @classmethod
    def make(
        cls,
        *,
        bands: "Bands",
        scale: float,
        config: "PrismConfig",
        device: Union[str, torch.device],
        softcap: float = 0.0,
        sinks: Optional[torch.Tensor] = None,
    ) -> "PrismParams":
        """From the layer's RoPE bands (prism_vllm.rope.rope_bands) and a PrismConfig (``sinks``:
        the layer's learned sinks, held as given: vLLM loads them in place)."""
        cfg = config
        one_band = torch.equal(bands.high, bands.low)
        return cls(
            band_high=bands.high.to(device=device, dtype=torch.float32).contiguous(),
            band_low=bands.low.to(device=device, dtype=torch.float32).contiguous(),
            high_threshold=float(cfg.high_threshold),
            low_threshold=float(cfg.low_threshold),
            calibrate=bool(cfg.calibrated),
            keep_sink=bool(cfg.keep_sink),
            keep_diagonal=bool(cfg.keep_diagonal),
            scale=float(scale),
            block_budget=None if cfg.block_budget is None else float(cfg.block_budget),
            softcap=float(softcap or 0.0),
            block_size=int(cfg.block_size),
            one_band=one_band,
            local_blocks=int(cfg.local_blocks),
            sinks=sinks,
        )
