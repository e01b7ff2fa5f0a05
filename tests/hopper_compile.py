"""Compile recorded Triton launches for Hopper (sm_90, CUDA) on a machine without a GPU.

``tests/test_startup_compiles.py`` records the launches of Prism's startup warm-up (which, as it
checks, covers every binary a serving step needs) and runs this file as a script, in a process
without TRITON_INTERPRET: under the interpreter the kernels' ``@triton.jit`` helpers are
interpreter objects that Triton's compiler cannot lower. Triton's compiler needs no GPU (its
bundled ptxas assembles the cubin), so errors that only a compile shows (e.g. a loop-carried
variable that changes type, which the interpreter runs without complaint) fail CI, not the GPU
suite.

    python tests/hopper_compile.py JOBS.pkl    # JOBS.pkl: a list of Job tuples (below)

Prints one JSON object: {"compiled": n, "failed": [[kernel, error], ...]}; exit status 0.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

#: Hopper, as the H200 the GPU suite runs on.
TARGET = ("cuda", 90, 32)


class Job(NamedTuple):
    """One specialisation of a kernel, as JITFunction.run would compile it."""

    module: str
    name: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]


def compile_one(job: Job) -> "str | None":
    """None when the kernel compiles to a cubin, else the error's last lines."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    fn = getattr(importlib.import_module(job.module), job.name)
    try:
        triton_compile(ASTSource(fn, job.signature, job.constexprs, job.attrs), target=GPUTarget(*TARGET),
                       options=job.options)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {str(e)[-1500:]}"
    return None


def main(path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("hopper_compile.py needs TRITON_INTERPRET unset (the interpreter's kernels do not compile)")
    with open(path, "rb") as f:
        jobs: list[Job] = [Job(*j) for j in pickle.load(f)]
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = list(pool.map(compile_one, jobs))
    failed = [[f"{j.module}.{j.name} {j.constexprs}", e] for j, e in zip(jobs, errors) if e is not None]
    print(json.dumps({"compiled": len(jobs) - len(failed), "failed": failed}))


if __name__ == "__main__":
    main(sys.argv[1])
