"""Shared test setup.

Without a CUDA GPU, Triton kernels run under the interpreter (TRITON_INTERPRET must be set
before triton is first imported, hence here). GPU tests carry the `gpu` marker and are
deselected by default (pyproject addopts); run them with `pytest -m gpu`.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ (scripts at the repo root, not part of the installed package) is imported by some
# tests as the package `benchmarks`: bound here to the repo's folder, whatever the command (plain
# `pytest` puts no repo root on sys.path, and another distribution may ship a `benchmarks`), and
# without putting the root first on sys.path, where its prism_vllm/ folder would shadow the
# package the GPU machine runs from a link tree (benchmarks/gpu_suite.sh, python -P).
_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if _BENCH.is_dir() and not str(getattr(sys.modules.get("benchmarks"), "__file__", "")).startswith(str(_BENCH)):
    _spec = importlib.util.spec_from_file_location("benchmarks", _BENCH / "__init__.py",
                                                   submodule_search_locations=[str(_BENCH)])
    sys.modules["benchmarks"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["benchmarks"])

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


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Every test leaves the process environment (VLLM_PLUGINS, VLLM_ALLOW_INSECURE_SERIALIZATION,
    ... set by the code under test) and Prism's stats sampling as it found them, so no test's
    verdict depends on which tests ran before it."""
    from prism_vllm import stats

    env, every = dict(os.environ), stats.STATS.sample_every
    yield
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)
    stats.STATS.sample_every = every


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        config.addinivalue_line("filterwarnings", INTERPRETER_NOISE)


def prism_params(bands, config=None, device=DEVICE, scale=1.0):
    """The layer's PrismParams for these RoPE bands (default PrismConfig), as the backend builds them."""
    from prism_vllm.config import PrismConfig
    from prism_vllm.kernels import PrismParams

    return PrismParams.make(bands=bands, scale=scale, config=config or PrismConfig(rule="paper"), device=device)


def key_energy_reference(kp, bands):
    """(|k|^2, |k_high|^2, |k_low|^2) per pooled key: [NKB, HKV, 3], what pool_keys_paged's
    energy_out holds and select_blocks' key_energy takes."""
    k2 = kp.float().pow(2)
    hi, lo = bands.high.to(kp.device), bands.low.to(kp.device)
    return torch.stack([k2.sum(-1), k2[..., hi].sum(-1), k2[..., lo].sum(-1)], dim=-1)


def assert_tf32_split(split, pooled, lo_bound=True):
    """split [..., 2, D] holds pooled [..., D] as an exact sum hi + lo, hi tf32-representable
    (and, with lo_bound, |lo| within hi's tf32 rounding)."""
    hi, lo = split[..., 0, :], split[..., 1, :]
    assert torch.equal(hi + lo, pooled)
    assert ((hi.view(torch.int32) & 8191) == 0).all(), "hi must be tf32-representable (13 low bits clear)"
    if lo_bound:
        assert (lo.abs() <= hi.abs() * 2**-10).all()


def make_paged_kv(ks, vs, page_size, layout="NHD", seed=0, spare_pages=2, gen=None):
    """A FlashAttention-style packed paged cache holding each request's K/V.

    ks[r], vs[r]: [S_r, HKV, D]. layout: vLLM 0.26's FlashAttention cache, "NHD" (physical
    [pages, page_size, HKV, 2D], the default), "HND" (physical [pages, HKV, page_size, 2D]),
    "NHD_padded" (NHD with a padded page stride), or the cross-layer layouts with this layer at
    index 1 of 3: "NHD_xlayer" ([pages, layers, page_size, HKV, 2D]) and "HND_xlayer"
    ([pages, HKV, layers, page_size, 2D]); K in [..., :D], V in [..., D:].

    Pages are handed out in a random order (``gen``, else a generator seeded with ``seed``); page
    0 (vLLM's null block) is never handed out and pads the table rows; it, ``spare_pages`` unused
    pages and every slot past a sequence's end hold NaN, so a kernel reading a wrong page or slot
    shows it. Returns (k_cache, v_cache, block_table): the [pages, page_size, HKV, D] views
    FlashAttention's forward gets (``kv_cache.transpose(1, 2).split(D, -1)``) and int32
    [R, max_pages].
    """
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    dt, dev = ks[0].dtype, ks[0].device
    npages = [-(-k.shape[0] // page_size) for k in ks]
    total = sum(npages) + 1 + spare_pages
    nan = dict(fill_value=float("nan"), dtype=dt, device=dev)
    if layout == "NHD":
        logical = torch.full((total, page_size, hkv, 2 * d), **nan).permute(0, 2, 1, 3)
    elif layout == "NHD_padded":
        logical = torch.full((total, page_size + 3, hkv, 2 * d), **nan)[:, :page_size].permute(0, 2, 1, 3)
    elif layout == "HND":
        logical = torch.full((total, hkv, page_size, 2 * d), **nan)
    elif layout == "NHD_xlayer":
        logical = torch.full((total, 3, page_size, hkv, 2 * d), **nan)[:, 1].permute(0, 2, 1, 3)
    elif layout == "HND_xlayer":
        logical = torch.full((total, hkv, 3, page_size, 2 * d), **nan)[:, :, 1]
    else:
        raise ValueError(layout)
    view = logical.transpose(1, 2)  # [pages, page_size, HKV, 2D], what FA's forward splits
    gen = torch.Generator().manual_seed(seed) if gen is None else gen
    perm = (torch.randperm(total - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(ks), max(npages), dtype=torch.int32)
    used = 0
    for r, (k, v) in enumerate(zip(ks, vs)):
        for p in range(npages[r]):
            page = perm[used]
            used += 1
            table[r, p] = page
            rows = slice(p * page_size, min((p + 1) * page_size, k.shape[0]))
            n = rows.stop - rows.start
            view[page, :n, :, :d] = k[rows]
            view[page, :n, :, d:] = v[rows]
    k_cache, v_cache = view.split(d, dim=-1)
    return k_cache, v_cache, table.to(dev)
