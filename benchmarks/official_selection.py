"""Record the official Prism estimation's block selections on fixed seeded inputs (CPU).

The official code (github xinghaow99/prism) is never committed here, so CI cannot run it. This
script runs its ``prism_block_estimate`` (its torch path: CPU tensors skip its Triton kernels) on
the cases below and writes what it produced, block masks and the two bands' softmax
probabilities, with the official commit, date and command, to ``tests/data/official_selection.json``;
``tests/test_reference.py`` compares ``prism_vllm.reference`` with that file in CI.

    bash benchmarks/fetch_official.sh
    python -m benchmarks.official_selection --official-dir benchmarks/_official

Only uncalibrated cases: the official code calibrates over the whole chunk, ours per query
block over its causal keys (so selections do not depend on chunking); with calibration off both
implement the same selection. The probabilities are captured from the official code's own
softmax call (its module's ``F.softmax``), not recomputed here.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["CASES", "case_inputs", "input_digest", "mask_rows", "run_official"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "official_selection.json"
HEAD_DIM = 128
HIGH_DIMS, LOW_DIMS = 64, 96  # the official defaults; NeoX layout, rotary dim = head dim

#: name -> (seed, kv tokens, query tokens (the last ones), heads, high threshold, low threshold,
#: keep sink and diagonal). Block-aligned lengths: the official code needs whole blocks.
CASES: dict[str, dict[str, Any]] = {
    "prefill1024-p0.8": dict(seed=11, kv_len=1024, q_len=1024, heads=4, high=0.8, low=0.8, keep=True),
    "prefill1024-p0.95": dict(seed=11, kv_len=1024, q_len=1024, heads=4, high=0.95, low=0.95, keep=True),
    "prefill2048-high0.9-low0.7": dict(seed=12, kv_len=2048, q_len=2048, heads=2, high=0.9, low=0.7, keep=True),
    "chunk512-after1024-p0.9": dict(seed=13, kv_len=1536, q_len=512, heads=3, high=0.9, low=0.9, keep=True),
    "prefill1024-p0.6-no-sink-no-diagonal": dict(seed=14, kv_len=1024, q_len=1024, heads=2, high=0.6, low=0.6,
                                                 keep=False),
}


def case_inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [q_len, H, D], k [kv_len, H, D]) float32 of a case, seeded: a few key blocks carry a
    hot direction each, every query block (per head) leans towards one of them, under token
    noise, so selections are sparse and differ between heads and bands."""
    g = torch.Generator().manual_seed(case["seed"])
    S, H, n_hot = case["kv_len"], case["heads"], 4
    nb = S // 128
    dirs = torch.randn(n_hot, H, HEAD_DIM, generator=g) * 0.7  # block densities 0.3-0.8 below
    kb = 0.3 * torch.randn(nb, H, HEAD_DIM, generator=g)
    kb[torch.randperm(nb, generator=g)[:n_hot]] += dirs
    which = torch.randint(0, n_hot, (nb, H), generator=g)
    qb = 0.3 * torch.randn(nb, H, HEAD_DIM, generator=g) + dirs[which, torch.arange(H)]
    k = kb.repeat_interleave(128, 0) + 0.5 * torch.randn(S, H, HEAD_DIM, generator=g)
    q = qb.repeat_interleave(128, 0) + 0.5 * torch.randn(S, H, HEAD_DIM, generator=g)
    return q[S - case["q_len"]:].contiguous(), k


def input_digest(q: torch.Tensor, k: torch.Tensor) -> str:
    """sha256 of the inputs' bytes: the test regenerates them and must get the same."""
    h = hashlib.sha256()
    for t in (q, k):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def mask_rows(mask: torch.Tensor) -> list[list[str]]:
    """bool [H, nq, nk] -> per head, one '0'/'1' string per query block."""
    return [["".join("1" if x else "0" for x in row) for row in head.tolist()] for head in mask]


def run_official(official_dir: Path, case: dict[str, Any]) -> dict[str, Any]:
    """The official estimation on one case: its mask and the softmax probabilities it computed."""
    if str(official_dir) not in sys.path:
        sys.path.insert(0, str(official_dir))
    import prism.prism as official  # type: ignore  (benchmarks/_official, never committed)

    q, k = case_inputs(case)
    captured: list[torch.Tensor] = []

    class _RecordingF:  # the official module calls F.softmax once, on both bands' logits
        def __getattr__(self, name: str) -> Any:
            return getattr(torch.nn.functional, name)

        @staticmethod
        def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = torch.nn.functional.softmax(*args, **kwargs)
            captured.append(out.detach().clone())
            return out

    saved = official.F
    official.F = _RecordingF()
    try:
        mask = official.prism_block_estimate(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], low_freq_dim=LOW_DIMS, high_freq_dim=HIGH_DIMS,
            block_size=128, low_freq_threshold=case["low"], high_freq_threshold=case["high"], calibrate=False,
            force_sink=case["keep"], force_recent=case["keep"],
        )[0]
    finally:
        official.F = saved
    assert len(captured) == 1, f"expected one softmax call in the official estimation, saw {len(captured)}"
    probs = captured[0][0]  # [H, 2 * nq, nk]: high band rows, then low band rows
    nq = mask.shape[1]
    return {
        "input_sha256": input_digest(q, k),
        "mask": mask_rows(mask),
        "probs_high": _rounded(probs[:, :nq]),
        "probs_low": _rounded(probs[:, nq:]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-dir", default=str(REPO / "benchmarks" / "_official"),
                    help="folder holding the official prism/ package and COMMIT (bash benchmarks/fetch_official.sh)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    official_dir = Path(args.official_dir)
    commit_file = official_dir / "COMMIT"
    commit = commit_file.read_text().strip() if commit_file.is_file() else "unknown"
    ours = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    doc = {
        "what": "official Prism prism_block_estimate (torch path, CPU, float32, calibrate=False) on the seeded "
                "inputs of benchmarks/official_selection.py: block masks (per head, one 0/1 string per query "
                "block) and the softmax probabilities of both bands (rows: query blocks, columns: key blocks)",
        "official_repo": "https://github.com/xinghaow99/prism",
        "official_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "recorded_at_commit": ours,
        "command": "python -m benchmarks.official_selection " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "head_dim": HEAD_DIM, "high_band_dims": HIGH_DIMS, "low_band_dims": LOW_DIMS, "block_size": 128,
        "cases": {},
    }
    with torch.no_grad():
        for name, case in CASES.items():
            doc["cases"][name] = {**case, **run_official(official_dir, case)}
            print(f"{name}: density {_density(doc['cases'][name]['mask']):.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    # one line per head's mask and per probability row keeps the file short and diffable
    out.write_text(_compact(text) + "\n")
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return 0


def _rounded(t: torch.Tensor) -> list:
    """Nested lists of floats with 7 significant digits (float32 carries about 7)."""
    return [[[float(f"{x:.7g}") for x in row] for row in head] for head in t.tolist()]


def _density(mask: list[list[str]]) -> float:
    sel = sum(r.count("1") for head in mask for r in head)
    nq, nk = len(mask[0]), len(mask[0][0])
    causal = sum(min(nk, nk - nq + i + 1) for i in range(nq)) * len(mask)
    return sel / causal


def _compact(text: str) -> str:
    """json.dumps(indent=1) with innermost lists of numbers or strings on one line."""
    import re

    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


if __name__ == "__main__":
    sys.exit(main())
