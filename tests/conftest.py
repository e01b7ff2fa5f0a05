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

#: Triton 3.6's interpreter turns one-element numpy arrays into Python ints (its ``__index__``
#: shim), which numpy >= 1.25 deprecates: about 4,000 identical warnings per CPU run, none of
#: them about our code. Ignored for that message from that module only, and only when the
#: interpreter runs (pytest re-applies its ini filters around every test, so a plain
#: warnings.filterwarnings here would be overridden).
INTERPRETER_NOISE = (
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning:triton.runtime.interpreter"
)


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        config.addinivalue_line("filterwarnings", INTERPRETER_NOISE)


def make_paged_kv(ks, vs, page_size, layout="NHD", seed=0, spare_pages=3):
    """Write per-request K/V ([S_r, HKV, D] each) into a paged cache laid out like vLLM 0.26's
    FlashAttention one: physical NHD [NP, PS, HKV, 2D] or HND [NP, HKV, PS, 2D], K in [..., :D].

    Pages are handed out in a random permutation (plus a few never-used pages filled with NaN,
    so a kernel reading a wrong page shows it). Returns (k_cache, v_cache, block_table) with
    k_cache/v_cache the [NP, PS, HKV, D] views FlashAttention's forward gets
    (``kv_cache.transpose(1, 2).split(D, -1)``) and block_table int32 [R, max_pages].
    """
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    pages = [-(-k.shape[0] // page_size) for k in ks]
    n_pages = sum(pages) + spare_pages
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pages, generator=gen)
    if layout == "NHD":
        phys = torch.full((n_pages, page_size, hkv, 2 * d), float("nan"), dtype=ks[0].dtype, device=ks[0].device)
        logical = phys.permute(0, 2, 1, 3)  # (NP, HKV, PS, 2D), the shape vLLM hands the backend
    elif layout == "HND":
        phys = torch.full((n_pages, hkv, page_size, 2 * d), float("nan"), dtype=ks[0].dtype, device=ks[0].device)
        logical = phys
    else:
        raise ValueError(layout)
    k_cache, v_cache = logical.transpose(1, 2).split(d, dim=-1)
    table = torch.zeros(len(ks), max(pages), dtype=torch.int32)
    nxt = 0
    for r, (k, v) in enumerate(zip(ks, vs)):
        for p in range(pages[r]):
            page = int(perm[nxt])
            nxt += 1
            table[r, p] = page
            rows = slice(p * page_size, min((p + 1) * page_size, k.shape[0]))
            n = rows.stop - rows.start
            k_cache[page, :n] = k[rows]
            v_cache[page, :n] = v[rows]
    return k_cache, v_cache, table.to(ks[0].device)
