"""End-to-end tests of ``--attention-backend prism`` in real vLLM engines (GPU machine).

Needs a CUDA GPU, vLLM 0.26.0 importable and ``PRISM_TEST_MODEL`` = a bf16 HF folder of
SmolLM2-135M-Instruct (the device staging writes it and sets the variable). Every engine runs in
its own Python subprocess (``_ENGINE`` below), so GPU memory is returned between engines; the
module-scoped fixtures start each engine once and the tests compare their outputs.

Engines (LLM engines with ``enforce_eager``; bf16, max_model_len 8192; all needed by the
selected tests start at once, side by side on the GPU, see ``_Engines``):
    flash         FLASH_ATTN, one-shot prefill: the reference for everything
    flash_b       FLASH_ATTN again on the short prompts: FLASH_ATTN's own run-to-run noise
    prism_dense   prism, both thresholds 1.0 (every block), min_context_len 512
    prism         prism, default thresholds, min_context_len 1024, one-shot prefill
    prism_paper   the same with dense_tail off (the default selection for every row, the paper's way;
                  the name is from when the default rule was the paper's)
    prism_c512    every block, max_num_batched_tokens 512 (chunks cut at block boundaries)
    prism_c1000   every block, max_num_batched_tokens 1000 (chunks start mid-block), runner V1
    prism_preempt every block, a KV cache too small for the batch: preemption and recompute
    flash_fp8     FLASH_ATTN with --kv-cache-dtype fp8
    prism_fp8     prism, every block (estimation on), fp8 KV cache: fp8 pooling + FA3 descales
    prism_auto    prism with the shipped defaults (no additional_config): min_context_len "auto"
(prism, prism_auto and prism_fp8 run with vLLM's verbose JIT monitor: every Triton compile after
vLLM's warm-up is logged, and Prism's kernels must not be among them)

The scheduling-situation engines select every block and are compared with ``prism_dense``: a
selection at default thresholds is discontinuous (a block at the top-p boundary flips with
bf16-sized changes of q/k, e.g. another GEMM shape for a 512-row chunk), so the first H200 run saw
chunked-vs-one-shot greedy outputs diverge at default thresholds although the selection code is
chunk-invariant (tests/test_reference.py, tests/test_backend.py check that on identical inputs).
Every-block runs still go through pooling, selection and the sparse kernel on the paged cache.
    serve         ``vllm serve --attention-backend prism`` (torch.compile + CUDA graphs, the
                  production default) + 32 concurrent OpenAI requests
    prism_tp2     prism dense on two GPUs (skipped with fewer)
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

MODEL = os.environ.get("PRISM_TEST_MODEL", "")
MAX_MODEL_LEN = 8192
GPU_MEM = "0.2"  # the served test's server (other GPU jobs may share the GPU)
# Engines of the LLM tests run side by side: each asks vLLM for a fixed KV cache (no memory
# profiling) and a small utilization floor (vLLM checks that much memory is free at start).
ENGINE_GPU_MEM = 0.05
ENGINE_KV_BYTES = 2 << 30  # ~90K tokens of SmolLM2's KV cache
# |delta logprob| of the chosen token allowed by bf16 noise: the first H200 run saw 0.151 at
# step 3 between Prism with every block selected and FLASH_ATTN (same batches, eager).
LOGPROB_TOL = 0.2
SERVED_LOGPROB_TOL = 0.35  # compiled, CUDA-graph server in mixed batches vs an eager engine
# fp8 KV caches (3 mantissa bits; FA3 also rounds the softmax probabilities to fp8 before P @ V):
# the 2026-12-02 H200 run (b2c8345) saw chosen-token logprobs 0.17 apart at step 5 and a greedy
# divergence at step 15 of 16 where FLASH_ATTN's own top-2 margin was 0.50, after 15 identical
# tokens, with Prism selecting every block. Not re-run with this tolerance.
FP8_LOGPROB_TOL = 0.3
# Every block selected, but through the whole sparse machinery (pooling, selection, virtual
# sequences / the sparse kernel): a budget of 1.0 keeps estimation on, where thresholds of 1.0
# alone would skip it and run plain causal attention (PrismParams.all_blocks).
ALL_BLOCKS = {"min_context_len": 512, "high_threshold": 1.0, "low_threshold": 1.0, "block_budget": 1.0}
LONG_LENGTHS = (4000, 5000, 6000)
SHORT_LENGTHS = (12, 40, 90, 200, 350, 600, 800, 1000)
PASSKEY_LENGTHS = (4000, 7900)  # "4K" and "8K" (the model's context is 8192 tokens)
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _require_gpu_stack() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    if not MODEL or not os.path.isdir(MODEL):
        pytest.skip("set PRISM_TEST_MODEL to the SmolLM2-135M-Instruct bf16 HF folder")


# ---------------------------------------------------------------------------------------------
# Prompts (token ids, so every engine sees exactly the same input)
# ---------------------------------------------------------------------------------------------
_PARAGRAPHS = [
    "The harbor town woke early. Fishermen checked their nets while the baker opened the shutters "
    "and set out rye loaves that smelled of caraway.",
    "In the archive, a clerk sorted letters by year. Most were about grain prices, a few about "
    "weddings, and one described a storm that flattened the orchard.",
    "The river changed course twice in a century. Each time the mill was moved upstream, and each "
    "time the miller complained that the water tasted of iron.",
    "On market days the square filled with carts of cabbages, copper pots, wool blankets and "
    "cages of hens. Children traded marbles behind the fountain.",
    "The lighthouse keeper wrote a short line in his log every night: wind, visibility, ships "
    "seen. In forty years he missed only three entries.",
    "A traveling surveyor measured the hills with a brass chain and drew maps that the council "
    "later framed and hung in the town hall.",
    "Winter brought ice to the canal. Skaters raced from the church to the windmill, and the "
    "winner received a wheel of cheese and a new scarf.",
    "The school had one room and a stove. The teacher taught arithmetic in the morning and "
    "geography in the afternoon, using a globe with a dent in Africa.",
]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def _text_tokens(tok, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids: list[int] = []
    section = 1
    while len(ids) < n:
        para = f"\n\nSection {section}. " + rng.choice(_PARAGRAPHS)
        ids += tok.encode(para, add_special_tokens=False)
        section += 1
    return ids[:n]


def _long_prompts(tok) -> list[list[int]]:
    tail = tok.encode("\n\nSummary of the sections above, in one sentence:", add_special_tokens=False)
    return [_text_tokens(tok, n - len(tail), seed=n) + tail for n in LONG_LENGTHS]


def _short_prompts(tok) -> list[list[int]]:
    tail = tok.encode("\n\nThe next section is about", add_special_tokens=False)
    return [_text_tokens(tok, max(1, n - len(tail)), seed=100 + n) + tail for n in SHORT_LENGTHS]


def _passkey_prompts(tok) -> tuple[list[list[int]], list[str]]:
    filler = tok.encode(
        " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
        add_special_tokens=False,
    )
    head = tok.encode(
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
        "memorize it.",
        add_special_tokens=False,
    )
    question = tok.encode("\nWhat is the pass key? The pass key is", add_special_tokens=False)
    prompts, keys = [], []
    rng = random.Random(1234)
    for n in PASSKEY_LENGTHS:
        for depth in PASSKEY_DEPTHS:
            key = str(rng.randint(10000, 99999))
            needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False)
            body = n - len(head) - len(needle) - len(question)
            hay = (filler * (body // len(filler) + 1))[:body]
            at = int(len(hay) * depth)
            prompts.append(head + hay[:at] + needle + hay[at:] + question)
            keys.append(key)
    return prompts, keys


# ---------------------------------------------------------------------------------------------
# One engine per subprocess
# ---------------------------------------------------------------------------------------------
_ENGINE = textwrap.dedent(
    r"""
    import json, sys
    job = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    kw = dict(model=job["model"], dtype="bfloat16", enforce_eager=True, seed=0,
              gpu_memory_utilization=job["gpu_mem"], max_model_len=job["max_model_len"])
    if "num_gpu_blocks_override" not in job["engine"]:
        kw["kv_cache_memory_bytes"] = job["kv_bytes"]
    kw.update(job["engine"])
    llm = LLM(**kw)
    out = {"results": {}}
    for task in job["tasks"]:
        sp = SamplingParams(temperature=0.0, max_tokens=task["max_tokens"], logprobs=task.get("logprobs"))
        rows = []
        for prompts in task["rounds"]:
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            for r in res:
                o = r.outputs[0]
                steps = []
                for t, lp in zip(o.token_ids, o.logprobs or []):
                    top = sorted(((int(k), float(v.logprob)) for k, v in lp.items()), key=lambda x: -x[1])
                    steps.append({"token": int(t), "lp": float(lp[t].logprob), "top": top})
                rows.append({"token_ids": list(o.token_ids), "text": o.text, "steps": steps})
        out["results"][task["name"]] = rows
    if job.get("metrics"):
        out["metrics"] = {}
        for m in llm.get_metrics():
            if isinstance(getattr(m, "value", None), (int, float)):
                out["metrics"][m.name] = out["metrics"].get(m.name, 0) + m.value
    if job["engine"].get("attention_backend") == "prism":
        from prism_vllm.stats import collect_stats_rpc
        out["stats"] = llm.collective_rpc(collect_stats_rpc)
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def _run_engine(
    engine: dict, tasks: list[dict], env: dict | None = None, timeout: int = 420, metrics: bool = False
) -> dict:
    job = {
        "model": MODEL,
        "gpu_mem": ENGINE_GPU_MEM,
        "kv_bytes": ENGINE_KV_BYTES,
        "max_model_len": MAX_MODEL_LEN,
        "engine": engine,
        "tasks": tasks,
        "metrics": metrics,
    }
    with tempfile.TemporaryDirectory() as d:
        jp, op = os.path.join(d, "job.json"), os.path.join(d, "out.json")
        json.dump(job, open(jp, "w"))
        # collective_rpc(callable) crosses the engine-core process boundary pickled.
        full_env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1", **(env or {}))
        proc = subprocess.run(
            [sys.executable, "-c", _ENGINE, jp, op], capture_output=True, text=True, timeout=timeout, env=full_env
        )
        if proc.returncode != 0 or not os.path.exists(op):
            raise AssertionError(f"engine {engine} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
        res = json.load(open(op))
        res["log"] = proc.stdout + proc.stderr  # vLLM logs to stdout (VLLM_LOGGING_STREAM)
        return res


@pytest.fixture(scope="module")
def prompts():
    _require_gpu_stack()
    tok = _tokenizer()
    pk, keys = _passkey_prompts(tok)
    return {"long": _long_prompts(tok), "short": _short_prompts(tok), "passkey": pk, "keys": keys}


def _tasks(p: dict, *names: str) -> list[dict]:
    spec = {
        "short": dict(max_tokens=24, logprobs=2, rounds=[p["short"]]),
        "long": dict(max_tokens=16, logprobs=2, rounds=[p["long"]]),
        # One prompt per generate call: each prefills alone (one shot, or cut only by the budget).
        "long_serial": dict(max_tokens=16, logprobs=2, rounds=[[x] for x in p["long"]]),
        "passkey": dict(max_tokens=10, logprobs=None, rounds=[p["passkey"]]),
        # The same long prompt twice (second round: prefix-cache hit) plus one sharing a prefix.
        "prefix": dict(
            max_tokens=16,
            logprobs=2,
            rounds=[[p["long"][1]], [p["long"][1]], [p["long"][1][:3001] + p["long"][0][-900:]]],
        ),
    }
    return [dict(name=n, **spec[n]) for n in names]


def _prism(extra: dict | None = None, **engine) -> dict:
    cfg = {"min_context_len": 1024}
    cfg.update(extra or {})
    return dict(attention_backend="prism", additional_config={"prism": cfg}, **engine)


def _engine_specs(p: dict) -> dict[str, tuple[dict, list[dict], dict]]:
    """name -> (engine kwargs, tasks, _run_engine kwargs) of every engine the tests compare."""
    return {
        "flash": (dict(attention_backend="FLASH_ATTN", max_num_batched_tokens=8192),
                  _tasks(p, "short", "long", "passkey", "prefix"), {}),
        # FLASH_ATTN again, under the same load: the noise floor of the short-prompt comparison
        "flash_b": (dict(attention_backend="FLASH_ATTN", max_num_batched_tokens=8192), _tasks(p, "short"), {}),
        # "prefix" first: its first round must miss the prefix cache.
        "prism_dense": (_prism(ALL_BLOCKS, max_num_batched_tokens=8192), _tasks(p, "prefix", "long", "long_serial"), {}),
        # jit_monitor_verbose: vLLM logs every Triton compile after its warm-up (startup compiles)
        "prism": (_prism(max_num_batched_tokens=8192, jit_monitor_verbose=True), _tasks(p, "short", "long", "passkey"),
                  {}),
        # the shipped defaults, nothing in additional_config: min_context_len="auto"
        "prism_auto": (dict(attention_backend="prism", max_num_batched_tokens=8192, jit_monitor_verbose=True),
                       _tasks(p, "long"), {}),
        # The paper's selection for every row (dense_tail off): what the tail rule changes.
        "prism_paper": (_prism({"dense_tail": False}, max_num_batched_tokens=8192), _tasks(p, "passkey"), {}),
        "prism_c512": (_prism(ALL_BLOCKS, max_num_batched_tokens=512, max_num_seqs=16), _tasks(p, "long_serial"), {}),
        # fp8 (e4m3) KV caches: Prism's pooling reads fp8 keys and queries, FA3 gets the descales
        "flash_fp8": (dict(attention_backend="FLASH_ATTN", max_num_batched_tokens=8192, kv_cache_dtype="fp8"),
                      _tasks(p, "long"), {}),
        "prism_fp8": (_prism(ALL_BLOCKS, max_num_batched_tokens=8192, kv_cache_dtype="fp8", jit_monitor_verbose=True),
                      _tasks(p, "long"), {}),
        "prism_c1000": (_prism(ALL_BLOCKS, max_num_batched_tokens=1000, max_num_seqs=16), _tasks(p, "long"),
                        dict(env={"VLLM_USE_V2_MODEL_RUNNER": "0"})),
        # 400 KV blocks of 16 tokens hold one long prompt (~312 blocks) but not two: chunked prefill
        # admits the second request chunk by chunk until blocks run out, and the scheduler preempts
        # and later recomputes. (700 blocks was seen on the H200 to fit the two requests that run
        # at once, with no preemption.) max_model_len 6144 (<= 400 * 16): vLLM refuses to start
        # when one max-length request cannot fit the cache (seen on the H200 with 8192).
        # scheduler_reserve_full_isl=False: vLLM 0.26 otherwise admits a request only when its whole
        # prompt fits (seen on the H200 on 2026-12-01: no preemption at all with 400 blocks).
        "prism_preempt": (_prism(ALL_BLOCKS, max_num_batched_tokens=2048, num_gpu_blocks_override=400,
                                 max_model_len=6144, disable_log_stats=False, scheduler_reserve_full_isl=False),
                          _tasks(p, "long"), dict(metrics=True)),
    }


class _Engines:
    """The engines the selected tests of this module need, started all at once (each in its own
    subprocess; fixed KV cache sizes let them share the GPU), awaited by name."""

    def __init__(self, names: set[str], p: dict):
        from concurrent.futures import ThreadPoolExecutor

        specs = _engine_specs(p)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(names)))
        self._futs = {n: self._pool.submit(_run_engine, specs[n][0], specs[n][1], **specs[n][2]) for n in sorted(names)}

    def get(self, name: str) -> dict:
        return self._futs[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def engines(request, prompts):
    names = set(_engine_specs(prompts))
    here = request.module.__name__
    wanted = {f for item in request.session.items if item.module.__name__ == here for f in item.fixturenames} & names
    e = _Engines(wanted, prompts)
    yield e
    e.close()


def _engine_fixture(name: str):
    """A module fixture ``name`` returning that engine's results (see _Engines)."""

    def fixture(engines):
        return engines.get(name)

    return pytest.fixture(scope="module", name=name)(fixture)


(flash, flash_b, prism_dense, prism, prism_paper, prism_c512, prism_c1000, prism_preempt, flash_fp8, prism_fp8,
 prism_auto) = (
    _engine_fixture(n)
    for n in ("flash", "flash_b", "prism_dense", "prism", "prism_paper", "prism_c512", "prism_c1000", "prism_preempt",
              "flash_fp8", "prism_fp8", "prism_auto")
)


def _compare_greedy(ref: dict, got: dict, tol: float = LOGPROB_TOL) -> int:
    """Same greedy tokens with chosen-token logprobs within ``tol``; a divergence is accepted
    only where the reference's top-2 margin was itself within noise. Returns matched steps."""
    for i, (a, b) in enumerate(zip(ref["steps"], got["steps"])):
        if a["token"] != b["token"]:
            margin = a["top"][0][1] - a["top"][1][1] if len(a["top"]) > 1 else float("inf")
            assert margin < 2 * tol, f"step {i}: token {b['token']} != {a['token']} with a clear margin {margin:.3f}"
            return i
        assert abs(a["lp"] - b["lp"]) < tol, f"step {i}: logprob {b['lp']:.4f} vs {a['lp']:.4f}"
    assert len(got["steps"]) == len(ref["steps"]), f"{len(got['steps'])} steps vs {len(ref['steps'])}, no divergence"
    return len(ref["steps"])


def _pairs(a: list, b: list) -> zip:
    """zip() that fails when one side returned fewer results (plain zip would stop silently)."""
    assert len(a) == len(b), f"{len(a)} results vs {len(b)}"
    return zip(a, b)


def _prism_ran(res: dict) -> dict:
    s = res["stats"][0]
    assert s["prism_tokens"] > 0, f"Prism never ran: {s}"
    assert s["kernel_failures"] == 0, f"Prism kernels failed and fell back to FlashAttention: {s}"
    # attend_layout "auto": every layout it timed reproduced FlashAttention at startup, and it
    # chose among the layouts that attend exactly the selection (never a kv group's union)
    for shape, rec in s["attend_layouts"].items():
        timed = rec.get("attend_ms") or {}
        assert rec["layout"] in timed and not rec.get("rejected"), f"{shape}: {rec}"
        assert set(timed) <= {"head", "head_views", "head_halves"}, f"{shape}: {rec}"
    return s


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_below_break_even_matches_flash_attention(flash, flash_b, prism, prompts):
    """Prompts below min_context_len are served by FlashAttention with the metadata FLASH_ATTN's
    own builder makes (checked field by field on CPU: tests/test_backend.py::
    test_below_break_even_batches_get_flash_attentions_metadata). Greedy tokens of two engines can
    still part at a near-tie: an offline engine core starts stepping while LLM.generate is still
    adding requests, so how the prompts are batched (GEMM shapes, FA's splits) depends on timing,
    i.e. on what else runs on the GPU (seen on the H200 at 43100c5: token 6 of one prompt differed
    with every engine of this module sharing the GPU, and never with two engines alone). So the
    comparison is margin-aware like the other tests, and a second FLASH_ATTN engine (flash_b)
    under the same load shows the noise floor of FLASH_ATTN against itself."""
    ref, ref_b, got = (e["results"]["short"] for e in (flash, flash_b, prism))
    assert len(ref) == len(ref_b) == len(got) == len(prompts["short"])
    same_prism = same_flash = 0
    for a, b, c in zip(ref, ref_b, got):
        _compare_greedy(a, c)
        _compare_greedy(a, b)
        same_prism += a["token_ids"] == c["token_ids"]
        same_flash += a["token_ids"] == b["token_ids"]
    print(f"identical greedy outputs: prism vs FLASH_ATTN {same_prism}/{len(ref)}, "
          f"FLASH_ATTN vs FLASH_ATTN {same_flash}/{len(ref)}")


def test_all_blocks_matches_flash_attention(flash, prism_dense):
    s = _prism_ran(prism_dense)
    assert s["block_density"] == 1.0  # thresholds 1.0 select every causal block
    for a, b in _pairs(flash["results"]["long"], prism_dense["results"]["long"]):
        print("matched steps:", _compare_greedy(a, b), "of", len(a["steps"]))


@pytest.mark.xfail(
    strict=False,
    reason=(
        "at top-p 0.95 (2026-12-01 H200 run, 72c0f2d): Prism 9/10, FLASH_ATTN 9/10, not the same prompts; "
        "at the 0.99 default (2026-12-02, b2c8345) the same 9/10 as FLASH_ATTN (XPASS) in one run; the "
        "paper's rule (dense_tail=false) 2-3/10; at d3f61a3 (still the paper's 0.99) Prism 8/10, FLASH_ATTN "
        "9/10; at the mean-pool 0.998 default (2026-12-03, 9bdb1ed) Prism 8/10, FLASH_ATTN 9/10, the "
        "same selection without the dense tail 7/10"
    ),
)
def test_passkey_retrieval_equals_flash_attention(flash, prism, prism_paper, prompts):
    """Defaults (dense_tail on). The default selection for every row, without the dense tail
    (prism_paper), is printed beside: the 2026-11-28 H200 run measured it at 3/10 vs FLASH_ATTN's
    9/10 on this model (the paper's rule at 0.95, the default then)."""
    _prism_ran(prism)
    _prism_ran(prism_paper)
    keys = prompts["keys"]
    ok = {name: [k in r["text"] for k, r in _pairs(keys, res["results"]["passkey"])]
          for name, res in (("FLASH_ATTN", flash), ("prism", prism), ("prism dense_tail=false", prism_paper))}
    for name, v in ok.items():
        print(f"passkey {name:24s} {sum(v)}/{len(keys)} {v}")
    assert ok["prism"] == ok["FLASH_ATTN"]


def test_auto_break_even_times_at_startup_and_serves_like_flash_attention(flash, prism_auto):
    """The shipped defaults (min_context_len="auto"): every Prism layer shape timed dense vs Prism
    on this GPU at startup at the lengths up to max_model_len; a chunk is served by Prism only from
    the decided length on; and the answers match FLASH_ATTN's. Whether a shadow step runs here
    depends on the GPU's table (SmolLM2 at 4K-8K on the H200: Prism cannot pay even at density
    0.1, so none ran at aae5b7f); when one does, its density must be recorded. The shadow step
    itself is checked on CPU (tests/test_backend.py) and in the speed benchmark's rows."""
    s = prism_auto["stats"][0]
    print(f"prism auto stats: {json.dumps(s)}")
    assert s["kernel_failures"] == 0 and s["break_even"], s
    decided = []
    for shape, rec in s["break_even"].items():
        assert [r["tokens"] for r in rec["rows"]] == [4096, 8192], rec
        assert all(r["dense_ms"] > 0 and r["estimate_ms"] > 0 for r in rec["rows"]) and rec["measured_in_s"] > 0, rec
        decided.append(rec["min_context_len"] or float("inf"))
    if s["prism_tokens"]:
        assert min(decided) <= max(LONG_LENGTHS), (decided, s)
    if s["shadow_steps"]:
        assert s["density_by_length"], s
    for a, b in _pairs(flash["results"]["long"], prism_auto["results"]["long"]):
        print("matched steps:", _compare_greedy(a, b), "of", len(a["steps"]))


def _prism_kernel_names() -> set[str]:
    """The names of Prism's Triton kernels (the @triton.jit functions of prism_vllm.kernels)."""
    import importlib

    import triton

    mods = [importlib.import_module(f"prism_vllm.kernels.{m}")  # the modules, not the same-named functions
            for m in ("attend_fa3", "plan", "pooling", "selection", "sparse_prefill")]
    return {name for m in mods for name, f in vars(m).items() if isinstance(f, triton.runtime.JITFunction)}


def test_prism_kernels_compile_at_startup_not_during_inference(prism, prism_auto, prism_fp8):
    """vLLM's JIT monitor (verbose: every compile after its warm-up is logged) names none of
    Prism's kernels while the engines serve: the startup runs (warm_up for an integer
    min_context_len, the timing for "auto", fp8 inputs for an fp8 cache) compiled every variant
    the requests needed (page size, table width, row-length levels, query-block counts)."""
    import re

    ours = _prism_kernel_names()
    assert {"_select_kernel", "_pool_keys_paged_kernel", "_sparse_prefill_fwd_kernel"} <= ours, ours
    for name, res in (("prism", prism), ("prism_auto", prism_auto), ("prism_fp8", prism_fp8)):
        if name != "prism_auto":  # "auto" may keep every prompt here on FlashAttention (SmolLM2 at 4K-8K)
            _prism_ran(res)
        assert "JIT monitor activated" in res["log"], f"{name}: vLLM's JIT monitor did not start"
        compiled = re.findall(r"JIT compilation during inference: (\w+)", res["log"])
        print(f"{name}: compiled during inference: {sorted(set(compiled))}")
        assert not set(compiled) & ours, f"{name}: Prism kernels compiled mid-serving: {sorted(set(compiled) & ours)}"


def test_default_thresholds_select_fewer_blocks(prism):
    s = _prism_ran(prism)
    print(f"prism stats: {json.dumps(s)}")
    assert s["block_density"] is not None and 0.0 < s["block_density"] < 1.0
    assert all(r["token_ids"] for r in prism["results"]["long"])


def test_block_aligned_chunks_match_one_shot(prism_dense, prism_c512):
    """512-token chunks of a prompt prefilled alone start at multiples of 128."""
    _prism_ran(prism_c512)
    for a, b in _pairs(prism_dense["results"]["long_serial"], prism_c512["results"]["long_serial"]):
        print("matched steps:", _compare_greedy(a, b), "of", len(a["steps"]))


def test_mid_block_chunks_v1_runner_match_one_shot(prism_dense, prism_c1000):
    _prism_ran(prism_c1000)
    # The runner is chosen by vLLM's own switch (VLLM_USE_V2_MODEL_RUNNER=0 in the fixture); its
    # "Using V2 Model Runner" line is logged in the worker process and not captured here.
    for a, b in _pairs(prism_dense["results"]["long_serial"], prism_c1000["results"]["long"]):
        print("matched steps:", _compare_greedy(a, b), "of", len(a["steps"]))


def test_preemption_and_recompute(prism_dense, prism_preempt):
    _prism_ran(prism_preempt)
    preempted = prism_preempt["metrics"].get("vllm:num_preemptions", 0)
    assert preempted > 0, f"no preemption happened; lower num_gpu_blocks_override ({prism_preempt['metrics']})"
    for a, b in _pairs(prism_dense["results"]["long_serial"], prism_preempt["results"]["long"]):
        print("matched steps:", _compare_greedy(a, b), "of", len(a["steps"]))


def test_fp8_kv_cache_every_block_matches_flash_attention(flash_fp8, prism_fp8):
    """--kv-cache-dtype fp8: Prism serves the long prompts (no fp8 fallback), estimation reads the
    fp8 cache and fp8 queries, and with every block selected the greedy outputs follow FLASH_ATTN's
    on the same fp8 cache."""
    s = _prism_ran(prism_fp8)
    assert not any("quantized" in r or "fp8" in r for r in s["fallback_layers"]), s["fallback_layers"]
    assert s["block_density"] == 1.0
    for a, b in _pairs(flash_fp8["results"]["long"], prism_fp8["results"]["long"]):
        print("matched steps:", _compare_greedy(a, b, tol=FP8_LOGPROB_TOL), "of", len(a["steps"]))


def test_prefix_cache_hit_matches_miss(flash, prism_dense):
    rows = prism_dense["results"]["prefix"]
    _compare_greedy(rows[0], rows[1])  # miss, then hit (context not a multiple of 128)
    for a, b in _pairs(flash["results"]["prefix"], rows):
        _compare_greedy(a, b)


# ---------------------------------------------------------------------------------------------
# vllm serve --attention-backend prism, 32 concurrent requests
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _steps_from_openai(lp: dict) -> dict:
    """OpenAI completion logprobs (tokens as 'token_id:N') in the engine runner's format."""
    tid = lambda t: int(t.split(":", 1)[1])  # noqa: E731
    steps = []
    for tok, lpv, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        ranked = sorted(((tid(k), float(v)) for k, v in top.items()), key=lambda x: -x[1])
        steps.append({"token": tid(tok), "lp": float(lpv), "top": ranked})
    return {"steps": steps}


def test_serve_32_concurrent_requests(flash, prompts):
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL,
        "--attention-backend", "prism", "--dtype", "bfloat16",
        "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", GPU_MEM,
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "4096",
        # a fixed KV cache skips vLLM's memory profiling, which fails when other jobs on the GPU
        # free memory meanwhile (seen on the H200 on 2026-12-01)
        "--kv-cache-memory-bytes", str(ENGINE_KV_BYTES),
        "--served-model-name", "m", "--additional-config", json.dumps({"prism": {"min_context_len": 1024}}),
    ]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 420  # compile + CUDA-graph capture
        while True:
            assert proc.poll() is None, "server exited"
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        short = prompts["short"]
        longs = prompts["long"] + [p[:2500] for p in prompts["long"]] + [p[:1500] for p in prompts["passkey"]]
        jobs = [("short", i, short[i % len(short)]) for i in range(16)] + [("long", i, longs[i % len(longs)]) for i in range(16)]
        results: dict[int, Any] = {}

        def worker(j: int, kind: str, ids: list[int]) -> None:
            try:
                body = {"model": "m", "prompt": ids, "max_tokens": 24, "temperature": 0.0, "logprobs": 2, "return_tokens_as_token_ids": True}
                results[j] = _post(base + "/v1/completions", body)
            except Exception as e:  # noqa: BLE001 - reported below
                results[j] = e

        threads = [threading.Thread(target=worker, args=(j, k, ids)) for j, (k, _, ids) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(400)
        failed = {j: r for j, r in results.items() if isinstance(r, Exception)}
        assert len(results) == 32 and not failed, failed
        for j, (kind, i, _) in enumerate(jobs):
            choice = results[j]["choices"][0]
            assert choice["text"], f"request {j} returned no text"
            if kind == "short":
                # Same greedy tokens as FLASH_ATTN (a split only at a near tie). The server runs
                # torch.compile + CUDA graphs in mixed batches, the reference an eager engine: the
                # first H200 run saw a 0.19 logprob drift on a short prompt by step 14, which no
                # Prism kernel touched (short prompts stay on FlashAttention), hence the wider
                # tolerance here.
                _compare_greedy(
                    flash["results"]["short"][i % len(short)], _steps_from_openai(choice["logprobs"]),
                    tol=SERVED_LOGPROB_TOL,
                )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read()
        log.close()
    # Only while serving: SIGTERM shuts vLLM 0.26 down in abort mode, and its output handler then
    # logs an EngineDeadError traceback (seen on the H200 on 2026-12-01 after all 32 requests
    # had returned 200).
    serving = text.split("shutdown triggered", 1)[0]
    assert "Prism: kernel launch failed" not in serving, serving[-4000:]
    assert "Traceback" not in serving, serving[-4000:]


def _two_rank_model(dst: str) -> str:
    """A folder of the test model whose head counts split over 2 ranks.

    SmolLM2-135M has 9 q / 3 kv heads, which --tensor-parallel-size 2 cannot split; keep its first
    2 kv heads and their 6 q heads (real trained weights, one GQA group dropped per layer)."""
    import glob
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if hq % 2 == 0 and hkv % 2 == 0:
        return MODEL
    d = cfg.get("head_dim") or cfg["hidden_size"] // hq
    keep_kv = hkv - hkv % 2
    keep_q = keep_kv * (hq // hkv)
    for f in os.listdir(MODEL):
        if not f.endswith(".safetensors") and os.path.isfile(os.path.join(MODEL, f)) and f != "config.json":
            shutil.copy(os.path.join(MODEL, f), dst)
    for path in glob.glob(os.path.join(MODEL, "*.safetensors")):
        sd = load_file(path)
        for k, v in sd.items():
            if k.endswith("q_proj.weight"):
                sd[k] = v[: keep_q * d].contiguous()
            elif k.endswith(("k_proj.weight", "v_proj.weight")):
                sd[k] = v[: keep_kv * d].contiguous()
            elif k.endswith("o_proj.weight"):
                sd[k] = v[:, : keep_q * d].contiguous()
        save_file(sd, os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})
    cfg.update(num_attention_heads=keep_q, num_key_value_heads=keep_kv, head_dim=d)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_tensor_parallel_2(prompts, tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (--tensor-parallel-size 2)")
    global MODEL
    saved = MODEL
    MODEL = _two_rank_model(str(tmp_path))
    try:
        # The reference shards the same way: TP=2 changes the all-reduce numerics of the (cut-down)
        # model, and the first H200 run compared against TP=1 and saw a 0.53 logprob drift.
        ref = _run_engine(
            dict(attention_backend="FLASH_ATTN", max_num_batched_tokens=8192, tensor_parallel_size=2),
            _tasks(prompts, "long"),
        )
        res = _run_engine(_prism(ALL_BLOCKS, max_num_batched_tokens=8192, tensor_parallel_size=2), _tasks(prompts, "long"))
    finally:
        MODEL = saved
    assert len(res["stats"]) == 2
    assert all(s["prism_tokens"] > 0 and s["kernel_failures"] == 0 for s in res["stats"])
    for a, b in _pairs(ref["results"]["long"], res["results"]["long"]):
        print("matched steps:", _compare_greedy(a, b), "of", len(a["steps"]))
