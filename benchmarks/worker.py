"""One benchmark job, run in its own process: ``python -m benchmarks.worker JOB.json``.

The orchestrator (benchmarks/run.py) writes the job file, runs this under a hard time limit and
reads ``job["result_file"]``, which is rewritten after every finished unit of work, so a job
killed at its limit still returns what it finished. Token ids come in the job (the orchestrator
tokenizes and scores); this process only runs the model.

Job kinds:
    engine    an inference engine (``engine.kind``: 'vllm' on the GPU machine, 'hf' for the CPU dry
              run: a transformers model whose 'prism' backend is prism_vllm.reference) and tasks:
              ppl (prompt log-probabilities), generate (greedy completions), speed (time to first
              token per length, and Prism's chosen density from prism_vllm.stats)
    recall    attention recall per layer (benchmarks/recall.py) on a transformers model
    selftest  prints and sleeps (tests the time limit and partial results without torch)
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import GpuLock, log, read_json, tok_label, write_json


class Result:
    """The job's result file, rewritten after each unit."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict[str, Any] = {"rows": [], "errors": [], "info": {}}

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.flush()

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        self.data["errors"].append(msg)
        log("ERROR " + msg)
        traceback.print_exc()
        self.flush()

    def flush(self) -> None:
        if self.path:
            write_json(self.path, self.data)


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------
def _prism_stats_rpc(worker: Any, op: str) -> Any:
    """Runs inside each vLLM worker (collective_rpc): reset / set sampling / read Prism's stats."""
    try:
        from prism_vllm import stats
    except ImportError:
        return None
    if op == "reset":
        stats.reset_stats()
        return {}
    if op.startswith("sample="):
        stats.set_sample_every(int(op.split("=", 1)[1]))
        return {}
    return stats.collect_stats()


class VllmEngine:
    """vLLM's offline LLM with the job's flags (GPU machine)."""

    def __init__(self, spec: dict[str, Any]):
        # collective_rpc with a function (Prism's stats) needs pickle-based serialization.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.backend = spec["backend"]
        kw = self.engine_kwargs(spec)
        log(f"vLLM engine: {self.backend}, max_model_len {kw['max_model_len']}, eager {kw['enforce_eager']}, "
            f"overrides {'yes' if kw.get('hf_overrides') else 'no'}")
        self.llm = LLM(**kw)

    @staticmethod
    def engine_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
        """vLLM engine arguments of a job: identical for both backends except the backend name
        and Prism's additional_config."""
        kw: dict[str, Any] = dict(  # noqa: C408 - reads as engine keyword arguments
            model=spec["model"],
            tokenizer=spec.get("tokenizer") or spec["model"],
            attention_backend="prism" if spec["backend"].startswith("prism") else "FLASH_ATTN",
            max_model_len=int(spec["max_model_len"]),
            enforce_eager=bool(spec.get("enforce_eager", False)),
            gpu_memory_utilization=float(spec.get("gpu_memory_utilization", 0.5)),
            enable_prefix_caching=False,
            max_num_batched_tokens=int(spec.get("max_num_batched_tokens", 16384)),
            max_num_seqs=int(spec.get("max_num_seqs", 64)),
            dtype="bfloat16",
            seed=0,
        )
        if spec.get("hf_overrides"):
            kw["hf_overrides"] = spec["hf_overrides"]
        if spec.get("load_format"):
            kw["load_format"] = spec["load_format"]
        if spec.get("kv_cache_memory_bytes"):
            # fixed KV size, no memory profiling: engines may share the GPU (accuracy runs)
            kw["kv_cache_memory_bytes"] = int(spec["kv_cache_memory_bytes"])
        if spec.get("kv_cache_dtype", "auto") != "auto":
            # e.g. "fp8": both backends read the same quantised cache (vLLM's per-tensor scales)
            kw["kv_cache_dtype"] = spec["kv_cache_dtype"]
        if spec["backend"].startswith("prism"):
            kw["additional_config"] = {"prism": dict(spec.get("prism") or {})}
        return kw

    def _gen(self, prompts: Sequence[Sequence[int]], params: Any) -> list[Any]:
        return self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per prompt: log p(token_t | tokens_<t) for t = 1..L-1."""
        outs = self._gen(prompts, self.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        res = []
        for ids, o in zip(prompts, outs):
            lps = o.prompt_logprobs
            row = []
            for t in range(1, len(ids)):
                d = lps[t]
                if d is None or ids[t] not in d:
                    raise RuntimeError(f"prompt logprob of token {t} missing")
                row.append(float(d[ids[t]].logprob))
            res.append(row)
        return res

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        outs = self._gen(prompts, self.SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [list(o.outputs[0].token_ids) for o in outs]

    def prefill_seconds(self, ids: Sequence[int]) -> float:
        """Wall time of one request with a single output token: its time to first token."""
        # detokenize=False: the dummy-weight Llama-3.1-8B samples ids beyond SmolLM2's vocabulary.
        p = self.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        self._gen([ids], p)
        return time.perf_counter() - t0

    def stats(self, op: str) -> dict[str, Any] | None:
        if not self.backend.startswith("prism"):
            return None
        try:
            res = self.llm.collective_rpc(_prism_stats_rpc, args=(op,))
        except Exception as e:  # noqa: BLE001 - stats are optional evidence, never fatal
            log(f"prism stats unavailable ({type(e).__name__}: {e})")
            return None
        return _merge_stats(res)


def _merge_stats(per_worker: Sequence[Any]) -> dict[str, Any] | None:
    ds = [d for d in per_worker if isinstance(d, dict) and d]
    if not ds:
        return None
    if len(ds) == 1:
        return ds[0]
    sel = sum(d.get("selected_blocks") or 0 for d in ds)
    causal = sum(d.get("causal_blocks") or 0 for d in ds)
    out = dict(ds[0])
    for key in ("prism_tokens", "prism_dense_tokens", "flash_tokens"):
        out[key] = sum(d.get(key) or 0 for d in ds)
    out["selected_blocks"], out["causal_blocks"] = sel, causal
    out["block_density"] = sel / causal if causal else None
    return out


def load_hf_model(path: str, overrides: dict[str, Any] | None, dtype: str, device: str, attn: str = "sdpa") -> Any:
    """A transformers causal LM with vLLM-style ``hf_overrides`` applied to its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn)
    return model.to(device).eval()


