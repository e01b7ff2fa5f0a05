"""Pooling of fp8 (e4m3) queries and KV caches (kernels/pooling.py) against reference.pool_blocks.

vLLM 0.26 with ``--kv-cache-dtype fp8`` on FlashAttention: the cache is uint8 storage that FA
views as float8_e4m3fn, written as fp8(k / layer._k_scale); Attention.forward hands the impl an
fp8 query fp8(q / layer._q_scale). Dequantised value = fp8.float() * scale. The kernels must
pool the dequantised values, so the reference here is ``pool_blocks(x_fp8.float() * scale)``.

CPU: the Triton interpreter (it stores fp8 as uint8 and converts bits in numpy; exact for every
finite e4m3 value, NaN patterns read as +-480). GPU (`-m gpu`): bf16 model, fp8 cache, 32K tokens.
"""

import pytest
import torch
from conftest import DEVICE, assert_tf32_split, key_energy_reference, make_paged_kv, prism_params
from prism_vllm.kernels import make_plan
from prism_vllm.kernels.pooling import pool_keys_paged, pool_queries
from test_pooling import CHUNKS

from prism_vllm import reference as R

B = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
E4M3_NAN_BITS = (0x7F, 0xFF)  # the only NaNs of e4m3fn (no infinities)


def quant(x, scale):
    """What vLLM stores / hands over: fp8(x / scale), saturated (QuantFP8, reshape_and_cache_flash)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequant(x8, scale):
    return x8.float() * scale


def scale_tensor(value, device=DEVICE, zero_dim=True):
    """Like vLLM's layer._k_scale: a 0-dim float32 device tensor (torch.tensor(1.0) buffer)."""
    t = torch.tensor(value, dtype=torch.float32, device=device)
    return t if zero_dim else t.reshape(1)


# Scales that are not powers of two, so a forgotten or doubled multiply shows.
Q_SCALE, K_SCALE = 0.0123, 0.0371


def _batch(chunks, hq, hkv, d, device, seed=0, q_scale=Q_SCALE, k_scale=K_SCALE):
    """chunks: [(ctx, L)]; returns fp8 q [T, HQ, D], per-request fp8 keys [ctx+L, HKV, D], cu, plan.

    Values are spread so x / scale covers most of e4m3's range (normals, some subnormals, some
    saturated at 448).
    """
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    for _, L in chunks:
        cu.append(cu[-1] + L)
    q = torch.randn(cu[-1], hq, d, generator=gen) * (q_scale * 120)
    ks = [torch.randn(c + L, hkv, d, generator=gen) * (k_scale * 120) for c, L in chunks]
    plan = make_plan(cu, [c for c, _ in chunks], hq, B).to(device)
    return quant(q, q_scale).to(device), [quant(k, k_scale).to(device) for k in ks], cu, plan


def _ref_q(q8, q_scale, chunks, cu):
    x = dequant(q8, q_scale)
    return torch.cat([R.pool_blocks(x[cu[i] : cu[i + 1]], c, B) for i, (c, _) in enumerate(chunks)])


def _ref_k(ks8, k_scale):
    return torch.cat([R.pool_blocks(dequant(k, k_scale), 0, B) for k in ks8])


# -- the fp8 -> fp32 conversion itself ----------------------------------------------------------


def _all_patterns():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = torch.ones(256, dtype=torch.bool)
    finite[list(E4M3_NAN_BITS)] = False
    return bits.view(FP8), finite


