"""RoPE bands: derived from the rotary layout and checked against the frequencies themselves."""

import math

import pytest
import torch

from prism_vllm.rope import RopeLayout, inv_freq_from_cos_sin_cache, rope_bands, rope_inv_freq


def _idx(mask):
    return mask.nonzero().flatten().tolist()


def _pair_freq_of_dim(layout, inv_freq):
    """freq[d] of each head dim (0 for unrotated dims), from the layout's pairing."""
    f = torch.zeros(layout.head_size, dtype=torch.float64)
    for i, (a, b) in enumerate(layout.pairs().tolist()):
        f[a] = f[b] = inv_freq[i]
    return f


def test_neox_128_matches_the_paper_split():
    b = rope_bands(RopeLayout(128, 128, is_neox_style=True), 64, 96)
    # NeoX pairs (i, i+64); high = the 32 fastest pairs, low = the 48 slowest.
    assert _idx(b.high) == list(range(0, 32)) + list(range(64, 96))
    assert _idx(b.low) == list(range(16, 64)) + list(range(80, 128))
    assert (b.high_dims, b.low_dims) == (64, 96)


def test_gptj_pairs_adjacent_dims():
    b = rope_bands(RopeLayout(64, 64, is_neox_style=False), 32, 48)
    assert _idx(b.high) == list(range(0, 32))
    assert _idx(b.low) == list(range(16, 64))


def test_partial_rotary_puts_unrotated_dims_in_the_low_band():
    layout = RopeLayout(128, 64, is_neox_style=True)
    b = rope_bands(layout, 32, 48)
    assert _idx(b.high) == list(range(0, 16)) + list(range(32, 48))
    assert _idx(b.low) == list(range(8, 32)) + list(range(40, 64)) + list(range(64, 128))
    assert not b.high[64:].any()


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head,rot", [(128, 128), (64, 64), (128, 64), (256, 192)], ids=lambda x: str(x))
def test_bands_follow_the_frequencies(neox, head, rot):
    """Every high-band dim rotates at least as fast as every rotated dim outside it, every
    low-band rotated dim at most as fast as every rotated dim outside it — for arbitrary
    (here shuffled, as if scaled) frequencies."""
    layout = RopeLayout(head, rot, is_neox_style=neox)
    g = torch.Generator().manual_seed(head + rot + neox)
    inv = rope_inv_freq(rot)[torch.randperm(rot // 2, generator=g)]
    hi_n, lo_n = rot // 2, rot * 3 // 4
    b = rope_bands(layout, hi_n, lo_n, inv_freq=inv)
    f = _pair_freq_of_dim(layout, inv)
    rotated = torch.zeros(head, dtype=torch.bool)
    rotated[:rot] = True
    assert f[b.high].min() >= f[rotated & ~b.high].max()
    assert f[b.low & rotated].max() <= f[rotated & ~b.low].min()
    assert int((b.low & rotated).sum()) == lo_n and b.high_dims == hi_n
    assert b.low[rot:].all()


def test_llama3_style_scaling_keeps_order_but_bands_use_the_given_frequencies():
    inv = rope_inv_freq(128, 500000.0)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > 8192 / 1.0, inv / 8.0, inv)  # low frequencies slowed down
    b0 = rope_bands(RopeLayout(128, 128), 64, 96)
    b1 = rope_bands(RopeLayout(128, 128), 64, 96, inv_freq=scaled)
    assert torch.equal(b0.high, b1.high) and torch.equal(b0.low, b1.low)


def test_frequencies_recovered_from_vllm_cos_sin_cache():
    rot = 64
    inv = rope_inv_freq(rot, 10000.0) * 0.5  # some scaling
    t = torch.arange(16, dtype=torch.float64)
    ang = t[:, None] * inv[None, :]
    mscale = 1.2  # YaRN-style magnitude scaling must not matter
    cache = torch.cat([ang.cos() * mscale, ang.sin() * mscale], dim=-1).float()
    got = inv_freq_from_cos_sin_cache(cache)
    torch.testing.assert_close(got, inv, rtol=1e-6, atol=1e-7)


def test_bad_band_sizes_raise():
    with pytest.raises(ValueError, match="high_dims=65 must be even"):
        rope_bands(RopeLayout(128, 128), 65, 96)
    with pytest.raises(ValueError, match="low_dims=160 must be even and in"):
        rope_bands(RopeLayout(128, 128), 64, 160)
    with pytest.raises(ValueError, match="rotary_dim=130"):
        RopeLayout(128, 130)
