#!/usr/bin/env python
"""Prism estimation (pool q + pool k + calibration + selection) timing and launch-knob sweep.

What prism_prefill runs before the sparse attention (``prism_vllm.kernels.prefill.prism_estimate``),
on a Llama-3.1-8B layer shape (HQ=32, HKV=8, D=128, bf16) with one request per length, K in a
FlashAttention-layout paged cache (NHD, 16-token pages, permuted table). Inputs are "structured"
(each query block aligned with a few hot key blocks under token noise: sparse selections, like real
attention) or Gaussian (near-flat softmax: dense selections, the emission's worst case).

Per configuration it reports the median GPU time of back-to-back calls (launch overhead overlapped,
as in a forward), the per-kernel breakdown, the selection density and the workspace size, and how
many selected blocks differ from the "ieee" (reference arithmetic) selection.

Usage (GPU machine, repo root):
    python benchmarks/estimation_sweep.py                      # defaults at 32K/64K/128K, JSON to stdout
    python benchmarks/estimation_sweep.py --lengths 131072 --sweep --out /tmp/est.json
    python benchmarks/estimation_sweep.py --lengths 131072 --pool-sweep --out /tmp/pool.json  # pooling launches
CPU plumbing check (Triton interpreter, fp16, tiny shapes, wall-clock instead of CUDA events):
    python benchmarks/estimation_sweep.py --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

if "--dry-run" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

DEV = "cpu" if "--dry-run" in sys.argv else "cuda"


def _timed(fn, trials: int = 7, reps: int = 10) -> float:
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    for _ in range(3):
        fn()
    ts = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    return sorted(ts)[len(ts) // 2]


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - no git (a copied tree): unknown
        return "unknown"


def _inputs(L: int, kind: str, hq: int, hkv: int, d: int, gen: torch.Generator):
    B = 128
    nk = -(-L // B)
    if kind == "gaussian":
        q = torch.randn(L, hq, d, device=DEV, generator=gen)
        k = torch.randn(L, hkv, d, device=DEV, generator=gen)
    else:  # structured: block means aligned with a few hot key blocks
        n_hot = 16
        dirs = 2.0 * torch.randn(n_hot, hkv, d, device=DEV, generator=gen)
        kb = 0.3 * torch.randn(nk, hkv, d, device=DEV, generator=gen)
        kb[torch.randint(0, nk, (n_hot,), device=DEV, generator=gen)] += dirs
        which = torch.randint(0, n_hot, (nk, hq), device=DEV, generator=gen)
        qb = 0.3 * torch.randn(nk, hq, d, device=DEV, generator=gen)
        qb += dirs[which, torch.arange(hq, device=DEV) // (hq // hkv)]
        k = kb.repeat_interleave(B, 0)[:L] + 0.5 * torch.randn(L, hkv, d, device=DEV, generator=gen)
        q = qb.repeat_interleave(B, 0)[:L] + 0.5 * torch.randn(L, hq, d, device=DEV, generator=gen)
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16  # interpreter: fp16 (tl.dot on bf16 is wrong)
    ps = 16
    pages = -(-L // ps)
    phys = torch.zeros(pages, ps, hkv, 2 * d, device=DEV, dtype=dtype)
    table = torch.randperm(pages, device=DEV, generator=gen).to(torch.int32)
    kpad = torch.zeros(pages * ps, hkv, d, device=DEV)
    kpad[:L] = k
    phys[table.long(), :, :, :d] = kpad.view(pages, ps, hkv, d).to(dtype)
    k_cache = phys.permute(0, 2, 1, 3).transpose(1, 2).split(d, -1)[0]  # vLLM's view of an NHD cache
    return q.to(dtype), k_cache, table[None]


def _pool_configs(heads: int, d: int, num_blocks: int) -> list:
    """The default launch for num_blocks first, then tiles of 4K / 8K / 16K elements over every
    power-of-two head tile, at 4 and 8 warps. (Triton's pipelining is no setting: num_stages 1
    against its default 3 read 0.361 / 0.361 ms for q and 0.123 / 0.124 ms for the keys at 128K in
    pool-sweep-h200.json; the 8K rows there are host-bound.)"""
    from prism_vllm.kernels.pooling import PoolingLaunch, pooling_launch

    default = pooling_launch(heads, d, num_blocks)
    out = [default]
    bh = 1
    while bh <= heads:
        for elems in (4096, 8192, 16384):
            bt = elems // (bh * default.block_d)
            if 1 <= bt <= 32:
                for w in (4, 8):
                    ln = PoolingLaunch(block_t=bt, block_h=bh, block_d=default.block_d, num_warps=w)
                    if ln not in out:
                        out.append(ln)
        bh *= 2
    return out


def _pool_sweep(lengths, hq, hkv, d, params, gen) -> list:
    """Pooling launches: time of pool_queries and of pool_keys_paged (with the key energies and the
    split keys, as prism_estimate runs it) per PoolingLaunch, bandwidth of the bytes read, and
    the largest deviation from the default launch's outputs (summation order differs)."""
    from prism_vllm.kernels import PrismWorkspace, make_plan
    from prism_vllm.kernels.pooling import pool_keys_paged, pool_queries

    rows = []
    for L in lengths:
        plan = make_plan([0, L], [0], hq).to(DEV)
        ws = PrismWorkspace(plan.num_q_blocks, plan.num_k_blocks, 1, plan.sel_capacity, hq, hkv, d, DEV)
        q, k_cache, table = _inputs(L, "structured", hq, hkv, d, gen)
        pq, pk = ws.pooled_q[: plan.num_q_blocks], ws.pooled_k[: plan.num_k_blocks]
        ke, sp = ws.key_energy[: plan.num_k_blocks], ws.pooled_k_split[: plan.num_k_blocks]
        for what, heads in (("pool_q", hq), ("pool_k", hkv)):
            if what == "pool_q":
                def fn(ln):
                    return pool_queries(q=q, plan=plan, out=pq, tuning=ln)
                outs = (pq,)
                nbytes = q.numel() * q.element_size()
            else:
                def fn(ln):
                    return pool_keys_paged(k_cache=k_cache, block_table=table, plan=plan, out=pk, energy_out=ke,
                                           params=params, split_out=sp, tuning=ln)
                outs = (pk, ke, sp)
                nbytes = L * hkv * d * k_cache.element_size()
            ref = None
            nblocks = plan.num_q_blocks if what == "pool_q" else plan.num_k_blocks
            for ln in _pool_configs(heads, d, nblocks):
                t0 = time.time()
                ms = _timed(lambda ln=ln: fn(ln))
                got = [o.clone() for o in outs]
                if ref is None:
                    ref = got
                dev = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, ref))
                row = {"tokens": L, "kernel": what, "heads": heads, **dataclasses.asdict(ln), "ms": round(ms, 4),
                       "gb_per_s": round(nbytes / (ms * 1e-3) / 1e9, 1), "max_rel_dev_from_default": dev}
                rows.append(row)
                print(f"[{time.time() - t0:5.1f}s] {row}", file=sys.stderr, flush=True)
    return rows


