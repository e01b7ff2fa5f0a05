#!/usr/bin/env python
"""Paired passkey outcomes of a quality sweep: per (point, length), the cases FLASH_ATTN answered
and the point missed, the reverse, and the exact two-sided McNemar p-value of that split; with
--model, where each lost case's key sits in its 128-token block.

The sweep's goal ("passkey counts within +-1 of FLASH_ATTN") compares totals; the same cases are
asked of every engine, so the paired split says whether a point loses keys systematically or by
chance, and which cases it loses.

    python benchmarks/passkey_pairs.py benchmarks/results/quality.json
    python benchmarks/passkey_pairs.py benchmarks/results/quality.json --model DIR   # + key positions
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
BLOCK = 128


def mcnemar_p(only_dense: int, only_point: int) -> float:
    """Exact two-sided McNemar p-value of a paired split (binomial test of the discordant pairs)."""
    n = only_dense + only_point
    if n == 0:
        return 1.0
    k = min(only_dense, only_point)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def outcomes(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, bool]]:
    """(point, length) -> {case id: correct} from a quality document's measured jobs."""
    return {(m["point"], m["length"]): {c["id"]: bool(c["correct"]) for c in m["passkeys"]}
            for m in doc.get("measured", []) if m.get("passkeys")}


def pairs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (point, length) with FLASH_ATTN's outcomes on the same cases."""
    out = outcomes(doc)
    rows = []
    for (point, length), got in sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        dense = out.get(("dense", length))
        if point == "dense" or dense is None:
            continue
        ids = [i for i in got if i in dense]
        lost = sorted(i for i in ids if dense[i] and not got[i])
        gained = sorted(i for i in ids if got[i] and not dense[i])
        rows.append({"point": point, "length": length, "cases": len(ids), "correct": sum(got[i] for i in ids),
                     "dense_correct": sum(dense[i] for i in ids), "only_dense": len(lost),
                     "only_point": len(gained), "mcnemar_p": mcnemar_p(len(lost), len(gained)),
                     "lost": lost, "gained": gained})
    return rows


def key_positions(model: str, doc: dict[str, Any]) -> dict[str, list[int]]:
    """Case id -> token positions of its key's first digits in the prompt (rebuilt as the sweep
    built it: benchmarks.prompts.needle_cases over the fortune corpus)."""
    sys.path.insert(0, str(REPO))
    from benchmarks import common, corpus, prompts

    tok = common.HFTokenizer(model)
    ids = tok.encode(corpus.load_text(download=False))
    s = doc["settings"]["passkey"]
    # case ids name the prompt's own length (the sweep's length less the tokens kept for the answer)
    lengths = sorted({int(c["id"].split("-")[1]) for m in doc["measured"] for c in m.get("passkeys") or []})
    cases = prompts.needle_cases(tok, ids, lengths, s["kinds"], s["depths"], list(range(s["seeds"])))
    pos = {}
    for c in cases:
        seq = c["ids"]
        pos[c["id"]] = [i for i in range(len(seq) - 3) if tok.decode(seq[i:i + 3]).strip().startswith(c["key"][:3])]
    return pos


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("quality_json", type=Path)
    ap.add_argument("--model", default=None, help="the sweep's model folder (its tokenizer rebuilds the prompts)")
    a = ap.parse_args(argv)
    doc = json.loads(a.quality_json.read_text())
    rows = pairs(doc)
    pos = key_positions(a.model, doc) if a.model else {}
    print(f"{'length':>6} {'point':<20} {'correct':>7} {'dense':>5} {'only dense':>10} {'only point':>10} {'McNemar p':>9}")
    for r in rows:
        print(f"{r['length']:>6} {r['point']:<20} {r['correct']:>7} {r['dense_correct']:>5} {r['only_dense']:>10} "
              f"{r['only_point']:>10} {r['mcnemar_p']:>9.2f}")
    lost_by: dict[str, list[str]] = {}
    for r in rows:
        for i in r["lost"]:
            lost_by.setdefault(i, []).append(r["point"])
    if lost_by:
        print("\ncases FLASH_ATTN answered and points missed (how many points missed each"
              + ("; key positions: token, position in its block" if pos else "") + "):")
        for i, pts in sorted(lost_by.items(), key=lambda kv: -len(kv[1])):
            where = ", ".join(f"{p} ({p % BLOCK})" for p in pos.get(i, []))
            print(f"  {i:<28} {len(pts):>2} points" + (f"   key at {where}" if where else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