@pytest.mark.parametrize("scale", [1.0, 2.0**-7, 0.0371], ids=["s1", "s2^-7", "s0.0371"])
def test_fp8_conversion_exact_for_all_bit_patterns(scale):
    """Every finite e4m3 bit pattern (normals, subnormals, +-0) through both kernels equals torch's
    float8_e4m3fn -> float32 times the scale exactly (one value per block, so the mean is the
    value itself and the only rounding is the one fp32 multiply by the scale, as in torch)."""
    x8, finite = _all_patterns()
    expect = x8.float() * torch.tensor(scale, dtype=torch.float32)
    s = scale_tensor(scale)

    # keys: one request of one token, the 256 patterns along D (one page of 16 slots)
    k8 = x8.view(1, 1, 256).to(DEVICE)
    k_cache, _, table = make_paged_kv([k8], [k8], 16, "NHD", spare_pages=1)
    plan = make_plan([0, 1], [0], 1, B).to(DEVICE)
    outk = torch.empty(1, 1, 256, device=DEVICE)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=outk, k_scale=s)
    # queries: the same patterns as one row of q
    outq = torch.empty(1, 1, 256, device=DEVICE)
    pool_queries(q=x8.view(1, 1, 256).to(DEVICE), plan=plan, out=outq, q_scale=s)

    for name, out in (("pool_keys_paged", outk), ("pool_queries", outq)):
        got = out.view(256).cpu()
        # exact equality (-0.0 pools to +0.0: the sum starts from +0, which is the right mean)
        bad = (got != expect) & finite
        assert not bad.any(), (
            f"{name}: fp8 bits {bad.nonzero().flatten().tolist()} -> {got[bad].tolist()}, "
            f"torch gives {expect[bad].tolist()}"
        )
        if DEVICE == "cuda":  # the GPU converts NaN to NaN; the interpreter reads 0x7F as 480
            assert got[~finite].isnan().all()


# -- pooled queries -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CHUNKS), ids=str)
@pytest.mark.parametrize("hq,d", [(4, 64), (3, 80)], ids=lambda x: str(x))
def test_pool_queries_fp8_matches_reference(name, hq, d):
    chunks = CHUNKS[name]
    q8, _, cu, plan = _batch(chunks, hq, 1, d, DEVICE)
    out = torch.full((plan.num_q_blocks + 2, hq, d), float("nan"), device=DEVICE)
    pool_queries(q=q8, plan=plan, out=out, q_scale=scale_tensor(Q_SCALE))
    torch.testing.assert_close(out[: plan.num_q_blocks], _ref_q(q8, Q_SCALE, chunks, cu), atol=1e-5, rtol=1e-4)
    assert out[plan.num_q_blocks :].isnan().all(), "rows past num_q_blocks must stay untouched"


def test_pool_queries_fp8_strided_view_of_padded_query():
    """vLLM quantises the [T_pad, HQ*D] query and views it [T_pad, HQ, D]; take a head slice of a
    padded buffer so the view is non-contiguous; the scale is a [1] tensor this time."""
    chunks = [(77, 300), (0, 50)]
    q8, _, cu, plan = _batch(chunks, 4, 1, 64, DEVICE, seed=5)
    big = torch.zeros(q8.shape[0] + 16, 6, 64, dtype=FP8, device=DEVICE)
    big[: q8.shape[0], 1:5] = q8
    view = big[:, 1:5]
    out = torch.empty(plan.num_q_blocks, 4, 64, device=DEVICE)
    pool_queries(q=view, plan=plan, out=out, q_scale=scale_tensor(Q_SCALE, zero_dim=False))
    torch.testing.assert_close(out, _ref_q(q8, Q_SCALE, chunks, cu), atol=1e-5, rtol=1e-4)


# -- pooled keys from an fp8 paged cache --------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [16, 32, 256])
@pytest.mark.parametrize("name", ["L1", "L129", "ctx77_L300", "three_reqs"], ids=str)
def test_pool_keys_paged_fp8_matches_reference(layout, page_size, name):
    chunks = CHUNKS[name]
    _, ks8, _, plan = _batch(chunks, 4, 2, 64, DEVICE, seed=1)
    k_cache, _, table = make_paged_kv(ks8, ks8, page_size, layout, seed=page_size)
    assert k_cache.dtype == FP8
    out = torch.full((plan.num_k_blocks + 1, 2, 64), float("nan"), device=DEVICE)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=out, k_scale=scale_tensor(K_SCALE))
    torch.testing.assert_close(out[: plan.num_k_blocks], _ref_k(ks8, K_SCALE), atol=1e-5, rtol=1e-4)
    assert out[plan.num_k_blocks :].isnan().all()