class HFEngine:
    """CPU dry-run engine: a transformers model; backend 'prism' runs prism_vllm.reference."""

    ATTN_NAME = "prism_bench_reference"
    _names = itertools.count()

    def __init__(self, spec: dict[str, Any]):
        import torch

        from prism_vllm.config import PrismConfig

        self.torch = torch
        self.backend = spec["backend"]
        self.device = spec.get("device", "cpu")
        self.model = load_hf_model(spec["model"], spec.get("hf_overrides"), spec.get("dtype", "float32"), self.device)
        if spec.get("kv_cache_dtype", "auto") != "auto":
            log(f"HF engine: kv_cache_dtype {spec['kv_cache_dtype']} not applied (transformers dry run, no KV cache "
                f"quantisation)")
        self.selected = 0
        self.causal = 0
        self.prism_tokens = 0
        if self.backend.startswith("prism"):
            from transformers import AttentionInterface

            from benchmarks.recall import model_bands
            from prism_vllm.reference import prism_attention

            cfg = PrismConfig.from_dict(spec.get("prism") or {})
            bands, _ = model_bands(self.model, cfg)

            def attend(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                       scaling: float | None = None, dropout: float = 0.0, **_: Any):
                q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
                ctx = k.shape[0] - q.shape[0]  # > 0 on cached decode steps
                if q.shape[0] < max(cfg.min_query_len, 2) or k.shape[0] < cfg.fixed_min_context_len:
                    g = query.shape[1] // key.shape[1]
                    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril(ctx)
                    o = torch.nn.functional.scaled_dot_product_attention(
                        query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), attn_mask=mask, scale=scaling)
                    return o.transpose(1, 2).contiguous(), None
                o, mask = prism_attention(q, k, v, ctx, bands, cfg, scaling)
                nb = mask.shape[1]
                self.selected += int(mask.sum())
                self.causal += mask.shape[0] * nb * (nb + 1) // 2
                self.prism_tokens += q.shape[0]
                return o.unsqueeze(0), None

            # a name per engine: the registry is process-wide, and an interleaved speed job
            # holds several Prism engines (each with its own config and counters) at once
            name = f"{self.ATTN_NAME}_{next(HFEngine._names)}"
            AttentionInterface.register(name, attend)
            self.model.set_attn_implementation(name)
        log(f"HF engine: {self.backend} on {self.device}")

    def _logits(self, ids: Sequence[int]) -> Any:
        x = self.torch.tensor([list(ids)], device=self.device)
        with self.torch.no_grad():
            return self.model(input_ids=x, use_cache=False).logits[0].float()

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        res = []
        for ids in prompts:
            lp = self.torch.log_softmax(self._logits(ids), dim=-1)
            tgt = self.torch.tensor(list(ids[1:]), device=self.device)
            res.append(lp[:-1].gather(1, tgt[:, None])[:, 0].tolist())
        return res

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Prefill through the backend, then decode with the KV cache (decode rows stay dense,
        as in vLLM)."""
        torch = self.torch
        res = []
        for ids in prompts:
            x = torch.tensor([list(ids)], device=self.device)
            out: list[int] = []
            past = None
            with torch.no_grad():
                for _ in range(max_tokens):
                    o = self.model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)
                    past = o.past_key_values
                    nxt = int(o.logits[0, -1].argmax())
                    out.append(nxt)
                    x = torch.tensor([[nxt]], device=self.device)
            res.append(out)
        return res

    def prefill_seconds(self, ids: Sequence[int]) -> float:
        t0 = time.perf_counter()
        self._logits(ids)
        return time.perf_counter() - t0

    def stats(self, op: str) -> dict[str, Any] | None:
        if not self.backend.startswith("prism"):
            return None
        if op == "reset":
            self.selected = self.causal = self.prism_tokens = 0
            return {}
        if op.startswith("sample="):
            return {}
        return {"block_density": self.selected / self.causal if self.causal else None,
                "selected_blocks": self.selected, "causal_blocks": self.causal,
                "prism_tokens": self.prism_tokens, "prism_dense_tokens": 0, "flash_tokens": 0}


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
def task_ppl(engine: Any, task: dict[str, Any], res: Result) -> None:
    """Prompt log-probabilities of each window (per-token values go back to the orchestrator).
    ``one_at_a_time``: one request per window, so no scheduler step mixes two windows and every
    chunk boundary falls where max_num_batched_tokens puts it (a multiple of 128: whole blocks)."""
    t0 = time.perf_counter()
    if task.get("one_at_a_time"):
        lps = [engine.prompt_logprobs([w])[0] for w in task["windows"]]
    else:
        lps = engine.prompt_logprobs(task["windows"])
    dt = time.perf_counter() - t0
    for w, row in enumerate(lps):
        nll = -sum(row) / len(row)
        log(f"ppl {task['label']} window {w + 1}/{len(lps)}: ppl {math.exp(nll):.3f}")
    res.add({"task": "ppl", "label": task["label"], "length": task["length"], "logprobs": lps,
             "seconds": round(dt, 2)})


def task_generate(engine: Any, task: dict[str, Any], res: Result) -> None:
    """Greedy completions of the cases (needle prompts); the orchestrator scores them."""
    t0 = time.perf_counter()
    cases = task["cases"]
    outs = engine.greedy([c["ids"] for c in cases], int(task["max_tokens"]))
    log(f"generate {task['label']}: {len(cases)} prompts in {time.perf_counter() - t0:.1f} s")
    res.add({"task": "generate", "label": task["label"], "outputs": {c["id"]: o for c, o in zip(cases, outs)},
             "seconds": round(time.perf_counter() - t0, 2)})


#: Requests at the shortest length before anything is timed: an engine's first requests run slower
#: (an 8K row once read 0.72x and 1.22x in two runs with both engines on FlashAttention).
ENGINE_WARMUP = 3


def task_speed(engine: Any, task: dict[str, Any], res: Result) -> None:
    """ENGINE_WARMUP untimed requests; then per length: one warm-up request (Prism's density
    sampled on it, and with min_context_len="auto" its shadow steps), then timed requests on
    distinct prompts; TTFT = wall time of a request with one output token. Prism rows also get
    the automatic decision in force after the warm-up (``auto_min_context_len``, by layer shape,
    with the timing table behind it: ``auto_break_even``), the attend layout chosen per shape,
    the densities it has learned by length and the warm-up's shadow steps."""
    task_speed_interleaved({task["label"]: engine}, task, res)


