"""Block-selection rules beside the paper's, in plain PyTorch (evaluated, not yet in the kernels).

:func:`prism_vllm.reference.select_blocks` is the paper's rule and stays the specification of what
the kernels compute. This module adds candidate rules with the same inputs and output, so a
benchmark can compare them at equal quality (issue 10, "beyond the paper"):

    paper           two RoPE bands (high, low), energy-calibrated, top-p per band, union
    meanpool        one band of every head dim, no calibration, top-p (plain mean pooling)
    paper+meanpool  the union of ``paper`` and ``meanpool`` at the same top-p
    mass            one cut instead of a union: score each key block by max(p_high, p_low),
                    normalise the scores to sum to 1 per row, keep the smallest set of
                    highest-scoring blocks that reaches the top-p mass
    avg             top-p on the average of the two band distributions (p_high + p_low) / 2

Every rule then does what the paper's does: sink and diagonal blocks kept (``keep_sink``,
``keep_diagonal``), the ``block_budget`` cap ranking blocks by the rule's score, and
``dense_tail`` for a chunk's partial last block. Single-threshold rules (``meanpool``, ``mass``,
``avg``) read ``cfg.high_threshold``; ``paper+meanpool`` applies ``cfg.high_threshold`` to the
mean-pool band too.

Measured (benchmarks/results/quality-cpu.json: CPU, SmolLM2-135M-Instruct, 8192-token windows of
Debian's fortunes and Austen's novels). On the same windows, ``meanpool`` at top-p 0.99 selected
about as many blocks as ``paper`` at 0.985 (density 0.428 vs 0.425 fortunes, 0.483 vs 0.475
Austen) at a third to a half of its perplexity cost (+0.57% vs +1.07%, +0.46% vs +1.39%), and
8-10% fewer blocks than ``paper`` at 0.99, its lowest threshold within 1%. The recall screen
(one Austen window, dense q/k) agrees: at equal recall 0.97 ``meanpool`` needs density 0.49,
``paper`` and ``paper+meanpool`` 0.52, ``mass`` and ``avg`` 0.53. Per-layer thresholds fitted
to that window would need 0.47 (``paper``) and 0.45 (``meanpool``), in-sample only.

Shapes as in :mod:`prism_vllm.reference`: qp [nq, HQ, D] pooled queries of absolute blocks
qb0.., kp [nk, HKV, D] pooled keys; the result is bool [HQ, nq, nk], False above the diagonal.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import PrismConfig
from .reference import band_logits, band_temperatures, finish_selection, select_blocks, top_p_mask
from .rope import Bands

__all__ = ["RULES", "band_probs", "select_blocks_rule"]

#: Names accepted by :func:`select_blocks_rule`.
RULES = ("paper", "meanpool", "paper+meanpool", "mass", "avg")


def band_probs(
    qp: torch.Tensor, kp: torch.Tensor, qb0: int, bands: Bands, calibrate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_high, p_low): the causal block softmax of each band, each [HQ, nq, nk] float32
    (zero above the diagonal), exactly as :func:`reference.select_blocks` scores them."""
    t_hi, t_lo = band_temperatures(qp, kp, qb0, bands, calibrate)
    p_hi = torch.softmax(band_logits(qp, kp, bands.high, t_hi, qb0), dim=-1)
    p_lo = torch.softmax(band_logits(qp, kp, bands.low, t_lo, qb0), dim=-1)
    return p_hi, p_lo


def _meanpool_probs(qp: torch.Tensor, kp: torch.Tensor, qb0: int) -> torch.Tensor:
    """[HQ, nq, nk] causal block softmax of plain mean-pooled scores (all dims, temperature 1)."""
    alld = torch.ones(qp.shape[-1], dtype=torch.bool, device=qp.device)
    one = torch.ones(qp.shape[0], qp.shape[1], dtype=torch.float32, device=qp.device)
    return torch.softmax(band_logits(qp, kp, alld, one, qb0), dim=-1)


def _top_p(probs: torch.Tensor, p: float, causal: torch.Tensor) -> torch.Tensor:
    return top_p_mask(probs, p) if p < 1.0 else causal.expand_as(probs).clone()


def select_blocks_rule(
    qp: torch.Tensor,
    kp: torch.Tensor,
    qb0: int,
    bands: Bands,
    cfg: PrismConfig,
    seq_len: Optional[int] = None,
    rule: str = "paper",
) -> torch.Tensor:
    """Selected key blocks, bool [HQ, nq, nk], under ``rule`` (one of :data:`RULES`; the module
    docstring defines each). ``rule="paper"`` is :func:`reference.select_blocks` itself.

    seq_len: ctx + L of the chunk, for cfg.dense_tail (None: no dense tail)."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; valid rules: {', '.join(RULES)}")
    if rule == "paper":  # whatever cfg.rule says (the 'quality' preset's is 'meanpool')
        return select_blocks(qp, kp, qb0, bands, dataclasses.replace(cfg, rule="paper"), seq_len)
    if rule == "meanpool":
        alld = torch.ones(qp.shape[-1], dtype=torch.bool, device=qp.device)
        one_band = dataclasses.replace(cfg, calibrate=False, low_threshold=cfg.high_threshold)
        return select_blocks(qp, kp, qb0, Bands(high=alld, low=alld), one_band, seq_len)

    nq, nk = qp.shape[0], kp.shape[0]
    rows = qb0 + torch.arange(nq, device=qp.device)
    causal = torch.arange(nk, device=qp.device)[None, :] <= rows[:, None]  # [nq, nk]
    p = cfg.high_threshold
    p_hi, p_lo = band_probs(qp, kp, qb0, bands, cfg.calibrate)
    if rule == "paper+meanpool":
        p_mp = _meanpool_probs(qp, kp, qb0)
        sel = _top_p(p_hi, cfg.high_threshold, causal) | _top_p(p_lo, cfg.low_threshold, causal)
        sel |= _top_p(p_mp, p, causal)
        score = torch.maximum(torch.maximum(p_hi, p_lo), p_mp)
    elif rule == "mass":
        score = torch.maximum(p_hi, p_lo)
        sel = _top_p(score / score.sum(-1, keepdim=True), p, causal)
    else:  # avg
        score = 0.5 * (p_hi + p_lo)
        sel = _top_p(score, p, causal)

    return finish_selection(sel, score, qb0, cfg, seq_len)
