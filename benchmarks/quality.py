"""The quality sweep through vLLM (``python -m benchmarks.run --only quality``): its points, its
documents and the numbers derived from what the engine jobs measured.

A *point* is one attention setting, named as in :mod:`benchmarks.quality_cpu` so the two studies
line up: ``dense`` (FLASH_ATTN), ``dense:cCHUNK`` (FLASH_ATTN in prefill chunks of CHUNK tokens:
the numerics control) or ``RULE:TOP_P[:bBUDGET][:lLOCAL]`` (Prism with ``rule``, both bands'
thresholds at TOP_P, ``block_budget`` BUDGET, ``local_blocks`` LOCAL), e.g. ``paper:0.99``,
``meanpool:0.98``, ``paper:0.99:b0.3``. :data:`POINTS` is the sweep, in run order (a ``--budget-s`` cut drops the
last ones first). Every Prism point runs with ``min_context_len=0``, so every prompt is served
sparsely.

Per (point, length) one engine job measures (benchmarks/run.py builds the jobs):

* perplexity from prompt logprobs of ``docs`` documents per corpus, spread evenly over the
  corpus, each ``length - 128`` tokens (whole Prism blocks) and sent one request at a time, so
  every chunk of ``max_num_batched_tokens`` ends on a block boundary and ``dense_tail`` never
  applies to a scored token;
* the block density Prism selected on those documents (prism_vllm.stats, every step sampled);
* passkeys at every depth (:mod:`benchmarks.prompts`, as the needle part);
* the TTFT of one prompt (median of ``reps`` after a warm-up), timed while no other job of the
  part runs on the GPU (:class:`benchmarks.common.GpuLock`).

Imports no torch: the orchestrator stays light.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from prism_vllm.config import DEFAULT_PRESET, PRESETS, PrismConfig

__all__ = ["CORPORA", "POINTS", "Point", "derive", "merge_docs", "parse_points", "preset_marks", "spaced_windows"]

#: The sweep, in run order (a --budget-s cut drops the last ones first): FLASH_ATTN first (every
#: delta is against it), the default preset's point, the candidates for a default within 1% at
#: every length, then the rest of the paper's rule over top-p (the fast preset's 0.95 first), the
#: mean-pool rule, and block-budget caps. The first run (2026-12-02, e31f62d) found top-p 0.99 at
#: +1.44% on the fortunes at 32K; the CPU screen of one 32K fortunes window
#: (benchmarks/results/quality-cpu-32k.json) put paper 0.998 at +0.89%, mean-pool 0.995 at +0.98%
#: and mean-pool 0.998 at +0.80% (paper 0.995: +1.10%); through vLLM (quality-candidates.json,
#: d3f61a3) all three were within 1% at every length, and mean-pool 0.998 became the default.
#: Edit freely; any ``RULE:TOP_P[:bBUDGET]`` with a PrismConfig rule works.
POINTS: tuple[str, ...] = (
    "dense",
    "meanpool:0.998",
    "paper:0.99",
    "paper:0.998",
    "meanpool:0.995",
    "paper:0.95",
    "paper:0.98",
    "paper:0.97",
    "paper:0.9",
    "meanpool:0.99",
    "meanpool:0.98",
    "paper:0.99:b0.5",
    "paper:0.99:b0.3",
)

#: Corpora of the perplexity documents (benchmarks/corpus.py, benchmarks/corpus_austen.py).
CORPORA: tuple[str, ...] = ("fortunes", "austen")


@dataclasses.dataclass(frozen=True)
class Point:
    """One attention setting of the sweep; ``rule`` None is FLASH_ATTN, with ``chunk`` a
    control: FLASH_ATTN with prefill chunks of ``chunk`` tokens (``max_num_batched_tokens``)
    instead of the sweep's, the same attention in other numerics (the model's matmuls see other
    row counts), which measures how far this model's passkeys and perplexity move on numerics
    alone."""

    rule: str | None
    top_p: float | None = None
    block_budget: float | None = None
    local_blocks: int = 1
    chunk: int | None = None

    @classmethod
    def parse(cls, name: str) -> Point:
        """'dense' | 'dense:cCHUNK' | 'RULE:TOP_P[:bBUDGET][:lLOCAL]' (values checked by
        PrismConfig), e.g. 'meanpool:0.998:l2' keeps the block before the diagonal too
        (PrismConfig.local_blocks); 'dense:c2048' is FLASH_ATTN in chunks of 2048 tokens (a
        positive multiple of 128, so perplexity documents still cut at block boundaries)."""
        s = name.strip()
        if s == "dense":
            return cls(None)
        if s.startswith("dense:"):
            c = s[len("dense:"):]
            if not (c[:1] == "c" and c[1:].isdigit() and int(c[1:]) > 0 and int(c[1:]) % 128 == 0):
                raise ValueError(f"quality point {name!r}: a FLASH_ATTN control is 'dense:cCHUNK' with CHUNK a "
                                 f"positive multiple of 128 (prefill tokens per step), e.g. dense:c2048")
            return cls(None, chunk=int(c[1:]))
        parts = s.split(":")
        try:
            if len(parts) < 2:
                raise ValueError
            budget, local = None, 1
            for extra in parts[2:]:
                if extra.startswith("b") and budget is None and local == 1:
                    budget = float(extra[1:])
                elif extra.startswith("l") and local == 1:
                    local = int(extra[1:])
                else:
                    raise ValueError
            pt = cls(parts[0], float(parts[1]), budget, local)
        except ValueError:
            raise ValueError(f"quality point {name!r}: use 'dense', 'dense:cCHUNK' or RULE:TOP_P[:bBUDGET][:lLOCAL], "
                             f"e.g. paper:0.99, paper:0.99:b0.3 or meanpool:0.998:l2") from None
        pt.prism_knobs()  # PrismConfig names the bad field and its range
        return pt

    @property
    def name(self) -> str:
        if self.rule is None:
            return "dense" + (f":c{self.chunk}" if self.chunk else "")
        return (f"{self.rule}:{self.top_p:g}" + (f":b{self.block_budget:g}" if self.block_budget is not None else "")
                + (f":l{self.local_blocks}" if self.local_blocks != 1 else ""))

    @property
    def slug(self) -> str:
        """The name as a job/file name ('paper:0.99:b0.3' -> 'paper-0.99-b0.3')."""
        return self.name.replace(":", "-")

    @property
    def backend(self) -> str:
        return "dense" if self.rule is None else "prism"

    def prism_knobs(self) -> dict[str, Any] | None:
        """The PrismConfig fields this point sets (None for FLASH_ATTN), validated."""
        if self.rule is None:
            return None
        knobs = {"rule": self.rule, "high_threshold": self.top_p, "low_threshold": self.top_p,
                 "block_budget": self.block_budget}
        if self.local_blocks != 1:
            knobs["local_blocks"] = self.local_blocks
        PrismConfig.from_dict({"min_context_len": 0, **knobs})
        return knobs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "rule": self.rule, "top_p": self.top_p,
                "block_budget": self.block_budget, "presets": preset_marks(self),
                **({"max_num_batched_tokens": self.chunk} if self.chunk else {})}


def parse_points(names: Iterable[str]) -> list[Point]:
    """Points in the given order, FLASH_ATTN first (added when missing: every delta needs it)."""
    pts: list[Point] = []
    for n in names:
        p = Point.parse(n)
        if p not in pts:
            pts.append(p)
    dense = Point(None)
    return [dense] + [p for p in pts if p != dense]


def preset_marks(point: Point) -> list[str]:
    """Names of the PrismConfig presets whose effective selection this point is, the default
    preset marked '(default)': the plot and the tables label these points."""
    if point.rule is None:
        return []
    cfg = PrismConfig.from_dict({"min_context_len": 0, **(point.prism_knobs() or {})})
    out = []
    for name in PRESETS:
        ref = PrismConfig(preset=name)
        if all(getattr(cfg, f) == getattr(ref, f)
               for f in ("rule", "high_threshold", "low_threshold", "block_budget", "local_blocks")):
            out.append(name + (" (default)" if name == DEFAULT_PRESET else ""))
    return out


def spaced_windows(ids: Sequence[int], length: int, count: int) -> list[tuple[int, list[int]]]:
    """``count`` documents of ``length`` tokens spread evenly over the corpus: (start, ids).
    (benchmarks.quality_cpu.spaced_windows, without its torch import.)"""
    n = len(ids)
    if n < length * count:
        raise ValueError(f"corpus has {n} tokens, {count} documents of {length} need {length * count}")
    step = (n - length) // max(1, count - 1) if count > 1 else 0
    return [(w * step, list(ids[w * step: w * step + length])) for w in range(count)]


def window_nll(logprobs: Sequence[float]) -> dict[str, float]:
    """Mean negative log-likelihood of a document and of its last quarter (the positions that
    attend over the longest context), as :func:`benchmarks.prompts.ppl_summary` splits them."""
    q = len(logprobs) - len(logprobs) // 4
    return {"tokens": len(logprobs), "nll": -sum(logprobs) / len(logprobs),
            "nll_last_quarter": -sum(logprobs[q:]) / (len(logprobs) - q)}


# -- derived numbers ------------------------------------------------------------------------------
def _pct(x: float, ref: float) -> float:
    return 100.0 * (x / ref - 1.0)


def _spread(xs: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else None}


def _ppl_summary(wins: list[dict[str, Any]], dense: list[dict[str, Any]]) -> dict[str, Any]:
    """One (point, length, corpus): perplexity over its documents and against FLASH_ATTN's on
    the same documents (matched by start and token count)."""
    ppls = [math.exp(w["nll"]) for w in wins]
    tok = sum(w["tokens"] for w in wins)
    pooled = math.exp(sum(w["nll"] * w["tokens"] for w in wins) / tok)
    pooled_q = math.exp(sum(w["nll_last_quarter"] * w["tokens"] for w in wins) / tok)
    sp = _spread(ppls)
    out: dict[str, Any] = {"documents": len(wins), "tokens": tok, "ppl": pooled, "ppl_last_quarter": pooled_q,
                           "ppl_mean": sp["mean"], "ppl_std": sp["std"], "ppl_min": sp["min"], "ppl_max": sp["max"],
                           "ppl_per_document": ppls}
    ref = {(w["start"], w["tokens"]): w for w in dense}
    pairs = [(w, ref[(w["start"], w["tokens"])]) for w in wins if (w["start"], w["tokens"]) in ref]
    if pairs:
        t = sum(w["tokens"] for w, _ in pairs)
        d_pool = math.exp(sum(d["nll"] * d["tokens"] for _, d in pairs) / t)
        p_pool = math.exp(sum(w["nll"] * w["tokens"] for w, _ in pairs) / t)
        dq = math.exp(sum(d["nll_last_quarter"] * d["tokens"] for _, d in pairs) / t)
        pq = math.exp(sum(w["nll_last_quarter"] * w["tokens"] for w, _ in pairs) / t)
        per = [_pct(math.exp(w["nll"]), math.exp(d["nll"])) for w, d in pairs]
        s = _spread(per)
        out.update({"dense_ppl": d_pool, "delta_pct": _pct(p_pool, d_pool), "delta_last_quarter_pct": _pct(pq, dq),
                    "delta_pct_mean": s["mean"], "delta_pct_min": s["min"], "delta_pct_max": s["max"],
                    "delta_pct_std": s["std"], "delta_pct_per_document": per, "documents_vs_dense": len(pairs)})
    return out


def derive(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """``doc["rows"]``: one row per measured (point, length), FLASH_ATTN's included, from
    ``doc["measured"]``: perplexity per corpus (mean and spread over documents, Δ against
    FLASH_ATTN), density, passkeys per depth and total (and FLASH_ATTN's), TTFT and its ratio to
    FLASH_ATTN's."""
    points = {p["name"]: p for p in doc.get("points", [])}
    meas = {(m["point"], m["length"]): m for m in doc.get("measured", [])}
    rows = []
    order = {n: i for i, n in enumerate(points)}
    for (name, L), m in sorted(meas.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99))):
        dense = meas.get(("dense", L), {})
        pt = points.get(name) or Point.parse(name).describe()
        row: dict[str, Any] = {"point": name, "backend": pt["backend"], "rule": pt["rule"], "top_p": pt["top_p"],
                               "block_budget": pt["block_budget"], "presets": pt["presets"], "length": L,
                               "rope": m.get("rope"), "run": m.get("run"), "status": m.get("status"), "ppl": {}}
        sel = causal = 0
        for corpus in dict.fromkeys(w["corpus"] for w in m.get("windows", [])):
            wins = [w for w in m["windows"] if w["corpus"] == corpus]
            dwins = [w for w in dense.get("windows", []) if w["corpus"] == corpus]
            s = _ppl_summary(wins, dwins)
            st = (m.get("prism_stats") or {}).get(f"ppl:{corpus}")
            s["density"] = st.get("block_density") if st else None
            if st:
                s["prism_tokens"], s["flash_tokens"] = st.get("prism_tokens"), st.get("flash_tokens")
                sel += st.get("selected_blocks") or 0
                causal += st.get("causal_blocks") or 0
            row["ppl"][corpus] = s
        row["density"] = sel / causal if causal else None
        if m.get("passkeys"):
            row["passkey"] = _passkey_summary(m["passkeys"], dense.get("passkeys") or [])
            st = (m.get("prism_stats") or {}).get("passkey")
            row["passkey"]["density"] = st.get("block_density") if st else None
        if row["backend"] == "prism":
            unserved = [k for k, st in (m.get("prism_stats") or {}).items() if not (st or {}).get("prism_tokens")]
            if unserved or not m.get("prism_stats"):
                row["warning"] = ("Prism served no tokens in " + (", ".join(unserved) or "this job (no stats)")
                                  + ": those numbers measure FlashAttention")
        if m.get("ttft"):
            t = dict(m["ttft"])
            own = t.pop("run_dense_ms", None)  # FLASH_ATTN's TTFT in the run that measured m (merge_docs)
            d = dense.get("ttft") or {}
            t["dense_ms"] = own if own is not None else d.get("ttft_ms")
            t["ratio"] = t["ttft_ms"] / t["dense_ms"] if t["dense_ms"] else None
            t["same_run_as_dense"] = True if own is not None else (dense.get("run") == m.get("run") if d else None)
            row["ttft"] = t
        rows.append(row)
    return rows


