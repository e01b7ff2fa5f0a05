"""The startup warm-up compiles every Triton binary a serving step needs, checked on CPU.

Triton compiles a kernel anew for every new *specialisation key*: its constexpr values, launch
options (warps, stages), each tensor's dtype and 16-byte alignment, and each integer argument's
class (== 1, divisible by 16, other) unless the kernel opts out (``do_not_specialize``,
``do_not_specialize_on_alignment``). The backend runs Prism's kernels on synthetic inputs when a
model loads (``attention_backend/break_even.py``: ``warm_up`` for an integer ``min_context_len``,
``measure`` for "auto") so that no request waits for a compile (vLLM's JIT monitor flags one).

Here every launch goes to a recorder instead of the kernel: it computes the key with Triton's own
``native_specialize_impl`` for the CUDA backend (no GPU needed, nothing runs) and collects the
keys of the warm-up, then of serving steps built the way the backend slices vLLM's tensors (a
query view of the fused qkv past the step's decode rows, a row slice of the engine's block table,
chunks that end mid-block, several requests). Every serving key must be a warm-up key. The GPU
suite checks the same end to end with vLLM's JIT monitor
(``tests/test_vllm_gpu.py::test_prism_kernels_compile_at_startup_not_during_inference``).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction

from hopper_compile import Job  # tests/ is on sys.path (pytest's default rootdir-relative import mode)

from prism_vllm import PrismConfig
from prism_vllm.attention_backend import break_even as be
from prism_vllm.kernels import FA3Launch, PrismParams, PrismWorkspace, make_plan, prism_prefill
from prism_vllm.kernels.attend_fa3 import make_attend_plan, virtual_kv
from prism_vllm.kernels.prefill import Fp8Scales
from prism_vllm.rope import RopeLayout, prism_bands

HQ, HKV, D = 32, 8, 128  # a Llama-3.1-8B layer: the query pooling widens its head tile with the step
MAX_MODEL_LEN, CHUNK = 40000, 8192
LAUNCHERS = ("pooling", "selection", "sparse_prefill", "attend_fa3")


def _signature(kernel: Any) -> JITFunction:
    """The kernel's JITFunction (under TRITON_INTERPRET the decorator returns an interpreter
    wrapper: the same function and specialisation options, re-read here)."""
    if isinstance(kernel, JITFunction):
        return kernel
    kw = {k: kernel.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    return JITFunction(kernel.fn, **kw)


class _Keys:
    """Records the specialisation key of every launch, and what compiling it takes
    (``hopper_compile.Job``); runs nothing."""

    def __init__(self) -> None:
        self.keys: dict[str, set] = {}
        self.jobs: dict[tuple, Job] = {}
        self._sig: dict[int, JITFunction] = {}

    def key(self, kernel: Any, kwargs: dict[str, Any]) -> tuple[str, tuple]:
        jf = self._sig.setdefault(id(kernel), _signature(kernel))
        spec = []
        for p in jf.params:
            v = kwargs.get(p.name, p.default)
            if p.is_constexpr:
                spec.append((p.name, "constexpr", repr(v)))
            else:
                spec.append((p.name, *native_specialize_impl(CUDABackend, v, p.is_const, not p.do_not_specialize,
                                                             not p.do_not_specialize_on_alignment)))
        return jf.fn.__name__, (tuple(spec), kwargs.get("num_warps"), kwargs.get("num_stages"))

    def launch(self, kernel: Any, grid: tuple, **kwargs: Any) -> None:
        name, key = self.key(kernel, kwargs)
        self.keys.setdefault(name, set()).add(key)
        if (name, key) not in self.jobs:
            self.jobs[name, key] = self.job(self._sig[id(kernel)], kwargs)

    @staticmethod
    def job(jf: JITFunction, kwargs: dict[str, Any]) -> Job:
        """The compile of this launch as JITFunction.run packs it (signature types, constexprs
        including integers specialised to 1, divisibility attributes, warps / stages)."""
        sig, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(jf.params):
            v = kwargs.get(p.name, p.default)
            if p.is_constexpr:
                sig[p.name], constexprs[(i,)] = "constexpr", v
                continue
            ty, attr = native_specialize_impl(CUDABackend, v, p.is_const, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            sig[p.name] = ty
            if ty == "constexpr":
                constexprs[(i,)] = attr
            elif isinstance(attr, str):
                attrs[(i,)] = CUDABackend.parse_attr(attr)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if kwargs.get(k) is not None}
        return Job(jf.fn.__module__, jf.fn.__name__, sig, constexprs, attrs, options)


@pytest.fixture
def keys(monkeypatch):
    rec = _Keys()
    for m in LAUNCHERS:
        monkeypatch.setattr(importlib.import_module(f"prism_vllm.kernels.{m}"), "launch", rec.launch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return rec


def _no_fa(**kw: Any) -> None:
    """FlashAttention / FA3 stand-in: the keys are all that matters here."""


def _new_keys(rec: _Keys, warm: dict[str, set]) -> dict[str, list]:
    """Keys recorded that the warm-up did not record, with the arguments that differ from the
    closest warm key."""
    out = {}
    for name, ks in rec.keys.items():
        for k in ks - warm.get(name, set()):
            near = min(warm.get(name, ()), key=lambda w: sum(a != b for a, b in zip(w[0], k[0])), default=None)
            out.setdefault(name, []).append("no warm launch" if near is None else
                                            [(b[0], a[1:], b[1:]) for a, b in zip(near[0], k[0]) if a != b]
                                            + ([("warps/stages", near[1:], k[1:])] if near[1:] != k[1:] else []))
    return out


LLAMA = (HQ, HKV, D)
SMOLLM2 = (9, 3, 64)  # SmolLM2-135M's layers, where "auto" chose head_halves on the H200 (db58eb6)
CASES = [(layout, page, min_len, False, CHUNK, LLAMA) for layout in ("head", "head_views", "triton")
         for page, min_len in ((16, "auto"), (16, 16384), (64, 16384), (128, "auto"))]
CASES += [("head", 16, "auto", True, CHUNK, LLAMA), ("head_views", 64, 16384, True, CHUNK, LLAMA)]  # fp8 KV caches (FA3 only)
CASES += [("group", 16, "auto", False, CHUNK, LLAMA), ("group_views", 32, 16384, False, CHUNK, LLAMA)]  # the union layouts
CASES += [("head_halves", 16, 16384, False, CHUNK, LLAMA)]  # the half-block sequences (HALVES kernel variant)
# 32K-token chunks: the warm chunks' 256 query blocks take whole-row pooling tiles, a tail chunk's
# 57 the narrow ones (Synthetic.pool_query_tiles)
CASES += [("head", 16, 16384, False, 32768, LLAMA)]
# d=64: the half-block layout as "auto" picks it for SmolLM2, on bf16 and fp8 KV caches
CASES += [("head_halves", 16, "auto", False, CHUNK, SMOLLM2), ("head_halves", 16, "auto", True, CHUNK, SMOLLM2)]
#: Kernels a serving step of each attend path launches besides pooling and selection.
ATTEND_KERNELS = {"head": {"_virtual_seqs_kernel", "_scatter_out_kernel"}, "head_views": {"_virtual_seqs_kernel"},
                  "head_halves": {"_virtual_seqs_kernel", "_scatter_out_kernel"},
                  "group": {"_union_rows_kernel", "_virtual_seqs_kernel", "_scatter_out_kernel"},
                  "group_views": {"_union_rows_kernel", "_virtual_seqs_kernel"}, "triton": {"_sparse_prefill_fwd_kernel"}}


def _startup(layout: str, page: int, min_len: Any, fp8: bool, chunk: int,
             shape: tuple[int, int, int] = (HQ, HKV, D)) -> PrismParams:
    """Run what the backend's startup runs for one layer of ``shape`` (q heads, kv heads, head
    size; its launches go to the recorder): measure's lengths for "auto", warm_up's for an integer
    (both: _measure, then the longest sequence untimed). Returns the layer's params."""
    hq, hkv, d = shape
    fa3 = layout != "triton"
    cfg = PrismConfig()
    params = PrismParams.make(bands=prism_bands(RopeLayout(d, d, True), cfg), scale=d**-0.5, config=cfg, device="cpu")
    probe = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=torch.bfloat16, scale=d**-0.5, params=params,
                 max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=chunk, flash_attn_varlen_func=_no_fa,
                 fa_version=3, fa3_attend=_no_fa if fa3 else None, device=torch.device("cpu"), page_size=page,
                 fp8=torch.float8_e4m3fn if fp8 else None)
    attend = layout if fa3 else "head"
    lengths = [L for i, L in enumerate(be.LENGTHS) if L <= MAX_MODEL_LEN and (
        min_len == "auto" or i + 1 == len(be.LENGTHS) or be.LENGTHS[i + 1] > min_len)]
    be._measure(**probe, lengths=lengths, layout=attend, timer=be._once)
    be._measure(**probe, lengths=be._top_length(MAX_MODEL_LEN, lengths), layout=attend, timer=be._once)
    return params


