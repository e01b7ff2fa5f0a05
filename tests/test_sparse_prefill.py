"""Block-sparse prefill attention over the paged KV cache vs prism_vllm.reference.

CPU: Triton interpreter (tests/conftest.py sets TRITON_INTERPRET), fp16, small odd shapes.
GPU (`-m gpu`): realistic sizes in bf16 and fp16, reference run on the GPU in fp32 row chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from prism_vllm import reference as ref
from conftest import make_paged_kv
from prism_vllm.kernels import BlockSelection, make_plan
from prism_vllm.kernels.sparse_prefill import SparsePrefillConfig, candidate_configs, default_config, sparse_prefill

# the interpreter converts 1-element arrays to loop bounds (numpy deprecation, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

B = 128
# (dtype, atol, rtol) against the fp32 reference: p is rounded to the input dtype before p @ v
TOL = {
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2.5e-2, 2e-2),
}


# ---------------------------------------------------------------- host helpers


def random_masks(
    hq: int,
    ctx_lens: Sequence[int],
    lens: Sequence[int],
    density: float,
    gen: torch.Generator,
    device,
    keep: str = "sink+diag",
) -> list[torch.Tensor]:
    """Random causal block masks; keep: "sink+diag" (as Prism configures), "none" (the diagonal
    may be missing; rows get at least one block) or "all" (every causal block)."""
    out = []
    for ctx, L in zip(ctx_lens, lens):
        qb0, nq, nk = ref.num_blocks(ctx, L, B)
        causal = torch.arange(nk)[None, :] <= (qb0 + torch.arange(nq))[:, None]
        if keep == "all":
            m = causal.expand(hq, nq, nk).clone()
        else:
            m = (torch.rand(hq, nq, nk, generator=gen) < density) & causal
            if keep == "sink+diag":
                m[:, :, 0] = True
                m[:, torch.arange(nq), qb0 + torch.arange(nq)] = True
            else:  # at least one causal block per row
                empty = ~m.any(-1)
                pick = (torch.rand(hq, nq, generator=gen) * (qb0 + torch.arange(nq) + 1)).long()
                m[empty.nonzero(as_tuple=True) + (pick[empty],)] = True
        out.append(m.to(device))
    return out


@dataclass
class Case:
    lens: list
    ctx: list
    hq: int
    hkv: int
    d: int
    page: int = 16
    layout: str = "NHD"
    keep: str = "sink+diag"
    density: float = 0.5
    dense: list | None = None  # plan.dense flags
    cfg: dict = field(default_factory=dict)  # launch settings replacing the head dim's default (block_m, ...)
    pad_rows: int = 0  # q/out rows past plan.num_tokens (must stay untouched)

    def __str__(self) -> str:
        return "-".join(
            [
                "L" + "+".join(map(str, self.lens)),
                "ctx" + "+".join(map(str, self.ctx)),
                f"G{self.hq // self.hkv}x{self.hkv}",
                f"D{self.d}",
                f"P{self.page}",
                self.layout,
                self.keep,
            ]
            + (["dense" + "".join(map(str, self.dense))] if self.dense else [])
            + [f"{k}{v}" for k, v in self.cfg.items()]
            + ([f"pad{self.pad_rows}"] if self.pad_rows else [])
        )


def run_case(case: Case, dtype: torch.dtype, device, seed: int = 0, check_dense_ref: bool = False, ref_rows=None):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = case.hq, case.hkv, case.d
    T = sum(case.lens)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    # q as a strided view into a fused qkv projection, as vLLM hands it over
    qkv = rnd(T + case.pad_rows, (hq + 2 * hkv) * d)
    q = qkv[:, : hq * d].view(T + case.pad_rows, hq, d)
    ks = [rnd(c + L, hkv, d) for c, L in zip(case.ctx, case.lens)]
    vs = [rnd(c + L, hkv, d) for c, L in zip(case.ctx, case.lens)]
    k_cache, v_cache, block_table = make_paged_kv(ks, vs, case.page, case.layout, gen=gen)
    cu = [0]
    for L in case.lens:
        cu.append(cu[-1] + L)
    plan = make_plan(cu, case.ctx, hq, block_size=B, dense=case.dense).to(device)
    masks = random_masks(hq, case.ctx, case.lens, case.density, gen, device, case.keep)
    sel = BlockSelection.from_masks(masks, plan)
    sel_idx, sel_cnt = sel.indices, sel.counts
    if case.dense:
        # dense requests' selection rows must not be read: poison them
        for r, flag in enumerate(case.dense):
            if flag:
                a, b = int(plan.cu_qb[r]), int(plan.cu_qb[r + 1])
                sel_cnt[a * hq : b * hq] = 1 << 30
                lo, hi = int(plan.sel_off[a]) * hq, int(plan.sel_off[b]) * hq
                sel_idx[lo:hi] = -7
    # out as a strided view with NaN poison around it
    out_buf = torch.full((T + case.pad_rows + 2, hq, d + 8), float("nan"), dtype=dtype, device=device)
    out = out_buf[: T + case.pad_rows, :, 4 : 4 + d]
    scale = d**-0.5
    sparse_prefill(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, plan=plan,
        sel_idx=sel_idx, sel_cnt=sel_cnt, scale=scale, out=out, config=dataclasses.replace(default_config(d), **case.cfg),
    )
    atol, rtol = TOL[dtype]
    got_all = out[:T]
    assert not torch.isnan(got_all).any(), "some row of [0, num_tokens) was not written or is NaN"
    # nothing outside the rows and columns of out was touched
    assert torch.isnan(out_buf[T:]).all() and torch.isnan(out_buf[:, :, :4]).all() and torch.isnan(out_buf[:, :, 4 + d :]).all()
    for r in range(len(case.lens)):
        got = out[cu[r] : cu[r + 1]].float()
        qr, kr, vr = q[cu[r] : cu[r + 1]].float(), ks[r].float(), vs[r].float()
        if case.dense and case.dense[r]:
            exp = ref.dense_causal_attention(qr, kr, vr, case.ctx[r], scale)
        elif ref_rows:
            exp = _chunked_reference(qr, kr, vr, case.ctx[r], masks[r], scale, ref_rows)
        else:
            exp = ref.block_sparse_attention(qr, kr, vr, case.ctx[r], masks[r], B, scale)
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol, msg=lambda m, r=r: f"request {r}: {m}")
        if check_dense_ref:
            dense = ref.dense_causal_attention(qr, kr, vr, case.ctx[r], scale)
            torch.testing.assert_close(got, dense, atol=atol, rtol=rtol, msg=lambda m, r=r: f"request {r} vs SDPA: {m}")


def _chunked_reference(q, k, v, ctx, mask, scale, rows):
    """reference.block_sparse_attention over row chunks (the full [HQ, L, S] mask would not fit)."""
    L = q.shape[0]
    qb0 = ctx // B
    out = torch.empty_like(q)
    for a in range(0, L, rows):
        b = min(L, a + rows)
        c_qb0, c_nq, c_nk = ref.num_blocks(ctx + a, b - a, B)
        m = mask[:, c_qb0 - qb0 : c_qb0 - qb0 + c_nq, :c_nk]
        out[a:b] = ref.block_sparse_attention(q[a:b], k[: ctx + b], v[: ctx + b], ctx + a, m, B, scale)
    return out


# ---------------------------------------------------------------- CPU (interpreter) tests

CPU_CASES = [
    # single token, single key: no NaN
    Case([1], [0], 2, 1, 64),
    Case([127], [0], 3, 1, 64, keep="none"),  # GQA 3, partial last block, diagonal may be missing
    Case([129], [77], 4, 1, 64, page=32, layout="HND"),  # GQA 4, chunk starts mid-block
    Case([300], [200], 8, 1, 64, layout="NHD_padded", cfg={"block_m": 64}),  # GQA 8, two programs per block
    Case([300], [128], 2, 2, 128, page=32, keep="none", cfg={"block_n": 32}),  # GQA 1, D 128
    # several requests in one launch, every length and chunk start of the brief
    Case([1, 127, 129, 300], [0, 77, 128, 200], 4, 2, 64, page=16, layout="HND", pad_rows=3),
    Case([130, 60], [0, 300], 2, 1, 64, page=48, cfg={"block_n": 64}),  # page size not dividing the tile
    Case([200, 90], [40, 0], 2, 1, 64, page=128, layout="HND", cfg={"block_n": 64}),  # tiles inside one page
    Case([260], [0], 2, 1, 256, page=32, layout="NHD_xlayer", cfg={"block_m": 64, "block_n": 64}),  # D 256
    Case([1000], [24], 2, 1, 64, page=32, layout="HND_xlayer", density=0.3),  # ~1000 rows
    # plan.dense: every causal block, poisoned selection rows never read
    Case([150, 100], [0, 90], 2, 1, 64, dense=[1, 0]),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_sparse_prefill_matches_reference(case):
    run_case(case, torch.float16, "cpu")


DENSE_CASES = [
    Case([300], [0], 4, 2, 64, keep="all", page=16),
    Case([1, 200], [0, 77], 3, 1, 128, keep="all", page=32, layout="HND", cfg={"block_m": 64, "block_n": 32}),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_all_blocks_selected_equals_dense(case):
    run_case(case, torch.float16, "cpu", check_dense_ref=True)


def test_chunked_reference_equals_reference():
    """The GPU tests' row-chunked reference is the reference."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(333, 4, 64, generator=gen)
    k, v = torch.randn(2, 333 + 77, 2, 64, generator=gen).unbind(0)
    m = random_masks(4, [77], [333], 0.4, gen, "cpu", keep="none")[0]
    torch.testing.assert_close(
        _chunked_reference(q, k, v, 77, m, 0.125, 64), ref.block_sparse_attention(q, k, v, 77, m, B, 0.125)
    )


