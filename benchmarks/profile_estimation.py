#!/usr/bin/env python
"""Where the estimation's time goes (issue 11): GPU time per kernel vs host time per call.

``benchmarks/bench_kernels.py`` times a call with CUDA events around back-to-back calls, which measures
the larger of the GPU's work and the host's launch work. This script separates the two for the
Llama-3.1-8B layer shape (32 q heads, 8 kv heads, D 128, bf16, structured synthetic q/k of
``bench_kernels.make_structured_qk``, one request in a paged cache) at each length:

  events_ms  bench_kernels.bench(): CUDA events around back-to-back calls (what bench_kernels.py reports)
  gpu_ms     the GPU's own time per call: the calls are queued behind a sleeping kernel, so the
             host is never what the GPU waits for, then timed with events (median of 3 batches)
  host_ms    the host's time to issue one call (Python, checks, Triton launches), measured while
             the GPU sleeps; "estimate" is a step's later layer (its launches replayed, see
             prefill.prism_estimate), "estimate_checked" a step's first layer (checked, recorded)
  kernels    torch.profiler's per-kernel GPU time per call (name -> microseconds), and the count
             of launches per call

With ``--attend DENSITY`` (vLLM's FA3 importable: `source /root/prism-stage/env.sh`), the same split
for the FA3 attend step in the backend's "head" layout on a fixed random selection of that density
(``bench_kernels.fixed_mask``): "attend" (q copy, table build, FA3, output scatter, every argument
checked), "attend_replayed" (the same through ``prism_attend``, whose later calls replay the first
call's launches, as a step's later layers do), "attend_copies" (the copies without the FA3 calls),
and "dense" (FA3 causal attention over the paged cache) beside:
the fixed cost of a short chunk is host time when host_ms > gpu_ms.

Usage (GPU machine, nothing staged): python benchmarks/profile_estimation.py --out OUT.json
Kernel metrics (Nsight Compute, where the machine has it):
    ncu -k regex:_select_kernel -c 4 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats python benchmarks/profile_estimation.py --lengths 131072 --once
CPU plumbing check: python benchmarks/profile_estimation.py --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# benchmarks/bench_kernels.py by its path (run as a script: the repo root on sys.path would shadow the
# installed package's prism_vllm with the bare prism_vllm/ folder)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as kb  # noqa: E402

KB = 1024


def kernel_table(fn: Callable[[], Any], n: int) -> tuple[dict[str, float], float]:
    """Per-kernel GPU microseconds per call (summed over launches of the same kernel) and the
    number of kernel launches per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    table: dict[str, float] = {}
    launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            table[e.name] = table.get(e.name, 0.0) + e.device_time / n  # microseconds
            launches += 1
    return {k: round(v, 2) for k, v in sorted(table.items(), key=lambda kv: -kv[1])}, launches / n


