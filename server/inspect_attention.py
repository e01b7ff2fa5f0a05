"""``prism-vllm inspect``: what Prism selects, drawn over the attention it approximates.

Runs a Hugging Face causal LM (transformers; CPU by default, CUDA when present) on one long
text and, for every layer, compares two block selections against the model's *true* attention:

- **Prism** (:func:`prism_vllm.reference.select_blocks`): two RoPE bands, energy calibration,
  top-p per band, union, sink and diagonal kept;
- **mean-pool only**: the same top-p threshold on one band holding all dims, no calibration
  (what plain mean-pooled block estimation does).

The true attention of each head is summarised as the share of attention mass that falls in each
128x128 block (rows of a query block averaged). *Density* is the share of causal blocks selected;
*recall* the share of attention mass inside the selected blocks.

Writes into ``--out``:

- ``layer_XX.png`` per ``--layers`` entry: one map per head (log colour scale), Prism's selection
  outlined on the left, mean-pool only on the right;
- ``density_recall.png``: density and recall per layer, both methods, averaged over heads;
- ``summary.json``: the numbers behind both.

Post-RoPE queries and keys are captured through transformers' attention-function registry
(the tensors the model's own attention receives), and the rotary layout (NeoX or GPT-J pairs,
rotary dim, frequencies) is read off the model's own ``apply_rotary_pos_emb`` and
``rotary_emb``, so nothing is assumed from the model's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from prism_vllm.config import PrismConfig
from prism_vllm.reference import pool_blocks, select_blocks
from prism_vllm.rope import Bands, RopeLayout, rope_bands

__all__ = [
    "HeadMaps",
    "LayerResult",
    "InspectResult",
    "block_attention_mass",
    "analyze_layer",
    "probe_rope_layout",
    "run_inspect",
    "main",
]

logger = logging.getLogger(__name__)

ATTN_IMPL = "prism_inspect"
#: Query rows per attention chunk (bounds memory at long lengths: rows x keys floats).
_ROW_CHUNK = 1024


# --------------------------------------------------------------------------------------------
# analysis (pure torch)
# --------------------------------------------------------------------------------------------
def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    block: int,
    heads: Optional[Sequence[int]] = None,
    row_chunk: int = _ROW_CHUNK,
) -> torch.Tensor:
    """True causal attention mass per (query block, key block), per head.

    Args:
        q: [S, HQ, D] post-RoPE queries at positions 0..S-1; k: [S, HKV, D] post-RoPE keys.
        scale: softmax scale of the model's attention.
        block: block size B.
        heads: q heads to compute (default all).
        row_chunk: query rows per step (rounded to whole blocks): memory H * row_chunk * S floats.
    Returns:
        [H, nb, nb] float32, nb = ceil(S / B): entry (h, i, j) is the attention probability of
        head h's rows in query block i that lands in key block j, averaged over those rows
        (each row of the map sums to 1).
    """
    S, hq, _ = q.shape
    g = hq // k.shape[1]
    heads = list(range(hq)) if heads is None else list(heads)
    idx = torch.tensor(heads, device=q.device)
    qh = q[:, idx].float().transpose(0, 1)  # [H, S, D]
    kh = k[:, idx // g].float().transpose(0, 1)  # [H, S, D]: each q head's kv head
    nb = -(-S // block)
    out = torch.zeros(len(heads), nb, nb, dtype=torch.float32, device=q.device)
    step = max(block, row_chunk // block * block)  # row chunks start on block boundaries
    for r0 in range(0, S, step):
        r1 = min(S, r0 + step)
        s = (qh[:, r0:r1] @ kh[:, :r1].transpose(1, 2)) * scale  # [H, rows, r1]
        causal = torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        nqb, nkb = -(-(r1 - r0) // block), -(-r1 // block)
        p = torch.nn.functional.pad(p, (0, nkb * block - r1, 0, nqb * block - (r1 - r0)))
        p = p.view(len(heads), nqb, block, nkb, block).sum(dim=(2, 4))
        out[:, r0 // block : r0 // block + nqb, :nkb] = p
    rows_per_block = torch.bincount(torch.arange(S, device=q.device) // block, minlength=nb).float()
    return out / rows_per_block.view(1, -1, 1)


@dataclass
class HeadMaps:
    """Per-head maps of one layer (kept only for the layers drawn)."""

    mass: torch.Tensor  # [H, nb, nb] float32, see block_attention_mass
    prism: torch.Tensor  # [H, nb, nb] bool
    meanpool: torch.Tensor  # [H, nb, nb] bool


@dataclass
class LayerResult:
    layer: int
    heads: list[int]
    prism_density: list[float]
    prism_recall: list[float]
    meanpool_density: list[float]
    meanpool_recall: list[float]
    maps: Optional[HeadMaps] = None

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "maps"}
        for name in ("prism_density", "prism_recall", "meanpool_density", "meanpool_recall"):
            vals = getattr(self, name)
            d[f"{name}_mean"] = sum(vals) / len(vals)
        return d


def all_dims_bands(head_size: int) -> Bands:
    """One band of every dim, twice: the mean-pool-only baseline's 'bands'."""
    m = torch.ones(head_size, dtype=torch.bool)
    return Bands(high=m, low=m.clone())


