"""min_context_len = "auto": the decision from measured timing tables (pure arithmetic), the
builder using it with the density Prism has been selecting, and what /prism/stats shows.
The measurement itself needs a CUDA GPU (attention_backend/break_even.measure)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from prism_vllm import PrismConfig, stats  # noqa: E402
from prism_vllm.attention_backend import break_even as be  # noqa: E402
from prism_vllm.config import AUTO_FALLBACK_MIN_CONTEXT_LEN  # noqa: E402
from prism_vllm.kernels import make_plan  # noqa: E402

L = [4096, 8192, 16384, 32768, 65536]


def _table(dense, est, attend_at_1, scale_with_density=True):
    """attend at density rho = rho * attend_at_1 (linear), or flat when not scale_with_density."""
    att = [[(r if scale_with_density else 1.0) * a for r in be.DENSITIES] for a in attend_at_1]
    return be.TimingTable(shape="t", lengths=list(L), dense_ms=list(dense), estimate_ms=list(est), attend_ms=att)


def test_break_even_interpolates_between_the_last_loss_and_the_first_gain():
    # dense grows ~quadratically, estimation ~linearly, attend at density 1 costs 1.05x dense
    dense = [0.1, 0.4, 1.6, 6.4, 25.6]
    est = [0.2, 0.3, 0.5, 0.9, 1.7]
    t = _table(dense, est, [1.05 * d for d in dense])
    # density 0.3: ratios 2.3, 1.07, 0.63, 0.45, 0.38 -> pays from 16K, crossing between 8K and 16K
    r = [t.prism_ms(i, 0.3) / dense[i] for i in range(5)]
    assert r[1] > be.MARGIN > r[2]
    got = t.break_even(0.3)
    assert 8192 < got < 16384 and got % 128 == 0
    # denser selections break even later; a tiny one earlier; density 1.0 never pays
    assert t.break_even(0.6) > got > t.break_even(0.1)
    assert t.break_even(1.0) is None


def test_break_even_needs_every_longer_length_to_pay():
    dense = [1.0] * 5
    est = [0.1] * 5
    att = [0.5, 0.5, 2.0, 0.5, 0.5]  # a loss at 16K: Prism only from 32K on
    t = _table(dense, est, att, scale_with_density=False)
    assert 16384 < t.break_even(0.3) <= 32768
    t2 = _table(dense, est, [0.5] * 5, scale_with_density=False)
    assert t2.break_even(0.3) == 4096  # pays at every measured length: the shortest one


def test_a_layer_that_pays_only_at_128k_is_turned_on_there():
    """The timed lengths reach 128K: a table that stopped at 64K would keep such a layer (a small
    model's: SmolLM2 paid 1.19x at 64K, 1.92x at 128K end to end) on FlashAttention for good."""
    assert be.LENGTHS[-2:] == (65536, 131072)
    att = [2.0] * 5 + [0.5]  # Prism loses up to 64K and wins at 128K
    t = be.TimingTable(shape="t", lengths=list(be.LENGTHS), dense_ms=[1.0] * 6, estimate_ms=[0.1] * 6,
                       attend_ms=[[a] * len(be.DENSITIES) for a in att])
    assert 65536 < t.break_even(0.3) <= 131072
    t64 = be.TimingTable(shape="t", lengths=list(be.LENGTHS[:-1]), dense_ms=[1.0] * 5, estimate_ms=[0.1] * 5,
                         attend_ms=[[a] * len(be.DENSITIES) for a in att[:-1]])
    assert t64.break_even(0.3) is None


def test_attend_interpolates_in_density_and_clamps():
    t = _table([1.0] * 5, [0.0] * 5, [1.0] * 5)
    assert t.prism_ms(0, 0.2) == pytest.approx(0.2)  # between 0.1 and 0.3
    assert t.prism_ms(0, 0.01) == pytest.approx(0.1)  # below the lowest measured density
    assert t.prism_ms(0, 1.5) == pytest.approx(1.0)


def test_summary_names_the_decision_and_its_numbers():
    t = _table([0.1, 0.4, 1.6, 6.4, 25.6], [0.2, 0.3, 0.5, 0.9, 1.7], [0.1, 0.4, 1.6, 6.4, 25.6])
    s = t.summary(0.3)
    assert s["min_context_len"] == t.break_even(0.3) and {r["density"] for r in s["rows"]} == {0.3}
    assert [r["tokens"] for r in s["rows"]] == L and s["rows"][2]["dense_ms"] == 1.6
    dens = [0.9, 0.8, 0.6, 0.4, 0.2]
    s = t.summary(dens, [False, False, True, True, False])
    assert [r["density"] for r in s["rows"]] == dens and s["min_context_len"] == t.break_even(dens)
    assert [r["density_sampled"] for r in s["rows"]] == [False, False, True, True, False]
    assert s["rows"][3]["prism_ms_at_density"] == round(t.prism_ms(3, 0.4), 3)


def test_densities_per_length_decide_where_one_figure_would_not():
    """Density falls with length: a table that does not pay at the short lengths' density pays at
    the long lengths' own, and a per-length decision turns Prism on there."""
    dense = [1.0] * 5
    t = _table(dense, [0.1] * 5, [1.5] * 5)  # Prism = 0.1 + 1.5 * density: pays below density 0.53
    assert t.break_even(0.6) is None  # one figure, the short prompts' density: never
    assert 16384 < t.break_even([0.9, 0.8, 0.6, 0.45, 0.3]) <= 32768  # pays at 32K and 64K at their own
    assert t.could_pay(0) and not _table(dense, [0.1] * 5, [9.0] * 5).could_pay(0)


def test_densities_for_carries_the_nearest_shorter_sample_else_the_prior():
    assert be.densities_for([None, None, None], 0.5) == [0.5, 0.5, 0.5]
    assert be.densities_for([None, 0.7, None, 0.3, None], 0.5) == [0.5, 0.7, 0.7, 0.3, 0.3]


def test_measure_without_cuda_gives_no_table():
    assert be.measure("cpu-shape", num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, scale=0.125,
                      params=None, max_model_len=8192, max_num_batched_tokens=4096, flash_attn_varlen_func=None,
                      fa_version=None, fa3_attend=None, device=torch.device("cpu")) is None
    assert be.table_for("cpu-shape") is None


def test_fixed_selection_has_sink_diagonal_and_the_density():
    plan = make_plan([0, 2000], [1000], 4, 128)
    gen = torch.Generator().manual_seed(0)
    sel = be._fixed_selection(plan, 4, 0.3, gen, torch.device("cpu"))
    (m,) = sel.to_masks()
    qb0 = 1000 // 128
    causal = torch.arange(m.shape[2])[None, :] <= (qb0 + torch.arange(m.shape[1]))[:, None]
    assert not (m & ~causal).any()
    assert m[:, :, 0].all() and m[:, torch.arange(m.shape[1]), qb0 + torch.arange(m.shape[1])].all()
    dens = float(m.sum()) / float(causal.sum() * 4)
    assert 0.3 < dens < 0.45  # 0.3 of the blocks plus the forced sink and diagonal


def test_density_by_length_buckets_samples_and_reads_cpu_counters_without_waiting():
    st = stats.PrismStats()
    ld = st.by_length
    assert ld.lengths == be.LENGTHS and ld.densities() == [None] * len(be.LENGTHS)
    # nearest bucket in log scale, clamped at both ends
    assert ld.bucket([100, 4096, 5000, 6000, 24000, 131056, 10**6]).tolist() == [0, 0, 0, 1, 3, 5, 5]
    # one launch: rows of the 8K bucket select 30, of 32K 10, a dense request's rows 99 (slot 6)
    st.add_sample(torch.tensor([20, 10, 10, 99]), torch.tensor([1, 1, 3, 6]), [0, 100, 0, 50, 0, 0])
    assert ld.densities() == [None, pytest.approx(0.3), None, pytest.approx(0.2), None, None]
    c = st.collect()
    assert (c["selected_blocks"], c["causal_blocks"]) == (40, 150)
    assert c["density_by_length"] == {"8192": 0.3, "32768": 0.2}
    # a shadow step's sample (FlashAttention served those rows) teaches the decision only
    st.add_sample(torch.tensor([30]), torch.tensor([2]), [0, 0, 100, 0, 0, 0], served=False)
    c = st.collect()
    assert (c["selected_blocks"], c["causal_blocks"], c["sampled_layer_launches"]) == (40, 150, 1)
    assert c["density_by_length"] == {"8192": 0.3, "16384": 0.3, "32768": 0.2}
    st.reset()  # reported counters start over; what the decision learned stays
    c = st.collect()
    assert c["causal_blocks"] == 0 and c["density_by_length"] == {"8192": 0.3, "16384": 0.3, "32768": 0.2}


def test_config_auto_is_the_default_and_falls_back_without_a_measurement():
    cfg = PrismConfig()
    assert cfg.min_context_len == "auto" and cfg.fixed_min_context_len == AUTO_FALLBACK_MIN_CONTEXT_LEN
    assert PrismConfig(min_context_len=4096).fixed_min_context_len == 4096
    with pytest.raises(ValueError, match=r"prism\.min_context_len='soon'.*\"auto\""):
        PrismConfig(min_context_len="soon")


def test_builder_routes_with_the_measured_break_even(monkeypatch):
    """A builder with min_context_len=auto: no table -> the fixed fallback; a measured table ->
    its break-even at the prior density, then at the sampled density, recorded for /prism/stats."""
    from test_backend import _model, _spec, _vllm_config  # the CPU model pieces of the backend tests

    from vllm.config import DeviceConfig, VllmConfig

    from prism_vllm.attention_backend import backend as pb

    vc = _vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")), prism={"min_context_len": "auto"})
    (owner,) = _model(vc, [{"rope_theta": 10000.0}])
    builder = pb.PrismMetadataBuilder(_spec(), [owner.attn.layer_name], vc, torch.device("cpu"))
    assert builder.prism_on
    assert builder._min_context_len() == AUTO_FALLBACK_MIN_CONTEXT_LEN
    t = _table([0.1, 0.4, 1.6, 6.4, 25.6], [0.2, 0.3, 0.5, 0.9, 1.7], [0.1, 0.4, 1.6, 6.4, 25.6])
    monkeypatch.setitem(be._TABLES, builder._shape_key, t)
    st = stats.PrismStats()
    monkeypatch.setattr(pb, "STATS", st)
    assert builder._min_context_len() == t.break_even(be.PRIOR_DENSITY)
    # Prism has been selecting 10% of the blocks at 8K: 8K and longer decide with 0.1, 4K with the prior
    st.add_sample(torch.tensor([10]), torch.tensor([1]), [0, 100, 0, 0, 0, 0])
    dens = [be.PRIOR_DENSITY] + [0.1] * 4
    assert builder._min_context_len() == t.break_even(dens) < t.break_even(be.PRIOR_DENSITY)
    rec = st.collect()["break_even"][builder._shape_key]
    assert rec["min_context_len"] == t.break_even(dens)
    assert [r["density"] for r in rec["rows"]] == dens
    assert [r["density_sampled"] for r in rec["rows"]] == [False, True, False, False, False]


def _cpu_timing(monkeypatch):
    """The startup timing on CPU: no-op synchronisation, one timed call; returns the PrismParams
    of a 64-dim NeoX layer under the default config."""
    from prism_vllm.kernels import PrismParams
    from prism_vllm.rope import RopeLayout, prism_bands

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(be, "REPS", 1)
    cfg = PrismConfig()
    return PrismParams.make(bands=prism_bands(RopeLayout(64, 64, True), cfg), scale=0.125, config=cfg, device="cpu")


def test_measurement_plumbing_on_cpu(monkeypatch):
    """The GPU-only timing code end to end on tiny shapes: the Triton interpreter for Prism's
    kernels, reference.paged_varlen_attention standing in for FlashAttention (dense) and for FA3
    (attend step), no-op synchronisation. Checks the calls and the table, not the times."""
    from prism_vllm import reference

    params = _cpu_timing(monkeypatch)
    calls = []

    def fa3_stand_in(**kw):  # FA3's keyword semantics; records how the attend step called it
        calls.append(kw["q"].is_contiguous())
        return reference.paged_varlen_attention(**kw)

    # FA3 attend in two layouts, then the Triton attend step
    for fa3, lengths, layout in ((fa3_stand_in, [256, 640], "head"), (fa3_stand_in, [256], "head_views"),
                                 (None, [256], "head")):
        calls.clear()
        t = be._measure(4, 2, 64, torch.float16, 0.125, params, 1024, 384, reference.paged_varlen_attention,
                        None, fa3, torch.device("cpu"), lengths, layout)
        assert t.lengths == lengths and t.chunk == 384
        assert len(t.attend_ms) == len(lengths) and all(len(r) == len(be.DENSITIES) for r in t.attend_ms)
        assert all(x > 0 for x in t.dense_ms + t.estimate_ms)
        # every attend call went through FA3 in the layout asked for: "head" one call on a q copy
        # per bucket, "head_views" one call per q head on views of q
        calls_per_attend = {"head": [True], "head_views": [False] * 4}[layout] if fa3 else []
        assert calls == calls_per_attend * (len(lengths) * len(be.DENSITIES) * (1 + be.REPS))


def test_fp8_cache_measurement_on_cpu(monkeypatch):
    """With an fp8 KV cache the startup inputs are what the engine hands an fp8 layer: cache and q
    in fp8, unit per-tensor scales as descales to both FlashAttention calls (dense and the attend
    step), outputs in the model dtype; the estimation reads them too (interpreter, reference
    attention standing in for FA / FA3)."""
    from prism_vllm import reference

    params = _cpu_timing(monkeypatch)
    fp8 = torch.float8_e4m3fn
    seen = []

    def stand_in(**kw):  # FA's keyword semantics; records what each call was given
        seen.append((kw["q"].dtype, kw["k"].dtype, kw["out"].dtype,
                     tuple(kw["k_descale"].shape) if "k_descale" in kw else None))
        return reference.paged_varlen_attention(**kw)

    t = be._measure(4, 2, 64, torch.float16, 0.125, params, 1024, 384, stand_in, None, stand_in,
                    torch.device("cpu"), [256], "head", fp8=fp8, timer=be._once)
    assert t.lengths == [256] and len(seen) == 1 + len(be.DENSITIES)
    assert all(q == k == fp8 and o == torch.float16 for q, k, o, _ in seen)
    assert seen[0][3] == (1, 2)  # dense: [sequences, kv heads] as vLLM passes them
    assert all(ds is not None for *_, ds in seen[1:])  # the attend step's calls
    # the dense call and the attend step read the fp8 inputs alike: every layout's every-block
    # output equals the dense one (else _choose would reject it)
    monkeypatch.setattr(be, "LAYOUT_TOKENS", 640)
    c = be._choose(("head", "head_views"), num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16,
                   scale=0.125, params=params, max_model_len=1024, max_num_batched_tokens=384,
                   flash_attn_varlen_func=reference.paged_varlen_attention, fa_version=None,
                   fa3_attend=reference.paged_varlen_attention, device=torch.device("cpu"), fp8=fp8)
    assert not c.rejected and set(c.attend_ms) == {"head", "head_views"}


def _choose_cpu(monkeypatch, fa3):
    """break_even._choose on CPU: tiny shapes, the interpreter, reference attention as FA / FA3."""
    from prism_vllm import reference

    params = _cpu_timing(monkeypatch)
    monkeypatch.setattr(be, "LAYOUT_TOKENS", 640)
    return be._choose(("head", "head_views"), num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16,
                      scale=0.125, params=params, max_model_len=1024, max_num_batched_tokens=384,
                      flash_attn_varlen_func=reference.paged_varlen_attention, fa_version=None, fa3_attend=fa3,
                      device=torch.device("cpu"))


@pytest.mark.parametrize("times,fastest", [((2.0, 1.0), "head_views"), ((1.0, 2.0), "head")])
def test_layout_choice_times_the_layouts_that_equal_flash_attention(monkeypatch, times, fastest):
    """Both layouts pass the every-block check and are timed (scripted times, in candidate
    order): the faster one is chosen."""
    from prism_vllm import reference

    scripted = iter(times)
    monkeypatch.setattr(be, "_wall_ms", lambda fn: (fn(), next(scripted))[1])
    c = _choose_cpu(monkeypatch, reference.paged_varlen_attention)
    assert (c.tokens, c.chunk) == (640, 384) and not c.rejected
    assert c.attend_ms == {"head": times[0], "head_views": times[1]} and c.layout == fastest
    assert c.summary()["attend_ms"] == c.attend_ms


def test_layout_choice_rejects_a_layout_whose_output_differs_or_that_raises(monkeypatch):
    from prism_vllm import reference

    def views_off(**kw):  # a stand-in that is wrong on q views (the view layouts' calls) only
        out = reference.paged_varlen_attention(**kw)
        if not kw["q"].is_contiguous():
            kw["out"].add_(0.05)
        return out

    c = _choose_cpu(monkeypatch, views_off)
    assert c.layout == "head" and set(c.attend_ms) == {"head"}
    assert "differs from FlashAttention's by 0.05" in c.rejected["head_views"]

    def copies_raise(**kw):
        if kw["q"].is_contiguous():
            raise RuntimeError("no kernel image")
        return reference.paged_varlen_attention(**kw)

    c = _choose_cpu(monkeypatch, copies_raise)
    assert c.layout == "head_views" and c.rejected == {"head": "RuntimeError: no kernel image"}


def test_choose_layout_without_cuda_or_fa3_chooses_nothing():
    probe = dict(num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, scale=0.125, params=None,
                 max_model_len=8192, max_num_batched_tokens=4096, flash_attn_varlen_func=None, fa_version=None,
                 fa3_attend=None, device=torch.device("cpu"))
    assert be.choose_layout("cpu-shape", ("head", "head_views"), **probe) is None
    assert be.layout_for("cpu-shape") is None


def test_the_backend_uses_the_measured_or_configured_layout(monkeypatch):
    from prism_vllm.attention_backend.backend import attend_layout

    monkeypatch.setitem(be._LAYOUTS, "s", be.LayoutChoice(shape="s", layout="head_views", tokens=1, chunk=1,
                                                          attend_ms={"head_views": 1.0}))
    assert attend_layout(PrismConfig(), "s", 128) == "head_views"
    assert attend_layout(PrismConfig(), "unmeasured", 64) == "head"
    assert attend_layout(PrismConfig(attend_layout="group"), "s", 64) == "group"
    # learned sinks: the view layout whatever was measured for the shape
    monkeypatch.setitem(be._LAYOUTS, "t", be.LayoutChoice(shape="t", layout="head", tokens=1, chunk=1,
                                                          attend_ms={"head": 1.0}))
    assert attend_layout(PrismConfig(), "t", 64) == "head"
    assert attend_layout(PrismConfig(), "t", 64, sinks=True) == "head_views"


def test_auto_times_half_blocks_only_where_fa3_has_a_tile_for_them():
    """"head_halves" is a candidate of "auto" only at head sizes FA3 tiles with 192 query rows
    (<= 64), where its 64-row tile may pay; layers with learned sinks keep the view layout."""
    from prism_vllm.attention_backend.backend import auto_layouts

    assert auto_layouts(False, 64) == ("head", "head_views", "head_halves")
    assert auto_layouts(False, 32) == ("head", "head_views", "head_halves")
    for d in (80, 96, 128, 256):
        assert auto_layouts(False, d) == ("head", "head_views")
    assert auto_layouts(True, 64) == ("head_views",)


@pytest.mark.parametrize("page,max_model_len,S_max",
                         [(16, 131072, 131072), (32, 1000, 640), (16, 40000, 8192), (16, 4000, 4000), (256, 100000, 4096)])
def test_synthetic_cache_is_laid_out_as_vllms(page, max_model_len, S_max):
    """The startup measurement's cache and page table have the strides and page size of the
    engine's (vLLM's own FlashAttention cache shape and stride order; a table row of
    cdiv(max_model_len, page) entries), so the kernels it compiles are the ones requests run
    (Triton specialises on strides divisible by 16; a 131072 / 16 + 1 column table had made the key
    pooling compile again on the first request)."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as FA
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    hq, hkv, d = 4, 2, 64
    syn = be._Synthetic(hq, hkv, d, torch.float16, 64, S_max, torch.device("cpu"), None, None, 0.125,
                        max_model_len=max_model_len, page_size=page)
    n_pages = -(-S_max // page)
    vc = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(vc):
        shape = FA.get_kv_cache_shape(n_pages, page, hkv, d)
        order = FA.get_kv_cache_stride_order()
    spec = FullAttentionSpec(block_size=page, num_kv_heads=hkv, head_size=d, dtype=torch.float16)
    physical = torch.empty([shape[i] for i in order], dtype=torch.float16)
    kv_cache = physical.permute([order.index(i) for i in range(len(order))])  # as vLLM hands it over
    k_real = kv_cache.transpose(1, 2).split(d, dim=-1)[0]  # as PrismAttentionImpl._cache_views reads it
    assert syn.k_cache.shape == k_real.shape and syn.k_cache.stride() == k_real.stride()
    # the runner's block table, built as vLLM builds it (its rows rounded up for some backends)
    rows = MultiGroupBlockTable(4, 256, False, torch.device("cpu"), [page], [page],
                                [spec.max_num_blocks_per_req(vc, max_model_len)])
    width = rows.block_tables[0].max_num_blocks_per_req
    assert syn.table.shape == (1, width) and syn.table.stride(0) == width
    assert sorted(syn.table[0, :n_pages].tolist()) == list(range(n_pages))  # every page once, shuffled
    assert not syn.table[0, n_pages:].any()


def test_startup_pools_queries_with_every_tile_a_step_can_pick(monkeypatch):
    """The query pooling's head tile widens with a step's query-block count (pooling_launch); the
    startup runs pool_queries with every tile the rule picks for any count its chunk rows allow
    (here 32 q heads of d=128: 8-, 16- and 32-head tiles), so none compiles mid-serving."""
    from prism_vllm.kernels import pooling

    rule, used = pooling.pooling_launch, []

    def recorded(h, d, n=0):
        ln = rule(h, d, n)
        used.append(ln)
        return ln

    monkeypatch.setattr(pooling, "pooling_launch", recorded)
    syn = be._Synthetic(32, 8, 128, torch.float16, 300, 300, torch.device("cpu"), None, None, 0.1, max_model_len=300)
    assert syn.pool_query_tiles() == 3
    every = {rule(32, 128, n) for n in range(1, 301)}
    assert len(every) == 3 and set(used) == every


def test_backend_hands_the_engines_page_size_to_the_measurements():
    from prism_vllm.attention_backend.backend import _page_size

    class Cache:
        block_size = 32

    class Config:
        cache_config = Cache()

    assert _page_size(Config()) == 32
    Cache.block_size = None  # not resolved yet: FlashAttention's smallest page
    assert _page_size(Config()) == 16 and _page_size(None) == 16


def test_startup_probe_carries_the_layer_and_the_fp8_cache(monkeypatch):
    """What a layer hands break_even at startup: keyword arguments its measurements take (bound
    to measure's signature, so a key it does not take fails), the engine's limits and page size,
    and for an fp8 KV cache the fp8 dtype, under a shape key of its own (fp8 timings never stand
    in for the model dtype's)."""
    import inspect

    from test_backend import MAX_MODEL_LEN, _model, _vllm_config
    from vllm.config import DeviceConfig, VllmConfig
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", reference_fa := object(), raising=False)
    vc = _vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")), max_batched_tokens=2048)
    vc.cache_config.block_size = 32
    (owner,) = _model(vc, [{"rope_theta": 10000.0}])
    impl = owner.attn.impl
    key, probe = impl._startup_probe(torch.bfloat16)
    bound = inspect.signature(be.measure).bind(key, **probe, layout="head").arguments
    assert (bound["max_model_len"], bound["max_num_batched_tokens"], bound["page_size"]) == (MAX_MODEL_LEN, 2048, 32)
    assert bound["flash_attn_varlen_func"] is reference_fa and bound["fp8"] is None and "fp8" not in key
    assert (bound["num_q_heads"], bound["num_kv_heads"], bound["head_dim"]) == (
        impl.num_heads, impl.num_kv_heads, impl.head_size)
    impl._fp8 = True  # as for --kv-cache-dtype fp8 (which CPU layers do not serve)
    key8, probe8 = impl._startup_probe(torch.bfloat16)
    assert probe8["fp8"] == torch.float8_e4m3fn and key8 != key and "fp8-kv" in key8


def _fake_gpu(monkeypatch, fail_heads=()):
    """``_measure`` recorded instead of run (its keyword arguments bound to the real signature, so
    a probe key it does not take fails), CUDA calls stubbed: (calls, probe)."""
    import inspect

    real = inspect.signature(be._measure)
    calls = []

    def fake_measure(*args, **kw):
        b = real.bind(*args, **kw)
        b.apply_defaults()
        a = b.arguments
        calls.append((a["lengths"], a["timer"], a["layout"], a["page_size"]))
        if a["num_q_heads"] in fail_heads:
            raise RuntimeError("out of memory")
        n = len(a["lengths"])
        return be.TimingTable(shape="", lengths=list(a["lengths"]), dense_ms=[1.0] * n, estimate_ms=[0.1] * n,
                              attend_ms=[[0.5] * len(be.DENSITIES)] * n, chunk=a["max_num_batched_tokens"])

    monkeypatch.setattr(be, "_measure", fake_measure)
    for name in ("_WARM", "_TABLES", "_LAYOUTS"):
        monkeypatch.setattr(be, name, {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "FakeGPU")
    probe = dict(num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, scale=0.125, params=None,
                 max_model_len=40000, max_num_batched_tokens=8192, flash_attn_varlen_func=None, fa_version=3,
                 fa3_attend=None, device=torch.device("cuda"), page_size=16)
    return calls, probe


def test_warm_up_runs_the_synthetic_calls_once_at_the_lengths_prism_serves(monkeypatch, caplog):
    """An integer min_context_len times nothing, but the startup still runs Prism's kernels once
    per layer shape (vLLM's warm-up sends no prefill through the backend), at the measured lengths
    from the bucket holding min_context_len up to max_model_len, then at max_model_len itself
    (each power-of-two row length of the selection is its own compiled launch)."""
    calls, probe = _fake_gpu(monkeypatch, fail_heads=(3,))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert be.warm_up("a", min_len=20000, **probe) is None  # no CUDA: nothing runs
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("INFO", logger="prism_vllm.attention_backend"):
        assert be.warm_up("a", min_len=20000, **probe, layout="head_views") >= 0
        assert be.warm_up("a", min_len=0, **probe) is not None  # once per shape and process
    assert calls == [([16384, 32768], be._once, "head_views", 16), ([40000], be._once, "head_views", 16)]
    assert caplog.text.count("Prism: kernels for a compiled on FakeGPU") == 1  # logged once, not per layer
    assert "16384, 32768, 40000 tokens" in caplog.text
    calls.clear()
    assert be.warm_up("b", min_len=0, **{**probe, "max_model_len": 131072}) is not None
    assert calls[0][0] == [4096, 8192, 16384, 32768, 65536, 131072] and len(calls) == 1  # nothing longer
    calls.clear()
    assert be.warm_up("b2", min_len=0, **{**probe, "max_model_len": 1 << 20}) is not None
    assert calls[1][0] == [be.TOP_WARM_TOKENS]  # 2049 blocks: the multi-pass launch, not 1M tokens
    calls.clear()
    assert be.warm_up("b3", min_len=0, **{**probe, "max_model_len": 3000}) is not None
    assert calls == [([3000], be._once, "head", 16)]  # shorter than every bucket: max_model_len itself
    assert be.warm_up("c", min_len=50000, **probe) is None and len(calls) == 1  # Prism serves no length
    with caplog.at_level("WARNING", logger="prism_vllm.attention_backend"):
        assert be.warm_up("d", min_len=0, **{**probe, "num_q_heads": 3}) is None
        assert be.warm_up("d", min_len=0, **{**probe, "num_q_heads": 3}) is None
    assert "could not run 4096/8192/16384/32768 untimed for d (RuntimeError: out of memory)" in caplog.text
    assert len(calls) == 3  # the buckets and the top length each tried once, not again for the next layer


def test_measure_runs_longer_sequences_untimed_and_caches_failures(monkeypatch, caplog):
    """"auto": the table is timed at the buckets up to max_model_len, max_model_len itself runs
    once untimed (its selection launch compiles at startup); the decision is logged once per shape
    and a failed measurement is not retried by the next layer of that shape."""
    calls, probe = _fake_gpu(monkeypatch, fail_heads=(3,))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("INFO", logger="prism_vllm.attention_backend"):
        t = be.measure("m", **probe)
        assert be.measure("m", **probe) is t and be.table_for("m") is t
    assert t.lengths == [4096, 8192, 16384, 32768]
    assert [c[0] for c in calls] == [[4096, 8192, 16384, 32768], [40000]]
    assert calls[0][1] is be._wall_ms and calls[1][1] is be._once
    assert caplog.text.count("Prism: timed dense vs Prism for m on FakeGPU") == 1
    calls.clear()
    assert be.measure("f", **{**probe, "num_q_heads": 3}) is None
    assert be.measure("f", **{**probe, "num_q_heads": 3}) is None and len(calls) == 1
    assert be.table_for("f") is None


def test_warm_up_calls_each_synthetic_kernel_once_on_cpu(monkeypatch):
    """``_measure`` with warm_up's timer on CPU (interpreter, reference attention as FA / FA3):
    one call per synthetic launch instead of a warm-up and REPS timed calls."""
    from prism_vllm import reference

    params = _cpu_timing(monkeypatch)
    n = []

    def fa3_stand_in(**kw):
        n.append(1)
        return reference.paged_varlen_attention(**kw)

    t = be._measure(4, 2, 64, torch.float16, 0.125, params, 1024, 384, reference.paged_varlen_attention, None,
                    fa3_stand_in, torch.device("cpu"), [256, 640], "head", timer=be._once)
    assert t.lengths == [256, 640] and len(n) == 2 * len(be.DENSITIES)
