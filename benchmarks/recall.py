"""Attention recall of block selections on a real model's post-RoPE queries and keys.

For one layer (one prefill of L tokens, q: [L, HQ, D], k: [L, HKV, D], G = HQ // HKV):

    M[h, i, j]   true attention mass that the rows of query block i (head h) put on key block j:
                 sum over rows r in block i of softmax_causal(scale * q_r k^T)[keys of block j]
    recall(sel)  sum(M * sel) / (HQ * L): the share of true attention mass inside the selected
                 blocks, averaged over heads and query rows (1.0 = nothing lost)
    density(sel) selected / causal (head, query block, key block) triples

Selections compared (all bool [HQ, nq, nk], causal):

    prism          prism_vllm.reference.select_blocks: two RoPE bands, calibration, top-p (the
                   paper's rule: callers pass ``study_config(cfg)`` and its bands)
    meanpool       the same top-p on one band of all head dims, no calibration (plain mean pooling)
    meanpool_topk  mean-pool scores, the k best blocks per row with k = Prism's count (equal density)
    oracle         the k blocks with the most true mass per row, k = Prism's count (upper bound)

The true mass is computed exactly in float32, ``chunk_rows`` query rows at a time, so memory stays
at HQ * chunk_rows * L floats. The model runs with a custom transformers attention function that
hands each layer's q/k to a callback and then computes ordinary causal SDPA attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from prism_vllm.config import PrismConfig
from prism_vllm.reference import band_logits, pool_blocks, select_blocks
from prism_vllm.rope import Bands, prism_bands
from prism_vllm.attention_maps import block_attention_mass, probe_rope_layout

__all__ = ["CAPTURE_NAME", "block_mass", "capture_qk", "layer_recall", "model_bands", "topk_rows"]

CAPTURE_NAME = "prism_bench_capture"
METHODS = ("prism", "meanpool", "meanpool_topk", "oracle")


def study_config(cfg: PrismConfig) -> PrismConfig:
    """The config the study's "prism" selection uses: ``cfg`` under the paper's rule, whatever
    rule ``cfg`` names (the 'quality' preset's is mean-pooling, which would compare mean-pooling
    with itself: the recall run at 9bdb1ed did). Thresholds and every other field stay."""
    return dataclasses.replace(cfg, rule="paper")


def block_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float, chunk_rows: int = 1024) -> torch.Tensor:
    """True attention mass per (head, query block, key block) of one causal prefill, summed over
    the rows of each query block (row i sums to the number of rows of block i).

    q: [L, HQ, D] at positions 0..L-1, k: [L, HKV, D]. The product's
    ``prism_vllm.attention_maps.block_attention_mass`` computes the per-row average;
    this only scales it back to sums, so recall weights every query row equally.
    """
    L, hq, _ = q.shape
    if k.shape[0] != L or hq % k.shape[1]:
        raise ValueError(f"expected k [L={L}, HKV | {hq}, D], got {tuple(k.shape)}")
    mean = block_attention_mass(q, k, scale, block, row_chunk=chunk_rows)
    rows = torch.bincount(torch.arange(L, device=q.device) // block, minlength=mean.shape[1]).float()
    return mean * rows.view(1, -1, 1)


def topk_rows(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``k[...]`` highest entries of each row of ``scores`` ([..., n]; k: [...])."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < k.unsqueeze(-1)


def layer_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    bands: Bands,
    cfg: PrismConfig,
    scale: float | None = None,
    chunk_rows: int = 1024,
) -> dict[str, Any]:
    """Recall and density of the four selections (module docstring) for one layer.

    q: [L, HQ, D], k: [L, HKV, D] post-RoPE. Returns {'<method>_recall', '<method>_density',
    'prism_recall_min_head'} as floats.
    """
    L, hq, d = q.shape
    B = cfg.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    M = block_mass(q, k, B, scale, chunk_rows)  # [HQ, nb, nb]
    nb = M.shape[1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    qp = pool_blocks(q, 0, B)
    kp = pool_blocks(k, 0, B)
    sel: dict[str, torch.Tensor] = {}
    sel["prism"] = select_blocks(qp, kp, 0, bands, cfg)
    alld = torch.ones(d, dtype=torch.bool)
    one_band = Bands(high=alld, low=alld)
    sel["meanpool"] = select_blocks(qp, kp, 0, one_band, dataclasses.replace(cfg, calibrate=False))
    kcount = sel["prism"].sum(-1)  # [HQ, nb]
    ones = torch.ones(nb, hq, dtype=torch.float32, device=q.device)
    mp_scores = band_logits(qp, kp, alld, ones, 0).clone()  # [HQ, nb, nb], -inf above the diagonal
    i = torch.arange(nb, device=q.device)
    if cfg.keep_sink:
        mp_scores[:, :, 0] = float("inf")
    if cfg.keep_diagonal:
        mp_scores[:, i, i] = float("inf")
    mp_scores = mp_scores.masked_fill(~causal, float("-inf"))
    sel["meanpool_topk"] = topk_rows(mp_scores, kcount) & causal
    sel["oracle"] = topk_rows(M.masked_fill(~causal, float("-inf")), kcount) & causal
    total_rows = float(hq * L)
    n_causal = float(hq * causal.sum())
    out: dict[str, Any] = {}
    for name in METHODS:
        s = sel[name]
        out[f"{name}_recall"] = float((M * s).sum()) / total_rows
        out[f"{name}_density"] = float(s.sum()) / n_causal
    per_head = (M * sel["prism"]).sum(dim=(1, 2)) / L
    out["prism_recall_min_head"] = float(per_head.min())
    return out


def model_bands(model: Any, cfg: PrismConfig) -> tuple[Bands, int]:
    """Prism's bands for a transformers model, from its own rotary code (NeoX or GPT-J pairing,
    partial rotary, YaRN-scaled frequencies: ``attention_maps.probe_rope_layout``).
    Returns (bands, head_dim)."""
    layout, inv_freq = probe_rope_layout(model)
    return prism_bands(layout, cfg, inv_freq), layout.head_size


def capture_qk(model: Any, input_ids: torch.Tensor,
               on_layer: Callable[[int, torch.Tensor, torch.Tensor, float], None], via: str = "auto") -> torch.Tensor:
    """Run ``model`` on one sequence (input_ids [L]) and call ``on_layer(layer, q, k, scale)``
    with each layer's post-RoPE q [L, HQ, D] and k [L, HKV, D] before its attention runs.
    Returns the logits of the last position ([vocab]).

    ``via``: 'implementation' switches the model to a registered custom attention function;
    'override' temporarily replaces the model's current one (e.g. 'sdpa') in transformers'
    registry; 'auto' tries the first and falls back to the second."""
    from transformers import AttentionInterface

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **_: Any):
        # query [1, HQ, L, D], key/value [1, HKV, L, D]: one unpadded sequence, so plain causal.
        sc = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        on_layer(int(module.layer_idx), query[0].transpose(0, 1), key[0].transpose(0, 1), sc)
        g = query.shape[1] // key.shape[1]
        kk = key.repeat_interleave(g, dim=1)
        vv = value.repeat_interleave(g, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(query, kk, vv, is_causal=True, scale=sc)
        return o.transpose(1, 2).contiguous(), None

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids.view(1, -1), use_cache=False, logits_to_keep=1).logits[0, -1]

    previous = model.config._attn_implementation
    if via in ("auto", "implementation"):
        AttentionInterface.register(CAPTURE_NAME, capture)
        try:
            model.set_attn_implementation(CAPTURE_NAME)
        except Exception:
            if via == "implementation":
                raise
        else:
            try:
                return forward()
            finally:
                model.set_attn_implementation(previous)
    # Fallback: stand in for the model's own implementation (one process-wide entry, restored).
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[previous]
    AttentionInterface.register(previous, capture)
    try:
        return forward()
    finally:
        AttentionInterface.register(previous, original)