@pytest.mark.parametrize("layout,page,min_len,fp8,chunk,shape", CASES,
                         ids=[f"{a}-p{b}-{c}{'-fp8' if d else ''}-c{e}-d{f[2]}" for a, b, c, d, e, f in CASES])
def test_serving_steps_launch_only_what_the_startup_compiled(keys, monkeypatch, layout, page, min_len, fp8, chunk,
                                                              shape):
    # every launch of a step goes through the recorder (a replayed one would skip it)
    monkeypatch.setattr(PrismWorkspace, "replay", lambda *a, **k: None)
    HQ, HKV, D = shape
    fa3 = layout != "triton"
    f8 = torch.float8_e4m3fn
    cfg = PrismConfig()
    params = _startup(layout, page, min_len, fp8, chunk, shape)
    warm = {k: set(v) for k, v in keys.keys.items()}
    keys.keys.clear()

    # the engine's side: vLLM's paged cache and block table (rows as wide as its runner's)
    W = -(-MAX_MODEL_LEN // page)
    if page <= 128:
        W = -(-W // (128 // page)) * (128 // page)
    kv = torch.zeros(-(-MAX_MODEL_LEN // page) * 2, page, HKV, 2 * D, dtype=torch.uint8 if fp8 else torch.bfloat16)
    k_cache, v_cache = (x.view(f8) if fp8 else x for x in kv.split(D, dim=-1))  # vLLM stores fp8 as uint8
    one = torch.ones((), dtype=torch.float32)  # vLLM's layer._q_scale etc.
    scales = Fp8Scales(q=one, k=one, v=one) if fp8 else None
    table = torch.zeros(16, W, dtype=torch.int32)
    sizes = PrismWorkspace.sizes_for(chunk, MAX_MODEL_LEN, 16, HQ, num_kv_heads=HKV, head_dim=D,
                                     attend_dtype=torch.bfloat16 if fa3 else None, attend_layouts=(layout if fa3 else "head",))
    ws = PrismWorkspace.allocate(sizes, "cpu")

    def step(n_decode: int, chunks: list[tuple[int, int]]) -> None:
        """A step of n_decode decode rows (FlashAttention's) then Prism's prefill chunks (ctx, rows)."""
        T = n_decode + sum(n for _, n in chunks)
        qkv = torch.zeros(T, (HQ + 2 * HKV) * D, dtype=torch.bfloat16)  # vLLM's fused projection
        query = qkv[:, : HQ * D].view(T, HQ, D)
        if fp8:  # vLLM quantises the query for FA3 when the cache is fp8
            query = query.to(f8)
        output = torch.empty(T, HQ, D, dtype=torch.bfloat16)
        plan = make_plan(np.concatenate([[0], np.cumsum([n for _, n in chunks])]), [c for c, _ in chunks], HQ, 128,
                         dense_tail=cfg.dense_tail)
        fa3_launch = None
        if fa3:
            fa3_launch = FA3Launch(flash_attn_varlen_func=_no_fa, kv=virtual_kv(k_cache, v_cache, 128),
                                   attend=make_attend_plan(plan, ws.attend.capacity, layout=layout, num_kv_heads=HKV))
        prism_prefill(query[n_decode:], k_cache, v_cache, table[n_decode : n_decode + len(chunks)], plan, params, ws,
                      output[n_decode:], fa3=fa3_launch, scales=scales)

    first = 16384 if min_len == "auto" else min_len  # the shortest sequence Prism serves here
    step(0, [(MAX_MODEL_LEN - chunk, chunk)])  # a long prompt's last chunk
    step(1, [(MAX_MODEL_LEN - chunk, chunk)])  # behind a decode row
    step(3, [(MAX_MODEL_LEN - 7232, 7232)])  # a tail chunk, mid-block
    step(5, [(first, 2000)])  # a short chunk
    step(2, [(first + 77, 8000)])  # a chunk starting mid-block
    step(3, [(first, 4000), (first + 1000, 3000)])  # two requests
    step(0, [(first + 50 + 128 * i, 130) for i in range(3)])  # short chunks across blocks (query blocks > rows / 128)
    served = set(keys.keys)
    assert {"_pool_queries_kernel", "_pool_keys_paged_kernel", "_select_kernel"} | ATTEND_KERNELS[layout] <= served
    assert not _new_keys(keys, warm), _new_keys(keys, warm)


def test_startup_binaries_compile_for_hopper(keys, tmp_path):
    """Every binary the startup compiles (for every attend path, page size, fp8 and chunk case
    above, which the test above finds covering serving; and each attend path for a d=64 and a
    d=256 layer, bf16 and fp8) compiles for sm_90 with Triton's own compiler, no GPU needed
    (``tests/hopper_compile.py``, in a process without the interpreter). The interpreter accepts
    code the compiler rejects: a static_range variable named like a tensor of an enclosing scope
    ran on CPU and failed every group-layout GPU test (2026-12-03)."""
    for case in CASES:
        _startup(*case)
    for shape in ((14, 2, 64), (8, 2, 256)):  # the GPU tests' d=64 (gqa7) and d=256 layers
        for layout in ATTEND_KERNELS:
            for fp8 in (False, True) if layout != "triton" else (False,):
                _startup(layout, 16, 16384, fp8, CHUNK, shape)
    jobs = list(keys.jobs.values())
    assert {j.name for j in jobs} >= {"_pool_queries_kernel", "_pool_keys_paged_kernel", "_select_kernel",
                                      "_sparse_prefill_fwd_kernel"} | set().union(*ATTEND_KERNELS.values())
    path = tmp_path / "jobs.pkl"
    path.write_bytes(pickle.dumps([tuple(j) for j in jobs]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_compile.py")), str(path)],
                         env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"][:3]
    assert report["compiled"] == len(jobs)