def _passkey_summary(cases: list[dict[str, Any]], dense: list[dict[str, Any]]) -> dict[str, Any]:
    dmap = {c["id"]: c["correct"] for c in dense}
    per: dict[tuple[str, float], list[int]] = {}
    for c in cases:
        a = per.setdefault((c["kind"], c["depth"]), [0, 0, 0, 0])  # correct, total, dense correct, dense total
        a[0] += int(c["correct"])
        a[1] += 1
        if c["id"] in dmap:
            a[2] += int(dmap[c["id"]])
            a[3] += 1
    rows = [{"kind": k, "depth": d, "correct": a[0], "total": a[1], "dense_correct": a[2] if a[3] else None}
            for (k, d), a in sorted(per.items())]
    tot = {"correct": sum(r["correct"] for r in rows), "total": sum(r["total"] for r in rows)}
    dn = [r for r in rows if r["dense_correct"] is not None]
    tot["dense_correct"] = sum(r["dense_correct"] for r in dn) if dn else None
    tot["delta"] = tot["correct"] - tot["dense_correct"] if dn else None
    by_kind = {}
    for k in dict.fromkeys(r["kind"] for r in rows):
        rk = [r for r in rows if r["kind"] == k]
        by_kind[k] = {"correct": sum(r["correct"] for r in rk), "total": sum(r["total"] for r in rk),
                      "dense_correct": sum(r["dense_correct"] for r in rk) if all(r["dense_correct"] is not None for r in rk) else None}
    return {**tot, "per_kind": by_kind, "per_depth": rows}


