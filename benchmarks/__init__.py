"""Benchmark scripts (run from a checkout: ``python -m benchmarks.run`` etc.).

``python -m`` (and ``python -c``) put the checkout's root first on ``sys.path``, where the
top-level ``kernels/`` folder (installed as ``prism_vllm.kernels``) shadows Hugging Face's
``kernels`` package, which transformers 5.25 (pulled by vLLM) imports when it is installed: the
benchmarks' vLLM and tokenizer imports would fail. Importing this package moves the root to the
end of ``sys.path``: installed packages win, and ``benchmarks`` itself is already imported.
"""

import os as _os
import sys as _sys

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


def _root_last() -> None:
    here = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) == _ROOT]
    if here:
        _sys.path[:] = [p for p in _sys.path if p not in here] + [_ROOT]


_root_last()
