"""Attention block maps of a Hugging Face model next to Prism's block selection: the analysis
behind ``prism-vllm inspect`` (whose command line and drawing live in
:mod:`prism_vllm.server.inspect_attention`), also used by the recall benchmark.

Runs a causal LM (transformers) on one sequence and, for every layer, compares two block
selections against the model's *true* attention:

- **Prism** (:func:`prism_vllm.reference.select_blocks`): two RoPE bands, energy calibration,
  top-p per band, union, sink and diagonal kept;
- **mean-pool only**: the same top-p threshold on one band holding all dims, no calibration
  (what plain mean-pooled block estimation does).

The true attention of each head is summarised as the share of attention mass that falls in each
128x128 block (rows of a query block averaged). *Density* is the share of causal blocks selected;
*recall* the share of attention mass inside the selected blocks.

Post-RoPE queries and keys are captured through transformers' attention-function registry
(the tensors the model's own attention receives), and the rotary layout (NeoX or GPT-J pairs,
rotary dim, frequencies) is read off the model's own ``apply_rotary_pos_emb`` and
``rotary_emb``, so nothing is assumed from the model's name.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from prism_vllm.config import PrismConfig
from prism_vllm.reference import pool_blocks, select_blocks
from prism_vllm.rope import Bands, RopeLayout, prism_bands

__all__ = [
    "ATTN_IMPL",
    "HeadMaps",
    "LayerResult",
    "InspectResult",
    "all_dims_bands",
    "attention_modules",
    "block_attention_mass",
    "analyze_layer",
    "load_model",
    "probe_rope_layout",
    "register_capture",
    "run_inspect",
]

logger = logging.getLogger(__name__)

#: Name of the capturing attention implementation registered with transformers.
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
    attn = attention_modules(model)[0][1]
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


def attention_modules(model: Any) -> list[tuple[int, Any]]:
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


def register_capture(sink: dict[int, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
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
    bands = prism_bands(layout, cfg, inv_freq=inv_freq)
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
    register_capture(sink)
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

    register_capture({})
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPL)
    return tok, model.to(device).eval()