def main(argv: list[str] | None = None) -> int:
    from prism_vllm.config import PrismConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--shape", default="llama8b", choices=sorted(kb.SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--config", choices=("paper", "default"), default="paper",
                    help="the selection timed: the paper's two calibrated bands (default, as the official code), "
                         "or the shipped defaults (PrismConfig(): the 'quality' preset, one band)")
    ap.add_argument("--attend", type=float, default=None, metavar="DENSITY",
                    help="also profile the FA3 attend step at this block density (needs vLLM's FA3)")
    ap.add_argument("--topp-bits", type=int, default=None, metavar="BITS",
                    help="the selection's SelectionTuning.topp_mantissa_bits, the resolution its top-p search "
                         "bisects to before it finishes exactly (default: the shipped tuning's; 23: bisection to "
                         "the bit)")
    ap.add_argument("--once", action="store_true",
                    help="only run the estimation once per length (for a profiler: ncu -k regex:_select_kernel ...)")
    args = ap.parse_args(argv)

    dry = args.dry_run
    s = kb.Setup(device="cpu" if dry else "cuda", dtype=torch.float16 if dry else torch.bfloat16)
    if dry:
        s.hq, s.hkv, s.d = 2, 1, 64
        lengths = [384]
    else:
        s.hq, s.hkv, s.d = kb.SHAPES[args.shape]
        lengths = [int(x) for x in args.lengths.split(",")]
    gen = torch.Generator(device=s.device).manual_seed(2)
    rows = []
    for L in lengths:
        q, k = kb.make_structured_qk(L, s, gen)
        v = kb.randn((L, s.hkv, s.d), s, gen)
        kv = kb.make_paged(k, v, s, gen)
        ours = kb.Ours(s, L, PrismConfig() if args.config == "default" else None)
        ws = ours.alloc()
        if args.topp_bits is not None:
            from prism_vllm.kernels.selection import DEFAULT_TUNING

            ours.tuning = dataclasses.replace(DEFAULT_TUNING, topp_mantissa_bits=args.topp_bits)

        from prism_vllm.kernels.pooling import pool_keys_paged, pool_queries
        from prism_vllm.kernels.selection import select_blocks

        p, prm = ours.plan, ours.params
        nqb, nkb = p.num_q_blocks, p.num_k_blocks
        parts: dict[str, Callable[[], Any]] = {
            # a step's later layers: the launches the first layer checked, replayed
            "estimate": lambda: ours.estimate(q, kv, ws),
            # a step's first layer: every argument checked, launches recorded
            "estimate_checked": lambda: (ws.forget_replays(), ours.estimate(q, kv, ws)),
            "pool_q": lambda: pool_queries(q=q, plan=p, out=ws.pooled_q[:nqb]),
            "pool_k": lambda: pool_keys_paged(k_cache=kv.k, block_table=kv.block_table, plan=p,
                                              out=ws.pooled_k[:nkb], energy_out=ws.key_energy[:nkb], params=prm,
                                              split_out=ws.pooled_k_split[:nkb]),
            "select": lambda: select_blocks(ws.pooled_q[:nqb], ws.pooled_k[:nkb], p, prm, ws.sel_idx,
                                            ws.sel_cnt[: nqb * s.hq], ws.temps[:nqb], key_energy=ws.key_energy[:nkb],
                                            pooled_k_split=ws.pooled_k_split[:nkb], precision=ours.precision,
                                            tuning=ours.tuning),
        }
        if args.attend is not None and not dry:
            fa, why = kb.load_fa3(s)
            if fa is None:
                raise SystemExit(f"--attend needs FA3: {why}")
            ours.attend_setup(kv)
            sel_idx, sel_cnt = ours.bsr(kb.fixed_mask(s.hq, nqb, args.attend, s.device, gen))
            out = torch.empty_like(q)
            fa = functools.partial(fa, fa_version=3)  # sparse_fa3 passes none; vLLM's default is FA2
            parts["attend"] = lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa)
            parts["attend_copies"] = lambda: ours.sparse_fa3(q, kv, sel_idx, sel_cnt, out, fa, copies_only=True)
            # as a step's later layers run it: prism_attend replays the first call's checked launches
            from prism_vllm.kernels import FA3Launch, prism_attend
            from prism_vllm.kernels.plan import BlockSelection

            ws.attend = ours.attend_ws
            launch = FA3Launch(flash_attn_varlen_func=fa, attend=ours.attend_plans["head"], kv=ours.vkv)
            sel = BlockSelection(plan=p, indices=sel_idx, counts=sel_cnt)
            parts["attend_replayed"] = lambda: prism_attend(q, kv.k, kv.v, kv.block_table, sel, prm, ws, out,
                                                            fa3=launch)
            parts["dense"] = kb.fa3_call(fa, q, kv, s, out)
        ours.estimate(q, kv, ws)  # compile
        row: dict[str, Any] = {"tokens": L, "density": round(ours.density(ws), 5)}
        if args.once:
            torch.cuda.synchronize()
            continue
        if dry:
            for name, fn in parts.items():
                fn()
            row["dry_run"] = True
            rows.append(row)
            continue
        for name, fn in parts.items():
            fn()
            row[f"{name}_events_ms"] = round(kb.bench(fn, s), 4)
            gpu, host = kb.gpu_and_host_ms(fn, args.reps, sleep_s=0.25)
            row[f"{name}_gpu_ms"], row[f"{name}_host_ms"] = round(gpu, 4), round(host, 4)
        row["kernels_us"], row["launches_per_call"] = kernel_table(parts["estimate"], args.reps)
        if "attend" in parts:
            row["attend_density"] = args.attend
            row["attend_kernels_us"], row["attend_launches_per_call"] = kernel_table(parts["attend"], args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        q = k = v = kv = ws = None  # free before the next length
        torch.cuda.empty_cache()

    res = {
        "what": "estimation profile: GPU time per kernel vs host time per call (benchmarks/profile_estimation.py)",
        "gpu": None if dry else torch.cuda.get_device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or kb.git_commit(),
        "command": "python benchmarks/profile_estimation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": {"hq": s.hq, "hkv": s.hkv, "head_dim": s.d, "dtype": str(s.dtype).replace("torch.", "")},
        "selection": "the paper's rule (PrismConfig(rule='paper'))" if args.config == "paper"
        else "the shipped defaults (PrismConfig())",
        "topp_mantissa_bits": args.topp_bits if args.topp_bits is not None else "default (SelectionTuning)",
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
        "rows": rows,
    }
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if dry else f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
