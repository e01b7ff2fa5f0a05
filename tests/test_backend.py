"""The vLLM glue on CPU: config through vLLM's path, row routing, RoPE from the model, dense
fallback, and the Prism suffix of real batches through the kernels (Triton interpreter, fp16)
checked against prism_vllm.reference.

FlashAttention cannot run on a CPU, so where a batch has a FlashAttention part the test swaps
FlashAttentionImpl.forward for a plain PyTorch paged attention (``_paged_dense_attention``) that
records the metadata it was given: that checks the split (which rows, which metadata) and the
stitching of both parts into one output. The real FlashAttention runs in tests/test_vllm_gpu.py.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from prism_vllm import PrismConfig, reference, stats  # noqa: E402
from prism_vllm.attention_backend import backend as pb  # noqa: E402
from prism_vllm.attention_backend.rope_source import resolve_rotary  # noqa: E402
from prism_vllm.attention_backend.routing import route_prism_suffix  # noqa: E402
from prism_vllm.kernels import BlockSelection  # noqa: E402
from prism_vllm.rope import RopeLayout, prism_bands, rope_inv_freq  # noqa: E402

HQ, HKV, D = 4, 2, 64
DTYPE = torch.float16
MAX_MODEL_LEN = 1024
CFG = {"min_context_len": 256, "min_query_len": 16}


# ---------------------------------------------------------------------------------------------
# A VllmConfig-like object: vLLM's own sub-configs (CPU device) plus a tiny model description.
# ---------------------------------------------------------------------------------------------
class _TinyModelConfig:
    rswa_window = None
    is_mm_prefix_lm = False
    dtype = DTYPE
    max_model_len = MAX_MODEL_LEN

    def get_num_attention_heads(self, parallel_config=None) -> int:
        return HQ

    def get_num_kv_heads(self, parallel_config=None) -> int:
        return HKV

    def get_head_size(self) -> int:
        return D


@pytest.fixture(scope="module")
def base_vllm_config():
    return VllmConfig(device_config=DeviceConfig(device="cpu"))


def _vllm_config(base, prism: Optional[dict] = None, max_batched_tokens: int = 4096, max_model_len: int = MAX_MODEL_LEN):
    model_config = _TinyModelConfig()
    model_config.max_model_len = max_model_len
    sched = SimpleNamespace(max_num_batched_tokens=max_batched_tokens, max_num_seqs=16)
    comp = base.compilation_config
    comp.static_forward_context.clear()
    return SimpleNamespace(
        model_config=model_config,
        parallel_config=base.parallel_config,
        cache_config=base.cache_config,
        compilation_config=comp,
        attention_config=base.attention_config,
        scheduler_config=sched,
        speculative_config=None,
        device_config=base.device_config,
        additional_config={"prism": dict(CFG if prism is None else prism)},
    )


# ---------------------------------------------------------------------------------------------
# Config through vLLM's path
# ---------------------------------------------------------------------------------------------
def test_config_from_vllm_additional_config(base_vllm_config):
    vc = VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        additional_config={"prism": {"high_threshold": 0.9, "min_context_len": 4096}},
    )
    cfg = PrismConfig.from_vllm_config(vc)
    assert (cfg.high_threshold, cfg.low_threshold, cfg.min_context_len) == (0.9, PrismConfig().low_threshold, 4096)
    assert PrismConfig.from_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))) == PrismConfig()


@pytest.mark.parametrize(
    "prism,match",
    [
        ({"high_threshold": 2.0}, r"prism\.high_threshold=2\.0 is out of range"),
        ({"min_query_len": 1}, r"prism\.min_query_len=1 is out of range"),
        ({"bogus": 1}, r"unknown prism setting\(s\) \['bogus'\]"),
    ],
    ids=["threshold", "min_query_len", "unknown"],
)
def test_invalid_config_stops_impl_and_builder_construction(base_vllm_config, prism, match):
    vc = _vllm_config(base_vllm_config, prism)
    with set_current_vllm_config(vc), pytest.raises(ValueError, match=match):
        pb.PrismAttentionImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
    with pytest.raises(ValueError, match=match):
        pb.PrismMetadataBuilder(_spec(), [], vc, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Routing (host only)
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Requests as (context tokens, query tokens), in the order vLLM hands them over."""

    reqs: list[tuple[int, int]]
    start: Optional[int]  # expected first Prism request (None: no Prism)
    dense: tuple[int, ...] = ()  # expected dense flags of the Prism part

    @property
    def qsl(self) -> torch.Tensor:
        return torch.tensor([0] + list(np.cumsum([q for _, q in self.reqs])), dtype=torch.int32)

    @property
    def seq(self) -> torch.Tensor:
        return torch.tensor([c + q for c, q in self.reqs], dtype=torch.int32)


