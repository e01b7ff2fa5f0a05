"""Shared test setup.

Without a CUDA GPU, Triton kernels run under the interpreter (TRITON_INTERPRET must be set
before triton is first imported, hence here). GPU tests carry the `gpu` marker and are
deselected by default (pyproject addopts); run them with `pytest -m gpu`.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