# -- merging runs ----------------------------------------------------------------------------------
def merge_docs(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One quality document from several runs (e.g. one device call per length): measurements
    of a (point, length) in a later document replace an earlier one's (a run records none for a
    job it skipped or that failed before its first task); each keeps the run it came from
    (``runs``: date, commit, GPU, command of every contributing run)."""
    if not docs:
        raise ValueError("nothing to merge")
    kv = {d.get("settings", {}).get("kv_cache_dtype", "auto") for d in docs}
    if len(kv) > 1:
        raise ValueError(f"the runs used different KV cache dtypes ({', '.join(sorted(kv))}): merge each kind apart")
    out = {k: v for k, v in docs[-1].items() if k not in ("measured", "rows", "runs", "jobs", "points")}
    runs: list[dict[str, Any]] = []
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    points: dict[str, dict[str, Any]] = {}
    jobs: list[dict[str, Any]] = []
    corpora: dict[str, Any] = {}
    for d in docs:
        remap = {}
        for i, r in enumerate(d.get("runs", [])):
            remap[i] = len(runs)
            runs.append(r)
        for p in d.get("points", []):  # preset marks as the presets are now
            points.setdefault(p["name"], dict(p, presets=preset_marks(Point.parse(p["name"]))))
        dense_ttft = {m["length"]: (m.get("ttft") or {}).get("ttft_ms") for m in d.get("measured", [])
                      if m["point"] == "dense"}
        for m in d.get("measured", []):
            mm = dict(m, run=remap.get(m.get("run"), m.get("run")))
            if m.get("ttft") and m["point"] != "dense" and dense_ttft.get(m["length"]):
                # a TTFT ratio stays within its run, whichever run's FLASH_ATTN row the merge keeps
                mm["ttft"] = {"run_dense_ms": dense_ttft[m["length"]], **m["ttft"]}
            measured[(m["point"], m["length"])] = mm
        jobs += d.get("jobs", [])
        for c, info in d.get("settings", {}).get("corpora", {}).items():
            corpora.setdefault(c, {}).update({k: v for k, v in info.items() if k != "documents"})
            corpora[c].setdefault("documents", {}).update(info.get("documents", {}))
    out["runs"], out["points"], out["jobs"] = runs, list(points.values()), jobs
    out["measured"] = list(measured.values())
    settings = dict(out.get("settings", {}))
    settings["corpora"] = corpora
    settings["lengths"] = sorted({m["length"] for m in out["measured"]})
    out["settings"] = settings
    last = runs[-1] if runs else {}
    for k in ("gpu", "date", "commit", "command"):
        vals = list(dict.fromkeys(str(r.get(k)) for r in runs))
        out[k] = last.get(k) if len(vals) <= 1 else " | ".join(vals)
    out["dry_run"] = any(r.get("dry_run") for r in runs)
    out["rows"] = derive(out)
    return out
