#!/usr/bin/env python
"""Plot benchmarks/bench_kernels.py's JSON: speedup over FA3 dense by density for each length, the
estimation times, and the break-even rows. Writes a PNG next to the JSON (or to --png).

    python benchmarks/plot_kernels.py benchmarks/results/kernels-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional


def _label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def plot(json_path: Path, png: Optional[Path] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res: dict[str, Any] = json.loads(Path(json_path).read_text())
    png = Path(png) if png else Path(json_path).with_suffix(".png")
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # 1. sparse: time relative to FA3 dense (or absolute ms when FA3 is missing)
    ax = axes[0]
    sparse = res.get("sparse", [])
    lengths = sorted({r["tokens"] for r in sparse})
    have_fa3 = any(r.get("fa3_ms") for r in sparse)
    for i, L in enumerate(lengths):
        rows = sorted((r for r in sparse if r["tokens"] == L), key=lambda r: r["density"])
        x = [r["density"] for r in rows]
        for key, style, name in (("prism_ms", "-o", "prism-vllm"), ("official_ms", "--s", "official"),
                                 ("official_paged_ms", ":^", "official paged")):
            pts = [(xx, r) for xx, r in zip(x, rows) if r.get(key)]
            if not pts:
                continue
            if have_fa3:
                y = [r["fa3_ms"] / r[key] for _, r in pts]
            else:
                y = [r[key] for _, r in pts]
            ax.plot([p[0] for p in pts], y, style, color=colors[i % len(colors)], label=f"{name} {_label(L)}")
    if have_fa3:
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_ylabel("speedup over FA3 dense (x)")
    else:
        ax.set_ylabel("time (ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("block density (selected / causal blocks)")
    ax.set_title("block-sparse attention")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    # 2. estimation time per length
    ax = axes[1]
    est = res.get("estimation", [])
    xs = list(range(len(est)))
    w = 0.38
    ours = [r.get("prism_ms") or 0 for r in est]
    off = [r.get("official_ms") or 0 for r in est]
    b1 = ax.bar([x - w / 2 for x in xs], ours, w, label="prism-vllm", color=colors[0])
    b2 = ax.bar([x + w / 2 for x in xs], off, w, label="official", color=colors[1])
    for bars, key in ((b1, "extra_mem_mb"), (b2, "official_extra_mem_mb")):
        for bar, r in zip(bars, est):
            if r.get(key) is not None:
                ax.annotate(f"{r[key]:.0f} MB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [_label(r["tokens"]) for r in est])
    ax.set_ylabel("time (ms)")
    ax.set_title("estimation (pool + score + select), extra GPU memory on bars")
    ax.legend(fontsize=8)

    # 3. break-even: estimation + sparse vs FA3
    ax = axes[2]
    be = res.get("break_even", [])
    modes = sorted({r["mode"] for r in be})
    be_len = sorted({r["tokens"] for r in be})
    for i, m in enumerate(modes):
        rows = sorted((r for r in be if r["mode"] == m), key=lambda r: r["tokens"])
        dens = ", ".join(f"{r['density']:.2f}" for r in rows)
        ax.plot([r["tokens"] for r in rows], [r["total_ms"] for r in rows], "-o", color=colors[i % len(colors)],
                label=f"{m} (density {dens})")
    fa3 = sorted({(r["tokens"], r["fa3_ms"]) for r in be if r.get("fa3_ms")})
    if fa3:
        ax.plot([t for t, _ in fa3], [f for _, f in fa3], "-k", lw=2, label="FA3 dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(be_len, [_label(t) for t in be_len])
    ax.set_xlabel("tokens")
    ax.set_ylabel("time (ms)")
    ax.set_title("estimation + sparse attention vs FA3 dense")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    fig.suptitle(f"{res.get('gpu', '?')} | {res.get('date', '?')} | commit {str(res.get('commit', '?'))[:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, nargs="?",
                    default=Path(__file__).resolve().parent / "results" / "kernels-h200.json")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    print(plot(args.json, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