BATCHES = {
    "decode_only": Batch([(300, 1), (500, 1), (17, 1)], None),
    "one_long_prefill": Batch([(0, 300)], 0, (0,)),
    "short_prefill_only": Batch([(0, 200), (40, 100)], None),
    # V2 order: decodes, then ascending query length.
    "mixed": Batch([(300, 1), (500, 1), (0, 40), (200, 150), (144, 260), (0, 300)], 3, (0, 0, 0)),
    # V1 order (decode, short extend, long extend, first chunks): a short first chunk after a
    # long extend is served by Prism with every block.
    "mixed_v1_order": Batch([(300, 1), (2, 1), (200, 150), (0, 40), (0, 300)], 2, (0, 1, 0)),
    "chunked_with_context": Batch([(200, 150)], 0, (0,)),
    "chunked_block_aligned": Batch([(256, 128)], 0, (0,)),
    "prefix_hit": Batch([(144, 260)], 0, (0,)),
    "many_long": Batch([(0, 300), (0, 280), (128, 200), (300, 60)], 0, (0, 0, 0, 0)),
    # Padded batch (full-graph style): trailing requests with no rows.
    "padded_tail": Batch([(300, 1), (0, 300), (0, 0), (0, 0)], 1, (0,)),
    # A decode-length row after a long chunk keeps everything before it on FlashAttention.
    "decode_after_long": Batch([(0, 300), (300, 1), (0, 280)], 2, (0,)),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_route_on_named_batches(name):
    b = BATCHES[name]
    r = route_prism_suffix(b.qsl, b.seq, len(b.reqs), min_query_len=16, min_context_len=256, decode_threshold=1)
    if b.start is None:
        assert r is None
        return
    assert r is not None and r.start == b.start
    live_end = max(i for i, (_, q) in enumerate(b.reqs) if q > 0) + 1
    assert r.end == live_end
    assert r.token_start == int(b.qsl[b.start]) and r.token_end == int(b.qsl[live_end])
    assert tuple(int(x) for x in r.dense) == b.dense
    assert r.ctx_lens.tolist() == [c for c, _ in b.reqs[b.start : live_end]]
    assert r.cu_seqlens_q.tolist() == (b.qsl[b.start : live_end + 1] - b.qsl[b.start]).tolist()


def test_route_respects_speculative_decode_rows_and_drop_first():
    b = Batch([(300, 3), (0, 300), (0, 280)], 1)
    r = route_prism_suffix(b.qsl, b.seq, 3, min_query_len=2, min_context_len=0, decode_threshold=3)
    assert r.start == 1  # the 3-token speculative decode row stays on FlashAttention
    r2 = r.drop_first()
    assert (r2.start, r2.token_start, r2.cu_seqlens_q.tolist()) == (2, 303, [0, 280])
    assert r2.drop_first() is None


# ---------------------------------------------------------------------------------------------
# Model pieces: an owner module with a real vLLM rotary embedding and a real Attention layer
# ---------------------------------------------------------------------------------------------
def _spec(page: int = 16):
    return FullAttentionSpec(block_size=page, num_kv_heads=HKV, head_size=D, dtype=DTYPE)


class _Owner(torch.nn.Module):
    """Stands for a model's attention module: rotary_emb next to the Attention layer."""

    def __init__(self, idx: int, rope: Optional[dict], neox: bool = True, **attn_kw):
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.rotary_embedding import get_rope

        super().__init__()
        if rope is not None:
            self.rotary_emb = get_rope(D, MAX_MODEL_LEN, neox, rope, dtype=DTYPE)
        self.attn = Attention(
            HQ, D, D**-0.5, HKV, prefix=f"model.layers.{idx}.attn", attn_backend=pb.PrismAttentionBackend, **attn_kw
        )


def _model(vc, ropes: list[Optional[dict]], neox: bool = True, **attn_kw) -> list[_Owner]:
    from prism_vllm import plugin

    plugin.register()  # the RoPE-owner hook
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with set_current_vllm_config(vc):
            owners = [_Owner(i, r, neox, **attn_kw) for i, r in enumerate(ropes)]
            for o in owners:  # what vLLM's model loader does once the weights are in
                o.attn.process_weights_after_loading(DTYPE)
            return owners
    finally:
        torch.set_default_dtype(prev)


ROPE = {"rope_theta": 10000.0}


@pytest.mark.parametrize(
    "rope,neox,rotary_dim",
    [
        ({"rope_theta": 10000.0}, True, D),
        ({"rope_theta": 10000.0}, False, D),
        ({"rope_theta": 10000.0, "partial_rotary_factor": 0.5}, True, D // 2),
        (
            {
                "rope_theta": 500000.0,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            True,
            D,
        ),
    ],
    ids=["neox", "gptj", "partial", "llama3_scaled"],
)
def test_rotary_layout_read_from_the_model(base_vllm_config, rope, neox, rotary_dim):
    vc = _vllm_config(base_vllm_config)
    (owner,) = _model(vc, [rope], neox=neox)
    src = resolve_rotary(owner, D)
    assert not isinstance(src, str), src
    assert src.layout == RopeLayout(D, rotary_dim, neox, rope["rope_theta"])
    # The frequencies are the module's own (scaled for llama3), recovered from cos_sin_cache.
    want = owner.rotary_emb._compute_inv_freq(owner.rotary_emb.base).double()
    assert torch.allclose(src.inv_freq, want, rtol=2e-2, atol=1e-5)
    if rope.get("rope_type") == "llama3":
        assert not torch.allclose(src.inv_freq, rope_inv_freq(rotary_dim, rope["rope_theta"]), rtol=1e-2)


def test_missing_rotary_emb_falls_back_with_one_log_line(base_vllm_config, caplog):
    vc = _vllm_config(base_vllm_config)
    pb._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="prism_vllm.attention_backend"):
        owners = _model(vc, [None, None])
        builder = pb.PrismMetadataBuilder(_spec(), [o.attn.layer_name for o in owners], vc, torch.device("cpu"))
    assert not builder.prism_on
    assert all("no rotary_emb" in o.attn.impl.prism_reason for o in owners)
    lines = [r for r in caplog.records if "no rotary_emb" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize(
    "flags,match",
    [
        ({"apply_rope_all_layers": False, "sliding_window": None}, "apply_rope_all_layers=False"),
        ({"v1": False, "sliding_window": None}, "v1=False"),
        ({"use_rope": False}, "use_rope=False"),
    ],
    ids=["exaone4_global", "cohere2_global", "step3p5_nope"],
)
def test_layers_that_skip_their_rotary_emb_are_nope(flags, match):
    """Hybrid models whose global layers own a rotary_emb but do not apply it (their forward
    tests a flag): read the flag, do not trust the attribute alone."""
    owner = torch.nn.Module()
    owner.rotary_emb = SimpleNamespace(rotary_dim=D, is_neox_style=True, base=1e4, cos_sin_cache=None)
    assert not isinstance(resolve_rotary(owner, D), str)
    for k, v in flags.items():
        setattr(owner, k, v)
    reason = resolve_rotary(owner, D)
    assert isinstance(reason, str) and match in reason
    owner.sliding_window = 512 if "use_rope" not in flags else None  # sliding layers do rotate
    assert isinstance(resolve_rotary(owner, D), str) == ("use_rope" in flags)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"per_layer_sliding_window": 64}, "sliding-window"),
        ({"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]}, "ALiBi"),
        ({"logits_soft_cap": 30.0}, "soft-capping"),
        ({"attn_type": AttentionType.ENCODER_DECODER}, "encoder_decoder attention"),
    ],
    ids=["sliding", "alibi", "softcap", "cross"],
)
def test_layers_prism_cannot_serve_stay_on_flash_attention(base_vllm_config, kw, match):
    vc = _vllm_config(base_vllm_config)
    (owner,) = _model(vc, [ROPE], **kw)
    impl = owner.attn.impl
    assert impl.prism_reason is not None and match in impl.prism_reason
    assert not impl.prism_resolve()


def test_fp8_kv_cache_stays_on_flash_attention(base_vllm_config):
    vc = _vllm_config(base_vllm_config)
    with set_current_vllm_config(vc):
        impl = pb.PrismAttentionImpl(HQ, D, D**-0.5, HKV, None, None, "fp8")
    assert "fp8" in impl.prism_reason


def test_non_full_attention_groups_never_plan(base_vllm_config):
    vc = _vllm_config(base_vllm_config)
    (owner,) = _model(vc, [ROPE])
    spec = SlidingWindowSpec(block_size=16, num_kv_heads=HKV, head_size=D, dtype=DTYPE, sliding_window=64)
    builder = pb.PrismMetadataBuilder(spec, [owner.attn.layer_name], vc, torch.device("cpu"))
    assert not builder.prism_on and "SlidingWindowSpec" in builder.prism_reason
    assert owner.attn.impl.prism_layer is not None  # the builder reads its layers, never changes them


def test_backend_declarations():
    assert pb.PrismAttentionBackend.get_name() == "CUSTOM"
    assert pb.PrismAttentionBackend.supports_batch_invariance() is False
    assert pb.PrismAttentionBackend.get_builder_cls() is pb.PrismMetadataBuilder
    assert pb.PrismAttentionBackend.get_impl_cls() is pb.PrismAttentionImpl
    sup = pb.PrismMetadataBuilder.get_cudagraph_support(None, _spec())
    assert sup.value <= AttentionCGSupport.UNIFORM_BATCH.value
    assert pb.PrismMetadataBuilder(_spec(), [], _vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))), torch.device("cpu")).use_cascade_attention() is False


