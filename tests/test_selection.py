"""Block selection (kernels/selection.py) against reference.select_blocks / band_temperatures.

The kernel's top-p is exact for its own probabilities; they differ from the reference's by float
rounding (another summation order of the dot products and of the kept mass). So a block may
legitimately flip only where the reference itself is on a knife edge. The comparison therefore
splits every band's blocks, per row, into

    certainly kept:     p >= t*(thr - delta) * (1 + eps)
    certainly dropped:  p <  t*(thr + delta) * (1 - eps)
    ambiguous:          in between

with t*(x) the reference's top-p threshold at mass x, eps a relative error of a probability and
delta an absolute error of a kept mass. Bound: the fp32 logits of both implementations differ by
a few ulp of |q||k| / (sqrt(d) t) (<= ~1e-6 absolute for the O(10) logits used here), so
probabilities agree to ~1e-6 relative and masses (sums of <= 100 terms <= 1) to ~1e-6 absolute;
eps = delta = 2e-5 (GPU "ieee" and CPU) leave a 10x margin. The union must contain every
certainly-kept block (plus sink/diagonal) and no block that both bands certainly drop; the
ambiguous ones are counted and must stay rare (a handful out of thousands here, usually zero).
"""

import dataclasses
import math

import pytest
import torch
from conftest import DEVICE, key_energy_reference, prism_params
from prism_vllm.kernels import BlockSelection, make_plan
from prism_vllm.kernels.selection import SelectionTuning, select_blocks, selection_launches

from prism_vllm import PrismConfig
from prism_vllm import reference as R
from prism_vllm.rope import RopeLayout, rope_bands

B = 128
BANDS = {
    "neox64": rope_bands(RopeLayout(64, 64, True), 32, 48),
    "gptj64": rope_bands(RopeLayout(64, 64, False), 32, 48),
    "partial64": rope_bands(RopeLayout(64, 32, True), 16, 16),  # 32 unrotated dims join the low band
    "neox128": rope_bands(RopeLayout(128, 128, True), 64, 96),
}