def task_speed_interleaved(engines: dict[str, Any], task: dict[str, Any], res: Result) -> None:
    """:func:`task_speed` for engines alive side by side (label -> engine), their timed requests
    interleaved: per length every engine gets its warm-up request, then timed prompt r runs on
    every engine in turn, the order rotated by r, each timed request right after an untimed one
    on the same engine (a hot burst, as one engine's back-to-back requests are). Separate engine
    processes of one backend, started one after another, read 17 to 34 ms for the same 8K prompt
    in one session (speed-705db1d.json, speed-native-9bdb1ed.json): interleaving puts every
    engine's requests into the same minutes, so a ratio between engines no longer carries that
    drift. The bursts came after the first interleaved run (f98685c): timed requests that each
    followed the other engines' read 26-37 ms at 8K on both FLASH_ATTN engines, against 17 ms
    back to back in one engine before; with the bursts (db58eb6) they still read 33 ms, so the
    untimed request does not restore the single-engine figure (ratios stay within the run)."""
    labels = list(engines)  # the engines still in the job
    by_len = sorted(((int(k), v) for k, v in task["prompts"].items()))
    if by_len:
        warm_ms = {lb: [round(1e3 * engines[lb].prefill_seconds(by_len[0][1][0]), 3) for _ in range(ENGINE_WARMUP)]
                   for lb in labels}
        res.data["info"]["engine_warmup_ms"] = warm_ms[labels[0]] if len(labels) == 1 else warm_ms
    interleaved = len(labels) > 1
    for L, prompts in by_len:
        warm, st = {}, {}
        times: dict[str, list[float]] = {}

        def attempt(lb: str, fn: Callable[[], Any]) -> None:
            """fn() for engine lb; side by side, an engine that fails leaves the job (recorded)
            and the others go on (with one engine the task's caller records the error)."""
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                if not interleaved:
                    raise
                res.error(f"speed {lb} {tok_label(L)}", e)
                labels.remove(lb)
                times.pop(lb, None)

        def warm_up(lb: str, engine: Any) -> None:
            engine.stats("reset")
            engine.stats("sample=1")
            warm[lb] = engine.prefill_seconds(prompts[0])
            st[lb] = engine.stats("collect")
            engine.stats("sample=0")  # timed runs without sampling events
            times[lb] = []

        for lb in list(labels):
            attempt(lb, functools.partial(warm_up, lb, engines[lb]))
        for r, p in enumerate(prompts[1:]):
            k = r % max(len(labels), 1)
            for lb in labels[k:] + labels[:k]:
                def timed(lb: str = lb, p: Sequence[int] = p) -> None:
                    if interleaved:
                        engines[lb].prefill_seconds(prompts[0])  # the burst's untimed request
                    times[lb].append(engines[lb].prefill_seconds(p))
                attempt(lb, timed)
        for lb in labels:
            # what served the requests after the warm-up (the untimed and the timed ones): the
            # decision may change after the warm-up's shadow step, so the warm-up's counts alone
            # do not say it
            after = engines[lb].stats("collect") if st[lb] is not None else None
            res.add(_speed_row(lb, L, len(prompts[0]), times[lb], warm[lb], st[lb], interleaved=interleaved,
                               after=after))


