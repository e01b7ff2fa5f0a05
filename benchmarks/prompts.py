"""Prompts and scoring for the accuracy benchmarks: perplexity windows, passkey / needle cases.

Passkey (single key): a 5-digit key sentence hidden at a relative depth of a haystack of corpus
text; the prompt ends with a question whose answer the model must complete. Multi-key: four keys,
each for a door of a different colour, the asked one at the given depth, the three distractors
at random depths; the model must give the asked door's key. A case is correct when the first
number in the greedy completion equals the key.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["DEPTHS", "NeedleCase", "Tokenizer", "needle_cases", "ppl_summary", "score_needle"]

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
INTRO = {
    "single": "Below is a collection of quotations. Hidden somewhere in it is a pass key. "
              "Remember the pass key; you will be asked for it at the end.\n\n",
    "multi": "Below is a collection of quotations. Hidden somewhere in it are pass keys, one for each "
             "door of a different color. Remember every pass key; you will be asked for one at the end.\n\n",
}


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class NeedleCase(dict):
    """dict with keys id, kind, length, depth, seed, key, ids (prompt token ids)."""


def _newline_ids(tok: Tokenizer, ids: Sequence[int]) -> set[int]:
    return {i for i in set(ids) if "\n" in tok.decode([i])}


def _snap(pos: int, ids: Sequence[int], nl: set[int], window: int = 256) -> int:
    """Nearest insertion point at or after ``pos`` that follows a newline token (keeps words whole)."""
    for p in range(pos, min(len(ids), pos + window)):
        if p == 0 or ids[p - 1] in nl:
            return p
    return pos


def needle_cases(
    tok: Tokenizer,
    corpus_ids: Sequence[int],
    lengths: Sequence[int],
    kinds: Sequence[str] = ("single", "multi"),
    depths: Sequence[float] = DEPTHS,
    seeds: Sequence[int] = (0, 1, 2),
    n_keys: int = 4,
) -> list[NeedleCase]:
    """Every (kind, length, depth, seed) case; each prompt is exactly ``length`` tokens."""
    nl = _newline_ids(tok, corpus_ids[:20000])
    cases: list[NeedleCase] = []
    for kind in kinds:
        for L in lengths:
            for seed in seeds:
                for depth in depths:
                    cases.append(_case(tok, corpus_ids, nl, kind, int(L), float(depth), int(seed), n_keys))
    return cases


def _case(tok: Tokenizer, corpus_ids: Sequence[int], nl: set[int], kind: str, L: int, depth: float,
          seed: int, n_keys: int) -> NeedleCase:
    rng = random.Random(f"{kind}-{L}-{seed}")  # same keys and haystack across depths of one seed
    intro = tok.encode(INTRO[kind])
    if kind == "single":
        key = str(rng.randint(10000, 99999))
        needles = [(depth, tok.encode(f"\nThe pass key is {key}. Remember it. The pass key is {key}.\n\n"))]
        question = tok.encode("\n\nWhat is the pass key? The pass key is")
    elif kind == "multi":
        colors = rng.sample(COLORS, n_keys)
        keys = [str(rng.randint(10000, 99999)) for _ in colors]
        target = rng.randrange(n_keys)
        key = keys[target]
        needles = []
        for j, (c, k) in enumerate(zip(colors, keys)):
            d = depth if j == target else rng.random()
            needles.append((d, tok.encode(f"\nThe pass key for the {c} door is {k}.\n\n")))
        question = tok.encode(f"\n\nWhat is the pass key for the {colors[target]} door? "
                              f"The pass key for the {colors[target]} door is")
    else:
        raise ValueError(f"needle kind {kind!r} is unknown; use 'single' or 'multi'")
    n_hay = L - len(intro) - sum(len(n) for _, n in needles) - len(question)
    if n_hay < 16:
        raise ValueError(f"needle prompt of {L} tokens is too short for its {L - n_hay} fixed tokens")
    start = rng.randrange(0, max(1, len(corpus_ids) - n_hay))
    hay = [corpus_ids[(start + i) % len(corpus_ids)] for i in range(n_hay)]
    # Insert the deepest needle first so earlier insertion points stay valid.
    points = sorted(((_snap(round(d * n_hay), hay, nl), n) for d, n in needles), key=lambda x: -x[0])
    for p, n in points:
        hay[p:p] = n
    ids = intro + hay + question
    assert len(ids) == L, (len(ids), L)
    return NeedleCase(id=f"{kind}-{L}-d{depth:g}-s{seed}", kind=kind, length=L, depth=depth, seed=seed,
                      key=key, ids=ids)


def score_needle(tok: Tokenizer, case: dict[str, Any], output_ids: Sequence[int]) -> bool:
    """True when the first number of the completion equals the case's key (spaces between
    digits are ignored, so a tokenizer that splits digits still scores)."""
    text = tok.decode(output_ids)
    m = re.search(r"\d[\d ]*", text)
    return bool(m) and m.group(0).replace(" ", "") == case["key"]


def ppl_summary(logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """Perplexity over all predicted tokens of the windows, and over their last quarter
    (the positions that attend over the longest context, where sparse attention matters most)."""
    tot = n = tail = nt = 0.0
    for row in logprobs:
        q = len(row) - len(row) // 4
        tot += -sum(row)
        n += len(row)
        tail += -sum(row[q:])
        nt += len(row) - q
    return {"ppl": math.exp(tot / n), "ppl_last_quarter": math.exp(tail / nt), "tokens": int(n)}
