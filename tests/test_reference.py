"""The pure-PyTorch reference: pooling, calibration, top-p, selection, sparse attention.

Checked against independent computations (plain loops, torch SDPA) and against the official
Prism estimation's own output on seeded inputs, recorded in tests/data/official_selection.json
by benchmarks/official_selection.py (the official code is never committed; with
PRISM_OFFICIAL_DIR set, the record is also re-checked against a live run of it).
"""

import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from prism_vllm import PrismConfig
from prism_vllm import reference as R
from prism_vllm.rope import RopeLayout, rope_bands

BANDS64 = rope_bands(RopeLayout(64, 64), 32, 48)
ALL = PrismConfig(rule="paper", high_threshold=1.0, low_threshold=1.0)


def _qkv(L, ctx, hq, hkv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, hq, d, generator=g).to(dtype)
    k = torch.randn(ctx + L, hkv, d, generator=g).to(dtype)
    v = torch.randn(ctx + L, hkv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("start,n", [(0, 1), (0, 127), (0, 129), (77, 300), (128, 128), (200, 1000)], ids=str)
def test_pool_blocks_averages_existing_rows_of_absolute_blocks(start, n):
    x = torch.randn(n, 2, 8)
    got = R.pool_blocks(x, start, 128)
    first = start // 128
    for i in range(got.shape[0]):
        lo, hi = max((first + i) * 128, start), min((first + i + 1) * 128, start + n)
        torch.testing.assert_close(got[i], x[lo - start : hi - start].mean(0))
    assert got.shape[0] == (start + n - 1) // 128 - first + 1


@pytest.mark.parametrize(
    "L,ctx,hq,hkv",
    [(1, 0, 2, 2), (127, 0, 4, 1), (129, 0, 3, 1), (300, 77, 8, 2), (256, 128, 4, 4), (1000, 200, 4, 1)],
    ids=lambda x: str(x),
)
def test_all_blocks_selected_equals_dense_sdpa(L, ctx, hq, hkv):
    q, k, v = _qkv(L, ctx, hq, hkv, 64)
    out, mask = R.prism_attention(q, k, v, ctx, BANDS64, ALL)
    causal = torch.arange(mask.shape[2])[None, :] <= (ctx // 128 + torch.arange(mask.shape[1]))[:, None]
    assert torch.equal(mask, causal.expand_as(mask))
    torch.testing.assert_close(out, R.dense_causal_attention(q, k, v, ctx, 1 / 8), atol=2e-5, rtol=1e-4)


def test_learned_sinks_scale_dense_attention_by_the_kept_mass():
    """With a learned sink s_h, attention is dense attention times the share of the row's mass
    its keys keep, Z / (Z + exp(s_h)) = sigmoid(logsumexp(scores) - s_h): checked against SDPA
    and an independent logsumexp, through both references (block-sparse with every block,
    and FA's paged varlen semantics with s_aux)."""
    L, ctx, hq, hkv, d = 300, 77, 4, 2, 64
    q, k, v = _qkv(L, ctx, hq, hkv, d)
    scale, sinks = d**-0.5, torch.tensor([-1.0, 0.5, 2.0, 30.0])
    S = ctx + L
    dense = R.dense_causal_attention(q, k, v, ctx, scale)  # [L, HQ, D]
    s = torch.einsum("lhd,shd->hls", q.float(), k.float().repeat_interleave(hq // hkv, 1)) * scale
    s = s.masked_fill(torch.arange(S)[None, None, :] > torch.arange(ctx, S)[None, :, None], float("-inf"))
    kept = torch.sigmoid(torch.logsumexp(s, -1) - sinks[:, None])  # [HQ, L]
    want = dense.float() * kept.transpose(0, 1)[:, :, None]
    nq, nk = -(-S // 128) - ctx // 128, -(-S // 128)
    every = torch.ones(hq, nq, nk, dtype=torch.bool)
    got = R.block_sparse_attention(q, k, v, ctx, every, 128, scale, sinks=sinks)
    torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=1e-4)
    assert got[:, 3].abs().max() < 1e-6  # a sink of 30 takes nearly all of head 3's mass
    pages = torch.randperm(-(-S // 16))
    kc = torch.zeros(len(pages), 16, hkv, d)
    vc = torch.zeros_like(kc)
    for j in range(S):
        kc[pages[j // 16], j % 16], vc[pages[j // 16], j % 16] = k[j], v[j]
    cu, used = torch.tensor([0, L], dtype=torch.int32), torch.tensor([S], dtype=torch.int32)
    fa = R.paged_varlen_attention(q, kc, vc, L, cu, S, used, pages[None].int(), scale, causal=True, s_aux=sinks)
    torch.testing.assert_close(fa.float(), want, atol=2e-5, rtol=1e-4)


def test_single_token_context_has_no_nan():
    q, k, v = _qkv(1, 0, 4, 2, 64)
    out, mask = R.prism_attention(q, k, v, 0, BANDS64, PrismConfig(rule="paper"))
    assert mask.tolist() == [[[True]]] * 4
    torch.testing.assert_close(out, v.repeat_interleave(2, 1))


def test_block_sparse_attention_matches_a_plain_loop():
    L, ctx, hq, hkv, d = 200, 100, 4, 2, 16
    q, k, v = _qkv(L, ctx, hq, hkv, d, seed=3)
    nq, nk = (ctx + L - 1) // 128 - ctx // 128 + 1, -(-(ctx + L) // 128)
    mask = torch.rand(hq, nq, nk, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[:, torch.arange(nq), ctx // 128 + torch.arange(nq)] = True  # every row sees itself
    got = R.block_sparse_attention(q, k, v, ctx, mask, 128, 0.3)
    for h in range(hq):
        for t in range(L):
            p = ctx + t
            keys = [j for j in range(p + 1) if mask[h, p // 128 - ctx // 128, j // 128]]
            s = torch.stack([q[t, h] @ k[j, h // 2] for j in keys]) * 0.3
            want = torch.softmax(s, 0) @ v[keys, h // 2]
            torch.testing.assert_close(got[t, h], want, atol=1e-5, rtol=1e-5)


def _official_rule_top_p(probs, p):
    """Sort descending and keep while the mass *before* the block is < p (the paper's rule)."""
    out = torch.zeros_like(probs, dtype=torch.bool)
    for idx in itertools.product(*map(range, probs.shape[:-1])):
        order = torch.argsort(probs[idx], descending=True)
        acc = 0.0
        for j in order.tolist():
            if acc < p:
                out[idx + (j,)] = True
            acc += float(probs[idx + (j,)])
    return out


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_the_sorted_cumulative_rule(p):
    logits = torch.randn(6, 40, dtype=torch.float64) * 2
    probs = torch.softmax(logits, -1)
    assert torch.equal(R.top_p_mask(probs, p), _official_rule_top_p(probs, p))


def test_top_p_keeps_ties_at_the_boundary_and_everything_at_one():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    assert R.top_p_mask(probs, 0.5).tolist() == [[True, True, True, True]]
    assert R.top_p_mask(probs, 0.4).tolist() == [[True, False, False, False]]
    assert R.top_p_threshold(probs, 1.0).item() == 0.0


def test_calibration_formula_per_row():
    torch.manual_seed(0)
    qp, kp = torch.randn(3, 2, 64), torch.randn(5, 1, 64)
    qb0 = 2  # rows see key blocks 0..2, 0..3, 0..4
    th, tl = R.band_temperatures(qp, kp, qb0, BANDS64, True)
    for i in range(3):
        for h in range(2):
            ks = kp[: qb0 + i + 1, 0]
            for t, m in ((th, BANDS64.high), (tl, BANDS64.low)):
                rq = qp[i, h, m].pow(2).mean().sqrt() / qp[i, h].pow(2).mean().sqrt()
                rk = ks[:, m].pow(2).mean().sqrt() / ks.pow(2).mean().sqrt()
                torch.testing.assert_close(t[i, h], math.sqrt(int(m.sum()) / 64) * rq * rk)
    one = R.band_temperatures(qp, kp, qb0, BANDS64, False)
    assert all(bool((x == 1).all()) for x in one)


def _structured(L, hq, hkv, d, seed):
    """Queries/keys where a few key blocks clearly dominate (selections are sparse)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, hq, d, generator=g) * 0.3
    k = torch.randn(L, hkv, d, generator=g) * 0.3
    hot = torch.randn(hkv, d, generator=g)
    for b in range(0, L, 128 * 3):  # every third block carries a shared direction
        k[b : b + 128] += 2.0 * hot
    q += 2.0 * hot.repeat_interleave(hq // hkv, 0)
    return q, k


def test_selection_invariants_and_sparsity_on_structured_input():
    L, hq, hkv, d = 1280, 4, 2, 64
    q, k = _structured(L, hq, hkv, d, seed=5)
    qp, kp = R.pool_blocks(q, 0, 128), R.pool_blocks(k, 0, 128)
    sel = R.select_blocks(qp, kp, 0, BANDS64, PrismConfig(rule="paper"))
    nq = nk = 10
    causal = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None]
    assert not (sel & ~causal).any()
    assert sel[:, :, 0].all() and sel[:, torch.arange(nq), torch.arange(nq)].all()
    hot_blocks = torch.zeros(nk, dtype=torch.bool)
    hot_blocks[::3] = True
    assert (sel | ~(causal & hot_blocks)).all(), "the dominant blocks must be selected"
    assert sel.sum() < causal.sum() * hq * 0.8, "structured input should give a sparse selection"
    no_extra = R.select_blocks(qp, kp, 0, BANDS64, PrismConfig(rule="paper", keep_sink=False, keep_diagonal=False))
    assert (no_extra <= sel).all()


@pytest.mark.parametrize("cut", [128, 512, 1024])
def test_block_aligned_chunking_gives_identical_selection_and_output(cut):
    L, hq, hkv, d = 1280, 4, 2, 64
    q, k = _structured(L, hq, hkv, d, seed=7)
    v = torch.randn(L, hkv, d)
    full_out, full_mask = R.prism_attention(q, k, v, 0, BANDS64, PrismConfig(rule="paper"))
    o1, m1 = R.prism_attention(q[:cut], k[:cut], v[:cut], 0, BANDS64, PrismConfig(rule="paper"))
    o2, m2 = R.prism_attention(q[cut:], k, v, cut, BANDS64, PrismConfig(rule="paper"))
    nb = cut // 128
    assert torch.equal(full_mask[:, :nb, :nb], m1) and torch.equal(full_mask[:, nb:], m2)
    torch.testing.assert_close(torch.cat([o1, o2]), full_out, atol=1e-6, rtol=1e-5)


def test_batch_equals_per_request():
    cfg = PrismConfig(rule="paper")
    q1, k1, v1 = _qkv(300, 0, 4, 2, 64, seed=1)
    q2, k2, v2 = _qkv(50, 140, 4, 2, 64, seed=2)
    out, masks = R.prism_attention_batch(torch.cat([q1, q2]), [0, 300, 350], [0, 140], [k1, k2], [v1, v2], BANDS64, cfg)
    torch.testing.assert_close(out[:300], R.prism_attention(q1, k1, v1, 0, BANDS64, cfg)[0])
    torch.testing.assert_close(out[300:], R.prism_attention(q2, k2, v2, 140, BANDS64, cfg)[0])
    assert [tuple(m.shape) for m in masks] == [(4, 3, 3), (4, 1, 2)]


# -- the official code's own selections (recorded; the code itself is never committed) ----------
OFFICIAL_RECORD = Path(__file__).parent / "data" / "official_selection.json"
OFFICIAL = json.loads(OFFICIAL_RECORD.read_text())


def _ours_on_official_case(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our reference on a recorded case: (mask [H, nq, nk], p_high, p_low [H, nq, nk])."""
    from benchmarks.official_selection import case_inputs, input_digest

    q, k = case_inputs(case)
    assert input_digest(q, k) == case["input_sha256"], "the seeded inputs changed: re-record (see the JSON's command)"
    d = OFFICIAL["head_dim"]
    bands = rope_bands(RopeLayout(d, d), OFFICIAL["high_band_dims"], OFFICIAL["low_band_dims"])
    cfg = PrismConfig(rule="paper", high_threshold=case["high"], low_threshold=case["low"], calibrate=False,
                      keep_sink=case["keep"], keep_diagonal=case["keep"])
    B = OFFICIAL["block_size"]
    ctx = case["kv_len"] - case["q_len"]
    qp, kp = R.pool_blocks(q, ctx, B), R.pool_blocks(k, 0, B)
    qb0 = ctx // B
    mask = R.select_blocks(qp, kp, qb0, bands, cfg)
    one = torch.ones(qp.shape[0], qp.shape[1])
    probs = [torch.softmax(R.band_logits(qp, kp, m, one, qb0), -1) for m in (bands.high, bands.low)]
    return mask, probs[0], probs[1]


def test_official_record_names_its_source():
    assert re.fullmatch(r"[0-9a-f]{40}", OFFICIAL["official_commit"])
    assert OFFICIAL["command"].startswith("python -m benchmarks.official_selection") and OFFICIAL["date"]
    assert len(OFFICIAL["cases"]) >= 5


@pytest.mark.parametrize("name", sorted(OFFICIAL["cases"]))
def test_selection_matches_the_recorded_official_estimation(name):
    """Uncalibrated, block-aligned, NeoX head_dim 128: both codes implement the same selection
    (the official calibrates over the whole chunk, ours causally per block, so only calibrate=False
    compares). One prefill with and one chunk after context; equal and unequal band thresholds."""
    case = OFFICIAL["cases"][name]
    mask, p_high, p_low = _ours_on_official_case(case)
    theirs = torch.tensor([[[c == "1" for c in row] for row in head] for head in case["mask"]])
    nq, nk = theirs.shape[1:]
    causal = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
    torch.testing.assert_close(p_high, torch.tensor(case["probs_high"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p_low, torch.tensor(case["probs_low"]), atol=1e-6, rtol=1e-5)
    assert torch.equal(mask, theirs & causal)
    assert 0.2 < mask.sum() / (causal.sum() * mask.shape[0]) < 0.9  # neither trivial nor everything


@pytest.mark.skipif(not os.environ.get("PRISM_OFFICIAL_DIR"),
                    reason="set PRISM_OFFICIAL_DIR to re-run the official code (bash benchmarks/fetch_official.sh)")
def test_official_record_is_what_the_official_code_gives_now():
    from benchmarks.official_selection import run_official

    for name, case in OFFICIAL["cases"].items():
        got = run_official(Path(os.environ["PRISM_OFFICIAL_DIR"]), case)
        assert got["mask"] == case["mask"], name
        torch.testing.assert_close(torch.tensor(got["probs_high"]), torch.tensor(case["probs_high"]))