def test_empty_selection_row_is_zero():
    """A (query block, head) with no selected block is written as zeros, its neighbours exactly."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, L = 2, 1, 64, 140
    q = torch.randn(L, hq, d, generator=gen).half()
    k = torch.randn(L, hkv, d, generator=gen).half()
    v = torch.randn(L, hkv, d, generator=gen).half()
    k_cache, v_cache, bt = make_paged_kv([k], [v], 16, "NHD", gen=gen)
    plan = make_plan([0, L], [0], hq)
    masks = random_masks(hq, [0], [L], 1.0, gen, "cpu", keep="all")
    masks[0][1, 1] = False  # head 1, query block 1: nothing selected
    sel = BlockSelection.from_masks(masks, plan)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q=q, k_cache=k_cache, v_cache=v_cache, block_table=bt, plan=plan, sel_idx=sel.indices,
                   sel_cnt=sel.counts, scale=d**-0.5, out=out)
    assert (out[B:, 1] == 0).all()
    exp = ref.dense_causal_attention(q.float(), k.float(), v.float(), 0, d**-0.5)
    torch.testing.assert_close(out[:, 0].float(), exp[:, 0], atol=4e-3, rtol=1e-2)
    torch.testing.assert_close(out[:B, 1].float(), exp[:B, 1], atol=4e-3, rtol=1e-2)


def _args(T=10, hq=4, hkv=2, d=64, dtype=torch.float16, page=16):
    plan = make_plan([0, T], [0], hq)
    q = torch.zeros(T, hq, d, dtype=dtype)
    kv = torch.zeros(4, page, hkv, 2 * d, dtype=dtype)
    kc, vc = kv.split(d, dim=-1)
    return {
        "q": q, "k_cache": kc, "v_cache": vc, "block_table": torch.zeros(1, 4, dtype=torch.int32), "plan": plan,
        "sel_idx": torch.zeros(plan.sel_capacity, dtype=torch.int16),
        "sel_cnt": torch.zeros(plan.num_q_blocks * hq, dtype=torch.int32), "scale": 0.125, "out": torch.zeros_like(q),
    }


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][:, :2], out=a["out"][:, :2]), ValueError, "plan was built for 4 q heads"),
        (lambda a: a.update(q=a["q"].float(), out=a["out"].float()), ValueError, "Invalid dtype of q"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :1], v_cache=a["v_cache"][:, :, :1]), None, None),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :, :32]), ValueError, "Invalid shape of k_cache"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :2]), ValueError, "Invalid shape of v_cache"),
        (lambda a: a.update(sel_idx=a["sel_idx"].int()), ValueError, "Invalid dtype of sel_idx"),
        (lambda a: a.update(sel_cnt=a["sel_cnt"][:1]), ValueError, r"Invalid shape of sel_cnt: expected \[>= 4\]"),
        (lambda a: a.update(block_table=a["block_table"].long()), ValueError, "Invalid dtype of block_table"),
        (lambda a: a.update(out=a["out"][:5]), ValueError, "Invalid shape of out"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "contiguous last dim"),
        (lambda a: a.update(config=SparsePrefillConfig(block_n=96)), ValueError, "block_n=96"),
        (lambda a: a.update(scale=0.0), ValueError, "scale must be > 0"),
    ],
    ids=["heads", "dtype", "gqa-ok", "k-head-dim", "kv-mismatch", "sel-idx-dtype", "sel-cnt-short", "bt-dtype", "out-short",
         "q-last-stride", "bad-block-n", "scale"],
)
def test_launcher_rejects_bad_inputs(mutate, exc, match):
    a = _args()
    mutate(a)
    if exc is None:
        sparse_prefill(**a)  # G = 4 with a single kv head is valid
        return
    with pytest.raises(exc, match=match):
        sparse_prefill(**a)


def test_unsupported_head_dim_and_gqa():
    a = _args(d=96)
    with pytest.raises(NotImplementedError, match="head_dim=96"):
        sparse_prefill(**a)
    a = _args(hq=4, hkv=3)
    with pytest.raises(ValueError, match="not a multiple of HKV=3"):
        sparse_prefill(**a)


def test_candidate_configs_fit_the_block():
    for d in (64, 128, 256):
        cfgs = candidate_configs(d)
        assert cfgs and all(isinstance(c, SparsePrefillConfig) for c in cfgs)
        assert all(B % c.block_m == 0 and B % c.block_n == 0 for c in cfgs)
        assert len(set(cfgs)) == len(cfgs)


# ---------------------------------------------------------------- GPU tests

GPU_CASES = [
    # Llama-3.1-8B layer, one long request
    Case([8192], [0], 32, 8, 128, page=16, density=0.25),
    # chunked prefill: several requests, mid-block starts, HND, 32-token pages
    Case([3000, 4097, 1000, 1], [5000, 0, 12077, 300], 32, 8, 128, page=32, layout="HND", density=0.3),
    Case([6000], [10000], 32, 8, 128, page=16, keep="none", density=0.1),
    Case([4096, 777], [0, 2000], 16, 4, 64, page=16, density=0.3),
    Case([3000], [1100], 8, 2, 256, page=16, layout="NHD_padded", density=0.3),
    Case([2048, 2048], [0, 1000], 32, 8, 128, page=16, dense=[1, 0]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_sparse_prefill_matches_reference(case, dtype):
    run_case(case, dtype, "cuda", ref_rows=512)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_all_blocks_selected_equals_dense(dtype):
    run_case(Case([4096], [100], 32, 8, 128, keep="all", page=16), dtype, "cuda", check_dense_ref=True, ref_rows=512)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_every_candidate_config_is_correct(d):
    """Every config a sweep may pick computes the same attention (compile + correctness)."""
    hq, hkv = (16, 4) if d < 256 else (8, 2)
    for cfg in candidate_configs(d):
        kw = dataclasses.asdict(cfg)
        run_case(Case([1500, 700], [77, 0], hq, hkv, d, page=16, density=0.4, cfg=kw), torch.bfloat16, "cuda",
                 ref_rows=512)
