"""Bounded load and bad-input test of `prism-vllm serve` on loopback (run on the GPU machine).

    python benchmarks/load_test.py --out benchmarks/results/load-h200.json [--model PATH] [--tp 1]

1. Starts `prism-vllm serve MODEL` on 127.0.0.1 (prefix caching off, so every prompt token is
   prefilled and the stats can be checked exactly; Prism from --prism-min-context-len tokens).
2. Warm-up (a few requests), then a fixed number of requests (default 256) at a fixed
   concurrency (default 64): half ~200-token prompts, half ~8K-token prompts, half of each
   streamed. Every prompt starts with a unique line, so no two share a cached prefix.
3. Checks: zero failed requests; GPU memory (nvidia-smi, sampled every 0.5 s) flat after warm-up;
   `/prism/stats` deltas consistent with the tokens sent (every prompt token counted once,
   long prompts through the sparse path, nothing counted that was not sent); `prism_*` series on
   `/metrics`; malformed requests (prompt over the max length, bad sampling parameters, invalid
   JSON) answered 4xx while the server keeps serving.
4. Writes a JSON summary (date, GPU, commit, command, numbers, each check) and exits 1 if any
   check failed.

Only loopback is contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEXT_FALLBACK = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the annual report, "
    "discussing budgets, schedules, and the weather in several distant cities. "
)


# ------------------------------------------------------------------------------- helpers
def _visible_gpus() -> list[str]:
    """nvidia-smi flags restricting it to CUDA_VISIBLE_DEVICES: the server's GPUs, not whatever
    else runs on the machine (the first H200 run counted a test on the other GPU)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [f"--id={vis}"] if vis else []


