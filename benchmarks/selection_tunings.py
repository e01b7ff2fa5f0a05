"""The selection kernel's search and launch knobs on the shipped selection (one band, PrismConfig()):
GPU time of the selection alone and of the whole estimation per SelectionTuning, and whether each
selects what the 23-bit search does.

Llama-3.1-8B layer (32 q / 8 kv heads, d=128), one request of L tokens from position 0, three
inputs: ``kbench`` (benchmarks/bench_kernels.py's structured q/k, the kernel benchmark's input: ~1-3%
of the blocks selected), ``structured`` and ``gaussian`` (benchmarks/estimation_sweep.py's: ~40%
and ~100%). GPU time: 10 calls queued behind a sleeping kernel (host time hidden), median of 5.
``same_as_b23``: the same counts and blocks as the first tuning (23 bits, the former default);
``extra_blocks_vs_b23``: selected blocks minus its.

Usage (GPU machine, nothing staged): python benchmarks/selection_tunings.py --out OUT.json
CPU plumbing check: python benchmarks/selection_tunings.py --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # benchmarks.estimation_sweep; appended: an installed prism_vllm comes first
DRY = "--dry-run" in sys.argv
DEV = "cpu" if DRY else "cuda"

import torch  # noqa: E402

#: name -> SelectionTuning fields over DEFAULT_TUNING; the first is what the others are compared with
TUNINGS = {
    "b23": dict(topp_mantissa_bits=23, min_programs=0),
    "b12x": dict(topp_mantissa_bits=12, min_programs=0),
    "b10x": dict(topp_mantissa_bits=10, min_programs=0),
    "b8x": dict(topp_mantissa_bits=8, min_programs=0),
    "b14x": dict(topp_mantissa_bits=14, min_programs=0),
    "b12sup": dict(topp_mantissa_bits=12, topp_exact=False, min_programs=0),
    "b12x_mp132": dict(topp_mantissa_bits=12, min_programs=132),
    "b12x_mp264": dict(topp_mantissa_bits=12, min_programs=264),
    "b23_mp132": dict(topp_mantissa_bits=23, min_programs=132),
    # a search stopped very coarse: a superset on any input, and exact again when finished exactly
    "b2sup": dict(topp_mantissa_bits=2, topp_exact=False, min_programs=0),
    "b2x": dict(topp_mantissa_bits=2, min_programs=0),
}


def main() -> None:
    from benchmarks.estimation_sweep import _git_commit, _inputs
    from prism_vllm.config import PrismConfig
    from prism_vllm.kernels import BlockSelection, PrismParams, PrismWorkspace, make_plan, prism_estimate
    from prism_vllm.kernels.selection import DEFAULT_TUNING, select_blocks
    from prism_vllm.rope import RopeLayout, prism_bands

    spec = importlib.util.spec_from_file_location("bench_kernels", HERE / "bench_kernels.py")
    kb = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = kb
    spec.loader.exec_module(kb)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check: interpreter, tiny shapes")
    args = ap.parse_args()
    hq, hkv, d = (4, 1, 64) if DRY else (32, 8, 128)
    s = kb.Setup(device=DEV, dtype=torch.float16 if DRY else torch.bfloat16)
    s.hq, s.hkv, s.d = hq, hkv, d

    def gpu_ms(fn) -> float:  # 10 calls queued behind a sleep, median of 5 (CPU: one call's wall time)
        return kb.bench_gpu(fn, s, n=10, trials=5)

    lengths = [2560] if DRY else [int(x) for x in args.lengths.split(",")]
    cfg = PrismConfig()
    params = PrismParams.make(bands=prism_bands(RopeLayout(d, d, True), cfg), scale=d**-0.5, config=cfg, device=DEV)
    rows = []
    for L in lengths:
        plan = make_plan([0, L], [0], hq).to(DEV)
        ws = PrismWorkspace(plan.num_q_blocks, plan.num_k_blocks, 1, plan.sel_capacity, hq, hkv, d, DEV)
        n = plan.num_q_blocks * hq
        for kind in ("kbench", "structured", "gaussian"):
            gen = torch.Generator(device=DEV).manual_seed(2)
            if kind == "kbench":
                q, k = kb.make_structured_qk(L, s, gen)
                kv = kb.make_paged(k, kb.randn((L, hkv, d), s, gen), s, gen)
                k_cache, table = kv.k, kv.block_table
            else:
                q, k_cache, table = _inputs(L, kind, hq, hkv, d, gen)
            ref = None
            for name, kw in TUNINGS.items():
                tun = dataclasses.replace(DEFAULT_TUNING, **kw)
                prism_estimate(q, k_cache, table, plan, params, ws, tuning=tun)
                cnt = ws.sel_cnt[:n].clone()
                masks = BlockSelection(plan, ws.sel_idx, ws.sel_cnt[:n]).to_masks(device=DEV)
                if ref is None:
                    ref = (cnt, masks)
                same = bool(torch.equal(cnt, ref[0])) and all(torch.equal(a, b) for a, b in zip(masks, ref[1]))
                pq, pk = ws.pooled_q[: plan.num_q_blocks], ws.pooled_k[: plan.num_k_blocks]
                ke, sp = ws.key_energy[: plan.num_k_blocks], ws.pooled_k_split[: plan.num_k_blocks]
                row = {
                    "tokens": L, "inputs": kind, "tuning": name,
                    "density": round(float(cnt.sum()) / plan.sel_capacity, 5),
                    "same_as_b23": same, "extra_blocks_vs_b23": int(cnt.sum() - ref[0].sum()),
                    "select_ms": round(gpu_ms(lambda: select_blocks(
                        pq, pk, plan, params, ws.sel_idx, ws.sel_cnt[:n], key_energy=ke, pooled_k_split=sp,
                        tuning=tun)), 4),
                    "estimate_ms": round(gpu_ms(lambda: prism_estimate(q, k_cache, table, plan, params, ws,
                                                                       tuning=tun)), 4),
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    out = {
        "what": "selection tunings on the shipped one-band selection: GPU time of select_blocks and of the whole "
                "estimation (queued behind a sleep), equality to the 23-bit search",
        "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or os.environ.get("PRISM_BENCH_COMMIT") or _git_commit(),
        "command": "python benchmarks/selection_tunings.py " + " ".join(sys.argv[1:]),
        "shape": {"hq": hq, "hkv": hkv, "head_dim": d},
        "tunings": TUNINGS, "tuning_default": dataclasses.asdict(DEFAULT_TUNING), "rows": rows,
    }
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
