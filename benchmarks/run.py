"""End-to-end evidence: accuracy and speed of Prism against dense attention, one command.

    python -m benchmarks.run [--only recall,ppl,needle,speed | accuracy] [--quick] [--out DIR]
    python -m benchmarks.run --report [--readme README.md]     # tables + plots from the JSON, no GPU
    python -m benchmarks.run --dry-run --out /tmp/bench         # CPU plumbing check, tiny random model

Parts (each writes DIR/<part>.json with gpu, date, commit, command and its rows):

    recall   attention recall per layer and block density on SmolLM2-135M-Instruct's real post-RoPE
             q/k (transformers, one causal prefill): Prism's reference selection, mean-pool only,
             mean-pool at Prism's block count, oracle top-k at Prism's block count
    ppl      perplexity through vLLM (prompt logprobs), Prism vs FLASH_ATTN, YaRN above 8K
    needle   passkey retrieval through vLLM, single key and 4 keys, 5 depths, several seeds
    speed    TTFT / prefill throughput through vLLM, Prism vs FLASH_ATTN (no enforce_eager) on
             SmolLM2 with YaRN (Prism forced on every chunk, and Prism with PrismConfig's shipped
             defaults); the break-even context length derived from these rows
    llama8b  the same on the Llama-3.1-8B architecture with dummy weights at a fixed block budget
             (random weights give near-uniform attention, hence the budget), file speed-llama8b.json
    quality  (only with --only quality) Prism's selection knobs swept on SmolLM2 at 8K (native),
             16K and 32K (YaRN): per point of benchmarks.quality.POINTS (FLASH_ATTN; the paper's
             rule at top-p 0.9-0.998; mean-pool at 0.98-0.998, the default's 0.998 first; block
             budgets 0.3/0.5 at 0.99) and
             length, one eager engine: perplexity of 4 documents per corpus (fortunes, Austen),
             block density, passkeys per depth, and the TTFT of one prompt, timed while no other
             job of the part works on the GPU; quality.json + quality.png (ΔPPL against density)

``--kv-cache-dtype fp8`` runs the TTFT parts (speed, llama8b) and the quality sweep with vLLM's
``kv_cache_dtype="fp8"`` (e4m3, vLLM's per-tensor scales: 1.0 unless the checkpoint brings its own)
on every engine, FLASH_ATTN and Prism, recorded in the part's settings and written to
speed-fp8.json / speed-llama8b-fp8.json / quality-fp8.json beside the default files (the fp8 cache's
perplexity and passkeys beside FLASH_ATTN on fp8: ``--only quality --kv-cache-dtype fp8
--quality-points paper:0.99,paper:0.95``); recall, ppl and needle keep the model's KV cache.

Each vLLM engine runs in its own subprocess under a hard time limit (GPU memory is freed when it
exits); a job killed at its limit still reports what it finished. Prism runs with
``min_context_len=0`` here so every chunk is served by Prism (otherwise short contexts silently
fall back to FlashAttention); ``--prism '{...}'`` adds PrismConfig fields.

The text is Debian's fortune files (benchmarks/corpus.py): run ``python -m benchmarks.corpus`` on a
machine with apt-get and carry ``benchmarks/data`` to the GPU machine.

On the GPU machine (vLLM and the model staged with ../shared/device/stage --model, benchmarks/data
carried), each command well inside the 10-minute limit of one device call:

    source /root/prism-stage/env.sh
    python -m benchmarks.run --quick --only accuracy --budget-s 540 --commit SHA --out $OUT/results
    python -m benchmarks.run --quick --only speed    --budget-s 540 --commit SHA --out $OUT/results
    # full evidence, one call each:
    python -m benchmarks.run --only accuracy --budget-s 570 --commit SHA --out $OUT/results
    python -m benchmarks.run --only speed    --budget-s 570 --commit SHA --out $OUT/results
    python -m benchmarks.run --only llama8b  --budget-s 570 --commit SHA --out $OUT/results
    # the TTFT row on an fp8 KV cache (both engines with vLLM's kv_cache_dtype="fp8") -> speed-fp8.json
    python -m benchmarks.run --only speed --kv-cache-dtype fp8 --no-speed-default-config --budget-s 540 \
        --commit SHA --out $OUT/results

then copy the returned results/*.json here into benchmarks/results and run
``python -m benchmarks.run --report --readme README.md`` (tables, plots, README block).

The quality sweep needs the Austen corpus too (``python -m benchmarks.corpus_austen`` here, then
carry benchmarks/data). It is 39 engine jobs (13 points x 3 lengths, 6 at a time; on the H200 on
2026-12-02 the first wave took ~2 min, later waves 45-80 s: 20 jobs in 304 s, 10 in 178 s); split it
over two device calls by length:

    python -m benchmarks.run --only quality --quality-lengths 8K,16K --jobs 6 --budget-s 540 \
        --commit SHA --out $OUT/results        # bash benchmarks/gpu_suite.sh quality with
    python -m benchmarks.run --only quality --quality-lengths 32K --jobs 6 --budget-s 540 \
        --commit SHA --out $OUT/results        # PRISM_QUALITY_LENGTHS=8K,16K, then =32K

and merge the two returned files here (later files win per point and length; each measurement
keeps its run's date/commit/command), then redraw:

    python -m benchmarks.run --merge-quality q-8k16k.json q-32k.json --out benchmarks/results
    python -m benchmarks.run --report --readme README.md

A call cut by --budget-s skips the table's last points (jobs run point-major); rerun those with
``--quality-points NAME,...`` (FLASH_ATTN is always measured again, as the reference) and merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common, corpus, prompts, quality, report
from benchmarks.common import KB, log, tok_label

#: Parts of a plain run (no --only).
PARTS = ("recall", "ppl", "needle", "speed", "llama8b")
#: Parts run only when --only names them.
EXTRA_PARTS = ("quality",)
#: Prompt tokens left free of a context of L tokens (vLLM needs prompt + outputs <= max_model_len).
OUT_RESERVE = 16
#: Prompt tokens of a perplexity window of a context of L tokens: L - 128, a whole number of Prism
#: blocks when L is, so no window ends in a partial block and PrismConfig.dense_tail (a partial
#: last block attends densely) changes none of the scored tokens: Prism's selection is measured
#: on every one of them.
PPL_RESERVE = 128
SMOL_NAME = report.SMOL_NAME
LLAMA_NAME = report.LLAMA_NAME


def parse_lengths(s: str | None) -> list[int] | None:
    """'4K,8K,12000' -> [4096, 8192, 12000]."""
    if s is None:
        return None
    out = []
    for tok in s.split(","):
        tok = tok.strip().upper()
        if tok:
            out.append(int(float(tok[:-1]) * KB) if tok.endswith("K") else int(tok))
    return out


@dataclasses.dataclass
class Plan:
    dry: bool
    quick: bool
    native: int = common.SMOLLM2_NATIVE_LEN
    recall_lengths: list[int] = dataclasses.field(default_factory=lambda: [8 * KB, 16 * KB, 32 * KB])
    ppl_lengths: list[int] = dataclasses.field(default_factory=lambda: [8 * KB, 16 * KB, 32 * KB])
    ppl_windows: int = 6
    needle_lengths: list[int] = dataclasses.field(default_factory=lambda: [4 * KB, 8 * KB, 16 * KB, 32 * KB])
    needle_seeds: int = 5
    needle_kinds: tuple[str, ...] = ("single", "multi")
    needle_max_tokens: int = 12
    speed_lengths: list[int] = dataclasses.field(default_factory=lambda: [8 * KB, 16 * KB, 32 * KB, 64 * KB, 128 * KB])
    #: timed requests per engine and length (after one warm-up): 5 since 2026-12-03 (3 before), as
    #: the 0.98x goal is read at lengths where both engines serve FlashAttention and three requests
    #: of each left a 2% reading inside FLASH_ATTN's own engine-to-engine spread (speed-f3e3aaa.json)
    speed_reps: int = 5
    llama_lengths: list[int] = dataclasses.field(default_factory=lambda: [16 * KB, 32 * KB, 64 * KB, 128 * KB])
    llama_reps: int = 2
    llama_budget: float = 0.1
    quality_lengths: list[int] = dataclasses.field(default_factory=lambda: [8 * KB, 16 * KB, 32 * KB])
    quality_points: list[str] = dataclasses.field(default_factory=lambda: list(quality.POINTS))
    quality_corpora: tuple[str, ...] = quality.CORPORA
    #: perplexity documents per corpus and length
    quality_docs: int = 4
    quality_kinds: tuple[str, ...] = ("single", "multi")
    quality_seeds: int = 5
    quality_reps: int = 3
    #: also time Prism with PrismConfig's defaults (min_context_len as shipped): below it every
    #: prompt should run at FlashAttention's speed. The SmolLM2 part then also times a second
    #: FLASH_ATTN engine ("dense-b"): two engines of the same backend differed by 5% at 16K and
    #: 30% at 8K between runs (speed.json, speed-repeat.json at aae5b7f), a spread the 0.98x goal
    #: must be read against.
    speed_default_config: bool = True
    #: the SmolLM2 speed engines side by side in one job, their timed requests interleaved
    #: (worker.task_speed_interleaved); off: one engine after another, as before 2026-12-03
    speed_interleave: bool = True
    #: vLLM's kv_cache_dtype of the KV parts' engines (report.KV_PARTS; "auto": the model's dtype)
    kv_cache_dtype: str = "auto"
    max_num_batched_tokens: int = 16384
    #: KV cache of each accuracy engine (fixed, so engines can share the GPU without profiling)
    accuracy_kv_bytes: int = 8 << 30
    recall_chunk_rows: int = 1024
    #: hard wall-clock limit per job kind, seconds (engine start included)
    limits: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "recall": 420, "accuracy": 300, "speed": 420, "llama": 560, "quality": 480})
    #: a job of this kind starts only with this much of --budget-s left (an engine start alone
    #: takes 30-55 s); kinds not named: 30 s
    min_start_s: dict[str, float] = dataclasses.field(default_factory=lambda: {"quality": 90})


def make_plan(a: argparse.Namespace) -> Plan:
    p = Plan(dry=a.dry_run, quick=a.quick, kv_cache_dtype=a.kv_cache_dtype)
    if a.quick:
        p.recall_lengths, p.ppl_lengths, p.ppl_windows = [8 * KB], [8 * KB], 4
        p.needle_lengths, p.needle_seeds = [4 * KB, 8 * KB], 3
        p.speed_lengths, p.llama_lengths = [8 * KB, 16 * KB, 32 * KB], []
        p.limits = {"recall": 180, "accuracy": 200, "speed": 240, "llama": 560, "quality": 300}
        p.speed_default_config = False
        p.quality_lengths, p.quality_docs, p.quality_kinds, p.quality_seeds, p.quality_reps = [8 * KB], 2, ("single",), 3, 2
    if a.dry_run:
        p.native = 512
        p.recall_lengths, p.ppl_lengths, p.ppl_windows = [512, 1024], [512, 1024], 2
        p.needle_lengths, p.needle_seeds, p.needle_max_tokens = [1024], 1, 4
        p.speed_lengths, p.speed_reps, p.llama_lengths = [256, 512, 1024], 1, [512, 1024]
        p.recall_chunk_rows = 256
        p.limits = {"recall": 120, "accuracy": 120, "speed": 120, "llama": 120, "quality": 120}
        p.min_start_s = {}
        p.speed_default_config = True
        p.quality_lengths, p.quality_docs, p.quality_seeds, p.quality_reps = [512, 1024], 2, 1, 1
    for name in ("recall", "ppl", "needle", "speed", "llama", "quality"):
        v = parse_lengths(getattr(a, f"{name}_lengths"))
        if v is not None:
            setattr(p, f"{name}_lengths", v)
    if a.seeds is not None:
        p.needle_seeds = p.quality_seeds = a.seeds
    if a.windows is not None:
        p.ppl_windows = a.windows
    if a.speed_default_config is not None:
        p.speed_default_config = a.speed_default_config
    if a.speed_interleave is not None:
        p.speed_interleave = a.speed_interleave
    if a.reps is not None:
        p.speed_reps = p.llama_reps = p.quality_reps = a.reps
    if a.quality_points is not None:
        p.quality_points = [x for x in a.quality_points.split(",") if x.strip()]
    if a.quality_docs is not None:
        p.quality_docs = a.quality_docs
    return p


class Runner:
    def __init__(self, a: argparse.Namespace, plan: Plan, argv: Sequence[str]):
        self.a, self.plan = a, plan
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.job_dir = self.out / "logs"
        self.meta = common.run_meta(argv, a.commit, plan.dry)
        self.t_end = time.monotonic() + a.budget_s if a.budget_s else None
        # Dry run: lower thresholds, so the tiny random model's near-uniform attention still
        # gives a sparse selection and Prism's numbers differ from dense.
        preset = {"min_context_len": 0, **({"high_threshold": 0.5, "low_threshold": 0.5} if plan.dry else {})}
        self.user_prism = json.loads(a.prism or "{}")
        self.prism_cfg = {**preset, **self.user_prism}
        self.in_process = plan.dry and not a.subprocess
        if plan.dry:
            self.model = str(common.write_tiny_llama(self.job_dir / "tiny-llama"))
            self.tok = common.ByteTokenizer()
            text = corpus.synthetic_text(4000)
            self.corpus_source = "synthetic pseudo-English (dry run)"
        else:
            self.model = a.model or os.environ.get("PRISM_TEST_MODEL")
            if not self.model or not Path(self.model).is_dir():
                raise SystemExit("no model: pass --model DIR or set PRISM_TEST_MODEL (source /root/prism-stage/env.sh)")
            self.tok = common.HFTokenizer(self.model)
            text = corpus.load_text(download=True)
            self.corpus_source = corpus.corpus_info().get("source", "benchmarks/data")
        t0 = time.monotonic()
        self.ids = self.tok.encode(text)
        log(f"corpus: {len(text)} chars -> {len(self.ids)} tokens ({self.corpus_source}) in {time.monotonic() - t0:.1f} s")
        self.results: dict[str, dict[str, Any]] = {}
        self._ppl_logged: set[int] = set()

    # -- helpers --------------------------------------------------------------------------------
    def part_doc(self, part: str, **extra: Any) -> dict[str, Any]:
        d = {"part": part, **self.meta, "model": SMOL_NAME if not self.plan.dry else "tiny random Llama (dry run)",
             "model_path": self.model, "corpus": self.corpus_source, "corpus_tokens": len(self.ids),
             "prism_config": self.prism_cfg, "rows": [], "jobs": []}
        d.update(extra)
        self.results[part] = d
        return d

    def save(self, part: str) -> None:
        kv = self.plan.kv_cache_dtype if part in report.KV_PARTS else "auto"
        common.write_json(self.out / report.part_file(part, kv), self.results[part])

    def windows(self, L: int, n: int, start: int) -> list[list[int]]:
        return corpus.token_windows(self.ids, L, n, start)

    def run_job(self, job: dict[str, Any], kind: str, scale: int = 1) -> dict[str, Any]:
        """scale: the job does the work of that many jobs of its kind (engines side by side): its
        time limit and the budget it needs to start scale with it."""
        limit = self.plan.limits[kind] * scale
        if self.t_end is not None:
            left = self.t_end - time.monotonic() - 5
            if left < self.plan.min_start_s.get(kind, 30) * scale:
                log(f"job {job['name']}: skipped, {max(0, left):.0f} s of --budget-s left")
                return {"status": "skipped (budget)", "rows": [], "errors": []}
            limit = min(limit, left)
        if self.in_process:
            from benchmarks import worker

            t0 = time.monotonic()
            log(f"job {job['name']}: in process")
            res = worker.run_job(dict(job, result_file=None))
            res["status"] = "ok" if not res["errors"] else "failed"
            res["wall_s"] = round(time.monotonic() - t0, 1)
            return res
        return common.run_job_subprocess(job, self.job_dir, limit, verbose=self.a.verbose)

    @staticmethod
    def job_summary(job: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
        info = res.get("info", {})
        out = {"name": job["name"], "status": res.get("status"), "wall_s": res.get("wall_s"),
               "engine_init_s": info.get("engine_init_s"), "errors": res.get("errors", [])}
        for key in ("engine_init_s_by_label", "engine_warmup_ms"):  # engines side by side: per engine
            if isinstance(info.get(key), dict):
                out[key] = info[key]
        st = info.get("prism_stats")
        if st is not None:
            keep = ("prism_tokens", "prism_dense_tokens", "flash_tokens", "block_density", "fallback_layers")
            out["prism_stats"] = {k: st.get(k) for k in keep}
            if not st.get("prism_tokens"):
                out["warning"] = "Prism served no tokens in this job: its rows measure FlashAttention"
                log(f"WARNING {job['name']}: {out['warning']}")
        return out

    def engine_spec(self, backend: str, max_model_len: int, eager: bool, mem: float, **kw: Any) -> dict[str, Any]:
        p = self.plan
        spec = {"kind": "hf" if p.dry else "vllm", "backend": backend, "model": self.model,
                "max_model_len": max_model_len, "enforce_eager": eager, "gpu_memory_utilization": mem,
                "max_num_batched_tokens": p.max_num_batched_tokens, "max_num_seqs": 64,
                "hf_overrides": common.yarn_overrides(self.model, max_model_len, p.native),
                "prism": self.prism_cfg if backend == "prism" else self.user_prism if backend == "prism-default" else None,
                "device": "cpu", "dtype": "float32", "kv_cache_dtype": "auto"}
        spec.update(kw)
        return spec

    def rope_label(self, L: int) -> str:
        f = common.yarn_factor(L, self.plan.native)
        return "native" if f <= 1.0 else f"YaRN x{f:g}"

    @property
    def kv_tag(self) -> str:
        """'-fp8' in the TTFT jobs' names (and their log files) on an fp8 KV cache."""
        return "" if self.plan.kv_cache_dtype == "auto" else f"-{self.plan.kv_cache_dtype}"

    # -- job scheduling ------------------------------------------------------------------------------
    def run_jobs(self, items: list[tuple[dict[str, Any], str, Any]], concurrency: int) -> None:
        """Run (job, kind, on_done) items, ``concurrency`` at a time (accuracy jobs may share the
        GPU: fixed KV cache sizes, no memory profiling); on_done(res) runs under a lock."""
        if concurrency <= 1 or self.in_process or len(items) <= 1:
            for job, kind, on_done in items:
                on_done(self.run_job(job, kind))
            return
        import threading
        from concurrent.futures import ThreadPoolExecutor, as_completed

        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            futs = {ex.submit(self.run_job, job, kind): on_done for job, kind, on_done in items}
            for f in as_completed(futs):
                with lock:
                    futs[f](f.result())

    # -- recall ------------------------------------------------------------------------------------
    def recall_items(self) -> list[tuple[dict[str, Any], str, Any]]:
        p = self.plan
        doc = self.part_doc("recall", settings={"lengths": p.recall_lengths, "method_names": report.METHOD_NAMES})
        items = []
        for i, L in enumerate(p.recall_lengths):
            items.append({"length": L, "ids": self.windows(L, 1, 7 * i * KB)[0],
                          "hf_overrides": common.yarn_overrides(self.model, L, p.native), "rope": self.rope_label(L)})
        job = {"name": "recall", "kind": "recall", "model": self.model, "items": items, "prism": self.prism_cfg,
               "device": "cpu" if p.dry else "cuda", "dtype": "float32" if p.dry else "bfloat16",
               "chunk_rows": p.recall_chunk_rows}

        def done(res: dict[str, Any]) -> None:
            for r in res.get("rows", []):
                r["summary"] = {m: {"recall": statistics.mean(l[f"{m}_recall"] for l in r["layers"]),
                                    "recall_min_layer": min(l[f"{m}_recall"] for l in r["layers"]),
                                    "density": statistics.mean(l[f"{m}_density"] for l in r["layers"])}
                                for m in report.METHOD_NAMES}
                doc["rows"].append(r)
            doc["jobs"].append(self.job_summary(job, res))
            self.save("recall")

        return [(job, "recall", done)]

    # -- ppl + needle (shared engines) ---------------------------------------------------------------
    def accuracy_items(self, do_ppl: bool, do_needle: bool) -> list[tuple[dict[str, Any], str, Any]]:
        """One engine job per (RoPE group, backend): ppl windows and needle prompts of the lengths
        that share a max_model_len (native 8K, or YaRN stretched to the length)."""
        p = self.plan
        groups: dict[int, dict[str, list[int]]] = {}  # max_model_len -> lengths

        def group_of(L: int) -> int:
            return max(L, p.native)

        if do_ppl:
            for L in p.ppl_lengths:
                groups.setdefault(group_of(L), {"ppl": [], "needle": []})["ppl"].append(L)
            self.part_doc("ppl", settings={"lengths": p.ppl_lengths, "windows": p.ppl_windows,
                                           "prompt_tokens": {str(L): L - PPL_RESERVE for L in p.ppl_lengths},
                                           "enforce_eager": True}, summary=[])
        cases: list[dict[str, Any]] = []
        if do_needle:
            for L in p.needle_lengths:
                groups.setdefault(group_of(L), {"ppl": [], "needle": []})["needle"].append(L)
            cases = prompts.needle_cases(self.tok, self.ids, [L - OUT_RESERVE for L in p.needle_lengths],
                                         p.needle_kinds, prompts.DEPTHS, list(range(p.needle_seeds)))
            self.part_doc("needle", settings={"lengths": p.needle_lengths, "kinds": list(p.needle_kinds),
                                              "depths": list(prompts.DEPTHS), "seeds": p.needle_seeds,
                                              "max_tokens": p.needle_max_tokens, "enforce_eager": True}, cases=[])
        ppl_lp: dict[tuple[int, str], list[list[float]]] = {}
        outputs: dict[str, dict[str, list[int]]] = {"dense": {}, "prism": {}}
        items = []
        for mml, g in sorted(groups.items()):
            tasks = []
            for L in g["ppl"]:
                tasks.append({"task": "ppl", "label": f"{tok_label(L)}", "length": L,
                              "windows": self.windows(L - PPL_RESERVE, p.ppl_windows, 0)})
            if g["needle"]:
                lens = {L - OUT_RESERVE for L in g["needle"]}
                tasks.append({"task": "generate", "label": "needle " + ",".join(tok_label(L) for L in g["needle"]),
                              "max_tokens": p.needle_max_tokens,
                              "cases": [{"id": c["id"], "ids": c["ids"]} for c in cases if c["length"] in lens]})
            for backend in ("dense", "prism"):
                spec = self.engine_spec(backend, mml, eager=True, mem=0.1, kv_cache_memory_bytes=p.accuracy_kv_bytes)
                job = {"name": f"accuracy-{tok_label(mml)}-{backend}", "kind": "engine", "engine": spec, "tasks": tasks}

                def done(res: dict[str, Any], job: dict[str, Any] = job, backend: str = backend) -> None:
                    for r in res.get("rows", []):
                        if r["task"] == "ppl":
                            ppl_lp[(r["length"], backend)] = r["logprobs"]
                        elif r["task"] == "generate":
                            outputs[backend].update(r["outputs"])
                    js = self.job_summary(job, res)
                    if do_ppl:
                        self.results["ppl"]["jobs"].append(js)
                        self._ppl_rows(ppl_lp)
                        self.save("ppl")
                    if do_needle:
                        self.results["needle"]["jobs"].append(js)
                        self._needle_rows(cases, outputs)
                        self.save("needle")

                items.append((job, "accuracy", done))
        return items

    def _ppl_rows(self, lp: dict[tuple[int, str], list[list[float]]]) -> None:
        doc = self.results["ppl"]
        doc["rows"], doc["summary"] = [], []
        for (L, backend), rows in sorted(lp.items()):
            s = prompts.ppl_summary(rows)
            doc["rows"].append({"length": L, "prompt_tokens": L - PPL_RESERVE, "rope": self.rope_label(L),
                                "backend": backend, "windows": len(rows), **s})
        for L in sorted({k[0] for k in lp}):
            if (L, "dense") in lp and (L, "prism") in lp:
                d, pr = prompts.ppl_summary(lp[(L, "dense")]), prompts.ppl_summary(lp[(L, "prism")])
                doc["summary"].append({
                    "length": L, "rope": self.rope_label(L), "tokens": d["tokens"],
                    "dense_ppl": d["ppl"], "prism_ppl": pr["ppl"], "delta_pct": 100 * (pr["ppl"] / d["ppl"] - 1),
                    "dense_ppl_last_quarter": d["ppl_last_quarter"], "prism_ppl_last_quarter": pr["ppl_last_quarter"],
                    "delta_last_quarter_pct": 100 * (pr["ppl_last_quarter"] / d["ppl_last_quarter"] - 1)})
                if L not in self._ppl_logged:
                    self._ppl_logged.add(L)
                    log(f"ppl {tok_label(L)}: dense {d['ppl']:.3f}, prism {pr['ppl']:.3f} "
                        f"({doc['summary'][-1]['delta_pct']:+.2f}%)")

    def _needle_rows(self, cases: list[dict[str, Any]], outputs: dict[str, dict[str, list[int]]]) -> None:
        doc = self.results["needle"]
        agg: dict[tuple, list[int]] = {}
        doc["cases"] = []
        for backend, outs in outputs.items():
            for c in cases:
                if c["id"] not in outs:
                    continue
                ok = prompts.score_needle(self.tok, c, outs[c["id"]])
                ctx = c["length"] + OUT_RESERVE
                a = agg.setdefault((c["kind"], ctx, c["depth"], backend), [0, 0])
                a[0] += int(ok)
                a[1] += 1
                doc["cases"].append({"id": c["id"], "backend": backend, "key": c["key"], "correct": ok,
                                     "output": self.tok.decode(outs[c["id"]])})
        doc["rows"] = [{"kind": k, "length": L, "depth": dp, "backend": be, "correct": n, "total": t,
                        "accuracy": n / t} for (k, L, dp, be), (n, t) in sorted(agg.items())]

    # -- quality sweep -----------------------------------------------------------------------------------
    def quality_corpus(self, name: str) -> tuple[list[int], str]:
        """Token ids and source of a perplexity corpus (dry run: synthetic text, one seed per name)."""
        if name == "fortunes":
            return self.ids, self.corpus_source
        if self.plan.dry:
            seed = 1 + sum(map(ord, name))
            return self.tok.encode(corpus.synthetic_text(4000, seed=seed)), f"synthetic pseudo-English, seed {seed} (dry run)"
        if name == "austen":
            from benchmarks import corpus_austen

            if not (corpus.DATA_DIR / corpus_austen.AUSTEN_FILE).is_file():
                raise SystemExit(f"{corpus.DATA_DIR / corpus_austen.AUSTEN_FILE} is missing: run "
                                 "`python -m benchmarks.corpus_austen` on a Debian machine and carry benchmarks/data")
            t0 = time.monotonic()
            ids = self.tok.encode(corpus_austen.load_austen())
            log(f"corpus austen: {len(ids)} tokens in {time.monotonic() - t0:.1f} s")
            return ids, corpus_austen.austen_info().get("source", "benchmarks/data/austen.txt")
        raise SystemExit(f"quality corpus {name!r} is unknown; use {', '.join(quality.CORPORA)}")

    def quality_items(self) -> list[tuple[dict[str, Any], str, Any]]:
        """One engine job per (point, length), point-major (a budget cut drops the table's last
        points at every length): perplexity per corpus, passkeys, then the timed prompt."""
        p = self.plan
        points = quality.parse_points(p.quality_points)
        corpora = {c: self.quality_corpus(c) for c in p.quality_corpora}
        docs = {(c, L): quality.spaced_windows(ids, L - PPL_RESERVE, p.quality_docs)
                for c, (ids, _) in corpora.items() for L in p.quality_lengths}
        cases = prompts.needle_cases(self.tok, self.ids, [L - OUT_RESERVE for L in p.quality_lengths],
                                     p.quality_kinds, prompts.DEPTHS, list(range(p.quality_seeds)))
        case_by_id = {c["id"]: c for c in cases}
        timed = {L: self.windows(L - OUT_RESERVE, p.quality_reps + 1, 0) for L in p.quality_lengths}
        alone = ("jobs ran one at a time" if self.in_process or self.a.jobs <= 1 else
                 "timed while no other job of this part held the GPU (benchmarks.common.GpuLock: other jobs' "
                 "engine starts, perplexity and passkey work wait; engines that finished their work stay loaded, idle)")
        doc = self.part_doc("quality", points=[pt.describe() for pt in points], measured=[], runs=[dict(self.meta)],
                            settings={
            "lengths": p.quality_lengths, "points": [pt.name for pt in points],
            "documents_per_corpus": p.quality_docs,
            "prompt_tokens": {str(L): L - PPL_RESERVE for L in p.quality_lengths},
            "corpora": {c: {"source": src, "tokens": len(ids),
                            "documents": {str(L): [s0 for s0, _ in docs[(c, L)]] for L in p.quality_lengths}}
                        for c, (ids, src) in corpora.items()},
            "passkey": {"kinds": list(p.quality_kinds), "depths": list(prompts.DEPTHS), "seeds": p.quality_seeds,
                        "max_tokens": p.needle_max_tokens, "haystack": "fortunes",
                        "prompt_tokens": {str(L): L - OUT_RESERVE for L in p.quality_lengths}},
            "enforce_eager": True, "enable_prefix_caching": False, "max_num_batched_tokens": p.max_num_batched_tokens,
            "kv_cache_dtype": p.kv_cache_dtype, "kv_cache_memory_bytes": p.accuracy_kv_bytes, "concurrency": 1 if self.in_process else self.a.jobs,
            "perplexity": "prompt logprobs of each document (one request at a time: chunks end on block boundaries, "
                          "dense_tail never applies to a scored token); ΔPPL against FLASH_ATTN on the same documents",
            "density": "selected / causal (query block, head, key block) triples over every Prism layer launch of the "
                       "task (prism_vllm.stats, sample_every=1)",
            "ttft": f"wall time of LLM.generate for one request of L-{OUT_RESERVE} tokens with max_tokens=1, median of "
                    f"{p.quality_reps} after one warm-up, in the part's engine (enforce_eager=True: compare ratios, "
                    f"not absolute times, with speed.json); {alone}"})
        doc["prism_config"] = {"min_context_len": 0, **self.user_prism}  # each point adds rule, thresholds, budget
        lock = None if self.in_process else str(self.job_dir / "quality-gpu.lock")
        items = []
        for pt in points:
            for L in p.quality_lengths:
                prism = None if pt.rule is None else {"min_context_len": 0, **self.user_prism, **(pt.prism_knobs() or {})}
                spec = self.engine_spec(pt.backend, max(L, p.native), eager=True, mem=0.1,
                                        kv_cache_memory_bytes=p.accuracy_kv_bytes, prism=prism,
                                        kv_cache_dtype=p.kv_cache_dtype,
                                        **({"max_num_batched_tokens": pt.chunk} if pt.chunk else {}))
                tasks: list[dict[str, Any]] = [
                    {"task": "ppl", "label": f"{c} {tok_label(L)}", "length": L, "windows": [w for _, w in docs[(c, L)]],
                     "one_at_a_time": True, "stats": True, "tag": f"ppl:{c}"} for c in corpora]
                tasks.append({"task": "generate", "label": f"passkeys {tok_label(L)}", "max_tokens": p.needle_max_tokens,
                              "cases": [{"id": c["id"], "ids": c["ids"]} for c in cases if c["length"] == L - OUT_RESERVE],
                              "stats": True, "tag": "passkey"})
                tasks.append({"task": "speed", "label": f"{pt.name} {tok_label(L)}", "prompts": {str(L): timed[L]},
                              "exclusive": True, "tag": "ttft"})
                job = {"name": f"quality-{tok_label(L)}-{pt.slug}{self.kv_tag}", "kind": "engine", "engine": spec, "tasks": tasks,
                       "sample_every": 1, **({"gpu_lock": lock} if lock else {})}

                def done(res: dict[str, Any], job: dict[str, Any] = job, pt: quality.Point = pt, L: int = L) -> None:
                    doc["jobs"].append(self.job_summary(job, res))
                    if not res.get("rows"):  # skipped or failed early: nothing to replace a merged measurement with
                        self.save("quality")
                        return
                    m: dict[str, Any] = {"point": pt.name, "length": L, "rope": self.rope_label(L), "run": 0,
                                         "job": job["name"], "status": res.get("status"), "windows": [],
                                         "prism_stats": {}, "passkeys": []}
                    for r in res.get("rows", []):
                        tag = r.get("tag", "")
                        if r.get("prism_stats"):
                            m["prism_stats"][tag] = r["prism_stats"]
                        if r["task"] == "ppl":
                            c = tag.split(":", 1)[1]
                            for (start, _), lp in zip(docs[(c, L)], r["logprobs"]):
                                m["windows"].append({"corpus": c, "start": start, **quality.window_nll(lp)})
                        elif r["task"] == "generate":
                            for cid, out in r["outputs"].items():
                                c = case_by_id[cid]
                                m["passkeys"].append({"id": cid, "kind": c["kind"], "depth": c["depth"], "seed": c["seed"],
                                                      "key": c["key"], "correct": prompts.score_needle(self.tok, c, out),
                                                      "output": self.tok.decode(out)})
                        elif r["task"] == "speed":
                            m["ttft"] = {k: r.get(k) for k in ("prompt_tokens", "ttft_ms", "ttft_ms_all", "warmup_ms",
                                                              "density", "prism_tokens", "flash_tokens")}
                    doc["measured"] = [x for x in doc["measured"] if (x["point"], x["length"]) != (pt.name, L)] + [m]
                    doc["rows"] = quality.derive(doc)
                    self._quality_log(doc, pt.name, L)
                    self.save("quality")

                items.append((job, "quality", done))
        conc = 1 if self.in_process else max(1, self.a.jobs)
        left = f", --budget-s leaves {self.t_end - time.monotonic():.0f} s" if self.t_end is not None else ""
        log(f"quality: {len(items)} engine jobs ({len(points)} points x {len(p.quality_lengths)} lengths), {conc} at a "
            f"time: roughly {-(-len(items) // conc) * 90 / 60:.0f} min on the GPU (~90 s per job wave){left}")
        return items

    @staticmethod
    def _quality_log(doc: dict[str, Any], name: str, L: int) -> None:
        row = next((r for r in doc["rows"] if r["point"] == name and r["length"] == L), None)
        if row is None:
            return
        parts = []
        for c, s in row["ppl"].items():
            d = f" ({s['delta_pct']:+.2f}%)" if s.get("delta_pct") is not None and name != "dense" else ""
            parts.append(f"{c} ppl {s['ppl']:.3f}{d}")
        if row.get("density") is not None:
            parts.append(f"density {row['density']:.3f}")
        pk = row.get("passkey")
        if pk:
            parts.append(f"passkeys {pk['correct']}/{pk['total']}"
                         + (f" (FLASH_ATTN {pk['dense_correct']})" if pk.get("dense_correct") is not None and name != "dense" else ""))
        t = row.get("ttft")
        if t and t.get("ttft_ms") is not None:
            parts.append(f"TTFT {t['ttft_ms']:.1f} ms" + (f" ({t['ratio']:.2f}x FLASH_ATTN)" if t.get("ratio") and name != "dense" else ""))
        log(f"quality {tok_label(L)} {name}: " + ", ".join(parts))

    # -- speed -----------------------------------------------------------------------------------------
    def part_speed(self) -> None:
        """SmolLM2 (real weights, YaRN): dense, Prism forced on, Prism with shipped defaults, and
        dense again in a second engine (FLASH_ATTN's own engine-to-engine spread)."""
        p = self.plan
        doc = self.part_doc("speed", models=[SMOL_NAME], skipped={}, settings={
            "lengths": p.speed_lengths, "reps": p.speed_reps, "enforce_eager": False, "enable_prefix_caching": False,
            "kv_cache_dtype": p.kv_cache_dtype,
            "max_num_batched_tokens": p.max_num_batched_tokens, "prism_default_config": self.user_prism,
            "interleaved": p.speed_interleave,
            "ttft": "wall time of LLM.generate for one request with max_tokens=1, median over reps after one warm-up"
                    + ("; the engines alive side by side in one process, each timed prompt on every engine in a "
                       "rotated order, right after an untimed request on the same engine" if p.speed_interleave
                       else "; one engine process after another")})
        if not p.speed_lengths:
            return
        mml = max(p.speed_lengths)
        prompts_by_len = {str(L): self.windows(L - OUT_RESERVE, p.speed_reps + 1, 0) for L in p.speed_lengths}
        backends = ("dense", "prism") + (("prism-default", "dense-b") if p.speed_default_config else ())
        if p.speed_interleave:
            # every engine alive in one job, each with a fixed KV cache (no memory profiling
            # beside the others) large enough for one prompt of the longest length
            kv = max(p.accuracy_kv_bytes, 2 * mml * common.kv_bytes_per_token(self.model, p.kv_cache_dtype))
            specs = {f"SmolLM2 {b}": self.engine_spec(b, mml, eager=False, mem=0.9 / len(backends), max_num_seqs=4,
                                                      kv_cache_dtype=p.kv_cache_dtype, kv_cache_memory_bytes=kv)
                     for b in backends}
            job = {"name": f"speed-smollm2-interleaved{self.kv_tag}", "kind": "engines", "engines": specs,
                   "task": {"task": "speed", "prompts": prompts_by_len}}
            res = self.run_job(job, "speed", scale=len(backends))
            by_label = {f"SmolLM2 {b}": b for b in backends}
            for r in res.get("rows", []):
                doc["rows"].append({"model": SMOL_NAME, "backend": by_label[r["label"]], "rope": self.rope_label(mml), **r})
            doc["jobs"].append(self.job_summary(job, res))
            self._speed_summary(doc)
            self.save("speed")
            return
        for backend in backends:
            job = {"name": f"speed-smollm2-{backend}{self.kv_tag}", "kind": "engine",
                   "engine": self.engine_spec(backend, mml, eager=False, mem=0.5, max_num_seqs=4,
                                              kv_cache_dtype=p.kv_cache_dtype),
                   "tasks": [{"task": "speed", "label": f"SmolLM2 {backend}", "prompts": prompts_by_len}]}
            res = self.run_job(job, "speed")
            for r in res.get("rows", []):
                doc["rows"].append({"model": SMOL_NAME, "backend": backend, "rope": self.rope_label(mml), **r})
            doc["jobs"].append(self.job_summary(job, res))
            self._speed_summary(doc)
            self.save("speed")

    def part_llama(self) -> None:
        """The Llama-3.1-8B architecture with dummy weights at a fixed block budget: dense, Prism
        forced on, and (speed_default_config) Prism with the shipped defaults plus the budget, so
        min_context_len="auto" decides at startup where Prism serves."""
        p = self.plan
        doc = self.part_doc("llama8b", models=[LLAMA_NAME], skipped={}, settings={
            "lengths": p.llama_lengths, "reps": p.llama_reps, "block_budget": p.llama_budget,
            "kv_cache_dtype": p.kv_cache_dtype, "enforce_eager": False, "enable_prefix_caching": False, "max_num_batched_tokens": p.max_num_batched_tokens,
            "config": common.LLAMA_31_8B_CONFIG, "load_format": "dummy",
            "ttft": "wall time of LLM.generate for one request with max_tokens=1, median over reps after one warm-up"})
        if p.dry:
            doc["model"] = "tiny random Llama standing in for Llama-3.1-8B (dry run)"
        if not p.llama_lengths:
            self.save("llama8b")
            return
        mdir = self.model if p.dry else str(common.write_llama8b_dir(self.job_dir / "llama-3.1-8b-config"))
        mml = max(p.llama_lengths)
        prompts_by_len = {str(L): self.windows(L - OUT_RESERVE, p.llama_reps + 1, 0) for L in p.llama_lengths}
        backends = ("dense", "prism") + (("prism-default",) if p.speed_default_config else ())
        for backend in backends:
            base = {"prism": self.prism_cfg, "prism-default": self.user_prism}.get(backend)
            prism = None if base is None else {**base, "block_budget": p.llama_budget}
            spec = self.engine_spec(backend, mml, eager=False, mem=0.85, max_num_seqs=4, model=mdir,
                                    tokenizer=self.model, load_format="dummy", hf_overrides=None, prism=prism,
                                    kv_cache_dtype=p.kv_cache_dtype)
            job = {"name": f"speed-llama8b-{backend}{self.kv_tag}", "kind": "engine", "engine": spec,
                   "tasks": [{"task": "speed", "label": f"Llama-8B {backend}", "prompts": prompts_by_len}]}
            res = self.run_job(job, "llama")
            for r in res.get("rows", []):
                doc["rows"].append({"model": LLAMA_NAME, "backend": backend, "rope": "llama3 x8 (native)",
                                    "block_budget": p.llama_budget if backend != "dense" else None, **r})
            doc["jobs"].append(self.job_summary(job, res))
            self._speed_summary(doc)
            self.save("llama8b")

    @staticmethod
    def _speed_summary(doc: dict[str, Any]) -> None:
        if doc["part"] == "speed":
            doc["break_even"] = report.break_even(report.speed_pairs(doc["rows"], SMOL_NAME))
        for r in doc["rows"]:
            if r["backend"] == "prism" and r.get("prism_tokens") == 0:
                r["warning"] = "Prism served no tokens in this row (everything fell back to FlashAttention)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None,
                    help="comma-separated parts: recall, ppl, needle, speed, llama8b, quality (only when named); "
                         "accuracy = recall,ppl,needle")
    ap.add_argument("--quick", action="store_true",
                    help="the most important evidence in a few minutes: recall 8K, ppl 8K, needle 4K/8K, speed 8K/16K/32K")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check on a tiny random Llama (no vLLM)")
    ap.add_argument("--subprocess", action="store_true", help="dry run: run jobs in subprocesses as on the GPU")
    ap.add_argument("--report", action="store_true", help="only print the markdown tables and redraw plots from DIR's JSON")
    ap.add_argument("--readme", default=None, help="with --report: update this README's results block")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; dry run: benchmarks/dry-run)")
    ap.add_argument("--model", default=None, help="SmolLM2-135M-Instruct folder (default $PRISM_TEST_MODEL)")
    ap.add_argument("--commit", default=None, help="commit of the measured tree (default git HEAD or $PRISM_BENCH_COMMIT)")
    ap.add_argument("--prism", default=None, help="JSON of PrismConfig fields for the Prism runs (min_context_len=0 is preset)")
    ap.add_argument("--budget-s", type=float, default=None, help="total wall-clock budget; jobs that would pass it are cut or skipped")
    ap.add_argument("--verbose", action="store_true", help="echo all job output (vLLM INFO logs)")
    ap.add_argument("--jobs", type=int, default=3,
                    help="accuracy jobs (recall, dense and Prism engines) sharing the GPU at once; speed jobs always run alone")
    for name in ("recall", "ppl", "needle", "speed", "llama", "quality"):
        ap.add_argument(f"--{name}-lengths", default=None, help=f"override {name} context lengths, e.g. 8K,16K")
    ap.add_argument("--quality-points", default=None,
                    help="quality points to run instead of benchmarks.quality.POINTS, e.g. paper:0.99,meanpool:0.98,"
                         "paper:0.99:b0.3 (dense is always added)")
    ap.add_argument("--quality-docs", type=int, default=None, help="quality: perplexity documents per corpus and length")
    ap.add_argument("--merge-quality", nargs="+", default=None, metavar="JSON",
                    help="merge quality.json files of separate runs (later ones win per point and length) into "
                         "DIR/quality.json and redraw its plot; runs nothing")
    ap.add_argument("--speed-default-config", action=argparse.BooleanOptionalAction, default=None,
                    help="also time Prism with PrismConfig's shipped defaults (default: on, off with --quick)")
    ap.add_argument("--speed-interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="SmolLM2 speed: every engine alive in one process, timed requests interleaved across "
                         "them (default: on); --no-speed-interleave starts one engine after another")
    ap.add_argument("--seeds", type=int, default=None, help="needle (and quality passkey) seeds per point")
    ap.add_argument("--windows", type=int, default=None, help="perplexity windows per length")
    ap.add_argument("--reps", type=int, default=None, help="timed requests per speed (and quality) point (after 1 warm-up)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                    help="vLLM's kv_cache_dtype for the engines of speed, llama8b and quality, every backend; "
                         "fp8: results in speed-fp8.json / speed-llama8b-fp8.json / quality-fp8.json (default: auto, the "
                         "model's dtype)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.out is None:
        a.out = str(common.REPO / "benchmarks" / ("dry-run" if a.dry_run else "results"))
    out = Path(a.out)
    if a.report:
        if a.readme and a.kv_cache_dtype != "auto":
            raise SystemExit("--readme: the README block is generated from the default results; "
                             "drop --kv-cache-dtype (--report --kv-cache-dtype fp8 prints the fp8 tables)")
        res = report.load_results(out, a.kv_cache_dtype)
        md = report.markdown(res, image_dir=os.path.relpath(out, Path(a.readme).resolve().parent) if a.readme else str(out))
        try:
            report.plot_all(res, out)
        except ImportError as e:
            log(f"plots skipped ({e}); pip install matplotlib")
        print(md)
        if a.readme:
            changed = report.update_readme(Path(a.readme), md)
            log(f"{a.readme}: {'updated' if changed else 'unchanged'}")
        return 0
    if a.merge_quality:
        merged = quality.merge_docs([common.read_json(Path(f)) for f in a.merge_quality])
        merged_file = report.part_file("quality", report.doc_kv_cache_dtype(merged))
        common.write_json(out / merged_file, merged)
        try:
            report.plot_all({"quality": merged}, out)
        except ImportError as e:
            log(f"plot skipped ({e}); pip install matplotlib")
        print(report.markdown({"quality": merged}))
        log(f"{out / merged_file}: {len(merged['measured'])} (point, length) measurements "
            f"from {len(merged['runs'])} runs")
        return 0
    parts = set(PARTS) - ({"llama8b"} if a.quick else set())
    if a.only:
        parts = set()
        for x in a.only.split(","):
            x = x.strip()
            if x == "accuracy":
                parts |= {"recall", "ppl", "needle"}
            elif x in PARTS or x in EXTRA_PARTS:
                parts.add(x)
            elif x:
                raise SystemExit(f"--only {x!r}: unknown part; use {', '.join(PARTS + EXTRA_PARTS)} or accuracy")
    if a.kv_cache_dtype != "auto":
        other = parts - set(report.KV_PARTS)
        if a.only and other:
            raise SystemExit(f"--kv-cache-dtype {a.kv_cache_dtype} is for the parts {', '.join(report.KV_PARTS)}; "
                             f"run {', '.join(sorted(other))} without it")
        parts -= other  # the default set: its TTFT parts
    plan = make_plan(a)
    t0 = time.monotonic()
    runner = Runner(a, plan, argv)
    log(f"parts {sorted(parts)}; out {out}; {'dry run' if plan.dry else runner.meta['gpu']}")
    # Accuracy jobs do not time anything: they may share the GPU. Speed jobs run alone.
    items = runner.recall_items() if "recall" in parts else []
    if parts & {"ppl", "needle"}:
        items += runner.accuracy_items("ppl" in parts, "needle" in parts)
    runner.run_jobs(items, a.jobs)
    if "quality" in parts:  # after the others: only its own jobs honour its timing lock
        runner.run_jobs(runner.quality_items(), a.jobs)
    if "speed" in parts:
        runner.part_speed()
    if "llama8b" in parts:
        runner.part_llama()
    res = report.load_results(out, plan.kv_cache_dtype)
    try:
        report.plot_all(res, out)
    except Exception as e:  # noqa: BLE001 - plots must not lose the measured JSON
        log(f"plots failed: {type(e).__name__}: {e}")
    print(report.markdown({k: v for k, v in res.items() if k in parts}))
    failed = [j["name"] for d in runner.results.values() for j in d.get("jobs", []) if j["status"] != "ok"]
    log(f"done in {time.monotonic() - t0:.0f} s; jobs not ok: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
