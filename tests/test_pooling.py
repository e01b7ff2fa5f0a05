"""Pooled queries and keys (kernels/pooling.py) against reference.pool_blocks.

CPU: the Triton interpreter on fp16 inputs and small shapes. GPU (`-m gpu`): bf16 at 32K tokens.
"""

import pytest
import torch
from conftest import DEVICE, assert_tf32_split, key_energy_reference, make_paged_kv, prism_params
from prism_vllm.kernels import make_plan
from prism_vllm.kernels.pooling import pool_keys_paged, pool_queries

from prism_vllm import reference as R

B = 128


def _batch(chunks, hq, hkv, d, dtype, device, seed=0):
    """chunks: [(ctx, L)]; returns q [T, HQ, D], per-request keys [ctx+L, HKV, D], plan."""
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    for _, L in chunks:
        cu.append(cu[-1] + L)
    q = torch.randn(cu[-1], hq, d, generator=gen).to(dtype).to(device)
    ks = [torch.randn(c + L, hkv, d, generator=gen).to(dtype).to(device) for c, L in chunks]
    plan = make_plan(cu, [c for c, _ in chunks], hq, B).to(device)
    return q, ks, cu, plan


def _ref_q(q, chunks, cu):
    return torch.cat([R.pool_blocks(q[cu[i] : cu[i + 1]], c, B) for i, (c, _) in enumerate(chunks)])


def _ref_k(ks):
    return torch.cat([R.pool_blocks(k, 0, B) for k in ks])


# Odd lengths, partial first/last blocks, chunks starting mid-block and on a block edge, batches.
CHUNKS = {
    "L1": [(0, 1)],
    "L127": [(0, 127)],
    "L129": [(0, 129)],
    "ctx77_L300": [(77, 300)],
    "ctx128_L129": [(128, 129)],
    "ctx200_L1000": [(200, 1000)],
    "three_reqs": [(0, 129), (77, 1), (200, 300)],
}


@pytest.mark.parametrize("name", list(CHUNKS), ids=str)
@pytest.mark.parametrize("hq,d", [(4, 64), (3, 80)], ids=lambda x: str(x))
def test_pool_queries_matches_reference(name, hq, d):
    chunks = CHUNKS[name]
    q, _, cu, plan = _batch(chunks, hq, 1, d, torch.float16, DEVICE)
    out = torch.full((plan.num_q_blocks + 2, hq, d), float("nan"), device=DEVICE)
    pool_queries(q=q, plan=plan, out=out)
    torch.testing.assert_close(out[: plan.num_q_blocks], _ref_q(q, chunks, cu), atol=1e-5, rtol=1e-4)
    assert out[plan.num_q_blocks :].isnan().all(), "rows past num_q_blocks must stay untouched"


def test_pool_queries_strided_view_of_padded_query():
    chunks = [(77, 300), (0, 50)]
    q, _, cu, plan = _batch(chunks, 4, 1, 64, torch.float16, DEVICE)
    # vLLM hands a view of a padded [T_pad, HQ_total, D] buffer; make q a non-contiguous slice.
    big = torch.randn(q.shape[0] + 16, 6, 64, dtype=torch.float16, device=DEVICE)
    big[: q.shape[0], 1:5] = q
    view = big[:, 1:5]
    out = torch.empty(plan.num_q_blocks, 4, 64, device=DEVICE)
    pool_queries(q=view, plan=plan, out=out)
    torch.testing.assert_close(out, _ref_q(q, chunks, cu), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [16, 32, 256])
@pytest.mark.parametrize("name", ["L1", "L127", "ctx77_L300", "three_reqs"], ids=str)
def test_pool_keys_paged_matches_reference(layout, page_size, name):
    chunks = CHUNKS[name]
    _, ks, _, plan = _batch(chunks, 4, 2, 64, torch.float16, DEVICE, seed=1)
    k_cache, _, table = make_paged_kv(ks, ks, page_size, layout, seed=page_size)
    out = torch.full((plan.num_k_blocks + 1, 2, 64), float("nan"), device=DEVICE)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=out)
    torch.testing.assert_close(out[: plan.num_k_blocks], _ref_k(ks), atol=1e-5, rtol=1e-4)
    assert out[plan.num_k_blocks :].isnan().all()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pool_keys_energy_out(layout):
    from prism_vllm.rope import RopeLayout, rope_bands

    bands = rope_bands(RopeLayout(64, 48, False), 16, 32)  # GPT-J pairs, 16 unrotated dims
    chunks = CHUNKS["three_reqs"]
    _, ks, _, plan = _batch(chunks, 4, 2, 64, torch.float16, DEVICE, seed=4)
    k_cache, _, table = make_paged_kv(ks, ks, 16, layout)
    out = torch.empty(plan.num_k_blocks, 2, 64, device=DEVICE)
    energy = torch.full((plan.num_k_blocks + 1, 2, 3), float("nan"), device=DEVICE)
    split = torch.full((plan.num_k_blocks, 2, 2, 64), float("nan"), device=DEVICE)
    pool_keys_paged(
        k_cache=k_cache, block_table=table, plan=plan, out=out, energy_out=energy, params=prism_params(bands),
        split_out=split,
    )
    ref = _ref_k(ks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(energy[: plan.num_k_blocks], key_energy_reference(ref, bands), atol=1e-5, rtol=1e-4)
    assert energy[plan.num_k_blocks :].isnan().all()
    assert_tf32_split(split, out)  # an exact tf32 (hi, lo) decomposition of the pooled keys the kernel wrote
    with pytest.raises(ValueError, match="energy_out needs params"):
        pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=out, energy_out=energy)