def analyze_layer(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bands: Bands,
    cfg: PrismConfig,
    heads: Optional[Sequence[int]] = None,
    keep_maps: bool = False,
) -> LayerResult:
    """Density and recall of Prism's and the mean-pool-only selection for one layer.

    q: [S, HQ, D], k: [S, HKV, D] post-RoPE, one sequence from position 0.
    The mean-pool-only selection uses ``cfg`` with both thresholds set to ``cfg.high_threshold``
    applied to one band of all dims, calibration off (sink and diagonal as in ``cfg``).
    """
    heads = list(range(q.shape[1])) if heads is None else list(heads)
    B = cfg.block_size
    mass = block_attention_mass(q, k, scale, B, heads)
    qp = pool_blocks(q, 0, B)
    kp = pool_blocks(k, 0, B)
    sel_prism = select_blocks(qp, kp, 0, bands, cfg)[heads]
    base_cfg = dataclasses.replace(cfg, calibrate=False, low_threshold=cfg.high_threshold)
    sel_mean = select_blocks(qp, kp, 0, all_dims_bands(q.shape[2]), base_cfg)[heads]
    nb = mass.shape[1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    n_causal = float(causal.sum())
    # Recall weights query blocks by their rows, so it is the share of all rows' attention.
    rows = torch.bincount(torch.arange(q.shape[0], device=q.device) // B, minlength=nb).float().view(1, -1, 1)
    tot = (mass * rows).sum(dim=(1, 2))

    def stats(sel: torch.Tensor) -> tuple[list[float], list[float]]:
        dens = (sel & causal).sum(dim=(1, 2)).float() / n_causal
        rec = (mass * rows * sel).sum(dim=(1, 2)) / tot
        return dens.tolist(), rec.tolist()

    pd, pr = stats(sel_prism)
    md, mr = stats(sel_mean)
    maps = HeadMaps(mass.cpu(), sel_prism.cpu(), sel_mean.cpu()) if keep_maps else None
    return LayerResult(layer, heads, pd, pr, md, mr, maps)


# --------------------------------------------------------------------------------------------
# model side (transformers)
# --------------------------------------------------------------------------------------------
def probe_rope_layout(model: Any) -> tuple[RopeLayout, torch.Tensor]:
    """The model's rotary layout and per-pair frequencies, read off its own code.

    Feeds unit vectors through the modeling module's ``apply_rotary_pos_emb`` at position 1:
    dim i rotates into its pair partner, so the partner of dim 0 tells NeoX (r/2) from GPT-J (1),
    unmoved dims are unrotated, and the rotation angle is the pair's frequency.

    Returns:
        (layout, inv_freq [r/2] float64 in pair order).
    Raises:
        NotImplementedError: the model has no recognisable rotary embedding.
    """
    attn = _attention_modules(model)[0][1]
    modeling = sys.modules[type(attn).__module__]
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None) or getattr(model, "rotary_emb", None)
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if apply is None or rotary is None:
        raise NotImplementedError(
            f"prism-vllm inspect: {type(model).__name__} has no apply_rotary_pos_emb/rotary_emb in "
            f"{modeling.__name__}; only RoPE models are supported (Prism's bands are RoPE bands)."
        )
    dev = next(model.parameters()).device
    x = torch.zeros(1, 1, head, device=dev, dtype=torch.float32)
    cos, sin = rotary(x, torch.tensor([[1]], device=dev))
    eye = torch.eye(head, dtype=torch.float32, device=dev).view(1, head, 1, head)
    out, _ = apply(eye, eye, cos.float(), sin.float())
    out = out.view(head, head).double().cpu()
    off = out - torch.diag(torch.diagonal(out))
    moved = off.abs().max(dim=1)
    rotated = moved.values > 1e-6
    r = int(rotated.sum())
    if r == 0 or r % 2:
        raise NotImplementedError(f"prism-vllm inspect: could not read the rotary layout (rotated dims: {r})")
    partner0 = int(moved.indices[0])
    neox = partner0 == r // 2
    if not neox and partner0 != 1:
        raise NotImplementedError(f"prism-vllm inspect: unrecognised rotary pairing (dim 0 pairs with {partner0})")
    layout = RopeLayout(head_size=head, rotary_dim=r, is_neox_style=neox)
    pairs = layout.pairs()
    a, b = pairs[:, 0], pairs[:, 1]
    inv_freq = torch.atan2(out[a, b].abs(), out[a, a])
    return layout, inv_freq


def _attention_modules(model: Any) -> list[tuple[int, Any]]:
    """(layer index, attention module) of every decoder layer, in order."""
    mods = [
        (int(m.layer_idx), m)
        for m in model.modules()
        if hasattr(m, "q_proj") and hasattr(m, "k_proj") and getattr(m, "layer_idx", None) is not None
    ]
    if not mods:
        raise NotImplementedError(
            f"prism-vllm inspect: found no attention layers with q_proj/k_proj in {type(model).__name__}"
        )
    return sorted(mods, key=lambda t: t[0])


@dataclass
class InspectResult:
    model: str
    tokens: int
    layers: list[LayerResult]
    drawn_layers: list[int]
    config: dict[str, Any]
    rope: dict[str, Any]
    seconds: float
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tokens": self.tokens,
            "config": self.config,
            "rope": self.rope,
            "seconds": self.seconds,
            "drawn_layers": self.drawn_layers,
            "layers": [lr.summary() for lr in self.layers],
        }