def main() -> None:  # noqa: C901 -- one linear script
    # The timing lambdas below run inside their loop iteration; B023 does not apply.
    from prism_vllm.config import PrismConfig
    from prism_vllm.kernels import BlockSelection, PrismParams, PrismWorkspace, make_plan, prism_estimate
    from prism_vllm.kernels.pooling import pool_keys_paged, pool_queries
    from prism_vllm.kernels.selection import DEFAULT_TUNING, select_blocks
    from prism_vllm.rope import RopeLayout, prism_bands

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--inputs", default="structured,gaussian")
    ap.add_argument("--sweep", action="store_true", help="also try other SelectionTuning knobs and precisions")
    ap.add_argument("--pool-sweep", action="store_true",
                    help="instead: the pooling kernels' launch settings (PoolingLaunch), each checked against the default's output")
    ap.add_argument("--out", default=None, help="JSON output path (default stdout)")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check: interpreter, tiny shapes")
    ap.add_argument("--config", choices=("paper", "default"), default="paper",
                    help="the selection timed: 'paper' (two calibrated bands, the costlier rule) or 'default' "
                         "(PrismConfig(): the shipped selection, one band)")
    args = ap.parse_args()

    hq, hkv, d = (4, 1, 64) if args.dry_run else (32, 8, 128)
    if args.dry_run:
        args.lengths = "1000"
    cfg = PrismConfig(rule="paper") if args.config == "paper" else PrismConfig()
    bands = prism_bands(RopeLayout(d, d, True), cfg)  # the config's rule: 'meanpool' is one band of every dim
    params = PrismParams.make(bands=bands, scale=d**-0.5, config=cfg, device=DEV)
    tunings = {"default": DEFAULT_TUNING}
    if args.sweep:
        for name, kw in {
            "warps16": dict(elems_per_thread=32),
            "warps4": dict(elems_per_thread=128),
            # the top-p search: bisection to the bit; coarser stops finished exactly (the default's
            # way); and coarse stops kept as they are (supersets of the exact selection)
            "topp23bits": dict(topp_mantissa_bits=23),
            "topp8bits": dict(topp_mantissa_bits=8),
            "topp16bits_superset": dict(topp_mantissa_bits=16, topp_exact=False),
            "topp12bits_superset": dict(topp_mantissa_bits=12, topp_exact=False),
            "topp8bits_superset": dict(topp_mantissa_bits=8, topp_exact=False),
            # every resident level in the query blocks per program its register budget allows
            "minprograms0": dict(min_programs=0),
            # more query blocks per program (each key load shared by more rows), fewer / more levels
            "resident32k": dict(resident_elems=32768),
            "levels3": dict(levels=3),
            "levels6": dict(levels=6),
        }.items():
            tunings[name] = dataclasses.replace(DEFAULT_TUNING, **kw)
    precisions = ["tf32x3", "ieee"] if args.sweep else ["tf32x3"]
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.pool_sweep:  # the pooling launches instead of the selection's knobs
        rows = _pool_sweep(lengths, hq, hkv, d, params, gen)
    for L in [] if args.pool_sweep else lengths:
        plan = make_plan([0, L], [0], hq).to(DEV)
        ws = PrismWorkspace(plan.num_q_blocks, plan.num_k_blocks, 1, plan.sel_capacity, hq, hkv, d, DEV)
        for kind in args.inputs.split(","):
            q, k_cache, table = _inputs(L, kind, hq, hkv, d, gen)
            ref = prism_estimate(q, k_cache, table, plan, params, ws, precision="ieee")
            ref_cnt = ref.counts.clone()
            ref_masks = ref.to_masks(device=DEV)
            for prec in precisions:
                for tname, tuning in tunings.items():
                    if prec != "tf32x3" and tname != "default":
                        continue  # "ieee" is the reference arithmetic: its own time at the default knobs
                    t0 = time.time()
                    total = _timed(
                        lambda: prism_estimate(q, k_cache, table, plan, params, ws, precision=prec, tuning=tuning)
                    )
                    sel = BlockSelection(plan, ws.sel_idx, ws.sel_cnt[: plan.num_q_blocks * hq])  # what it wrote
                    cnt = sel.counts
                    same = bool(torch.equal(cnt, ref_cnt))
                    row = {
                        "tokens": L, "inputs": kind, "precision": prec, "tuning": tname, "total_ms": round(total, 4),
                        "density": round(float(cnt.sum()) / plan.sel_capacity, 4),
                        "rows_with_other_count_than_ieee": int((cnt != ref_cnt).sum()),
                        "workspace_mb": round(ws.nbytes / 2**20, 1),
                    }
                    if same:  # the same counts: compare the selected blocks too
                        row["same_selection_as_ieee"] = all(
                            torch.equal(a, b) for a, b in zip(sel.to_masks(device=DEV), ref_masks)
                        )
                    if tname == "default" and prec == "tf32x3":
                        pq, pk = ws.pooled_q[: plan.num_q_blocks], ws.pooled_k[: plan.num_k_blocks]
                        ke, sp = ws.key_energy[: plan.num_k_blocks], ws.pooled_k_split[: plan.num_k_blocks]
                        row["pool_q_ms"] = round(_timed(lambda: pool_queries(q=q, plan=plan, out=pq)), 4)
                        row["pool_k_ms"] = round(_timed(lambda: pool_keys_paged(
                            k_cache=k_cache, block_table=table, plan=plan, out=pk, energy_out=ke, params=params,
                            split_out=sp)), 4)
                        row["select_ms"] = round(_timed(lambda: select_blocks(
                            pq, pk, plan, params, ws.sel_idx, ws.sel_cnt[: plan.num_q_blocks * hq], key_energy=ke,
                            pooled_k_split=sp)), 4)
                    rows.append(row)
                    print(f"[{time.time() - t0:5.1f}s] {row}", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    out = {"gpu": gpu, "torch": torch.__version__, "tuning_default": dataclasses.asdict(DEFAULT_TUNING),
           "selection": "PrismConfig(rule='paper')" if args.config == "paper" else "the shipped defaults (PrismConfig())",
           "bands_scored": 1 if params.one_band else 2,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("PRISM_BENCH_COMMIT") or _git_commit(),
           "command": "python benchmarks/estimation_sweep.py " + " ".join(sys.argv[1:]),
           "timing": "median over 7 trials of the mean of 10 back-to-back calls (CUDA events); the first "
                     "configuration timed at a length also warms the caches (its row may read high)",
           "rows": rows}
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