def test_validation_is_flash_attentions_except_batch_invariance():
    from vllm.platforms.interface import DeviceCapability

    cases = [
        dict(head_size=128, kv_cache_dtype="auto", attn_type="decoder"),
        dict(head_size=80, kv_cache_dtype="auto", attn_type="decoder", has_sliding_window=True),
        dict(head_size=64, kv_cache_dtype="fp8", attn_type="encoder_only", use_non_causal=True),
        dict(head_size=72, kv_cache_dtype="bfloat16", attn_type="encoder_decoder"),
    ]
    for c in cases:
        kw = dict(
            dtype=torch.bfloat16, block_size=None, use_mla=False, has_sink=False, use_sparse=False,
            use_mm_prefix=False, use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
        )
        kw.update(c)
        assert pb.PrismAttentionBackend.validate_configuration(**kw) == FlashAttentionBackend.validate_configuration(**kw)


# ---------------------------------------------------------------------------------------------
# Whole batches through builder.build and impl.forward (Prism suffix under the interpreter)
# ---------------------------------------------------------------------------------------------
def _dense(q, k, v, ctx, scale, sinks=None):
    """Dense causal attention (SDPA), with learned sinks through the block-sparse reference
    with every block."""
    if sinks is None:
        return reference.dense_causal_attention(q, k, v, ctx, scale)
    nq, nk = -(-(ctx + q.shape[0]) // 128) - ctx // 128, -(-(ctx + q.shape[0]) // 128)
    every = torch.ones(q.shape[1], nq, nk, dtype=torch.bool)
    return reference.block_sparse_attention(q, k, v, ctx, every, 128, scale, sinks=sinks)


def _paged_dense_attention(query, kv_cache, md, output, scale, sinks=None):
    """Stand-in for FlashAttention on CPU: dense causal attention of md's requests, reading the
    paged cache through md's block table (what FlashAttention's varlen call computes)."""
    k_cache, v_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    page = k_cache.shape[1]
    qsl = md.query_start_loc.tolist()
    seq = md.seq_lens.tolist()
    for r in range(len(seq)):
        a, b = qsl[r], qsl[r + 1]
        if b == a:
            continue
        pos = torch.arange(seq[r])
        pages = md.block_table[r, pos // page].long()
        k, v = k_cache[pages, pos % page], v_cache[pages, pos % page]
        output[a:b] = _dense(query[a:b], k, v, seq[r] - (b - a), scale, sinks)
    return output


@pytest.fixture
def fake_flash(monkeypatch):
    """Replace FlashAttentionImpl.forward (CUDA only) by _paged_dense_attention; record calls."""
    calls = []

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        calls.append(attn_metadata)
        assert attn_metadata.num_actual_tokens >= int(attn_metadata.query_start_loc[-1])
        return _paged_dense_attention(query, kv_cache, attn_metadata, output, self.scale, self.sinks)

    monkeypatch.setattr(FlashAttentionImpl, "forward", forward)
    return calls


@dataclass
class Paged:
    query: torch.Tensor  # [T_pad, HQ, D] strided view (like vLLM's q from the fused qkv)
    kv_cache: torch.Tensor  # FlashAttention's logical (blocks, HKV, page, 2D) view of an NHD cache
    block_table: torch.Tensor
    ks: list
    vs: list
    cm: CommonAttentionMetadata


def _paged_batch(b: Batch, page: int, seed: int, pad_tokens: int = 0) -> Paged:
    """Random K/V written into a randomly permuted paged cache, plus the batch's metadata.

    Keys of block 1 of every sequence share a direction the queries also carry, so estimation
    has something to find (selections are sparse, not all-or-nothing)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [c + q for c, q in b.reqs]
    npages = [-(-s // page) for s in seqs]
    nb = sum(npages) + 5
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(seqs), max(max(npages), 1), dtype=torch.int32)
    phys = torch.zeros(nb, page, HKV, 2 * D, dtype=DTYPE)
    u = torch.randn(D, generator=g)
    ks, vs, used = [], [], 0
    for r, s in enumerate(seqs):
        ids = perm[used : used + npages[r]]
        used += npages[r]
        table[r, : npages[r]] = ids.to(torch.int32)
        k = torch.randn(s, HKV, D, generator=g)
        k[128:256] += 2.5 * u
        k, v = k.to(DTYPE), torch.randn(s, HKV, D, generator=g).to(DTYPE)
        pos = torch.arange(s)
        phys[ids[pos // page].long(), pos % page, :, :D] = k
        phys[ids[pos // page].long(), pos % page, :, D:] = v
        ks.append(k)
        vs.append(v)
    T = int(b.qsl[-1]) + pad_tokens
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, generator=g)
    qkv[:, : HQ * D] += 1.5 * u.repeat(HQ)
    query = qkv.to(DTYPE)[:, : HQ * D].view(T, HQ, D)
    seq_t = b.seq
    cm = CommonAttentionMetadata(
        query_start_loc=b.qsl.clone(),
        query_start_loc_cpu=b.qsl.clone(),
        seq_lens=seq_t.clone(),
        num_reqs=len(seqs),
        num_actual_tokens=T,
        max_query_len=max(q for _, q in b.reqs),
        max_seq_len=max(seqs),
        block_table_tensor=table,
        slot_mapping=torch.zeros(T, dtype=torch.int64),
        seq_lens_cpu_upper_bound=seq_t.clone(),
        positions=torch.cat([torch.arange(c, c + q) for c, q in b.reqs] + [torch.zeros(pad_tokens, dtype=torch.long)]),
    )
    return Paged(query, phys.permute(0, 2, 1, 3), table, ks, vs, cm)


def _expected(b: Batch, p: Paged, start: Optional[int], dense_flags, cfg: PrismConfig, prism_layer: bool,
              sinks=None):
    """Per request: dense causal attention (FlashAttention part, dense rows, non-Prism layers)
    or reference.prism_attention (NeoX RoPE, rotary dim D); with learned ``sinks``, the same
    attention over the same blocks with them."""
    bands = prism_bands(RopeLayout(D, D, True, 10000.0), cfg)  # the rule's bands, as the backend builds them
    out, masks = [], {}
    qsl = b.qsl.tolist()
    for r, (c, q) in enumerate(b.reqs):
        if q == 0:
            continue
        qr = p.query[qsl[r] : qsl[r + 1]]
        on_prism = prism_layer and start is not None and r >= start and not dense_flags[r - start]
        if on_prism:
            o, masks[r] = reference.prism_attention(qr, p.ks[r], p.vs[r], c, bands, cfg, D**-0.5)
            if sinks is not None:
                o = reference.block_sparse_attention(qr, p.ks[r], p.vs[r], c, masks[r], 128, D**-0.5, sinks=sinks)
        else:
            o = _dense(qr, p.ks[r], p.vs[r], c, D**-0.5, sinks)
        out.append(o)
    return torch.cat(out), masks


FORWARD_CASES = {
    # name: (batch, page size, padding tokens)
    "decode_only": ("decode_only", 16, 0),
    "one_long_prefill": ("one_long_prefill", 16, 0),
    "mixed": ("mixed", 16, 0),
    "mixed_v1_order": ("mixed_v1_order", 32, 0),
    "chunked_with_context": ("chunked_with_context", 16, 0),
    "prefix_hit": ("prefix_hit", 128, 0),
    "many_long": ("many_long", 16, 0),
    "padded_tail": ("padded_tail", 16, 8),
}


@pytest.fixture
def fa3_on_cpu(monkeypatch):
    """Layers whose FlashAttention is FA3 (as on Hopper), with reference.paged_varlen_attention
    (FA's documented paged varlen semantics) standing in for vLLM's FA3 kernel."""
    init = FlashAttentionImpl.__init__

    def fa3_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.vllm_flash_attn_version = 3

    monkeypatch.setattr(FlashAttentionImpl, "__init__", fa3_init)
    monkeypatch.setattr(pb, "_FA3", lambda: reference.paged_varlen_attention)
    pb.POOL.clear()
    yield
    pb.POOL.clear()


@pytest.mark.parametrize("case", ["mixed", "chunked_with_context", "prefix_hit", "many_long", "padded_tail"])
@pytest.mark.parametrize("layout", ["auto", "head_views"])
def test_forward_on_named_batches_fa3_attend(base_vllm_config, fake_flash, fa3_on_cpu, case, layout):
    """The same batches with the attend step on FA3 (virtual varlen sequences), in the layout the
    config names ("auto" without a GPU measurement: "head"); both attend exactly the selection."""
    test_forward_on_named_batches(base_vllm_config, fake_flash, case, attend="fa3", layout=layout)


@pytest.fixture
def sinks_allowed(monkeypatch):
    """vLLM's FlashAttentionImpl takes learned sinks only where its FA version has them (3)."""
    from vllm.v1.attention.backends import flash_attn

    monkeypatch.setattr(flash_attn, "flash_attn_supports_sinks", lambda: True, raising=False)  # CPU: not imported


SINKS = torch.tensor([-1.0, 0.0, 1.0, 2.5], dtype=torch.bfloat16)  # one per q head (HQ = 4); FA3 takes bf16


def test_learned_sinks_serve_on_prism_in_a_view_layout(base_vllm_config, fake_flash, fa3_on_cpu, sinks_allowed):
    """A layer with learned sinks (gpt-oss) on the FA3 attend step: "auto" takes "head_views"
    (one FA3 call per q head, each with its own sink), the layer's PrismParams carry the sinks,
    and the output is Prism's selection attended with the sinks (FlashAttention's rows with them
    too)."""
    b = BATCHES["mixed"]
    vc = _vllm_config(base_vllm_config, prism=CFG)  # attend_layout "auto"
    (owner,) = _model(vc, [ROPE], sinks=SINKS)
    impl = owner.attn.impl
    assert impl.prism_reason is None and impl.prism_layer.params.sinks is impl.sinks
    builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
    assert builder.prism_on and "sinks" in builder._shape_key
    p = _paged_batch(b, 16, seed=11)
    md = builder.build(0, p.cm)
    assert md.prism.launches[0].attend.layout == "head_views"
    out = torch.full((p.query.shape[0], HQ, D), float("nan"), dtype=DTYPE)
    impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    T = int(b.qsl[-1])
    cfg = PrismConfig(**CFG)
    want, _ = _expected(b, p, b.start, b.dense, cfg, prism_layer=True, sinks=SINKS)
    torch.testing.assert_close(out[:T].float(), want.float(), atol=5e-3, rtol=5e-3)
    plain, _ = _expected(b, p, b.start, b.dense, cfg, prism_layer=True)
    assert not torch.isnan(out[:T]).any() and (out[:T].float() - plain.float()).abs().max() > 0.05


def test_steps_fa3_cannot_take_go_to_flash_attention_on_layers_only_fa3_serves(
        base_vllm_config, fake_flash, fa3_on_cpu, sinks_allowed, monkeypatch):
    """Layers with learned sinks (what only the FA3 attend step applies; also fp8, soft-cap, head
    sizes the Triton kernel lacks). A step whose rows the attend workspace cannot take: the
    builder hands it to FlashAttention (sinks applied, counted as FlashAttention's tokens). A KV
    cache FA3 cannot view: the layer goes to FlashAttention with the reason, no kernel failure
    (the Triton attend step would have refused the sinks and counted one)."""
    b = BATCHES["mixed"]
    vc = _vllm_config(base_vllm_config, prism=CFG)
    (owner,) = _model(vc, [ROPE], sinks=SINKS)
    impl = owner.attn.impl
    builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
    assert impl._fa3_only and builder._fa3_only
    p = _paged_batch(b, 16, seed=11)
    T = int(b.qsl[-1])
    want, _ = _expected(b, p, b.start, b.dense, PrismConfig(**CFG), prism_layer=False, sinks=SINKS)
    st = stats.PrismStats()
    monkeypatch.setattr(pb, "STATS", st)

    with monkeypatch.context() as m:  # rows too wide for the attend workspace: no bucket plan
        m.setattr(pb, "make_attend_plan", lambda *a, **k: None)
        md = builder.build(0, p.cm)
    assert md.prism is None
    s = st.collect()
    assert s["prism_tokens"] == 0 and s["flash_tokens"] == int(p.cm.query_start_loc_cpu[-1])
    out = torch.full((p.query.shape[0], HQ, D), float("nan"), dtype=DTYPE)
    fake_flash.clear()
    impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    assert fake_flash == [md] and impl.prism_layer is not None
    torch.testing.assert_close(out[:T].float(), want.float(), atol=5e-3, rtol=5e-3)

    md = builder.build(0, p.cm)  # a step Prism plans, on a cache FA3 cannot view
    assert md.prism is not None
    monkeypatch.setattr(pb, "virtual_kv", lambda *a, **k: "strides no virtual page can express")
    out.fill_(float("nan"))
    fake_flash.clear()
    impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    assert fake_flash == [md]  # one FlashAttention call over the whole batch
    torch.testing.assert_close(out[:T].float(), want.float(), atol=5e-3, rtol=5e-3)
    assert impl.prism_layer is None and "cannot view" in impl.prism_reason
    assert st.collect()["kernel_failures"] == 0


@pytest.mark.parametrize("layout,fa3,sinks,match", [("head", True, SINKS, "attend_layout='head'.*'head_views'"),
                                                   ("auto", False, SINKS, "without FA3"),
                                                   ("auto", True, SINKS.float(), "in torch.float32.*bfloat16")])
def test_learned_sinks_without_a_view_layout_stay_on_flash_attention(base_vllm_config, monkeypatch, sinks_allowed,
                                                                     layout, fa3, sinks, match):
    """Sinks Prism cannot carry (a copy layout named in the config, the Triton attend step, a
    dtype FA3 does not take): the layer serves on FlashAttention, the reason naming the setting
    and its fix."""
    if fa3:
        init = FlashAttentionImpl.__init__

        def fa3_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.vllm_flash_attn_version = 3

        monkeypatch.setattr(FlashAttentionImpl, "__init__", fa3_init)
    vc = _vllm_config(base_vllm_config, prism={**CFG, "attend_layout": layout})
    (owner,) = _model(vc, [ROPE], sinks=sinks)
    reason = owner.attn.impl.prism_reason
    assert reason is not None and "learned attention sinks" in reason and re.search(match, reason)


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_on_named_batches(base_vllm_config, fake_flash, case, attend="triton", layout="auto"):
    name, page, pad = FORWARD_CASES[case]
    b = BATCHES[name]
    vc = _vllm_config(base_vllm_config, prism={**CFG, "attend_layout": layout})
    owners = _model(vc, [ROPE, None])  # layer 1 has no rotary_emb: FlashAttention only
    assert owners[0].attn.impl.prism_fa3 == (attend == "fa3")
    names = [o.attn.layer_name for o in owners]
    builder = pb.PrismMetadataBuilder(_spec(page), names, vc, torch.device("cpu"))
    assert builder.prism_on and owners[0].attn.impl.prism_layer is not None
    assert owners[1].attn.impl.prism_layer is None
    p = _paged_batch(b, page, seed=zlib.crc32(case.encode()) % 1000, pad_tokens=pad)

    md = builder.build(0, p.cm)
    step = md.prism
    T = int(b.qsl[-1])
    if b.start is None:
        assert step is None
    else:
        # Routing and metadata: FlashAttention gets the prefix, Prism the suffix.
        assert (step.start, step.token_start, step.token_end) == (b.start, int(b.qsl[b.start]), T)
        assert len(step.launches) == 1  # the workspace holds every named batch in one launch
        launch = step.launches[0]
        plan = launch.plan
        assert (launch.attend is not None) == (attend == "fa3")
        if launch.attend is not None:
            assert launch.attend.layout == ("head" if layout == "auto" else layout)
        assert (launch.token_start, launch.token_end) == (step.token_start, step.token_end)
        assert plan.ctx_lens.tolist() == [c for c, q in b.reqs[b.start :] if q > 0]
        assert plan.cu_seqlens_q.tolist() == (b.qsl[b.start : step.end + 1] - b.qsl[b.start]).tolist()
        assert tuple(plan.dense.tolist()) == b.dense
        assert torch.equal(launch.block_table, p.block_table[b.start : step.end])
        if b.start == 0:
            assert md.prism_head is None
        else:
            head = md.prism_head
            assert head.num_actual_tokens == int(b.qsl[b.start])
            assert head.query_start_loc.tolist() == b.qsl[: b.start + 1].tolist()
            assert head.seq_lens.tolist() == b.seq[: b.start].tolist()
            assert head.max_query_len == max(q for _, q in b.reqs[: b.start])
            assert head.max_seq_len == max(c + q for c, q in b.reqs[: b.start])
            assert head.slot_mapping.shape[0] == int(b.qsl[b.start])
    # The inherited fields always describe the whole batch (for non-Prism layers).
    assert md.num_actual_tokens == p.cm.num_actual_tokens
    assert md.query_start_loc.tolist() == b.qsl.tolist()

    cfg = PrismConfig(**CFG)
    for i, o in enumerate(owners):
        fake_flash.clear()
        out = torch.full((p.query.shape[0], HQ, D), float("nan"), dtype=DTYPE)
        o.attn.impl.forward(o.attn, p.query, None, None, p.kv_cache, md, out)
        want, _ = _expected(b, p, b.start, b.dense, cfg, prism_layer=(i == 0))
        got = out[:T]
        assert not torch.isnan(got).any(), "rows left unwritten"
        torch.testing.assert_close(got.float(), want.float(), atol=5e-3, rtol=5e-3)
        if i == 0 and step is not None:
            assert [m is md.prism_head for m in fake_flash] == ([True] if b.start else [])
        else:
            assert fake_flash == [md]


@pytest.mark.parametrize("attend", ["triton", "fa3"])
def test_a_steps_later_layers_replay_the_estimation_with_their_own_tensors(base_vllm_config, fake_flash, attend,
                                                                          request, monkeypatch):
    """Two Prism layers of one step with their own queries and KV caches: the second layer
    replays the first layer's checked estimation launches (one check per step) and each layer's
    output is its own reference's (a replay that kept layer 0's q or cache would fail here)."""
    import dataclasses as dc

    import prism_vllm.kernels.attend_fa3 as ka
    import prism_vllm.kernels.prefill as kp

    if attend == "fa3":
        request.getfixturevalue("fa3_on_cpu")
    checks, attend_checks = [], []
    real, real_attend = kp._check_launch, ka._check_launch
    monkeypatch.setattr(kp, "_check_launch", lambda *a: checks.append(1) or real(*a))
    monkeypatch.setattr(ka, "_check_launch", lambda *a: attend_checks.append(1) or real_attend(*a))
    b = Batch([(0, 900)], 0, (0,))  # 8 key blocks: rows 2-6 choose among earlier blocks
    knobs = {**CFG, "high_threshold": 0.6, "low_threshold": 0.6}  # sparse enough that selections matter
    vc = _vllm_config(base_vllm_config, prism=knobs)
    owners = _model(vc, [ROPE, ROPE])
    builder = pb.PrismMetadataBuilder(_spec(16), [o.attn.layer_name for o in owners], vc, torch.device("cpu"))
    p0 = _paged_batch(b, 16, seed=11)
    g = torch.Generator().manual_seed(12)
    # layer 1: other queries, keys and values scaled (exact in fp16), the same pages and block table
    # layer 1: its own q (a view of its own qkv, as vLLM's is) and its own cache over the same
    # pages and block table, whose hot key block is 2 instead of 1 (so its selection differs)
    u = torch.randn(D, generator=g)
    qkv1 = torch.randn(p0.query.shape[0], (HQ + 2 * HKV) * D, generator=g)
    qkv1[:, : HQ * D] += 1.5 * u.repeat(HQ)
    query1 = qkv1.to(DTYPE)[:, : HQ * D].view(-1, HQ, D)
    assert query1.stride() == p0.query.stride()
    phys1 = p0.kv_cache.permute(0, 2, 1, 3).clone()  # [pages, page, HKV, 2D]
    ks1, vs1 = [], []
    for r, (k, v) in enumerate(zip(p0.ks, p0.vs)):
        n = k.shape[0]
        k1 = torch.randn(n, HKV, D, generator=g)
        k1[256:384] += 2.5 * u
        k1, v1 = k1.to(DTYPE), (-v.float()).to(DTYPE)
        pos = torch.arange(n)
        ids = p0.block_table[r, pos // 16].long()
        phys1[ids, pos % 16, :, :D] = k1
        phys1[ids, pos % 16, :, D:] = v1
        ks1.append(k1)
        vs1.append(v1)
    p1 = dc.replace(p0, query=query1, kv_cache=phys1.permute(0, 2, 1, 3), ks=ks1, vs=vs1)
    assert p1.kv_cache.stride() == p0.kv_cache.stride()
    md = builder.build(0, p0.cm)
    T = int(b.qsl[-1])
    cfg = PrismConfig(**knobs)
    outs, masks = [], []
    for o, p in zip(owners, (p0, p1)):
        out = torch.full((p.query.shape[0], HQ, D), float("nan"), dtype=DTYPE)
        o.attn.impl.forward(o.attn, p.query, None, None, p.kv_cache, md, out)
        want, m = _expected(b, p, b.start, b.dense, cfg, prism_layer=True)
        torch.testing.assert_close(out[:T].float(), want.float(), atol=5e-3, rtol=5e-3)
        # the layer's own selection, read back from the shared workspace, is its reference's
        launch = md.prism.launches[0]
        n = launch.plan.num_q_blocks * HQ
        got = BlockSelection(launch.plan, md.prism.workspace.sel_idx, md.prism.workspace.sel_cnt[:n]).to_masks()[0]
        assert int((got != m[0]).sum()) <= 2, f"layer selection differs from its reference in {(got != m[0]).sum()} blocks"
        outs.append(out[:T])
        masks.append(m)
    assert len(checks) == 1, "the second layer replays the first layer's checked launches"
    # the FA3 attend step too (copies, FA3 call, scatter), with the layer's own q, out, cache and rows
    assert len(attend_checks) == (1 if attend == "fa3" else 0)
    assert any(not torch.equal(masks[0][r], masks[1][r]) for r in masks[0]), "the layers select differently"


def test_stats_count_rows_and_density(base_vllm_config, fake_flash):
    b = BATCHES["mixed"]
    # No dense tails: these chunks span 2-3 blocks, so their tail rows would select everything.
    cfg = {**CFG, "dense_tail": False}
    vc = _vllm_config(base_vllm_config, prism=cfg)
    (owner,) = _model(vc, [ROPE])
    builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
    p = _paged_batch(b, 16, seed=7)
    stats.reset_stats()
    stats.set_sample_every(1)
    md = builder.build(0, p.cm)
    out = torch.empty(p.query.shape[0], HQ, D, dtype=DTYPE)
    owner.attn.impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    s = stats.collect_stats()
    _, masks = _expected(b, p, b.start, b.dense, PrismConfig(**cfg), prism_layer=True)
    selected = sum(int(m.sum()) for m in masks.values())
    causal = 0
    for r, m in masks.items():
        qb0 = b.reqs[r][0] // 128
        causal += HQ * sum(qb0 + i + 1 for i in range(m.shape[1]))
    assert s["prism_tokens"] == 150 + 260 + 300 and s["flash_tokens"] == 42
    assert s["prism_requests"] == 3 and s["prism_steps"] == 1 and s["sampled_layer_launches"] == 1
    assert (s["selected_blocks"], s["causal_blocks"]) == (selected, causal)
    assert 0 < s["block_density"] < 1
    stats.set_sample_every(16)


def _auto_builder(base_vllm_config, monkeypatch):
    """A min_context_len="auto" builder over one layer whose timing table (lengths 256 / 512)
    says Prism never pays at 256 tokens and pays at 512 below a density of ~0.4 (0.5 assumed),
    with its own stats; MIN_AUTO 128 and EXPLORE_EVERY 2 to fit CPU-sized batches."""
    from prism_vllm.attention_backend import break_even as be

    st = stats.PrismStats()
    st.by_length = stats.LengthDensity((256, 512))
    monkeypatch.setattr(pb, "STATS", st)
    monkeypatch.setattr(be, "MIN_AUTO", 128)
    monkeypatch.setattr(be, "EXPLORE_EVERY", 2)
    cfg = {"min_context_len": "auto", "min_query_len": 16, "dense_tail": False}
    vc = _vllm_config(base_vllm_config, prism=cfg)
    (owner,) = _model(vc, [ROPE])
    builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
    t = be.TimingTable(shape="t", lengths=[256, 512], dense_ms=[1.0, 1.0], estimate_ms=[0.1, 0.1],
                       attend_ms=[[9.0] * 4, [2 * d for d in be.DENSITIES]])
    monkeypatch.setitem(be._TABLES, builder._shape_key, t)
    assert builder._min_context_len() == pb._NEVER  # at the prior density 0.5
    return builder, owner, st, t, cfg


def test_auto_samples_unmeasured_lengths_on_shadow_steps_served_by_flash_attention(base_vllm_config, fake_flash,
                                                                                    monkeypatch):
    """min_context_len="auto" with Prism off at every length for want of a sampled density: a step
    with a chunk at a length where Prism could pay is a shadow step. FlashAttention serves the
    whole batch exactly as without Prism; Prism only estimates, and its selection's block count
    (the reference's) lands in that length's bucket. The decision then uses it; the next steps
    there are plain FlashAttention until EXPLORE_EVERY dense steps have passed."""
    from prism_vllm.attention_backend import break_even as be

    b = BATCHES["mixed"]  # sequence lengths 40, 350, 404, 300 -> buckets 256, 256, 512, 256
    builder, owner, st, t, cfg = _auto_builder(base_vllm_config, monkeypatch)
    p = _paged_batch(b, 16, seed=7)
    md = builder.build(0, p.cm)
    # only the 404-token chunk: no estimation for the 300-token request after it either
    assert md.prism is not None and md.prism.shadow and (md.prism.start, md.prism.end) == (4, 5)
    assert md.prism_head is None and md.num_actual_tokens == p.cm.num_actual_tokens
    out = torch.empty(p.query.shape[0], HQ, D, dtype=DTYPE)
    owner.attn.impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    assert fake_flash == [md]  # FlashAttention over the whole batch, once
    want, _ = _expected(b, p, None, (), PrismConfig(**cfg), prism_layer=False)
    torch.testing.assert_close(out.float(), want.float(), atol=5e-3, rtol=5e-3)
    # the sample: request 4 (context 144, 260 rows: query blocks 1..3) against the reference's selection
    _, masks = _expected(b, p, 4, (0, 1), PrismConfig(**cfg), prism_layer=True)
    causal = HQ * (2 + 3 + 4)
    assert st.by_length.causal == [0, causal]
    learned = st.by_length.densities()
    assert learned[0] is None and learned[1] == pytest.approx(int(masks[4].sum()) / causal)
    c = st.collect()
    assert c["shadow_steps"] == 1 and c["prism_tokens"] == 0 and c["flash_tokens"] == int(b.qsl[-1])
    # what Prism served is reported apart: a shadow step's estimation attended nothing
    assert (c["causal_blocks"], c["selected_blocks"], c["block_density"]) == (0, 0, None)
    assert c["density_by_length"] == {"512": round(learned[1], 4)}
    dens = be.densities_for([None, learned[1]], be.PRIOR_DENSITY)
    got = t.break_even(dens)
    assert builder._min_context_len() == (got if got is not None else pb._NEVER)
    assert st.collect()["break_even"][builder._shape_key]["rows"][1]["density_sampled"]
    # the next two dense steps at 512 are plain FlashAttention; the one after samples again
    assert got is None or got > 404, got  # random data: a dense selection, Prism stays off
    for shadow in (False, False, True):
        md = builder.build(0, p.cm)
        assert (md.prism is not None and md.prism.shadow) is shadow


def test_no_shadow_step_where_prism_has_sampled_or_when_planning_fails(base_vllm_config, fake_flash, monkeypatch,
                                                                       caplog):
    """A length Prism's own launches have sampled needs no shadow step; and a shadow step that
    cannot be planned leaves the step to FlashAttention (logged once), never failing it."""
    b = BATCHES["mixed"]
    p = _paged_batch(b, 16, seed=7)
    monkeypatch.setattr(pb, "_logged_reasons", set())  # logged once per process: not by an earlier run
    builder, _, st, _, _ = _auto_builder(base_vllm_config, monkeypatch)
    st.add_sample(torch.tensor([40]), torch.tensor([1]), [0, 100])  # sampled at 512 by a Prism launch
    md = builder.build(0, p.cm)
    assert md.prism is None and fake_flash == []
    # decode-only steps never look for a shadow step (and count no dense step)
    builder, _, st, _, _ = _auto_builder(base_vllm_config, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(pb, "route_prism_suffix", lambda *a, **k: pytest.fail("routed a decode-only step twice"))
        m.setattr(builder, "_route", lambda cm, fast_build: None)
        assert builder.build(0, _paged_batch(BATCHES["decode_only"], 16, seed=7).cm).prism is None
    assert builder._dense_steps == [None, None]

    builder, _, st, _, _ = _auto_builder(base_vllm_config, monkeypatch)

    def broken(*a, **k):
        raise RuntimeError("no plan")

    monkeypatch.setattr(builder, "_build_split", broken)
    with caplog.at_level("ERROR", logger="prism_vllm.attention_backend"):
        md = builder.build(0, p.cm)
        builder._dense_steps[1] = None  # due again: the failure is logged once
        md2 = builder.build(0, p.cm)
    assert md.prism is None and md2.prism is None and md.num_actual_tokens == p.cm.num_actual_tokens
    assert sum("could not plan a shadow step" in r.getMessage() for r in caplog.records) == 1
    assert st.collect()["shadow_steps"] == 0


def test_route_until_keeps_the_first_requests():
    b = BATCHES["many_long"]
    r = route_prism_suffix(b.qsl, b.seq, len(b.reqs), min_query_len=16, min_context_len=256, decode_threshold=1)
    u = r.until(2)
    assert (u.start, u.end, u.token_start, u.token_end) == (r.start, r.start + 2, r.token_start,
                                                            r.token_start + int(r.cu_seqlens_q[2]))
    assert u.cu_seqlens_q.tolist() == r.cu_seqlens_q[:3].tolist() and u.ctx_lens.tolist() == r.ctx_lens[:2].tolist()
    whole = r.until(r.num_reqs)
    assert (whole.end, whole.token_end, whole.dense.tolist()) == (r.end, r.token_end, r.dense.tolist())
    with pytest.raises(ValueError, match="until"):
        r.until(0)


def test_workspace_too_small_splits_the_prism_part_into_launches(base_vllm_config, fake_flash):
    """A Prism part the preallocated workspace cannot hold at once runs as several launches."""
    b = BATCHES["many_long"]
    # Sized for 128-token steps of sequences up to 400 tokens: room for HQ * 9 selection entries,
    # while the batch needs HQ * (6 + 6 + 5 + 3).
    vc = _vllm_config(base_vllm_config, max_batched_tokens=128, max_model_len=400)
    pb.POOL.clear()
    try:
        (owner,) = _model(vc, [ROPE])
        builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
        p = _paged_batch(b, 16, seed=3)
        md = builder.build(0, p.cm)
    finally:
        pb.POOL.clear()
    step = md.prism
    assert step is not None and step.start == 0
    bounds = [(L.token_start, L.token_end) for L in step.launches]
    q = b.qsl.tolist()
    assert bounds == [(q[0], q[1]), (q[1], q[2]), (q[2], q[4])]
    for L in step.launches:
        assert builder.workspace.fits(L.plan)
    out = torch.full((p.query.shape[0], HQ, D), float("nan"), dtype=DTYPE)
    owner.attn.impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    want, _ = _expected(b, p, 0, b.dense, PrismConfig(**CFG), prism_layer=True)
    torch.testing.assert_close(out.float(), want.float(), atol=5e-3, rtol=5e-3)
    assert fake_flash == []


def test_below_break_even_batches_get_flash_attentions_metadata(base_vllm_config, fake_flash):
    """A batch Prism does not serve (every chunk below min_context_len) gets exactly the metadata
    FLASH_ATTN's own builder makes, and the layer's forward hands exactly that to FlashAttention."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    b = BATCHES["mixed"]
    vc = _vllm_config(base_vllm_config, prism={**CFG, "min_context_len": 100_000})
    (owner,) = _model(vc, [ROPE])
    names = [owner.attn.layer_name]
    ours = pb.PrismMetadataBuilder(_spec(), names, vc, torch.device("cpu"))
    theirs = FlashAttentionMetadataBuilder(_spec(), names, vc, torch.device("cpu"))
    p = _paged_batch(b, 16, seed=5)
    md, want = ours.build(0, p.cm), theirs.build(0, p.cm)
    assert md.prism is None and md.prism_head is None
    for f in dataclasses.fields(want):
        a, w = getattr(md, f.name), getattr(want, f.name)
        if isinstance(w, torch.Tensor):
            assert isinstance(a, torch.Tensor) and torch.equal(a, w), f.name
        else:
            assert a == w, f.name
    out = torch.empty(p.query.shape[0], HQ, D, dtype=DTYPE)
    owner.attn.impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    assert fake_flash == [md]


def test_split_launches_packs_requests_and_skips_oversized_ones():
    from prism_vllm.attention_backend.routing import split_launches

    b = Batch([(0, 300), (0, 280), (1000, 200), (0, 260)], 0)
    r = route_prism_suffix(b.qsl, b.seq, 4, min_query_len=16, min_context_len=256, decode_threshold=1)
    nq, nk, sel = r.block_counts(128, HQ)
    assert nq.tolist() == [3, 3, 3, 3] and nk.tolist() == [3, 3, 10, 3]
    assert sel.tolist() == [HQ * 6, HQ * 6, HQ * (8 + 9 + 10), HQ * 6]
    kw = dict(block_size=128, num_q_heads=HQ, max_reqs=8, max_q_blocks=6, max_sel_capacity=10**6)
    r2, launches = split_launches(r, max_k_blocks=100, **kw)
    assert r2 is r and launches == [(0, 2), (2, 4)]
    # A request with more key blocks than the workspace holds goes (with all before it) to FA.
    r3, launches = split_launches(r, max_k_blocks=9, **kw)
    assert r3.start == 3 and launches == [(0, 1)]


def test_a_failing_kernel_launch_falls_back_to_flash_attention(base_vllm_config, fake_flash, monkeypatch):
    b = BATCHES["mixed"]
    vc = _vllm_config(base_vllm_config)
    (owner,) = _model(vc, [ROPE])
    builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
    p = _paged_batch(b, 16, seed=11)
    md = builder.build(0, p.cm)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(pb, "prism_prefill", broken)
    stats.reset_stats()
    out = torch.full((p.query.shape[0], HQ, D), float("nan"), dtype=DTYPE)
    owner.attn.impl.forward(owner.attn, p.query, None, None, p.kv_cache, md, out)
    want, _ = _expected(b, p, None, (), PrismConfig(**CFG), prism_layer=False)
    torch.testing.assert_close(out.float(), want.float(), atol=5e-3, rtol=5e-3)
    assert fake_flash[-1] is md  # the whole batch, with the full-batch metadata
    assert owner.attn.impl.prism_layer is None and "kernel launch failed" in owner.attn.impl.prism_reason
    assert stats.collect_stats()["kernel_failures"] == 1
