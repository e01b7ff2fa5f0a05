"""CPU check: our Python host time per bucket of the FA3 attend step's checked path (q copy,
table build and output scatter launched per bucket, benchmarks/bench_kernels.py's "copies" column) with
every Triton launch stubbed out, so only the Python argument work is timed. Llama-3.1-8B layer,
one 128K-token request, 10% fixed mask. Usage: PYTHONPATH=. python benchmarks/cpu/attend_host.py
(a tree at another commit: put its package first on PYTHONPATH, as gpu_suite.sh's link tree does)."""
import time

import torch

import benchmarks.bench_kernels as kb
from prism_vllm.kernels import attend_fa3 as af

af.launch = lambda *a, **k: None  # the host path only
s = kb.Setup(device="cpu", dtype=torch.bfloat16, attend_layouts=["head"])
L = 131072
ours = kb.Ours(s, L)
gen = torch.Generator().manual_seed(0)
k = torch.zeros(L, s.hkv, s.d, dtype=s.dtype)
kv = kb.make_paged(k, torch.zeros_like(k), s, gen)
ours.attend_setup(kv)
q = torch.zeros(L, s.hq, s.d, dtype=s.dtype)
out = torch.zeros_like(q)
si, sc = ours.bsr(kb.fixed_mask(s.hq, L // 128, 0.1, "cpu", gen))
buckets = len(ours.attend_plans["head"].buckets)
for _ in range(3):
    ours.sparse_fa3(q, kv, si, sc, out, None, copies_only=True)
n = 20
t = time.perf_counter()
for _ in range(n):
    ours.sparse_fa3(q, kv, si, sc, out, None, copies_only=True)
dt = (time.perf_counter() - t) / n
print(f"{buckets} buckets: {dt * 1e3:.3f} ms of host time per copies-only call, {dt * 1e6 / buckets:.1f} us per bucket")