def gpu_memory_mib() -> list[int]:
    try:
        out = subprocess.run(
            ["nvidia-smi", *_visible_gpus(), "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        return [int(x) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def process_group_memory_mib(pgid: int) -> int | None:
    """GPU memory of the processes in process group ``pgid`` (the server and its engine-core
    and worker processes), from nvidia-smi's compute-apps list; None when none is listed (e.g.
    a driver that hides per-process usage). Other jobs sharing the GPU do not count."""
    try:
        out = subprocess.run(
            ["nvidia-smi", *_visible_gpus(), "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, seen = 0, False
    for line in out.splitlines():
        try:
            pid, mib = (int(x) for x in line.split(","))
            if os.getpgid(pid) == pgid:
                total, seen = total + mib, True
        except (ValueError, ProcessLookupError, PermissionError):
            continue
    return total if seen else None


class MemorySampler:
    """Samples GPU memory every `period` seconds in a thread, tagged with the phase: the
    server's own processes (once ``pgid`` is set) and, as a fallback, the whole GPU."""

    def __init__(self, period: float = 0.5):
        self.period, self.phase, self.samples, self.pgid = period, "start", [], None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = gpu_memory_mib()
            own = process_group_memory_mib(self.pgid) if self.pgid is not None else None
            if m:
                self.samples.append((time.time(), self.phase, sum(m), own))
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=30)

    def of(self, phase: str, scope: str = "gpu") -> list[int]:
        """Samples of a phase: scope "gpu" (whole GPU) or "server" (its process group)."""
        i = 2 if scope == "gpu" else 3
        return [s[i] for s in self.samples if s[1] == phase and s[i] is not None]

    def scope(self) -> str:
        """"server" when per-process samples cover the warm-up and the load, else "gpu"."""
        return "server" if self.of("warm", "server") and self.of("load", "server") else "gpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", *_visible_gpus(), "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().replace("\n", ", ")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_prompts(tokenizer_path: str, n: int, short_tokens: int, long_tokens: int, seed: int) -> list[dict]:
    """n prompts as token-id lists: alternating short/long, each starting with a unique line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    gpl = Path("/usr/share/common-licenses/GPL-3")
    text = gpl.read_text() if gpl.is_file() else TEXT_FALLBACK * 400
    body = tok(text, add_special_tokens=False).input_ids
    while len(body) < long_tokens + 64:
        body = body + body
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        length = long_tokens if i % 2 else short_tokens
        head = tok(f"Request {i} ({rng.random():.6f}). Summarise the following text.\n",
                   add_special_tokens=False).input_ids
        start = rng.randrange(0, len(body) - length)
        ids = (head + body[start:start + length])[:length]
        prompts.append({"ids": ids, "long": length == long_tokens, "stream": (i // 2) % 2 == 1})
    return prompts


# ------------------------------------------------------------------------------- requests
async def completion(client: httpx.AsyncClient, model: str, ids: list[int], stream: bool, max_tokens: int) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": r.text[:300]}
        u = r.json()["usage"]
        return {"ok": True, "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "seconds": time.perf_counter() - t0}
    body.update(stream=True, stream_options={"include_usage": True})
    usage, chunks, done, ttft = None, 0, False, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            if msg.get("choices"):
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
    if not done or usage is None:
        return {"ok": False, "status": 200, "error": f"stream ended early (done={done}, usage={usage})"}
    return {"ok": True, "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "seconds": time.perf_counter() - t0, "ttft": ttft, "chunks": chunks}


async def run_load(client, model, prompts, concurrency, max_tokens) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)

    async def one(p):
        async with sem:
            try:
                res = await completion(client, model, p["ids"], p["stream"], max_tokens)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
                res = {"ok": False, "status": None, "error": repr(e)}
            res.update(long=p["long"], stream=p["stream"], sent_tokens=len(p["ids"]))
            return res

    return await asyncio.gather(*(one(p) for p in prompts))


async def bad_inputs(client, model, max_model_len) -> list[dict]:
    """Each malformed request must get a 4xx, and a good request right after must succeed."""
    cases = [
        ("prompt over max length", {"model": model, "prompt": [11] * (max_model_len + 100), "max_tokens": 4}),
        ("negative temperature", {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": -1.0}),
        ("top_p above 1", {"model": model, "prompt": "Hello", "max_tokens": 4, "top_p": 2.0}),
        ("negative max_tokens", {"model": model, "prompt": "Hello", "max_tokens": -5}),
        ("unknown model", {"model": "no-such-model", "prompt": "Hello", "max_tokens": 4}),
        ("invalid JSON", None),
    ]
    out = []
    for name, body in cases:
        if body is None:
            r = await client.post("/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
        else:
            r = await client.post("/v1/completions", json=body)
        ok_after = await client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
        health = await client.get("/health")
        out.append({"case": name, "status": r.status_code, "is_4xx": 400 <= r.status_code < 500,
                    "good_request_after": ok_after.status_code, "health_after": health.status_code,
                    "body": r.text[:200]})
    return out


async def get_stats(client) -> dict:
    r = await client.get("/prism/stats")
    r.raise_for_status()
    return r.json()


# ------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON summary path")
    ap.add_argument("--model", default=os.environ.get("PRISM_TEST_MODEL"), help="model folder (default: $PRISM_TEST_MODEL, else the bundled model)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--short-tokens", type=int, default=200)
    ap.add_argument("--long-tokens", type=int, default=8000)
    ap.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--prism-min-context-len", type=int, default=2048, help="so the 8K prompts take the Prism path")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    ap.add_argument("--memory-slack-mib", type=int, default=512, help="allowed GPU memory growth after warm-up")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--commit", default=None, help="commit of the measured tree (default: git HEAD)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for prism-vllm serve")
    args = ap.parse_args()

    model = args.model
    if not model:
        from prism_vllm.bundled import ensure_bundled_model

        model = str(ensure_bundled_model())
    cmd = [sys.executable, "-m", "prism_vllm.server.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(args.port), "--max-model-len", str(args.max_model_len), "--no-enable-prefix-caching",
           "--served-model-name", "m", "-tp", str(args.tp),
           "--prism-min-context-len", str(args.prism_min_context_len), *args.extra]
    log_path = Path(args.out).with_suffix(".server.log")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu_name(),
        "commit": args.commit or git_commit(), "command": " ".join(sys.argv), "server_command": " ".join(cmd),
        "config": vars(args), "checks": {},
    }
    prompts = build_prompts(model, args.requests, args.short_tokens, args.long_tokens, seed=0)
    warm = build_prompts(model, 8, args.short_tokens, args.long_tokens, seed=1)
    with open(log_path, "w") as log, MemorySampler() as mem:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        mem.pgid = server.pid  # start_new_session: the server leads its own process group
        try:
            summary.update(asyncio.run(_drive(args, server, prompts, warm, mem)))
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        sc = mem.scope()
        summary["memory_mib"] = {p: {"min": min(v), "max": max(v), "n": len(v)} for p in ("warm", "load", "after")
                                 if (v := mem.of(p, sc))}
        summary["memory_scope"] = {"server": "the server's processes (nvidia-smi compute apps)",
                                   "gpu": "the whole GPU"}[sc]
        if mem.of("warm", sc) and mem.of("load", sc):
            base = max(mem.of("warm", sc)[-5:])
            growth = max(mem.of("load", sc) + mem.of("after", sc)) - base
            summary["checks"]["gpu_memory_flat"] = {"ok": growth <= args.memory_slack_mib, "growth_mib": growth,
                                                    "slack_mib": args.memory_slack_mib, "scope": sc}
        else:
            summary["checks"]["gpu_memory_flat"] = {"ok": False, "error": "no nvidia-smi samples"}
    summary["ok"] = all(c.get("ok") for c in summary["checks"].values())
    summary["server_log"] = str(log_path)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k in ("ok", "checks", "load")}, indent=1))
    return 0 if summary["ok"] else 1


async def _drive(args, server, prompts, warm, mem) -> dict:
    out: dict[str, Any] = {"checks": {}}
    checks = out["checks"]
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=300, limits=limits) as client:
        t0 = time.monotonic()
        while True:  # bounded wait for start-up
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}; see the server log")
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > args.startup_timeout:
                raise TimeoutError(f"server not healthy after {args.startup_timeout:.0f} s")
            await asyncio.sleep(2)
        out["startup_seconds"] = time.monotonic() - t0

        mem.phase = "warm"
        warm_res = await run_load(client, "m", warm, 8, args.max_tokens)
        await asyncio.sleep(2)
        before = await get_stats(client)

        mem.phase = "load"
        t1 = time.monotonic()
        res = await run_load(client, "m", prompts, args.concurrency, args.max_tokens)
        wall = time.monotonic() - t1
        mem.phase = "after"
        await asyncio.sleep(3)
        after = await get_stats(client)

        failed = [r for r in res + warm_res if not r["ok"]]
        checks["zero_failures"] = {"ok": not failed, "failed": len(failed), "examples": failed[:5]}
        sent = sum(r["sent_tokens"] for r in res)
        prompt_tok = sum(r.get("prompt_tokens", 0) for r in res)
        gen = sum(r.get("completion_tokens", 0) for r in res)
        long_tok = sum(r.get("prompt_tokens", 0) for r in res if r["long"])
        lat = sorted(r["seconds"] for r in res if r["ok"])
        out["load"] = {
            "requests": len(res), "concurrency": args.concurrency, "wall_seconds": wall,
            "prompt_tokens": prompt_tok, "completion_tokens": gen, "long_prompt_tokens": long_tok,
            "latency_p50": statistics.median(lat) if lat else None,
            "latency_p99": lat[int(0.99 * (len(lat) - 1))] if lat else None,
            "ttft_p50_stream": statistics.median([r["ttft"] for r in res if r.get("ttft") is not None] or [0]),
        }
        checks["usage_matches_sent"] = {"ok": prompt_tok == sent, "sent": sent, "reported": prompt_tok}

        a, b = before["aggregate"]["tokens"], after["aggregate"]["tokens"]
        d = {k: b[k] - a[k] for k in ("sparse", "dense", "dense_prism", "dense_flash_attention")}
        counted = d["sparse"] + d["dense"]
        # Every prompt token is prefilled exactly once (no prefix cache); decode rows (one per
        # generated token but the last) may be counted as FlashAttention rows as well.
        upper = prompt_tok + gen
        checks["stats_consistent"] = {
            "ok": prompt_tok <= counted <= upper and 0 < d["sparse"] <= long_tok,
            "delta_tokens": d, "prompt_tokens": prompt_tok, "upper_bound_with_decode": upper,
            "long_prompt_tokens": long_tok, "workers_reporting": after["aggregate"]["workers_reporting"],
            "block_density": after["aggregate"].get("block_density"),
            "decode_rows_counted": counted - prompt_tok,
        }
        metrics = (await client.get("/metrics")).text
        series = [s for s in ("prism_prefill_tokens_total", "prism_block_density", "prism_workers_reporting")
                  if s in metrics]
        checks["prometheus_series"] = {"ok": len(series) == 3, "found": series}

        bad = await bad_inputs(client, "m", args.max_model_len)
        checks["bad_inputs_4xx_and_still_serving"] = {
            "ok": all(x["is_4xx"] and x["good_request_after"] == 200 and x["health_after"] == 200 for x in bad),
            "cases": bad,
        }
        out["stats_after"] = after["aggregate"]
    return out


if __name__ == "__main__":
    sys.exit(main())