def test_pool_keys_fp8_from_uint8_storage_like_vllm():
    """vLLM allocates an fp8 cache as uint8 (STR_DTYPE_TO_TORCH_DTYPE["fp8"]); the impl's
    kv_cache.transpose(1, 2).split(D, -1) halves are strided uint8 views, which FA views as
    float8_e4m3fn. The launcher refuses the raw uint8 view with that hint and takes the fp8 one."""
    chunks = CHUNKS["ctx200_L1000"]
    _, ks8, _, plan = _batch(chunks, 8, 2, 128, DEVICE, seed=6)
    k_cache8, _, table = make_paged_kv(ks8, ks8, 16)
    k_u8 = k_cache8.view(torch.uint8)  # the same strided bytes, as the impl receives them
    out = torch.empty(plan.num_k_blocks, 2, 128, device=DEVICE)
    with pytest.raises(ValueError, match=r"k_cache.view\(torch.float8_e4m3fn\)"):
        pool_keys_paged(k_cache=k_u8, block_table=table, plan=plan, out=out, k_scale=scale_tensor(K_SCALE))
    pool_keys_paged(k_cache=k_u8.view(FP8), block_table=table, plan=plan, out=out, k_scale=scale_tensor(K_SCALE))
    torch.testing.assert_close(out, _ref_k(ks8, K_SCALE), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pool_keys_fp8_energy_and_split_out(layout):
    """Energies and the tf32 split describe the dequantised pooled keys."""
    from prism_vllm.rope import RopeLayout, rope_bands

    bands = rope_bands(RopeLayout(80, 64, True), 32, 48)  # NeoX pairs, 16 unrotated dims, odd D
    chunks = CHUNKS["three_reqs"]
    _, ks8, _, plan = _batch(chunks, 3, 3, 80, DEVICE, seed=4)
    k_cache, _, table = make_paged_kv(ks8, ks8, 32, layout)
    out = torch.empty(plan.num_k_blocks, 3, 80, device=DEVICE)
    energy = torch.full((plan.num_k_blocks + 1, 3, 3), float("nan"), device=DEVICE)
    split = torch.full((plan.num_k_blocks, 3, 2, 80), float("nan"), device=DEVICE)
    pool_keys_paged(
        k_cache=k_cache, block_table=table, plan=plan, out=out, energy_out=energy, params=prism_params(bands),
        split_out=split, k_scale=scale_tensor(K_SCALE),
    )
    ref = _ref_k(ks8, K_SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(energy[: plan.num_k_blocks], key_energy_reference(ref, bands), atol=1e-6, rtol=1e-4)
    assert energy[plan.num_k_blocks :].isnan().all()
    assert_tf32_split(split, out, lo_bound=False)


def test_pool_keys_fp8_scale_is_read_on_device():
    """The scale is data, not a compile-time constant: changing the tensor in place (as vLLM's
    calc_kv_scales / weight loading does) changes the result of the next launch."""
    chunks = CHUNKS["ctx77_L300"]
    _, ks8, _, plan = _batch(chunks, 4, 2, 64, DEVICE, seed=7)
    k_cache, _, table = make_paged_kv(ks8, ks8, 16, "HND")
    s = scale_tensor(K_SCALE)
    out = torch.empty(plan.num_k_blocks, 2, 64, device=DEVICE)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=out, k_scale=s)
    s.fill_(2 * K_SCALE)
    out2 = torch.empty_like(out)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=out2, k_scale=s)
    torch.testing.assert_close(out2, _ref_k(ks8, 2 * K_SCALE), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out2, 2 * out, atol=0, rtol=0)


# -- validation ---------------------------------------------------------------------------------