def _structured(chunks, hq, hkv, d, seed, device, n_hot=3, strength=4.0):
    """Pooled q/k per request where each query block strongly matches a few 'hot' key blocks
    (and the rest is noise), so top-p keeps a sparse set, like real attention."""
    gen = torch.Generator().manual_seed(seed)
    qps, kps = [], []
    for ctx, L in chunks:
        qb0, nq, nk = R.num_blocks(ctx, L, B)
        kp = 0.5 * torch.randn(nk, hkv, d, generator=gen)
        dirs = torch.randn(n_hot, hkv, d, generator=gen)
        hot = torch.randint(0, nk, (n_hot,), generator=gen)
        kp[hot] += strength * dirs / math.sqrt(d) * 4
        qp = 0.5 * torch.randn(nq, hq, d, generator=gen)
        which = torch.randint(0, n_hot, (nq, hq), generator=gen)
        g = hq // hkv
        for i in range(nq):
            for h in range(hq):
                qp[i, h] += strength * dirs[which[i, h], h // g] / math.sqrt(d) * 4
        qps.append(qp)
        kps.append(kp)
    return [x.to(device) for x in qps], [x.to(device) for x in kps]


def tf32_split(kp):
    """[..., D] -> [..., 2, D]: (hi, lo) with hi = kp with the 13 low mantissa bits cleared (tf32)
    and lo = kp - hi (exact), what pool_keys_paged's split_out holds."""
    hi = (kp.contiguous().view(torch.int32) & -8192).view(torch.float32)
    return torch.stack([hi, kp - hi], dim=-2)


def _run(chunks, qps, kps, bands, cfg, dense=None, with_energy=True, with_split=False, **kw):
    hq = qps[0].shape[1]
    cu = [0]
    for _, L in chunks:
        cu.append(cu[-1] + L)
    plan = make_plan(cu, [c for c, _ in chunks], hq, B, dense=dense, dense_tail=cfg.dense_tail).to(DEVICE)
    pq = torch.cat(qps)
    pk = torch.cat(kps)
    sel_idx = torch.full((plan.sel_capacity + 5,), -7, dtype=torch.int16, device=DEVICE)
    sel_cnt = torch.full((plan.num_q_blocks * hq,), -7, dtype=torch.int32, device=DEVICE)
    temps = torch.full((plan.num_q_blocks, hq, 2), float("nan"), device=DEVICE)
    if with_energy:
        kw["key_energy"] = key_energy_reference(pk, bands)
    if with_split:
        kw["pooled_k_split"] = tf32_split(pk)
    select_blocks(
        pooled_q=pq,
        pooled_k=pk,
        plan=plan,
        params=prism_params(bands, cfg, pq.device),
        sel_idx=sel_idx,
        sel_cnt=sel_cnt,
        temps_out=temps,
        **kw,
    )
    return plan, sel_idx, sel_cnt, temps


def kernel_masks(plan, sel_idx, sel_cnt):
    """Dense bool [HQ, nq, nk] per request from the kernel's BSR rows, after checking their form."""
    sel = BlockSelection(plan=plan, indices=sel_idx, counts=sel_cnt)
    sel.check_rows()
    return sel.to_masks()


def _band_probs(qp, kp, qb0, bands, calibrate):
    t_hi, t_lo = R.band_temperatures(qp, kp, qb0, bands, calibrate)
    return [
        torch.softmax(R.band_logits(qp, kp, m, t, qb0).double(), dim=-1)
        for m, t in ((bands.high, t_hi), (bands.low, t_lo))
    ]


def compare_with_reference(chunks, qps, kps, bands, cfg, masks, dense=None, eps=2e-5, delta=2e-5):
    """Assert the kernel's masks agree with the reference up to knife-edge blocks; return
    (ambiguous blocks, causal blocks)."""
    n_amb = n_causal = 0
    for r, (ctx, L) in enumerate(chunks):
        qp, kp, got = qps[r].cpu(), kps[r].cpu(), masks[r]
        qb0, nq, nk = R.num_blocks(ctx, L, B)
        causal = torch.arange(nk)[None, :] <= (qb0 + torch.arange(nq))[:, None]
        ref = R.select_blocks(qp, kp, qb0, bands, cfg, seq_len=ctx + L)
        n_causal += int(causal.sum()) * qp.shape[1]
        if dense is not None and dense[r]:
            assert torch.equal(got, causal.expand_as(got)), f"dense request {r} must select every causal block"
            continue
        if cfg.high_threshold >= 1.0 or cfg.low_threshold >= 1.0:
            assert torch.equal(got, ref), f"request {r}: a threshold of 1.0 must select every causal block"
            continue
        must = torch.zeros_like(got)
        may = torch.zeros_like(got)
        for probs, thr in zip(_band_probs(qp, kp, qb0, bands, cfg.calibrate), (cfg.high_threshold, cfg.low_threshold)):
            t_hi = R.top_p_threshold(probs, thr - delta).unsqueeze(-1)
            t_lo = R.top_p_threshold(probs, min(thr + delta, 1.0)).unsqueeze(-1)
            must |= probs >= t_hi * (1 + eps)
            may |= probs >= t_lo * (1 - eps)
        forced = torch.zeros_like(got)
        if cfg.keep_sink:
            forced[:, :, 0] = True
        if cfg.keep_diagonal:
            forced[:, torch.arange(nq), qb0 + torch.arange(nq)] = True
        must = (must | forced) & causal
        may = (may | forced) & causal
        if cfg.dense_tail and (ctx + L) % B:  # the partial last block attends to every causal block
            must[:, -1] = may[:, -1] = causal[-1]
        assert not (must & ~ref).any() and not (ref & ~may).any(), "test bug: reference outside its own bounds"
        missing = must & ~got
        extra = got & ~may
        assert not missing.any(), f"request {r}: certainly-kept blocks missing at {missing.nonzero()[:5].tolist()}"
        assert not extra.any(), f"request {r}: certainly-dropped blocks selected at {extra.nonzero()[:5].tolist()}"
        n_amb += int((got != ref).sum())
    return n_amb, n_causal


def _check_temps(chunks, qps, kps, bands, cfg, plan, temps, rtol=2e-5):
    cu_qb = plan.cu_qb.tolist()
    for r, (ctx, _) in enumerate(chunks):
        t_hi, t_lo = R.band_temperatures(qps[r].cpu(), kps[r].cpu(), ctx // B, bands, cfg.calibrate)
        want = torch.stack(
            [1 / (math.sqrt(bands.high_dims) * t_hi), 1 / (math.sqrt(bands.low_dims) * t_lo)], dim=-1
        )
        torch.testing.assert_close(temps[cu_qb[r] : cu_qb[r + 1]].cpu(), want, rtol=rtol, atol=0)


CASES = {
    # name: (chunks [(ctx, L)], HQ, HKV, bands)
    "one_req_g4": ([(0, 1000)], 4, 1, "neox64"),
    "mid_block_start_g1": ([(200, 1000)], 2, 2, "gptj64"),
    "three_reqs_g3": ([(0, 129), (77, 1), (1000, 700)], 6, 2, "neox64"),
    "partial_rotary_g8": ([(300, 600), (0, 256)], 8, 1, "partial64"),
    "two_tiles_g4": ([(9000, 200), (100, 50)], 8, 2, "gptj64"),
    "three_levels_g2": ([(0, 40 * 128 + 5)], 4, 2, "neox64"),  # rows of 1..41 blocks: levels 16/32/64
}
CFGS = {
    "t95_80": PrismConfig(rule="paper", high_threshold=0.95, low_threshold=0.8),
    "t80_95_nocal": PrismConfig(rule="paper", high_threshold=0.8, low_threshold=0.95, calibrate=False),
    # the preset's 0.998: the highest threshold whose bisection starts from its feasible floor
    "t998_nosink_nodiag": PrismConfig(rule="paper", keep_sink=False, keep_diagonal=False),
    "t995_99": PrismConfig(rule="paper", high_threshold=0.995, low_threshold=0.99),
    # above 0.998 the bisection starts from 0
    "t999_99": PrismConfig(rule="paper", high_threshold=0.999, low_threshold=0.99),
}


@pytest.mark.parametrize("cfg_name", list(CFGS), ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_selection_matches_reference(case, cfg_name):
    chunks, hq, hkv, bname = CASES[case]
    cfg, bands = CFGS[cfg_name], BANDS[bname]
    qps, kps = _structured(chunks, hq, hkv, 64, seed=len(case), device=DEVICE)
    # Key energies / tf32-split keys from pool_keys_paged (the facade's way) or computed in-kernel.
    plan, sel_idx, sel_cnt, temps = _run(
        chunks, qps, kps, bands, cfg, with_energy=len(case) % 2 == 0, with_split=len(cfg_name) % 2 == 0
    )
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    n_amb, n_causal = compare_with_reference(chunks, qps, kps, bands, cfg, masks)
    assert n_amb <= max(2, n_causal // 1000), f"{n_amb} of {n_causal} blocks differ at the top-p edge"
    # Sparse inputs indeed (rows other than the dense tails, which select every causal block).
    body = [m[:, :-1] if cfg.dense_tail and (c + L) % B else m for m, (c, L) in zip(masks, chunks)]
    body_causal = sum(int(torch.ones(m.shape[1:], dtype=torch.bool).tril(c // B).sum()) * hq
                      for m, (c, _) in zip(body, chunks))
    sel_frac = sum(int(m.sum()) for m in body) / max(1, body_causal)
    assert sel_frac < 0.8, f"inputs meant to give sparse selections selected {sel_frac:.0%}"
    _check_temps(chunks, qps, kps, bands, cfg, plan, temps)


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
@pytest.mark.parametrize("cfg_name", ["t95_80", "t998_nosink_nodiag"], ids=str)
def test_multipass_path_matches_reference(resident_max_blocks, cfg_name):
    # 41 and 9 key blocks: with a resident cap of 16 blocks the long request is streamed
    # (several tiles of 32 and several threshold passes); the short one shares the launch.
    chunks = [(4000, 1200), (0, 1100)]
    hq, hkv, bands, cfg = 4, 1, BANDS["neox64"], CFGS[cfg_name]
    paths = [ln.path for ln in selection_launches(hq, hkv, 41, resident_max_blocks=resident_max_blocks)]
    assert ("multipass" in paths) == bool(resident_max_blocks) and "resident" in paths
    qps, kps = _structured(chunks, hq, hkv, 64, seed=5, device=DEVICE)
    for with_energy in (True, False):
        plan, sel_idx, sel_cnt, temps = _run(
            chunks, qps, kps, bands, cfg, with_energy=with_energy, resident_max_blocks=resident_max_blocks
        )
        masks = kernel_masks(plan, sel_idx, sel_cnt)
        n_amb, n_causal = compare_with_reference(chunks, qps, kps, bands, cfg, masks)
        assert n_amb <= 2
        _check_temps(chunks, qps, kps, bands, cfg, plan, temps)


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
def test_threshold_one_selects_every_causal_block(resident_max_blocks):
    chunks = [(77, 300), (2500, 1000)]
    cfg = PrismConfig(rule="paper", high_threshold=1.0, low_threshold=0.5, keep_sink=False, keep_diagonal=False)
    qps, kps = _structured(chunks, 4, 2, 64, seed=3, device=DEVICE)
    plan, sel_idx, sel_cnt, _ = _run(chunks, qps, kps, BANDS["neox64"], cfg, resident_max_blocks=resident_max_blocks)
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    for (ctx, L), m in zip(chunks, masks):
        qb0, nq, nk = R.num_blocks(ctx, L, B)
        causal = torch.arange(nk)[None, :] <= (qb0 + torch.arange(nq))[:, None]
        assert torch.equal(m, causal.expand_as(m))


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
def test_dense_flag_selects_every_causal_block_of_that_request_only(resident_max_blocks):
    chunks = [(1000, 700), (2300, 300), (0, 500)]
    cfg = CFGS["t95_80"]
    qps, kps = _structured(chunks, 4, 1, 64, seed=9, device=DEVICE)
    dense = [0, 1, 0]
    plan, sel_idx, sel_cnt, _ = _run(
        chunks, qps, kps, BANDS["neox64"], cfg, dense=dense, resident_max_blocks=resident_max_blocks
    )
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    compare_with_reference(chunks, qps, kps, BANDS["neox64"], cfg, masks, dense=dense)


def test_single_token_context_selects_block_zero_only():
    chunks = [(0, 1), (0, 1)]
    cfg = PrismConfig(rule="paper", keep_sink=False, keep_diagonal=False)
    qps, kps = _structured(chunks, 4, 2, 64, seed=1, device=DEVICE)
    plan, sel_idx, sel_cnt, _ = _run(chunks, qps, kps, BANDS["neox64"], cfg)
    assert sel_cnt.tolist() == [1] * 8
    assert sel_idx[: plan.sel_capacity].tolist() == [0] * 8


def test_gaussian_inputs_and_head_dim_128():
    # Plain Gaussian pooled vectors (near-uniform softmax, so many blocks sit close together).
    chunks = [(5000, 3000)]
    gen = torch.Generator().manual_seed(0)
    qb0, nq, nk = R.num_blocks(*chunks[0], B)
    qps = [torch.randn(nq, 4, 128, generator=gen).to(DEVICE)]
    kps = [torch.randn(nk, 1, 128, generator=gen).to(DEVICE)]
    cfg = PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.9)
    plan, sel_idx, sel_cnt, temps = _run(chunks, qps, kps, BANDS["neox128"], cfg)
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    n_amb, n_causal = compare_with_reference(chunks, qps, kps, BANDS["neox128"], cfg, masks)
    assert n_amb <= 2
    _check_temps(chunks, qps, kps, BANDS["neox128"], cfg, plan, temps)


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
def test_coarse_top_p_resolution_keeps_a_superset_within_its_bound(resident_max_blocks):
    # topp_mantissa_bits < 23 stops the threshold search early: every exactly-selected block stays,
    # extra blocks lie within 2^-bits (relative) below the threshold.
    chunks = [(5000, 3000)]
    gen = torch.Generator().manual_seed(3)
    qb0, nq, nk = R.num_blocks(*chunks[0], B)
    qps = [torch.randn(nq, 4, 64, generator=gen).to(DEVICE)]
    kps = [torch.randn(nk, 1, 64, generator=gen).to(DEVICE)]
    cfg, bands = PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.8), BANDS["neox64"]
    exact = _run(chunks, qps, kps, bands, cfg, resident_max_blocks=resident_max_blocks)
    coarse = _run(chunks, qps, kps, bands, cfg, resident_max_blocks=resident_max_blocks,
                  tuning=SelectionTuning(topp_mantissa_bits=4, topp_exact=False))
    m_exact = kernel_masks(exact[0], exact[1], exact[2])[0]
    m_coarse = kernel_masks(coarse[0], coarse[1], coarse[2])[0]
    assert not (m_exact & ~m_coarse).any(), "the coarse search must keep every exactly selected block"
    assert (m_coarse & ~m_exact).any(), "4 bits on near-flat rows should admit extra blocks (else the test is vacuous)"
    compare_with_reference(chunks, qps, kps, bands, cfg, [m_coarse], eps=2**-4 + 2e-5)


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
@pytest.mark.parametrize("inputs", ["gaussian", "uniform", "structured"])
def test_coarse_search_finished_exactly_selects_what_the_full_search_does(resident_max_blocks, inputs):
    # topp_exact (the default) after a coarse search: the resident rows snap to the smallest
    # probability in their bracket and bisect on only where that did not settle; multi-pass rows
    # search to the bit. Same blocks, same counts as the 23-bit search, bit for bit -- on rows where
    # the 4-bit bracket holds several probabilities (near-flat "gaussian", so the snap's fallback
    # bisection runs), rows of equal probabilities ("uniform": zero queries) and sparse ones.
    chunks = [(5000, 3000), (0, 700)]
    gen = torch.Generator().manual_seed(4)
    if inputs == "structured":
        qps, kps = _structured(chunks, 4, 1, 64, seed=8, device=DEVICE)
    else:
        qps, kps = [], []
        for ctx, L in chunks:
            _, nq, nk = R.num_blocks(ctx, L, B)
            q = torch.randn(nq, 4, 64, generator=gen)
            qps.append((q * 0 if inputs == "uniform" else q).to(DEVICE))
            kps.append(torch.randn(nk, 1, 64, generator=gen).to(DEVICE))
    cfg, bands = PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.8), BANDS["neox64"]
    runs = {name: _run(chunks, qps, kps, bands, cfg, resident_max_blocks=resident_max_blocks, tuning=tun)
            for name, tun in {"full": SelectionTuning(topp_mantissa_bits=23),
                              "coarse_exact": SelectionTuning(topp_mantissa_bits=4),
                              "coarse": SelectionTuning(topp_mantissa_bits=4, topp_exact=False)}.items()}
    masks = {k: kernel_masks(*v[:3]) for k, v in runs.items()}
    for a, b in zip(masks["full"], masks["coarse_exact"]):
        assert torch.equal(a, b)
    assert torch.equal(runs["full"][2], runs["coarse_exact"][2])  # sel_cnt
    if inputs == "gaussian":  # else the coarse brackets may all have held one value: nothing to finish
        assert any((c & ~f).any() for c, f in zip(masks["coarse"], masks["full"])), "vacuous: nothing to finish"
    compare_with_reference(chunks, qps, kps, bands, cfg, masks["coarse_exact"])


def test_min_programs_splits_short_levels_and_selects_the_same():
    # A 128K-token request of a Llama-8B layer: the two lowest resident levels run 64 programs of 16
    # query blocks each; min_programs halves their query blocks per program until they reach it
    # (not below the 4 query blocks x 4 heads of one tl.dot's 16 rows).
    base = selection_launches(32, 8, 1024, one_band=True, tuning=SelectionTuning(min_programs=0))
    split = selection_launches(32, 8, 1024, one_band=True, tuning=SelectionTuning(min_programs=256))
    # the default, 264 (two per SM of an H200), also splits the 512 level: every level at 4
    assert [ln.block_g for ln in selection_launches(32, 8, 1024, one_band=True)] == [4, 4, 4, 4]
    assert [ln.nk_pad for ln in base] == [ln.nk_pad for ln in split] == [1024, 512, 256, 128]
    assert [ln.block_g for ln in base] == [4, 8, 16, 16]
    assert [ln.block_g for ln in split] == [4, 8, 4, 4]
    assert all(ln.qr == ln.block_g * 4 for ln in split)
    # and on a small shape, where it splits every level down to one tl.dot's rows: the same blocks
    chunks, hq, hkv = [(0, 40 * 128 + 5)], 4, 2
    cfg, bands = CFGS["t95_80"], BANDS["neox64"]
    qps, kps = _structured(chunks, hq, hkv, 64, seed=6, device=DEVICE)
    # fp32 FMA ("ieee"): on a GPU, tf32 tensor-core dots of other shapes may round a knife-edge block
    a = _run(chunks, qps, kps, bands, cfg, tuning=SelectionTuning(min_programs=0), precision="ieee")
    b = _run(chunks, qps, kps, bands, cfg, tuning=SelectionTuning(min_programs=10**6), precision="ieee")
    assert [ln.block_g for ln in selection_launches(hq, hkv, 41, tuning=SelectionTuning(min_programs=10**6))] \
        != [ln.block_g for ln in selection_launches(hq, hkv, 41, tuning=SelectionTuning(min_programs=0))]
    assert all(torch.equal(x, y) for x, y in zip(kernel_masks(*a[:3]), kernel_masks(*b[:3])))


def test_selection_rejects_bad_arguments():
    chunks = [(0, 300)]
    qps, kps = _structured(chunks, 4, 1, 64, seed=1, device=DEVICE)
    bands = BANDS["neox64"]
    # thresholds are validated once, where the params are built (PrismConfig, or PrismParams itself)
    with pytest.raises(ValueError, match="high_threshold"):
        dataclasses.replace(prism_params(bands), high_threshold=0.0)
    with pytest.raises(ValueError, match="Invalid dtype of sel_cnt"):
        select_blocks(
            pooled_q=qps[0], pooled_k=kps[0], plan=make_plan([0, 300], [0], 4).to(DEVICE),
            params=prism_params(bands),
            sel_idx=torch.empty(100, dtype=torch.int16, device=DEVICE),
            sel_cnt=torch.empty(12, dtype=torch.int32, device=DEVICE).long(),
        )
    with pytest.raises(ValueError, match="band masks of 128 dims"):
        select_blocks(
            pooled_q=qps[0], pooled_k=kps[0], plan=make_plan([0, 300], [0], 4).to(DEVICE),
            params=prism_params(BANDS["neox128"]),
            sel_idx=torch.empty(100, dtype=torch.int16, device=DEVICE),
            sel_cnt=torch.empty(12, dtype=torch.int32, device=DEVICE),
        )


# --- GPU: realistic sizes (bf16-pooled inputs are fp32 here already; bf16 tokens are covered by
# test_prefill / test_pooling). eps/delta per dot precision: "ieee" is plain fp32 like the reference;
# "tf32x3" splits operands into tf32 pairs (~2^-21 relative per product), so its bound is 5x wider;
# "_split": the keys come pre-split (pool_keys_paged split_out), the facade's way.
GPU_TOL = {"ieee": (2e-5, 2e-5), "tf32x3": (1e-4, 1e-4), "tf32x3_split": (1e-4, 1e-4)}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(GPU_TOL))
@pytest.mark.parametrize(
    "chunks",
    [[(0, 32768)], [(20000, 4096), (1000, 77), (0, 8192)], [(262144 - 1000, 1000)]],
    ids=["32k_one_shot", "three_chunks", "256k_ctx_resident_limit"],
)
def test_selection_gpu_realistic(chunks, precision):
    hq, hkv, d = 32, 8, 128
    bands, cfg = BANDS["neox128"], CFGS["t95_80"]
    qps, kps = _structured(chunks, hq, hkv, d, seed=11, device="cuda", n_hot=8)
    plan, sel_idx, sel_cnt, temps = _run(
        chunks, qps, kps, bands, cfg, precision=precision.split("_")[0], with_split=precision.endswith("split")
    )
    torch.cuda.synchronize()
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    eps, delta = GPU_TOL[precision]
    n_amb, n_causal = compare_with_reference(chunks, qps, kps, bands, cfg, masks, eps=eps, delta=delta)
    assert n_amb <= max(2, n_causal // 10000), f"{n_amb} of {n_causal} blocks differ at the top-p edge"
    _check_temps(chunks, qps, kps, bands, cfg, plan, temps, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_name", ["t95_80", "t998_nosink_nodiag"], ids=str)
def test_selection_gpu_1m_context_multipass(cfg_name):
    # A short chunk at the end of a 1M-token context: rows of 8192 key blocks (multi-pass path).
    chunks = [(2**20 - 128, 128), (2**20 - 700, 300)]
    hq, hkv, d = 32, 8, 128
    assert selection_launches(hq, hkv, 8192)[0].path == "multipass"
    bands, cfg = BANDS["neox128"], CFGS[cfg_name]
    qps, kps = _structured(chunks, hq, hkv, d, seed=12, device="cuda", n_hot=16)
    plan, sel_idx, sel_cnt, temps = _run(chunks, qps, kps, bands, cfg)
    torch.cuda.synchronize()
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    n_amb, _ = compare_with_reference(chunks, qps, kps, bands, cfg, masks)
    assert n_amb <= 4
    _check_temps(chunks, qps, kps, bands, cfg, plan, temps, rtol=1e-4)
    # Gaussian pooled vectors: flat softmax over 8192 blocks, so thousands of blocks are kept.
    gen = torch.Generator().manual_seed(0)
    gq = [torch.randn(x.shape, generator=gen).cuda() for x in qps]
    gk = [torch.randn(x.shape, generator=gen).cuda() for x in kps]
    plan, sel_idx, sel_cnt, _ = _run(chunks, gq, gk, bands, cfg)
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    n_amb, n_causal = compare_with_reference(chunks, gq, gk, bands, cfg, masks)
    assert n_amb <= max(4, n_causal // 10000)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "chunks",
    [[(0, 32768)], [(20000, 4096), (1000, 77), (0, 8192)], [(262144 - 1000, 1000)], [(2**20 - 700, 300)]],
    ids=["32k_one_shot", "three_chunks", "256k_ctx_resident_limit", "1m_ctx_multipass"],
)
def test_one_band_selection_gpu_realistic(chunks):
    """The 'quality' preset's rule on the GPU at real sizes: the one-band launch selects exactly
    what the two-band launch of the same params does, and agrees with the reference."""
    from prism_vllm.rope import prism_bands

    hq, hkv, d = 32, 8, 128
    cfg = PrismConfig(rule="meanpool")
    bands = prism_bands(RopeLayout(d, d, True), cfg)
    qps, kps = _structured(chunks, hq, hkv, d, seed=13, device="cuda", n_hot=8)
    one = prism_params(bands, cfg, "cuda")
    assert one.one_band
    got = []
    for params in (one, dataclasses.replace(one, one_band=False)):
        cu = [0]
        for _, L in chunks:
            cu.append(cu[-1] + L)
        plan = make_plan(cu, [c for c, _ in chunks], hq, B, dense_tail=cfg.dense_tail).to("cuda")
        pq, pk = torch.cat(qps), torch.cat(kps)
        sel_idx = torch.full((plan.sel_capacity + 5,), -7, dtype=torch.int16, device="cuda")
        sel_cnt = torch.full((plan.num_q_blocks * hq,), -7, dtype=torch.int32, device="cuda")
        temps = torch.full((plan.num_q_blocks, hq, 2), float("nan"), device="cuda")
        select_blocks(pooled_q=pq, pooled_k=pk, plan=plan, params=params, sel_idx=sel_idx, sel_cnt=sel_cnt,
                      temps_out=temps, key_energy=key_energy_reference(pk, bands), pooled_k_split=tf32_split(pk))
        torch.cuda.synchronize()
        got.append((plan, sel_idx, sel_cnt, temps))
    (plan, i1, c1, t1), (_, i2, c2, t2) = got
    assert torch.equal(c1, c2)
    m1 = kernel_masks(plan, i1, c1)
    assert all(torch.equal(a, b) for a, b in zip(m1, kernel_masks(plan, i2, c2)))
    torch.testing.assert_close(t1, t2, rtol=0, atol=0, equal_nan=True)
    eps, delta = GPU_TOL["tf32x3_split"]
    n_amb, n_causal = compare_with_reference(chunks, qps, kps, bands, cfg, m1, eps=eps, delta=delta)
    assert n_amb <= max(4, n_causal // 10000), f"{n_amb} of {n_causal} blocks differ at the top-p edge"
    _check_temps(chunks, qps, kps, bands, cfg, plan, t1, rtol=1e-4)


def _row_budget(chunks, cfg, masks):
    """Per request: (selected counts [HQ, nq], allowed maximum [nq]) under cfg.block_budget."""
    out = []
    for (ctx, L), m in zip(chunks, masks):
        qb0, nq, _ = R.num_blocks(ctx, L, B)
        rows = qb0 + torch.arange(nq)
        k = R.budget_counts(rows + 1, cfg.block_budget)
        n_forced = int(cfg.keep_sink) + int(cfg.keep_diagonal)
        allowed = torch.maximum(k, torch.minimum(torch.full_like(k, n_forced), rows + 1))
        if cfg.dense_tail and (ctx + L) % B:
            allowed[-1] = rows[-1] + 1  # the dense tail is not capped
        out.append((m.sum(-1), allowed))
    return out


BUDGET_CFGS = {
    # thresholds 1.0: the budget alone decides (top-k of max(p_high, p_low))
    "all_b10": PrismConfig(rule="paper", high_threshold=1.0, low_threshold=1.0, block_budget=0.1),
    "t95_80_b25": PrismConfig(rule="paper", high_threshold=0.95, low_threshold=0.8, block_budget=0.25),
    "t9_nosink_b05": PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.9, keep_sink=False, block_budget=0.05),
}


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
@pytest.mark.parametrize("cfg_name", list(BUDGET_CFGS), ids=str)
def test_block_budget_caps_selection_like_reference(cfg_name, resident_max_blocks):
    # Gaussian pooled vectors: near-flat softmax, so top-p keeps most blocks and the budget cuts.
    chunks = [(4000, 1200), (0, 1100), (300, 200)]
    cfg, bands = BUDGET_CFGS[cfg_name], BANDS["neox64"]
    gen = torch.Generator().manual_seed(len(cfg_name))
    qps, kps = [], []
    for ctx, L in chunks:
        _, nq, nk = R.num_blocks(ctx, L, B)
        qps.append(torch.randn(nq, 4, 64, generator=gen).to(DEVICE))
        kps.append(torch.randn(nk, 2, 64, generator=gen).to(DEVICE))
    plan, sel_idx, sel_cnt, _ = _run(chunks, qps, kps, bands, cfg, resident_max_blocks=resident_max_blocks)
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    uncapped = dataclasses.replace(cfg, block_budget=None)
    n_diff = n_causal = capped_rows = 0
    for r, ((ctx, L), got) in enumerate(zip(chunks, masks)):
        qb0 = ctx // B
        ref = R.select_blocks(qps[r].cpu(), kps[r].cpu(), qb0, bands, cfg, seq_len=ctx + L)
        free = R.select_blocks(qps[r].cpu(), kps[r].cpu(), qb0, bands, uncapped, seq_len=ctx + L)
        n_diff += int((got != ref).sum())
        n_causal += int(free.numel())
        capped_rows += int((ref.sum(-1) < free.sum(-1)).sum())
        outside = int((got & ~free).sum())  # the budget only removes: at most the cut's float noise
        assert outside <= 2, f"request {r}: {outside} blocks outside the top-p union"
        if cfg.keep_diagonal:
            i = torch.arange(got.shape[1])
            assert got[:, i, qb0 + i].all(), "the diagonal block must survive the budget"
    for cnt, allowed in _row_budget(chunks, cfg, masks):
        assert (cnt <= allowed).all(), f"rows over budget: {(cnt - allowed).max()} extra blocks"
    assert capped_rows > 0, "the budget never cut a row (test inputs too sparse)"
    assert n_diff <= 2, f"{n_diff} blocks differ from the reference at the budget's cut"


def test_reference_budget_ranks_forced_blocks_first():
    # One row of 10 causal blocks, budget 0.2 -> k = 2: sink + diagonal fill it, nothing else stays.
    sel = torch.ones(1, 1, 10, dtype=torch.bool)
    forced = torch.zeros_like(sel)
    forced[..., 0] = forced[..., 9] = True
    score = torch.linspace(0.01, 0.9, 10).view(1, 1, 10)
    causal = torch.ones_like(sel)
    k = R.budget_counts(torch.tensor([10]), 0.2).view(1, 1)
    assert int(k) == 2
    assert R.cap_to_budget(sel, forced, score, causal, k)[0, 0].nonzero().flatten().tolist() == [0, 9]
    # k = 4: the two best-scoring non-forced blocks (8, 7) join; unselected blocks never do.
    sel[..., 8] = False
    k4 = torch.tensor([[4]])
    assert R.cap_to_budget(sel, forced, score, causal, k4)[0, 0].nonzero().flatten().tolist() == [0, 6, 7, 9]


@pytest.mark.gpu
@pytest.mark.parametrize("resident_max_blocks", [None, 128], ids=["resident", "multipass"])
def test_block_budget_gpu_realistic(resident_max_blocks):
    # The Llama-3.1-8B evidence setting: near-flat (Gaussian) scores, a 10% budget, 32K tokens.
    chunks = [(0, 32768), (20000, 4096)]
    hq, hkv, d = 32, 8, 128
    cfg, bands = PrismConfig(rule="paper", block_budget=0.1), BANDS["neox128"]
    gen = torch.Generator().manual_seed(21)
    qps, kps = [], []
    for ctx, L in chunks:
        _, nq, nk = R.num_blocks(ctx, L, B)
        qps.append(torch.randn(nq, hq, d, generator=gen).cuda())
        kps.append(torch.randn(nk, hkv, d, generator=gen).cuda())
    plan, sel_idx, sel_cnt, _ = _run(chunks, qps, kps, bands, cfg, with_split=True,
                                     resident_max_blocks=resident_max_blocks)
    torch.cuda.synchronize()
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    for cnt, allowed in _row_budget(chunks, cfg, masks):
        assert (cnt <= allowed).all()
    n_diff = n_causal = 0
    for r, ((ctx, L), got) in enumerate(zip(chunks, masks)):
        ref = R.select_blocks(qps[r].cpu(), kps[r].cpu(), ctx // B, bands, cfg, seq_len=ctx + L)
        n_diff += int((got != ref).sum())
        n_causal += int(ref.sum())
    # tf32x3 scores: a block may swap with its neighbour in rank at the cut (~1e-4 relative).
    assert n_diff <= max(4, n_causal // 2000), f"{n_diff} of {n_causal} selected blocks differ at the budget's cut"
    density = sum(int(m.sum()) for m in masks) / sum(int(torch.ones(m.shape[1:]).tril(c // B).sum()) * hq
                                                     for m, (c, _) in zip(masks, chunks))
    assert 0.09 < density < 0.13, density


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
def test_block_budget_breaks_exact_ties_toward_recent_blocks(resident_max_blocks):
    # Zero queries: every block of a row has exactly the same probability (what dummy weights
    # come close to). The budget must still keep k blocks, not every tied one: the sink, the
    # diagonal and the most recent others.
    chunks = [(2000, 1500), (0, 700)]
    cfg, bands = PrismConfig(rule="paper", block_budget=0.1, dense_tail=False), BANDS["neox64"]
    gen = torch.Generator().manual_seed(2)
    qps, kps = [], []
    for ctx, L in chunks:
        _, nq, nk = R.num_blocks(ctx, L, B)
        qps.append(torch.zeros(nq, 4, 64).to(DEVICE))
        kps.append(torch.randn(nk, 2, 64, generator=gen).to(DEVICE))
    plan, sel_idx, sel_cnt, _ = _run(chunks, qps, kps, bands, cfg, resident_max_blocks=resident_max_blocks)
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    for r, ((ctx, L), got) in enumerate(zip(chunks, masks)):
        qb0 = ctx // B
        ref = R.select_blocks(qps[r].cpu(), kps[r].cpu(), qb0, bands, cfg, seq_len=ctx + L)
        assert torch.equal(got, ref), f"request {r}: {(got != ref).nonzero()[:5].tolist()}"
        for i in range(got.shape[1]):
            n = qb0 + i + 1
            k = max(int(R.budget_counts(torch.tensor([n]), 0.1)), min(2, n))
            want = sorted({0, n - 1} | set(range(n - 2, 0, -1)[: max(0, k - 2)]))
            assert got[0, i].nonzero().flatten().tolist() == want, f"request {r} row {i}"


ONE_BAND_CFGS = {
    # the 'quality' preset's rule at its threshold, at a lower one, and with a block budget
    "meanpool_998": PrismConfig(rule="meanpool"),
    "meanpool_9_nosink": PrismConfig(rule="meanpool", high_threshold=0.9, low_threshold=0.9, keep_sink=False),
    "meanpool_95_budget": PrismConfig(rule="meanpool", high_threshold=0.95, low_threshold=0.95, block_budget=0.3),
    # two thresholds on one mask: the union is the set at the larger one
    "meanpool_9_97": PrismConfig(rule="meanpool", high_threshold=0.9, low_threshold=0.97),
}


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
@pytest.mark.parametrize("cfg_name,hq,hkv", [(c, 8, 2) for c in ONE_BAND_CFGS] + [
    ("meanpool_998", 3, 3), ("meanpool_998", 14, 2), ("meanpool_95_budget", 8, 1)], ids=str)
def test_one_band_selection_equals_two_identical_bands_and_reference(cfg_name, hq, hkv, resident_max_blocks):
    """Rule 'meanpool' (every head dim in both bands): PrismParams.one_band, and the kernel scores
    one band with twice the query blocks per program (groups of 1, 4, 7 and 8 q heads). It must
    select exactly what the two-band launch of the same params selects (the union of two sets over
    the same probabilities), write the same temperatures, and agree with the reference like every
    other rule."""
    from prism_vllm.rope import prism_bands

    cfg = ONE_BAND_CFGS[cfg_name]
    bands = prism_bands(RopeLayout(64, 64, True), cfg)
    chunks = [(4000, 1200), (0, 1100), (300, 200)]
    qps, kps = _structured(chunks, hq, hkv, 64, seed=11, device=DEVICE)
    one = prism_params(bands, cfg, DEVICE)
    two = dataclasses.replace(one, one_band=False)
    assert one.one_band and one.estimation_key != two.estimation_key  # replays never mix them
    nb = {ln.bands for ln in selection_launches(hq, hkv, 41, resident_max_blocks=resident_max_blocks, one_band=True)}
    assert nb == {1}
    runs = []
    for params in (one, two):
        cu = [0]
        for _, L in chunks:
            cu.append(cu[-1] + L)
        plan = make_plan(cu, [c for c, _ in chunks], hq, B, dense_tail=cfg.dense_tail).to(DEVICE)
        pq, pk = torch.cat(qps), torch.cat(kps)
        sel_idx = torch.full((plan.sel_capacity + 5,), -7, dtype=torch.int16, device=DEVICE)
        sel_cnt = torch.full((plan.num_q_blocks * hq,), -7, dtype=torch.int32, device=DEVICE)
        temps = torch.full((plan.num_q_blocks, hq, 2), float("nan"), device=DEVICE)
        select_blocks(pooled_q=pq, pooled_k=pk, plan=plan, params=params, sel_idx=sel_idx, sel_cnt=sel_cnt,
                      temps_out=temps, key_energy=key_energy_reference(pk, bands),
                      resident_max_blocks=resident_max_blocks)
        runs.append((plan, sel_idx, sel_cnt, temps))
    (plan, i1, c1, t1), (_, i2, c2, t2) = runs
    assert torch.equal(c1, c2)
    m1, m2 = kernel_masks(plan, i1, c1), kernel_masks(plan, i2, c2)
    assert all(torch.equal(a, b) for a, b in zip(m1, m2))
    torch.testing.assert_close(t1, t2, rtol=0, atol=0, equal_nan=True)
    if cfg.block_budget is None:
        n_amb, n_causal = compare_with_reference(chunks, qps, kps, bands, cfg, m1)
        assert n_amb <= 2, f"{n_amb} of {n_causal} blocks differ at the top-p edge"
        _check_temps(chunks, qps, kps, bands, cfg, plan, t1)
    else:
        for r, ((ctx, L), got) in enumerate(zip(chunks, m1)):
            ref = R.select_blocks(qps[r].cpu(), kps[r].cpu(), ctx // B, bands, cfg, seq_len=ctx + L)
            assert int((got != ref).sum()) <= 2, f"request {r}: {(got != ref).nonzero()[:5].tolist()}"
    sel_frac = sum(int(m.sum()) for m in m1) / sum(int(torch.ones(m.shape[1:]).tril(c // B).sum()) * hq
                                                   for m, (c, _) in zip(m1, chunks))
    assert sel_frac < 0.9, f"inputs meant to give sparse selections selected {sel_frac:.0%}"


@pytest.mark.parametrize("rule", ["meanpool", "paper"])
def test_longest_resident_rows_fill_their_programs(rule):
    """Rows of up to 2048 key blocks (a chunk at the end of a 256K-token context): the level whose
    register budget holds fewer query blocks than the 16 // bands rows tl.dot needs now fills those
    rows with query blocks instead of padding. Same selection as the reference, and for one band
    the same as two."""
    from prism_vllm.rope import prism_bands

    hq, hkv = 8, 2
    top = selection_launches(hq, hkv, 2048, one_band=rule == "meanpool")[0]
    assert top.path == "resident" and top.nk_pad == 2048 and top.block_g * 4 == top.qr  # no padding rows
    cfg = PrismConfig(rule=rule, high_threshold=0.95, low_threshold=0.9)
    bands = prism_bands(RopeLayout(64, 64, True), cfg)
    chunks = [(262144 - 700, 700)]
    qps, kps = _structured(chunks, hq, hkv, 64, seed=21, device=DEVICE, n_hot=6)
    params = prism_params(bands, cfg, DEVICE)
    assert params.one_band == (rule == "meanpool")
    plan = make_plan([0, 700], [262144 - 700], hq, B, dense_tail=cfg.dense_tail).to(DEVICE)
    pq, pk = qps[0], kps[0]
    outs = []
    for prm in ([params, dataclasses.replace(params, one_band=False)] if params.one_band else [params]):
        sel_idx = torch.full((plan.sel_capacity + 5,), -7, dtype=torch.int16, device=DEVICE)
        sel_cnt = torch.full((plan.num_q_blocks * hq,), -7, dtype=torch.int32, device=DEVICE)
        select_blocks(pooled_q=pq, pooled_k=pk, plan=plan, params=prm, sel_idx=sel_idx, sel_cnt=sel_cnt,
                      key_energy=key_energy_reference(pk, bands))
        outs.append(kernel_masks(plan, sel_idx, sel_cnt))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[-1]))
    n_amb, n_causal = compare_with_reference(chunks, qps, kps, bands, cfg, outs[0])
    assert n_amb <= 2, f"{n_amb} of {n_causal} blocks differ at the top-p edge"


def test_one_band_params_are_made_for_identical_bands_only():
    from prism_vllm.kernels import PrismParams
    from prism_vllm.rope import prism_bands

    layout = RopeLayout(64, 64, True)
    mp = PrismConfig(rule="meanpool")
    assert prism_params(prism_bands(layout, mp), mp).one_band
    split = PrismConfig(rule="meanpool", high_threshold=0.9, low_threshold=0.95)  # one mask, two thresholds
    assert prism_params(prism_bands(layout, split), split).one_band
    paper = PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.9)
    p = prism_params(prism_bands(layout, paper), paper)
    assert isinstance(p, PrismParams) and not p.one_band  # two different masks
    with pytest.raises(ValueError, match=r"one_band=True needs the same mask in both bands"):
        dataclasses.replace(p, one_band=True)


@pytest.mark.parametrize("resident_max_blocks", [16, None], ids=["multipass", "resident"])
@pytest.mark.parametrize("cfg", [
    PrismConfig(rule="meanpool", high_threshold=0.9, low_threshold=0.9, local_blocks=2),
    PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.8, local_blocks=3, keep_sink=False),
    PrismConfig(rule="paper", high_threshold=0.95, low_threshold=0.95, local_blocks=2, block_budget=0.1),
], ids=["meanpool_l2", "paper_l3_nosink", "paper_l2_budget"])
def test_local_blocks_are_always_selected_like_reference(cfg, resident_max_blocks):
    """local_blocks: the diagonal and the local_blocks - 1 blocks before it are always selected
    (forced, so a block budget keeps them too), as in the reference; chunks that start mid-block
    and rows near block 0 included."""
    from prism_vllm.rope import prism_bands

    bands = prism_bands(RopeLayout(64, 64, True), cfg)
    chunks = [(4000, 1200), (0, 1100), (300, 200)]
    hq, hkv = 4, 2
    qps, kps = _structured(chunks, hq, hkv, 64, seed=17, device=DEVICE)
    plan, sel_idx, sel_cnt, _ = _run(chunks, qps, kps, bands, cfg, resident_max_blocks=resident_max_blocks)
    masks = kernel_masks(plan, sel_idx, sel_cnt)
    base = dataclasses.replace(cfg, local_blocks=1)
    n_more = 0
    for r, ((ctx, L), got) in enumerate(zip(chunks, masks)):
        qb0 = ctx // B
        ref = R.select_blocks(qps[r].cpu(), kps[r].cpu(), qb0, bands, cfg, seq_len=ctx + L)
        assert int((got != ref).sum()) <= 2, f"request {r}: {(got != ref).nonzero()[:5].tolist()}"
        i = torch.arange(got.shape[1])
        for back in range(cfg.local_blocks):
            ok = qb0 + i - back >= 0
            assert got[:, i[ok], (qb0 + i - back)[ok]].all(), f"request {r}: block I-{back} missing"
        n_more += int((ref & ~R.select_blocks(qps[r].cpu(), kps[r].cpu(), qb0, bands, base, seq_len=ctx + L)).sum())
    assert n_more > 0, "the local blocks added nothing (test inputs select them anyway)"


def test_local_blocks_config_and_params():
    from prism_vllm.rope import prism_bands

    with pytest.raises(ValueError, match=r"prism\.local_blocks=0 is out of range"):
        PrismConfig(local_blocks=0)
    with pytest.raises(ValueError, match=r"prism\.local_blocks=2 .*keep_diagonal=true"):
        PrismConfig(local_blocks=2, keep_diagonal=False)
    cfg = PrismConfig(local_blocks=2)
    p = prism_params(prism_bands(RopeLayout(64, 64, True), cfg), cfg)
    assert p.local_blocks == 2 and p.estimation_key != dataclasses.replace(p, local_blocks=1).estimation_key
    with pytest.raises(ValueError, match="local_blocks"):
        dataclasses.replace(p, local_blocks=2, keep_diagonal=False)