def _speed_row(label: str, L: int, n: int, times: list[float], warm: float, st: dict[str, Any] | None,
               interleaved: bool, after: dict[str, Any] | None = None) -> dict[str, Any]:
    """One engine's speed row at length L; ``st``: Prism's stats collected after the warm-up
    request (reset before it), ``after``: collected again after the timed requests, whose
    difference is what served the requests after the warm-up (``*_tokens_timed``)."""
    med = statistics.median(times)
    row = {"task": "speed", "label": label, "length": L, "prompt_tokens": n, "ttft_ms": round(1e3 * med, 3),
           "ttft_ms_all": [round(1e3 * t, 3) for t in times], "warmup_ms": round(1e3 * warm, 3),
           "prefill_tok_s": round(n / med, 1)}
    if interleaved:
        row["interleaved"] = True
    if st is not None:
        row["density"] = st.get("block_density")
        row["prism_tokens"] = st.get("prism_tokens")
        row["flash_tokens"] = st.get("flash_tokens")
        row["prism_launch_ms_mean"] = st.get("prism_launch_ms_mean")
        row["shadow_steps"] = st.get("shadow_steps")
        row["density_by_length"] = st.get("density_by_length")
        row["auto_min_context_len"] = {k: v.get("min_context_len") for k, v in (st.get("break_even") or {}).items()}
        if st.get("break_even"):  # what decided it: the startup's timing table and the densities behind it
            row["auto_break_even"] = st["break_even"]
        if st.get("attend_layouts"):
            row["attend_layouts"] = st["attend_layouts"]
        served = _stats_delta(st, after) if after is not None else None
        if served is not None:
            row["prism_tokens_timed"] = served["prism_tokens"]
            row["flash_tokens_timed"] = served["flash_tokens"]
    dens = row.get("density")
    log(f"speed {label} {tok_label(L)}: TTFT {row['ttft_ms']:.1f} ms"
        + (f", density {dens:.3f}" if isinstance(dens, float) else ""))
    return row


