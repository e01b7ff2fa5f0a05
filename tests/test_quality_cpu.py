"""The CPU quality harness's pieces: its fast block-sparse attention equals the reference, the
candidate selection rules keep the paper rule's guarantees (sink, diagonal, causality, budget)."""

import pytest
import torch

from benchmarks.quality_cpu import Setting, block_sparse_attention_cpu, spaced_windows
from prism_vllm import PrismConfig
from prism_vllm import reference as R
from prism_vllm.rope import RopeLayout, rope_bands
from prism_vllm.rules import RULES, select_blocks_rule

BANDS = rope_bands(RopeLayout(64, 64), 32, 48)


@pytest.mark.parametrize("L,hq,hkv", [(1, 2, 2), (127, 4, 1), (300, 3, 1), (512, 8, 2), (1000, 9, 3)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=lambda d: f"dens{d}")
def test_cpu_block_sparse_attention_equals_reference(L, hq, hkv, density):
    g = torch.Generator().manual_seed(L + hq)
    q, k, v = (torch.randn(n, L, 64, generator=g) for n in (hq, hkv, hkv))
    nb = -(-L // 128)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    sel = (torch.rand(hq, nb, nb, generator=g) < density) & causal
    sel[:, torch.arange(nb), torch.arange(nb)] = True
    want = R.block_sparse_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 0, sel, 128, 0.125)
    got = block_sparse_attention_cpu(q, k, v, sel, 0.125, 128)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=2e-5, rtol=1e-4)
    if density == 1.0:
        torch.testing.assert_close(block_sparse_attention_cpu(q, k, v, None, 0.125, 128), got, atol=2e-5, rtol=1e-4)


def _pooled(nq=12, hq=4, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nq, hq, 64, generator=g) * 2, torch.randn(nq, hkv, 64, generator=g) * 2


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("budget", [None, 0.3])
def test_rules_keep_sink_diagonal_causality_and_budget(rule, budget):
    qp, kp = _pooled()
    cfg = PrismConfig(high_threshold=0.9, low_threshold=0.9, block_budget=budget)
    sel = select_blocks_rule(qp, kp, 0, BANDS, cfg, rule=rule)
    nb = qp.shape[0]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert sel.shape == (4, nb, nb)
    assert not (sel & ~causal).any()
    assert sel[:, :, 0].all() and sel[:, torch.arange(nb), torch.arange(nb)].all()
    if budget is not None:
        cap = R.budget_counts(torch.arange(1, nb + 1), budget).clamp_min(2)
        assert (sel.sum(-1) <= cap).all()
    full = select_blocks_rule(qp, kp, 0, BANDS, PrismConfig(high_threshold=1.0, low_threshold=1.0), rule=rule)
    assert torch.equal(full, causal.expand_as(full))


def test_paper_rule_is_the_reference_and_union_contains_it():
    qp, kp = _pooled(seed=3)
    cfg = PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.9)
    paper = select_blocks_rule(qp, kp, 0, BANDS, cfg, rule="paper")
    assert torch.equal(paper, R.select_blocks(qp, kp, 0, BANDS, cfg))
    union = select_blocks_rule(qp, kp, 0, BANDS, cfg, rule="paper+meanpool")
    mean = select_blocks_rule(qp, kp, 0, BANDS, cfg, rule="meanpool")
    assert torch.equal(union, paper | mean)


def test_unknown_rule_names_the_valid_ones():
    qp, kp = _pooled()
    with pytest.raises(ValueError, match="paper, meanpool"):
        select_blocks_rule(qp, kp, 0, BANDS, PrismConfig(), rule="nope")


def test_setting_names_round_trip_and_windows_spread():
    for s in ("paper:0.95", "mass:0.97", "paper:0.99:b0.3"):
        assert Setting.parse(s).name == s
    assert Setting.parse("meanpool:0.99@2") == Setting("meanpool", 0.99, None, 2)
    with pytest.raises(ValueError):
        Setting.parse("paper")
    w = spaced_windows(list(range(1000)), 100, 3)
    assert [s for s, _ in w] == [0, 450, 900] and w[2][1] == list(range(900, 1000))


@pytest.mark.parametrize("L,hq,hkv", [(256, 2, 1), (300, 4, 2), (129, 3, 3)], ids=str)
def test_fast_block_mass_equals_the_recall_harness(L, hq, hkv):
    from benchmarks.quality_cpu import block_mass_causal
    from benchmarks.recall import block_mass

    g = torch.Generator().manual_seed(L)
    q, k = torch.randn(hq, L, 64, generator=g), torch.randn(hkv, L, 64, generator=g)
    want = block_mass(q.transpose(0, 1), k.transpose(0, 1), 128, 0.125)
    torch.testing.assert_close(block_mass_causal(q, k, 0.125, 128), want, atol=1e-5, rtol=1e-5)


def test_proxy_table_gqa_union_is_the_groups_selection_for_every_head():
    """The recall screen's GQA-group union (what a packed-heads attend step computes): per kv
    head, the blocks any of its q heads selected, counted for every head of the group."""
    from benchmarks.quality_cpu import proxy_table

    nq, hq, hkv = 12, 4, 2
    qp, kp = _pooled(nq, hq, hkv, seed=5)
    L = nq * 128
    mass = torch.rand(hq, nq, nq, generator=torch.Generator().manual_seed(6)).tril()
    base = PrismConfig()
    rows = {(r["rule"], r["top_p"]): r for r in proxy_table([(0, qp, kp, mass)], BANDS, base, L, grid=(0.8,))}
    row = rows[("paper", 0.8)]
    sel = select_blocks_rule(qp, kp, 0, BANDS, Setting("paper", 0.8).config(base), seq_len=L, rule="paper")
    causal = hq * nq * (nq + 1) // 2
    union = torch.stack([sel[2 * j : 2 * j + 2].any(0) for j in range(hkv) for _ in range(2)])
    assert row["density"] == pytest.approx(float(sel.sum()) / causal)
    assert row["union_density"] == pytest.approx(float(union.sum()) / causal)
    assert row["union_recall"] == pytest.approx(float((mass * union).sum()) / (hq * L))
    assert row["union_density"] > row["density"], "random heads of a group select differently"


def test_windows_beyond_the_native_context_get_yarn(tmp_path):
    """32K windows run SmolLM2 (native 8K) with YaRN x4, as the GPU sweep's engines; 8K ones do not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.quality_cpu import load_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    native = load_model(str(tmp_path), 8192)
    long = load_model(str(tmp_path), 32768)
    assert native.config.rope_parameters["rope_type"] == "default"
    rp = long.config.rope_parameters
    assert (rp["rope_type"], rp["factor"], rp["original_max_position_embeddings"]) == ("yarn", 4.0, 8192)
    # the rotary module follows: YaRN stretches the slow frequencies, keeps the fastest
    f_native = native.model.rotary_emb.inv_freq
    f_long = long.model.rotary_emb.inv_freq
    assert torch.allclose(f_long[0], f_native[0]) and f_long[-1] < f_native[-1] * 0.5