def _register_capture(sink: dict[int, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Register the ``prism_inspect`` attention implementation: record post-RoPE q/k per layer,
    then run SDPA so the model's forward is unchanged."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # query: [b, HQ, S, D], key: [b, HKV, S, D], both post-RoPE (what attention consumes)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        sink[int(module.layer_idx)] = (query[0].transpose(0, 1), key[0].transpose(0, 1), float(scale))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(ATTN_IMPL, capture)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    except ImportError:  # older transformers: masks keyed by implementation did not exist
        pass


def run_inspect(
    model: Any,
    input_ids: torch.Tensor,
    cfg: PrismConfig,
    draw_layers: Sequence[int],
    heads: Optional[Sequence[int]] = None,
    name: str = "model",
) -> InspectResult:
    """Run ``model`` (already loaded with ``attn_implementation="prism_inspect"``, see
    :func:`load_model`) on ``input_ids`` [1, S] and analyse every layer.

    The layers are analysed one at a time as the forward reaches the next, so only one
    layer's q/k is held at once besides the maps of ``draw_layers``.
    """
    t0 = time.perf_counter()
    layout, inv_freq = probe_rope_layout(model)
    hi, lo = cfg.band_dims(layout.rotary_dim)
    bands = rope_bands(layout, hi, lo, inv_freq=inv_freq)
    device = next(model.parameters()).device
    bands = Bands(high=bands.high.to(device), low=bands.low.to(device))
    draw = set(draw_layers)
    results: list[LayerResult] = []

    class _Sink(dict):
        """Analyse each layer as soon as its q/k arrive (then drop them)."""

        def __setitem__(self, layer: int, v: tuple[torch.Tensor, torch.Tensor, float]) -> None:
            q, k, scale = v
            results.append(analyze_layer(layer, q, k, scale, bands, cfg, heads=heads, keep_maps=layer in draw))

    sink = _Sink()
    _register_capture(sink)
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: logits are not needed
    with torch.inference_mode():
        base(input_ids=input_ids.to(device), use_cache=False)
    results.sort(key=lambda r: r.layer)
    rope = {
        "head_size": layout.head_size,
        "rotary_dim": layout.rotary_dim,
        "is_neox_style": layout.is_neox_style,
        "high_band_dims": bands.high_dims,
        "low_band_dims": bands.low_dims,
    }
    return InspectResult(
        model=name,
        tokens=int(input_ids.shape[1]),
        layers=results,
        drawn_layers=sorted(draw),
        config=cfg.to_dict(),
        rope=rope,
        seconds=time.perf_counter() - t0,
    )


def load_model(path: str, device: str) -> tuple[Any, Any]:
    """(tokenizer, model) from a local folder or name, with the capture attention installed.
    float32 on CPU (bf16 matmuls are slow there), bf16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _register_capture({})
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPL)
    return tok, model.to(device).eval()


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
    from .cli import prism_flag_names

    p = argparse.ArgumentParser(
        prog="prism-vllm inspect",
        description="Draw the true attention block maps of a model on a long text with Prism's "
        "block selection over them (and a mean-pool-only selection beside it), plus a per-layer "
        "chart of density and recall. Example: prism-vllm inspect /usr/share/common-licenses/GPL-3",
    )
    p.add_argument("text_file", help="a long plain-text file (UTF-8)")
    p.add_argument("--model", default=None, help="HF model folder or name (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--layers", default=None, help="layers to draw: 'all', '0,5,7', '2-6' (default: four spread over the depth)")
    p.add_argument("--heads", default="all", help="q heads per drawn layer: 'all', '0,3', '0-4' (default: all)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text to use (default: 4096)")
    p.add_argument("--out", default="prism-inspect", help="output folder (default: ./prism-inspect)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    for flag, name in prism_flag_names().items():
        p.add_argument(flag, dest=f"prism_{name}", default=None, metavar="VALUE", help=f"PrismConfig.{name}")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``prism-vllm inspect`` entry point."""
    from .cli import UsageError, _parse_prism_value, prism_flag_names

    args = build_parser().parse_args(argv)
    prism: dict[str, Any] = {}
    for flag, name in prism_flag_names().items():
        raw = getattr(args, f"prism_{name}")
        if raw is not None:
            prism[name] = _parse_prism_value(flag, name, raw)
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
    if model_path is None:
        from .bundled import ensure_bundled_model

        try:
            model_path = str(ensure_bundled_model())
        except (FileNotFoundError, ImportError) as e:
            raise UsageError(f"no --model given and the bundled model is unavailable: {e}") from None
    tok, model = load_model(model_path, device)
    ids = tok(text_path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < 2 * cfg.block_size:
        raise UsageError(f"{text_path} has only {ids.shape[1]} tokens; Prism needs at least two 128-token blocks")
    n_layers = len(_attention_modules(model))
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
