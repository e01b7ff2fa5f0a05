"""``prism-vllm inspect``: what Prism selects, drawn over the attention it approximates.

The command line and the drawing; the analysis (capture of post-RoPE q/k, true block attention
mass, Prism's and the mean-pool-only selection, density and recall) is the library module
:mod:`prism_vllm.attention_maps`.

Writes into ``--out``:

- ``layer_XX.png`` per ``--layers`` entry: one map per head (log colour scale), Prism's selection
  outlined on the left, mean-pool only on the right;
- ``density_recall.png``: density and recall per layer, both methods, averaged over heads;
- ``summary.json``: the numbers behind both.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from prism_vllm.attention_maps import InspectResult, LayerResult, attention_modules, load_model, run_inspect
from prism_vllm.config import PrismConfig

from .flags import UsageError, check_model_folder, flag_note, parse_prism_value, prism_flag_names

__all__ = ["build_parser", "default_layers", "draw_chart", "draw_layer", "main"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# drawing (matplotlib)
# --------------------------------------------------------------------------------------------
def _outline_segments(sel: torch.Tensor) -> list[list[tuple[float, float]]]:
    """Line segments along the border of the True cells of a bool [n, n] grid (imshow coords)."""
    s = torch.nn.functional.pad(sel.to(torch.int8), (1, 1, 1, 1))
    segs = []
    # Vertical borders: cells (i, j-1) and (i, j) differ -> x = j - 0.5 from y = i-0.5 to i+0.5.
    dv = (s[1:-1, 1:] != s[1:-1, :-1]).nonzero().tolist()
    segs += [[(j - 0.5, i - 0.5), (j - 0.5, i + 0.5)] for i, j in dv]
    dh = (s[1:, 1:-1] != s[:-1, 1:-1]).nonzero().tolist()
    segs += [[(j - 0.5, i - 0.5), (j + 0.5, i - 0.5)] for i, j in dh]
    return segs


def draw_layer(lr: LayerResult, out: Path, title: str, threshold: float) -> Path:
    """One PNG: per head, the block map with Prism's selection (left) and mean-pool's (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    assert lr.maps is not None
    H = len(lr.heads)
    per_row = max(1, min(H, math.ceil(math.sqrt(H))))
    rows = math.ceil(H / per_row)
    fig, axes = plt.subplots(
        rows, 2 * per_row, figsize=(2.2 * 2 * per_row + 1.0, 2.4 * rows + 1.0), squeeze=False, layout="constrained"
    )
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#dddddd")  # grey: above the diagonal
    nb = lr.maps.mass.shape[1]
    upper = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    im = None
    for ax in axes.flat:
        ax.axis("off")
    for idx, h in enumerate(lr.heads):
        r, c = divmod(idx, per_row)
        m = lr.maps.mass[idx].clamp_min(1e-6).masked_fill(upper, float("nan")).numpy()
        for side, (sel, label, dens, rec, color) in enumerate(
            (
                (lr.maps.prism[idx], "Prism", lr.prism_density[idx], lr.prism_recall[idx], "#00e5ff"),
                (lr.maps.meanpool[idx], "mean-pool", lr.meanpool_density[idx], lr.meanpool_recall[idx], "#7CFC00"),
            )
        ):
            ax = axes[r, 2 * c + side]
            ax.axis("on")
            im = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest")
            ax.add_collection(LineCollection(_outline_segments(sel), colors=color, linewidths=0.9))
            ax.set_xlim(-0.5, nb - 0.5)
            ax.set_ylim(nb - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"h{h} {label}\ndensity {dens:.0%}  recall {rec:.1%}", fontsize=8, color=color if side == 0 else "#2e7d32")
    fig.suptitle(
        f"{title}\nlayer {lr.layer}: true attention mass per 128x128 block (log scale; rows = query blocks, "
        f"columns = key blocks)\noutlined = selected blocks at top-p {threshold:g}: Prism (left, cyan) vs "
        f"mean-pool only (right, green)",
        fontsize=9,
    )
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.7, pad=0.01)
        cb.set_label("attention mass in block (mean over the block's rows)", fontsize=8)
    path = out / f"layer_{lr.layer:02d}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_chart(res: InspectResult, out: Path, title: str) -> Path:
    """density_recall.png: per-layer density and recall, both methods, mean over heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [lr.layer for lr in res.layers]
    s = [lr.summary() for lr in res.layers]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label, color in (("prism", "Prism", "#0097a7"), ("meanpool", "mean-pool only", "#558b2f")):
        dens = [x[f"{key}_density_mean"] for x in s]
        rec = [x[f"{key}_recall_mean"] for x in s]
        a1.plot(layers, dens, "o-", ms=3, color=color, label=f"{label} (mean {sum(dens) / len(dens):.0%})")
        a2.plot(layers, rec, "o-", ms=3, color=color, label=f"{label} (mean {sum(rec) / len(rec):.1%})")
    a1.set_title("density: share of causal blocks computed (lower = faster)", fontsize=9)
    a2.set_title("recall: share of true attention mass kept (higher = closer to dense)", fontsize=9)
    a1.set_ylim(0, 1)
    a2.set_ylim(min(0.5, min(min(x["prism_recall_mean"], x["meanpool_recall_mean"]) for x in s) - 0.02), 1.0)
    for a in (a1, a2):
        a.set_xlabel("layer")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "density_recall.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _int_list(spec: str, n: int, what: str) -> list[int]:
    """'all' | '3' | '-1' (from the end) | '0,5,7' | '2-6' (inclusive) -> sorted unique ints in [0, n)."""
    if spec.strip() == "all":
        return list(range(n))
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        rng = re.fullmatch(r"(\d+)-(\d+)", part)
        if rng:
            out.update(range(int(rng.group(1)), int(rng.group(2)) + 1))
        elif re.fullmatch(r"-?\d+", part):
            i = int(part)
            out.add(i + n if i < 0 else i)
        else:
            raise ValueError(f"--{what} {spec!r}: use 'all', a number, a list '0,5,7' or a range '2-6'")
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad:
        raise ValueError(f"--{what} {spec!r}: {bad} out of range; the model has {n} {what} (0..{n - 1})")
    return sorted(out)


def default_layers(n: int) -> list[int]:
    """Four layers spread over the depth (first quarter to last)."""
    return sorted({max(0, n // 4), n // 2, (3 * n) // 4, n - 1})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prism-vllm inspect",
        description="Draw the true attention block maps of a model on a long text with Prism's "
        "block selection over them (the paper's two-band rule unless --prism-rule says otherwise, and a "
        "mean-pool-only selection beside it), plus a per-layer chart of density and recall. Example: prism-vllm inspect /usr/share/common-licenses/GPL-3",
    )
    p.add_argument("text_file", help="a long plain-text file (UTF-8)")
    p.add_argument("--model", default=None, help="HF model folder or name (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--layers", default=None, help="layers to draw: 'all', '0,5,7', '2-6' (default: four spread over the depth)")
    p.add_argument("--heads", default="all", help="q heads per drawn layer: 'all', '0,3', '0-4' (default: all)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text to use (default: 4096)")
    p.add_argument("--out", default="prism-inspect", help="output folder (default: ./prism-inspect)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    docs = PrismConfig.field_docs(summary=True)
    for flag, name in _selection_flags().items():
        note = INSPECT_NOTES.get(name) or flag_note(name)
        p.add_argument(flag, dest=f"prism_{name}", default=None, metavar="VALUE",
                       help=(docs[name] + (f" {note}" if note else "")).replace("%", "%%"))  # argparse formats help
    return p


#: PrismConfig fields that decide only when and how the server runs Prism, not what it selects:
#: no ``--prism-`` flag of inspect.
SERVING_ONLY = ("min_context_len", "attend_layout", "min_query_len")
#: Where inspect reads a flag otherwise than the server.
INSPECT_NOTES = {"rule": "Here: the left panel's rule, 'paper' unless given; the right panel is always 'meanpool'."}


def _selection_flags() -> dict[str, str]:
    """``--prism-<field>`` -> field, for the fields that shape the selection inspect draws."""
    return {flag: name for flag, name in prism_flag_names().items() if name not in SERVING_ONLY}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``prism-vllm inspect`` entry point."""
    args = build_parser().parse_args(argv)
    prism: dict[str, Any] = {}
    for flag, name in _selection_flags().items():
        raw = getattr(args, f"prism_{name}")
        if raw is not None:
            prism[name] = parse_prism_value(flag, name, raw)
    # the left panel is the paper's two-band rule unless --prism-rule names another: the right one
    # is always plain mean-pooling, the 'quality' preset's rule
    prism.setdefault("rule", "paper")
    try:
        cfg = PrismConfig(**prism)
    except ValueError as e:
        raise UsageError(str(e)) from None
    text_path = Path(args.text_file)
    if not text_path.is_file():
        raise UsageError(f"text file {text_path} does not exist")
    if args.tokens < 2 * cfg.block_size:
        raise UsageError(f"--tokens {args.tokens} is too short: use at least {2 * cfg.block_size} (two blocks)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = args.model
    if model_path is not None:
        check_model_folder(model_path)
    else:
        from prism_vllm.bundled import ensure_bundled_model

        try:
            model_path = str(ensure_bundled_model())
        except (FileNotFoundError, ImportError) as e:
            raise UsageError(f"no --model given and the bundled model is unavailable: {e}") from None
    try:
        tok, model = load_model(model_path, device)
    except OSError as e:  # transformers: not a model folder, unknown hub id, offline
        raise UsageError(f"could not load --model {model_path}: {' '.join(str(e).split())}") from None
    ids = tok(text_path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids
    if ids.shape[1] < args.tokens:
        logger.warning("--tokens %d: %s has only %d tokens; using all %d", args.tokens, text_path, ids.shape[1], ids.shape[1])
    ids = ids[:, : args.tokens]
    if ids.shape[1] < 2 * cfg.block_size:
        raise UsageError(f"{text_path} has only {ids.shape[1]} tokens; Prism needs at least two 128-token blocks")
    n_layers = len(attention_modules(model))
    n_heads = model.config.num_attention_heads
    try:
        layers = default_layers(n_layers) if args.layers is None else _int_list(args.layers, n_layers, "layers")
        heads = _int_list(args.heads, n_heads, "heads")
    except ValueError as e:
        raise UsageError(str(e)) from None
    name = Path(model_path).name if Path(model_path).exists() else model_path
    logger.info("inspect: %s on %d tokens of %s (%s), drawing layers %s", name, ids.shape[1], text_path.name, device, layers)
    res = run_inspect(model, ids, cfg, layers, heads=heads, name=name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{name} on {res.tokens} tokens of {text_path.name}"
    for lr in res.layers:
        if lr.maps is not None:
            res.files.append(str(draw_layer(lr, out, title, cfg.high_threshold)))
    res.files.append(str(draw_chart(res, out, title)))
    summary = res.summary()
    summary["text_file"] = str(text_path)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    res.files.append(str(out / "summary.json"))
    mean = lambda key: sum(x.summary()[key] for x in res.layers) / len(res.layers)  # noqa: E731
    print(
        f"{name}, {res.tokens} tokens, {len(res.layers)} layers ({res.seconds:.0f} s): "
        f"Prism density {mean('prism_density_mean'):.0%} recall {mean('prism_recall_mean'):.1%} | "
        f"mean-pool only density {mean('meanpool_density_mean'):.0%} recall {mean('meanpool_recall_mean'):.1%}"
    )
    for f in res.files:
        print(f"wrote {f}")
    return 0