TASKS = {"ppl": task_ppl, "generate": task_generate, "speed": task_speed}


def _job_stats(engine: Any, res: Result) -> None:
    """What Prism actually served over the job so far (tokens, fallbacks, sampled density): a
    Prism run that silently fell back to FlashAttention must not pass for Prism's accuracy."""
    st = engine.stats("collect")
    if st is not None:
        res.data["info"]["prism_stats"] = st
        log(f"prism served {st.get('prism_tokens')} tokens (dense rows inside Prism {st.get('prism_dense_tokens')}, "
            f"FlashAttention {st.get('flash_tokens')}), sampled density {st.get('block_density')}, "
            f"fallbacks {st.get('fallback_layers')}")
    res.flush()


def _stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if not after:
        return None
    b = before or {}
    out = {k: (after.get(k) or 0) - (b.get(k) or 0)
           for k in ("prism_tokens", "prism_dense_tokens", "flash_tokens", "selected_blocks", "causal_blocks")}
    out["block_density"] = out["selected_blocks"] / out["causal_blocks"] if out["causal_blocks"] else None
    return out


def run_engine_job(job: dict[str, Any], res: Result) -> None:
    """Start the engine, run the tasks in order. Job keys beside ``engine`` and ``tasks``:
    ``sample_every`` (Prism's stats sample every N-th step; 1: the density of every launch),
    ``gpu_lock`` (a :class:`benchmarks.common.GpuLock` path: the engine start and the tasks
    hold it shared, a task with ``exclusive`` holds it alone, e.g. a timed one). Task keys read
    here: ``stats`` (the row gets ``prism_stats``: what Prism served during this task),
    ``tag`` (copied into the task's rows)."""
    spec = job["engine"]
    lock = GpuLock(job["gpu_lock"]) if job.get("gpu_lock") else None
    if lock:
        t0 = time.perf_counter()
        lock.shared()
        res.data["info"]["lock_wait_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    engine = VllmEngine(spec) if spec["kind"] == "vllm" else HFEngine(spec)
    res.data["info"]["engine_init_s"] = round(time.perf_counter() - t0, 1)
    log(f"engine ready in {res.data['info']['engine_init_s']} s")
    if job.get("sample_every") is not None:
        engine.stats(f"sample={int(job['sample_every'])}")
    res.flush()
    collected = False
    for i, task in enumerate(job["tasks"]):
        if task["task"] == "speed" and i > 0 and not collected:
            _job_stats(engine, res)  # the speed task resets the counters
            collected = True
        if lock:
            t0 = time.perf_counter()
            if task.get("exclusive"):
                lock.exclusive()
            else:
                lock.shared()
            if time.perf_counter() - t0 > 1:
                log(f"{task['task']} {task.get('label', '')}: waited {time.perf_counter() - t0:.0f} s for the GPU")
        n0 = len(res.data["rows"])
        before = engine.stats("collect") if task.get("stats") else None
        try:
            TASKS[task["task"]](engine, task, res)
        except Exception as e:  # noqa: BLE001 - record and go on with the next task
            res.error(f"{task['task']} {task.get('label', '')}", e)
        delta = _stats_delta(before, engine.stats("collect")) if task.get("stats") else None
        for r in res.data["rows"][n0:]:
            if task.get("stats"):
                r["prism_stats"] = delta
            if "tag" in task:
                r["tag"] = task["tag"]
        res.flush()
    if lock:
        lock.close()
    if all(t["task"] != "speed" for t in job["tasks"]):
        _job_stats(engine, res)


def run_engines_job(job: dict[str, Any], res: Result) -> None:
    """Several engines side by side in this process (``engines``: label -> engine spec, started
    in order), then ``task`` (a speed task) on all of them: :func:`task_speed_interleaved`.
    The rows carry each engine's Prism stats per length, as :func:`task_speed`'s do."""
    engines: dict[str, Any] = {}
    init: dict[str, float] = {}
    for label, spec in job["engines"].items():
        t0 = time.perf_counter()
        engines[label] = VllmEngine(spec) if spec["kind"] == "vllm" else HFEngine(spec)
        init[label] = round(time.perf_counter() - t0, 1)
        log(f"engine {label} ready in {init[label]} s")
        res.data["info"]["engine_init_s"] = round(sum(init.values()), 1)
        res.data["info"]["engine_init_s_by_label"] = dict(init)
        res.flush()
    task = job["task"]
    try:
        task_speed_interleaved(engines, task, res)
    except Exception as e:  # noqa: BLE001 - record; the rows so far stay
        res.error(f"{task['task']} interleaved", e)


def run_recall_job(job: dict[str, Any], res: Result) -> None:
    import torch

    from benchmarks.recall import capture_qk, layer_recall, model_bands, study_config
    from prism_vllm.config import PrismConfig

    cfg = study_config(PrismConfig.from_dict(job.get("prism") or {}))
    device = job.get("device", "cuda")
    for item in job["items"]:
        L = int(item["length"])
        t0 = time.perf_counter()
        model = load_hf_model(job["model"], item.get("hf_overrides"), job.get("dtype", "bfloat16"), device)
        bands, _ = model_bands(model, cfg)
        layers: list[dict[str, Any]] = []

        def on_layer(i: int, q: Any, k: Any, scale: float, bands: Any = bands, layers: list = layers) -> None:
            r = layer_recall(q, k, bands, cfg, scale, int(job.get("chunk_rows", 1024)))
            r["layer"] = i
            layers.append(r)

        ids = torch.tensor(item["ids"], device=device)
        capture_qk(model, ids, on_layer)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        layers.sort(key=lambda r: r["layer"])
        log(f"recall {tok_label(L)}: {len(layers)} layers in {time.perf_counter() - t0:.1f} s, prism recall "
            f"{statistics.mean(r['prism_recall'] for r in layers):.4f} at density "
            f"{statistics.mean(r['prism_density'] for r in layers):.3f}")
        res.add({"task": "recall", "length": L, "rope": item.get("rope", "native"), "layers": layers,
                 "seconds": round(time.perf_counter() - t0, 1)})


def run_selftest_job(job: dict[str, Any], res: Result) -> None:
    if job.get("orphan"):  # stands in for vLLM's engine-core process left behind
        import subprocess

        res.data["info"]["orphan_pid"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]).pid
    # gpu_lock: each unit holds the lock shared, or alone when listed in exclusive_units (as an
    # engine job's tasks do); rows record when each unit held it
    lock = GpuLock(job["gpu_lock"]) if job.get("gpu_lock") else None
    for i in range(int(job.get("units", 3))):
        mode = "exclusive" if i in job.get("exclusive_units", ()) else "shared"
        if lock and mode == "exclusive":
            lock.exclusive()
        elif lock:
            lock.shared()
        t0 = time.monotonic()  # one clock for every process on the machine: spans compare
        time.sleep(float(job.get("sleep_s", 0.1)))
        log(f"selftest unit {i}")
        res.add({"task": "selftest", "unit": i, "mode": mode, "start": t0, "end": time.monotonic()})
    if lock:
        lock.close()
    if job.get("fail"):
        raise RuntimeError("selftest asked to fail")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process; returns the result dict (also written to job['result_file'])."""
    res = Result(job.get("result_file"))
    kind = job["kind"]
    runner = {"engine": run_engine_job, "engines": run_engines_job, "recall": run_recall_job,
              "selftest": run_selftest_job}[kind]
    try:
        runner(job, res)
    except Exception as e:
        res.error(f"job {job.get('name')}", e)
        if job.get("raise", False):
            raise
    res.data["done"] = True
    res.flush()
    return res.data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = read_json(argv[0])
    data = run_job(job)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (an engine's shutdown can hang); the results are written and the
    # orchestrator ends whatever this process group still holds (vLLM's engine core).
    os._exit(code)