def test_pool_keys_single_kv_head_and_odd_head_dim():
    chunks = [(200, 1000)]
    _, ks, _, plan = _batch(chunks, 4, 1, 80, torch.float16, DEVICE, seed=2)
    k_cache, _, table = make_paged_kv(ks, ks, 32, "HND")
    out = torch.empty(plan.num_k_blocks, 1, 80, device=DEVICE)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=out)
    torch.testing.assert_close(out, _ref_k(ks), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_t,block_h,num_warps", [(32, 1, 4), (2, 4, 8), (1, 2, 4)])
def test_pooling_launch_settings_match_reference(block_t, block_h, num_warps):
    """Other launch settings (what benchmarks/estimation_sweep.py --pool-sweep times): head tiles
    smaller than, equal to and (block_h 4 > 3 q heads) larger than the heads, both kernels."""
    from prism_vllm.kernels.pooling import PoolingLaunch

    chunks = CHUNKS["three_reqs"]
    q, ks, cu, plan = _batch(chunks, 3, 2, 80, torch.float16, DEVICE, seed=5)
    ln = PoolingLaunch(block_t=block_t, block_h=block_h, block_d=128, num_warps=num_warps)
    out = torch.empty(plan.num_q_blocks, 3, 80, device=DEVICE)
    pool_queries(q=q, plan=plan, out=out, tuning=ln)
    torch.testing.assert_close(out, _ref_q(q, chunks, cu), atol=1e-5, rtol=1e-4)
    k_cache, _, table = make_paged_kv(ks, ks, 16, "NHD")
    kout = torch.empty(plan.num_k_blocks, 2, 80, device=DEVICE)
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=kout, tuning=ln)
    torch.testing.assert_close(kout, _ref_k(ks), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="block_d >= head dim"):
        pool_queries(q=q, plan=plan, out=out, tuning=PoolingLaunch(block_t=8, block_h=4, block_d=64))
    with pytest.raises(ValueError, match="powers of two"):
        pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=kout,
                        tuning=PoolingLaunch(block_t=3, block_h=2, block_d=128))


def test_pooling_launch_widens_head_tiles_only_while_the_gpu_stays_busy():
    """1K-element tile rows, widened to up to 4K (whole q rows of 32 x 128) only while the launch
    keeps >= 256 programs over the padded heads (pool-sweep-h200.json: whole rows pay at 32K-128K
    and cost at 8K)."""
    from prism_vllm.kernels.pooling import pooling_launch

    def tile(h, d, n):
        ln = pooling_launch(h, d, n)
        return ln.block_t, ln.block_h, ln.block_d

    assert tile(32, 128, 64) == (8, 8, 128)  # 8K tokens: 64 blocks x 4 head tiles = 256 programs
    assert tile(32, 128, 128) == (4, 16, 128)
    assert tile(32, 128, 256) == tile(32, 128, 1024) == (2, 32, 128)  # 32K+: one contiguous row
    assert tile(64, 128, 1024) == (2, 32, 128)  # never past 4K elements per row
    assert tile(8, 128, 1024) == (8, 8, 128)  # kv heads of that layer: one 1K row already
    assert tile(9, 64, 1024) == (8, 16, 64) and tile(3, 64, 1024) == (32, 4, 64)
    assert tile(16, 256, 64) == (8, 4, 256) and tile(16, 256, 1024) == (2, 16, 256)
    # 40 heads pad to 64: the tile changes at 64 and 128 blocks, block counts the startup reaches
    assert tile(40, 128, 63) == (8, 8, 128) and tile(40, 128, 64) == tile(40, 128, 127) == (4, 16, 128)
    assert tile(40, 128, 128) == (2, 32, 128)
    for h, d, n in [(32, 128, 0), (5, 80, 1000), (40, 128, 300), (1, 256, 1)]:
        bt, bh, bd = tile(h, d, n)
        assert bd >= d and bh * bd <= max(4096, bd) and 1 <= bt * bh * bd <= 8192


def test_pooling_rejects_bad_shapes():
    chunks = [(0, 129)]
    q, ks, _, plan = _batch(chunks, 4, 2, 64, torch.float16, DEVICE)
    with pytest.raises(ValueError, match="Invalid shape of out"):
        pool_queries(q=q, plan=plan, out=torch.empty(1, 4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="Invalid dtype of out"):
        pool_queries(q=q, plan=plan, out=torch.empty(2, 4, 64, dtype=torch.float16, device=DEVICE))
    k_cache, _, table = make_paged_kv(ks, ks, 16)
    with pytest.raises(ValueError, match="block_table"):
        pool_keys_paged(k_cache=k_cache, block_table=table.long(), plan=plan, out=torch.empty(2, 2, 64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pooling_gpu_32k_bf16(layout):
    chunks = [(0, 32768), (20000, 3000), (1000, 77)]
    q, ks, cu, plan = _batch(chunks, 32, 8, 128, torch.bfloat16, "cuda", seed=3)
    outq = torch.empty(plan.num_q_blocks, 32, 128, device="cuda")
    pool_queries(q=q, plan=plan, out=outq)
    torch.testing.assert_close(outq, _ref_q(q, chunks, cu), atol=1e-5, rtol=1e-4)
    k_cache, _, table = make_paged_kv(ks, ks, 16, layout)
    outk = torch.empty(plan.num_k_blocks, 8, 128, device="cuda")
    pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=outk)
    torch.testing.assert_close(outk, _ref_k(ks), atol=1e-5, rtol=1e-4)