def test_pooling_fp8_rejects_bad_dtype_scale_combinations():
    chunks = [(0, 129)]
    q8, ks8, _, plan = _batch(chunks, 4, 2, 64, DEVICE)
    k_cache, _, table = make_paged_kv(ks8, ks8, 16)
    outq = torch.empty(plan.num_q_blocks, 4, 64, device=DEVICE)
    outk = torch.empty(plan.num_k_blocks, 2, 64, device=DEVICE)
    s = scale_tensor(1.0)

    def keys(cache, **kw):
        return pool_keys_paged(k_cache=cache, block_table=table, plan=plan, out=outk, **kw)

    with pytest.raises(ValueError, match="q is float8_e4m3fn: pass q_scale"):
        pool_queries(q=q8, plan=plan, out=outq)
    with pytest.raises(ValueError, match="k_cache is float8_e4m3fn: pass k_scale"):
        keys(k_cache)
    with pytest.raises(ValueError, match="pass k_scale.*got float"):
        keys(k_cache, k_scale=0.5)  # a Python float would bake the scale in / sync; must be a tensor
    with pytest.raises(ValueError, match="Invalid k_scale: expected a float32 tensor of 1 element"):
        keys(k_cache, k_scale=torch.tensor(1.0, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="per-head fp8 scales are not supported"):
        keys(k_cache, k_scale=torch.ones(2, device=DEVICE))  # compressed-tensors "attn_head" scales
    with pytest.raises(ValueError, match="Invalid q_scale"):
        pool_queries(q=q8, plan=plan, out=outq, q_scale=torch.ones(4, device=DEVICE))
    # a scale with a float16 input is a caller bug, not silently ignored
    with pytest.raises(ValueError, match="q_scale is only for a float8_e4m3fn q; q is torch.float16"):
        pool_queries(q=q8.float().half(), plan=plan, out=outq, q_scale=s)
    with pytest.raises(ValueError, match="k_scale is only for a float8_e4m3fn k_cache"):
        keys(k_cache.float().half(), k_scale=s)
    # other fp8 formats: e5m2 (vLLM fp8_e5m2) and ROCm's fnuz are not what FA on CUDA stores
    for dt in (torch.float8_e5m2, torch.float8_e4m3fnuz):
        with pytest.raises(ValueError, match="Invalid dtype of k_cache"):
            keys(k_cache.view(dt), k_scale=s)
        with pytest.raises(ValueError, match="Invalid dtype of q"):
            pool_queries(q=q8.view(dt), plan=plan, out=outq, q_scale=s)


# -- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pooling_fp8_gpu_32k(layout):
    """bf16 model, fp8 KV cache and fp8 query as vLLM hands them (Llama-3.1-8B head shape), 32K
    tokens over a permuted page table; no host sync inside the launches."""
    from prism_vllm.rope import RopeLayout, rope_bands

    chunks = [(0, 32768), (20000, 3000), (1000, 77)]
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator().manual_seed(3)
    cu = [0]
    for _, L in chunks:
        cu.append(cu[-1] + L)
    q = (torch.randn(cu[-1], hq, d, generator=gen) * 2).to(torch.bfloat16).cuda()
    ks = [(torch.randn(c + L, hkv, d, generator=gen) * 3).to(torch.bfloat16).cuda() for c, L in chunks]
    # scales as a calibrated checkpoint would have them: amax / 448 (vLLM calc_kv_scales)
    q_scale = (q.float().abs().amax() / FP8_MAX).reshape(())
    k_scale = (torch.stack([k.float().abs().amax() for k in ks]).amax() / FP8_MAX).reshape(())
    q8 = quant(q, q_scale)
    ks8 = [quant(k, k_scale) for k in ks]
    plan = make_plan(cu, [c for c, _ in chunks], hq, B).to("cuda")
    k_cache, _, table = make_paged_kv(ks8, ks8, 16, layout)
    bands = rope_bands(RopeLayout(d, d, True), 64, 96)
    outq = torch.empty(plan.num_q_blocks, hq, d, device="cuda")
    outk = torch.empty(plan.num_k_blocks, hkv, d, device="cuda")
    energy = torch.empty(plan.num_k_blocks, hkv, 3, device="cuda")
    split = torch.empty(plan.num_k_blocks, hkv, 2, d, device="cuda")
    params = prism_params(bands, device="cuda")

    def run():
        pool_queries(q=q8, plan=plan, out=outq, q_scale=q_scale)
        pool_keys_paged(
            k_cache=k_cache, block_table=table, plan=plan, out=outk, energy_out=energy,
            params=params, split_out=split, k_scale=k_scale,
        )

    run()  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    ref_q = torch.cat([R.pool_blocks(dequant(q8, q_scale)[cu[i] : cu[i + 1]], c, B) for i, (c, _) in enumerate(chunks)])
    ref_k = torch.cat([R.pool_blocks(dequant(k, k_scale), 0, B) for k in ks8])
    torch.testing.assert_close(outq, ref_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outk, ref_k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(energy, key_energy_reference(ref_k, bands), atol=1e-5, rtol=1e-4)
    assert torch.equal(split[:, :, 0] + split[:, :, 1], outk)
    # fp8 pooling stays close to pooling the bf16 originals (quantisation noise averages out)
    ref_k_bf16 = torch.cat([R.pool_blocks(k, 0, B) for k in ks])
    assert (outk - ref_k_bf16).abs().max() < 0.1 * ref_k_bf16.abs().max()
