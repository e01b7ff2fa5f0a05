"""The end-to-end benchmark harness (benchmarks/): its math against independent references, its
prompts, its job plumbing (time limits, partial results) and a whole CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks import common, corpus, prompts, quality, recall, report, run
from prism_vllm.config import PrismConfig
from prism_vllm.rope import RopeLayout, prism_bands, rope_bands

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


# -- recall math ---------------------------------------------------------------------------------
def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """NeoX RoPE on [L, H, D] (positions 0..L-1)."""
    L, _, D = x.shape
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


@pytest.mark.parametrize("L,hq,hkv,chunk", [(300, 4, 2, 128), (512, 2, 2, 256), (129, 4, 1, 1024)],
                         ids=["L300-gqa2-chunk128", "L512-mha-chunk256", "L129-gqa4-onechunk"])
def test_block_mass_equals_dense_softmax(L: int, hq: int, hkv: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(L)
    q = torch.randn(L, hq, 16, generator=g)
    k = torch.randn(L, hkv, 16, generator=g)
    scale = 0.3
    got = recall.block_mass(q, k, 128, scale, chunk)
    # independent: the full causal probability matrix, summed per block pair
    kk = k.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk.double()) * scale
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    nb = -(-L // 128)
    want = torch.zeros(hq, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            want[:, i, j] = p[:, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].sum(dim=(1, 2))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_topk_rows() -> None:
    s = torch.tensor([[0.1, 0.5, 0.3, -math.inf], [3.0, 1.0, 2.0, 0.0]])
    m = recall.topk_rows(s, torch.tensor([2, 1]))
    assert m.tolist() == [[False, True, True, False], [True, False, False, False]]


def _structured_qk(L: int = 1024, hq: int = 4, hkv: int = 2, d: int = 32, seed: int = 0):
    """Queries that attend to a few recurring 'topic' keys far back plus locally (RoPE applied)."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(6, d, generator=g)
    tid = torch.randint(0, 6, (L // 64 + 1,), generator=g).repeat_interleave(64)[:L]
    k = 0.7 * torch.randn(L, hkv, d, generator=g) + 1.5 * topics[tid][:, None]
    q = 0.7 * torch.randn(L, hq, d, generator=g) + 1.5 * topics[tid][:, None]
    return _rope(q), _rope(k)


def test_layer_recall_orders_and_limits() -> None:
    q, k = _structured_qk()
    d = q.shape[-1]
    bands = rope_bands(RopeLayout(head_size=d, rotary_dim=d), *PrismConfig().band_dims(d))
    cfg = PrismConfig(high_threshold=0.8, low_threshold=0.8)
    r = recall.layer_recall(q, k, bands, cfg)
    for m in recall.METHODS:
        assert 0.0 < r[f"{m}_recall"] <= 1.0 + 1e-6
        assert 0.0 < r[f"{m}_density"] <= 1.0
    # equal block counts by construction; the oracle is the best selection of that size
    assert r["meanpool_topk_density"] == pytest.approx(r["prism_density"])
    assert r["oracle_density"] == pytest.approx(r["prism_density"])
    assert r["oracle_recall"] >= r["prism_recall"] - 1e-6
    assert r["oracle_recall"] >= r["meanpool_topk_recall"] - 1e-6
    assert r["prism_density"] < 0.9  # the structured input is genuinely sparse at p=0.8
    # every block selected: all the mass is kept
    full = recall.layer_recall(q, k, bands, PrismConfig(high_threshold=1.0, low_threshold=1.0))
    assert full["prism_recall"] == pytest.approx(1.0, abs=1e-5)
    assert full["prism_density"] == pytest.approx(1.0)


def test_layer_recall_matches_reference_selection() -> None:
    """prism_recall is the mass inside prism_vllm.reference's own mask under the paper's rule
    (study_config), meanpool_recall the mass inside the product's mean-pooling rule's mask."""
    from prism_vllm.reference import prism_attention

    q, k = _structured_qk(L=640, seed=0)
    d = q.shape[-1]
    layout = RopeLayout(head_size=d, rotary_dim=d)
    cfg = PrismConfig(high_threshold=0.7, low_threshold=0.7)
    assert cfg.rule == "meanpool"  # the default preset's
    paper = recall.study_config(cfg)
    assert paper.rule == "paper" and paper.high_threshold == 0.7
    _, mask = prism_attention(q, k, k, 0, prism_bands(layout, paper), paper)
    _, mp_mask = prism_attention(q, k, k, 0, prism_bands(layout, cfg), cfg)
    assert not torch.equal(mask, mp_mask)  # the two rules differ on this input
    M = recall.block_mass(q, k, 128, 1 / math.sqrt(d))
    r = recall.layer_recall(q, k, prism_bands(layout, paper), paper)
    rows = q.shape[1] * q.shape[0]
    assert r["prism_recall"] == pytest.approx(float((M * mask).sum()) / rows, rel=1e-5)
    assert r["meanpool_recall"] == pytest.approx(float((M * mp_mask).sum()) / rows, rel=1e-5)
    nb = mask.shape[1]
    assert r["prism_density"] == pytest.approx(float(mask.sum()) / (q.shape[1] * nb * (nb + 1) / 2))


def test_recall_job_compares_the_papers_rule_under_the_default_preset(tmp_path: Path, monkeypatch) -> None:
    """The job studies the paper's rule (bands and calibration) beside mean-pooling, also when the
    job's config is the default preset, whose own rule is mean-pooling."""
    from benchmarks import worker

    seen = []
    real = recall.layer_recall
    monkeypatch.setattr(recall, "layer_recall", lambda q, k, bands, cfg, *a: seen.append((bands, cfg)) or real(q, k, bands, cfg, *a))
    path = common.write_tiny_llama(tmp_path / "m", vocab_size=256)
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    res = worker.Result(None)
    worker.run_recall_job({"model": str(path), "device": "cpu", "dtype": "float32", "prism": {},
                           "items": [{"length": 256, "ids": ids}]}, res)
    assert seen and all(cfg.rule == "paper" and cfg.calibrated for _, cfg in seen)
    assert all(not torch.equal(bands.high, bands.low) for bands, _ in seen)  # two bands, not one
    assert len(res.data["rows"][0]["layers"]) == len(seen)


@pytest.mark.parametrize("via", ["implementation", "override"])
def test_capture_keeps_model_outputs(tmp_path: Path, via: str) -> None:
    from benchmarks.worker import load_hf_model

    path = common.write_tiny_llama(tmp_path / "m", vocab_size=256)
    model = load_hf_model(str(path), None, "float32", "cpu")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    seen = []
    got = recall.capture_qk(model, ids, lambda i, q, k, s: seen.append((i, q, k, s)), via=via)
    with torch.no_grad():
        want = model(input_ids=ids[None], use_cache=False).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][1].shape == (200, 4, 16) and seen[0][2].shape == (200, 2, 16) and seen[0][3] == pytest.approx(0.25)
    # the captured q/k are the layer's post-RoPE projections: recompute layer 0's from its input
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[None]))
        pos = model.model.rotary_emb(h, torch.arange(200)[None])
        q = attn.q_proj(h).view(1, 200, 4, 16).transpose(1, 2)
        k = attn.k_proj(h).view(1, 200, 2, 16).transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, *pos)
    torch.testing.assert_close(seen[0][1], q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0][2], k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


# -- prompts ---------------------------------------------------------------------------------------
def test_needle_cases_exact_length_key_and_depth() -> None:
    tok = common.ByteTokenizer()
    ids = tok.encode(corpus.synthetic_text(3000, seed=1))
    cases = prompts.needle_cases(tok, ids, [700, 1200], depths=(0.0, 0.5, 1.0), seeds=(0, 1))
    assert len(cases) == 2 * 2 * 3 * 2
    for c in cases:
        assert len(c["ids"]) == c["length"]
        text = tok.decode(c["ids"])
        assert c["key"] in text
        if c["kind"] == "single":
            pos = text.index(f"The pass key is {c['key']}")
            frac = pos / len(text)
            assert abs(frac - c["depth"]) < 0.35, (c["id"], frac)
        else:
            assert len(re.findall(r"The pass key for the \w+ door is \d{5}\.", text)) == 4
            asked = text.rsplit("What is the pass key for the ", 1)[1].split(" door")[0]
            assert f"The pass key for the {asked} door is {c['key']}." in text
    # keys and haystack are shared across the depths of one seed, differ across seeds
    s0 = [c for c in cases if c["kind"] == "single" and c["length"] == 700 and c["seed"] == 0]
    s1 = [c for c in cases if c["kind"] == "single" and c["length"] == 700 and c["seed"] == 1]
    assert len({c["key"] for c in s0}) == 1 and s0[0]["key"] != s1[0]["key"]


def test_score_needle() -> None:
    tok = common.ByteTokenizer()
    case = {"key": "71432"}
    assert prompts.score_needle(tok, case, tok.encode(" 71432. Remember"))
    assert prompts.score_needle(tok, case, tok.encode(" 7 1 4 3 2"))
    assert not prompts.score_needle(tok, case, tok.encode(" 71433"))
    assert not prompts.score_needle(tok, case, tok.encode(" 714320"))
    assert not prompts.score_needle(tok, case, tok.encode(" the key"))


def test_ppl_summary() -> None:
    rows = [[-1.0, -2.0, -3.0, -4.0], [-0.5] * 4]
    s = prompts.ppl_summary(rows)
    assert s["tokens"] == 8
    assert s["ppl"] == pytest.approx(math.exp((10 + 2) / 8))
    assert s["ppl_last_quarter"] == pytest.approx(math.exp((4 + 0.5) / 2))


# -- corpus ----------------------------------------------------------------------------------------
def test_parse_fortunes_and_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = ("A clash of doctrine is not a disaster.\n\t\t-- Whitehead\n%\n"
           "  ___\n |   |\n |___|\n%\n\n%\nLine one\n\tindented line two\n")
    assert corpus.parse_fortunes(raw) == ["A clash of doctrine is not a disaster.\n-- Whitehead",
                                          "Line one\nindented line two"]
    fdir = tmp_path / "fortunes"
    fdir.mkdir()
    (fdir / "wisdom").write_text(raw)
    (fdir / "literature").write_text("A classic is something that everyone wants to have read.\n%\n")
    monkeypatch.setattr(corpus, "SYSTEM_DIR", fdir)
    p = corpus.ensure_corpus(tmp_path / "data", download=False)
    text = p.read_text()
    assert text.startswith("A classic")  # FORTUNE_FILES order: literature before wisdom
    assert "Whitehead" in text and "___" not in text
    info = corpus.corpus_info(tmp_path / "data")
    assert info["chars"] == len(text) and info["source"].startswith("installed:")
    w = corpus.token_windows(list(range(10)), 4, 3, start=1)
    assert w == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2]]


# -- speed summary ---------------------------------------------------------------------------------
def _pairs(ratios):
    return [{"length": L, "dense_ms": 10.0, "prism_ms": 10.0 * r} for L, r in ratios]


def test_break_even() -> None:
    be = report.break_even(_pairs([(8192, 1.5), (16384, 1.1), (32768, 0.5), (65536, 0.3)]))
    # log-linear crossing between 16K (1.1) and 32K (0.5): 16K * 2^(0.1/0.6)
    assert be["tokens"] == round(16384 * 2 ** (0.1 / 0.6))
    assert be["recommended_min_context_len"] % 1024 == 0 and be["recommended_min_context_len"] >= be["tokens"]
    assert report.break_even(_pairs([(8192, 0.9), (16384, 0.5)]))["tokens"] == 8192
    assert report.break_even(_pairs([(8192, 0.9), (16384, 1.2)]))["tokens"] is None
    # a dip below 1 followed by a loss does not count: the crossing is the last one
    assert report.break_even(_pairs([(8192, 0.9), (16384, 1.2), (32768, 0.8)]))["between"] == [16384, 32768]


def test_parse_lengths() -> None:
    assert run.parse_lengths("4K, 8k,12000") == [4096, 8192, 12000]


# -- model configs ---------------------------------------------------------------------------------
def test_yarn_overrides(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}))
    assert common.yarn_overrides(str(tmp_path), 8192) is None
    ov = common.yarn_overrides(str(tmp_path), 32768)
    assert ov == {"rope_parameters": {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 8192},
                  "max_position_embeddings": 32768}


@pytest.mark.vllm
def test_vllm_accepts_overrides_and_llama8b(tmp_path: Path) -> None:
    """vLLM 0.26 resolves our YaRN overrides and the Llama-3.1-8B config to the lengths we run."""
    pytest.importorskip("vllm")
    from vllm.config import ModelConfig

    tiny = common.write_tiny_llama(tmp_path / "tiny", max_pos=8192)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (tiny / "config.json").write_text(json.dumps(cfg))
    m = ModelConfig(model=str(tiny), tokenizer=str(tiny), hf_overrides=common.yarn_overrides(str(tiny), 131072),
                    max_model_len=131072)
    rp = m.hf_text_config.rope_parameters
    assert m.max_model_len == 131072 and rp["rope_type"] == "yarn" and rp["factor"] == 16.0
    assert rp["rope_theta"] == 100000.0
    d = common.write_llama8b_dir(tmp_path / "l8b")
    m8 = ModelConfig(model=str(d), tokenizer=str(tiny), max_model_len=131072)
    assert m8.max_model_len == 131072 and m8.hf_text_config.rope_parameters["rope_type"] == "llama3"
    assert m8.hf_text_config.num_key_value_heads == 8 and m8.hf_text_config.head_dim == 128


# -- job plumbing ------------------------------------------------------------------------------------
def test_subprocess_job_time_limit_keeps_partial_results(tmp_path: Path) -> None:
    job = {"name": "slow", "kind": "selftest", "units": 200, "sleep_s": 0.2}
    res = common.run_job_subprocess(job, tmp_path, timeout_s=6)
    assert res["status"] == "timeout"
    assert 0 < len(res["rows"]) < 200
    assert res["wall_s"] < 40
    res = common.run_job_subprocess({"name": "bad", "kind": "selftest", "units": 2, "sleep_s": 0, "fail": True},
                                    tmp_path, timeout_s=60)
    assert res["status"].startswith("failed") and len(res["rows"]) == 2 and res["errors"]


def test_subprocess_job_leaves_no_process_behind(tmp_path: Path) -> None:
    """A finished job's leftover processes (vLLM's engine core holds GPU memory) are ended."""
    res = common.run_job_subprocess({"name": "orphan", "kind": "selftest", "units": 1, "sleep_s": 0, "orphan": True},
                                    tmp_path, timeout_s=60)
    assert res["status"] == "ok" and res["done"]
    pid = res["info"]["orphan_pid"]
    stat = Path(f"/proc/{pid}/stat")
    state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
    assert state in ("gone", "Z", "X"), f"orphan {pid} still running (state {state})"


def test_dry_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res"
    assert run.main(["--dry-run", "--out", str(out)]) == 0
    res = report.load_results(out)
    assert set(res) == {"recall", "ppl", "needle", "speed", "llama8b"}
    for part, d in res.items():
        for key in ("gpu", "date", "commit", "command", "rows", "jobs"):
            assert key in d, (part, key)
        assert all(j["status"] == "ok" for j in d["jobs"]), d["jobs"]
        assert d["rows"], part
        if HAS_MPL:
            assert (out / report.PART_FILES[part].replace(".json", ".png")).is_file()
    assert {r["length"] for r in res["recall"]["rows"]} == {512, 1024}
    assert len(res["recall"]["rows"][0]["layers"]) == 2
    assert {(s["length"]) for s in res["ppl"]["summary"]} == {512, 1024}
    prism_jobs = [j for j in res["ppl"]["jobs"] if j["name"].endswith("-prism")]
    assert prism_jobs and all(j["prism_stats"]["prism_tokens"] > 0 and "warning" not in j for j in prism_jobs)
    assert len(res["needle"]["rows"]) == 2 * 1 * 5 * 2  # kinds x lengths x depths x backends
    sp = res["speed"]
    assert {(r["backend"], r["length"]) for r in sp["rows"]} == \
        {(b, L) for b in ("dense", "prism", "prism-default", "dense-b") for L in (256, 512, 1024)}
    assert all(r["density"] is not None for r in sp["rows"] if r["backend"] == "prism")
    # shipped defaults (min_context_len far above 1024 tokens) keep these short prompts off Prism entirely
    assert all(r["prism_tokens"] == 0 for r in sp["rows"] if r["backend"] == "prism-default")
    assert "break_even" in sp
    # the four engines ran side by side, their timed requests interleaved
    assert sp["settings"]["interleaved"] and all(r["interleaved"] for r in sp["rows"])
    assert [j["name"] for j in sp["jobs"]] == ["speed-smollm2-interleaved"]
    labels = {f"SmolLM2 {b}" for b in ("dense", "prism", "prism-default", "dense-b")}
    assert set(sp["jobs"][0]["engine_warmup_ms"]) == set(sp["jobs"][0]["engine_init_s_by_label"]) == labels
    # the prism runs really were sparse (lowered thresholds in the dry run)
    assert min(r["density"] for r in sp["rows"] if r["backend"] == "prism") < 1.0
    # the Llama-8B part runs dense, Prism forced on and the shipped defaults (the tiny model stands
    # in), the budget on both Prism engines; the defaults keep these short prompts on FlashAttention
    ll = res["llama8b"]
    assert not ll["skipped"]
    assert {(r["backend"], r["length"]) for r in ll["rows"]} == \
        {(b, L) for b in ("dense", "prism", "prism-default") for L in (512, 1024)}
    assert all(r["block_budget"] == 0.1 for r in ll["rows"] if r["backend"] != "dense")
    assert all(r["prism_tokens"] == 0 for r in ll["rows"] if r["backend"] == "prism-default")
    lmd = report.markdown({"llama8b": ll})
    assert "Llama-3.1-8B architecture" in lmd and "shipped defaults" in lmd
    g = dict((a, (b, c)) for a, b, c in report.goals({"llama8b": ll}))
    on16 = g["Prism on from <= 16K with the shipped defaults (Llama-3.1-8B architecture, budget 0.1)"]
    assert on16 == ("off at every measured length", False)
    capsys.readouterr()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n## Limitations\n")
    assert run.main(["--report", "--out", str(out), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "### Perplexity" in printed and "### Goals" in printed
    text = readme.read_text()
    assert text.index(report.README_BEGIN) < text.index("## Limitations")
    assert "![TTFT](res/speed.png)" in text
    run.main(["--report", "--out", str(out), "--readme", str(readme)])
    assert readme.read_text().count(report.README_BEGIN) == 1


@pytest.fixture
def engine_specs(monkeypatch: pytest.MonkeyPatch) -> list:
    """The engine spec of every job the runner starts (the jobs still run)."""
    from benchmarks import worker

    specs: list = []
    real_run_job = worker.run_job

    def spy(job):
        specs.extend(job["engines"].values() if "engines" in job else [job["engine"]])
        return real_run_job(job)

    monkeypatch.setattr(worker, "run_job", spy)
    return specs


def test_dry_run_fp8_kv_cache(tmp_path: Path, capsys: pytest.CaptureFixture, engine_specs: list) -> None:
    """--kv-cache-dtype fp8: only the TTFT parts run, every engine of theirs (both backends) gets
    the dtype, the docs record it and land in speed-fp8.json / speed-llama8b-fp8.json beside, never
    over, the default files; the report reads them back without the bf16 goals."""
    specs = engine_specs
    out = tmp_path / "res"
    out.mkdir()
    (out / "speed.json").write_text('{"sentinel": 1}\n')
    argv = ["--dry-run", "--out", str(out), "--kv-cache-dtype", "fp8", "--speed-lengths", "256,512",
            "--llama-lengths", "512", "--no-speed-default-config"]
    assert run.main(argv) == 0
    assert json.loads((out / "speed.json").read_text()) == {"sentinel": 1}
    assert not any((out / report.PART_FILES[p]).exists() for p in ("recall", "ppl", "needle", "llama8b"))
    assert {(s["backend"], s["kv_cache_dtype"]) for s in specs} == {(b, "fp8") for b in ("dense", "prism")}
    assert len(specs) == 4  # speed + llama8b, two backends each
    res = report.load_results(out, "fp8")
    assert set(res) == {"speed", "llama8b"}
    for part, d in res.items():
        assert (out / f"{report.PART_FILES[part][:-5]}-fp8.json").is_file()
        assert d["settings"]["kv_cache_dtype"] == "fp8" and "--kv-cache-dtype fp8" in d["command"]
        assert d["rows"] and all(j["status"] == "ok" and j["name"].endswith("-fp8") for j in d["jobs"])
        if HAS_MPL:
            assert (out / report.part_file(part, "fp8", ext=".png")).is_file()
    md = report.markdown(res, image_dir="img")
    assert "KV cache fp8" in md and "### Goals" not in md and "(img/speed-fp8.png)" in md
    assert report.load_results(out)["speed"] == {"sentinel": 1}
    with pytest.raises(SystemExit, match="for the parts speed, llama8b, quality"):
        run.main(["--dry-run", "--out", str(out), "--only", "ppl", "--kv-cache-dtype", "fp8"])
    with pytest.raises(SystemExit, match="README"):
        run.main(["--report", "--out", str(out), "--kv-cache-dtype", "fp8", "--readme", str(tmp_path / "R.md")])
    capsys.readouterr()
# -- the quality sweep -------------------------------------------------------------------------------
def test_quality_points_table() -> None:
    pts = quality.parse_points(quality.POINTS)
    assert pts[0].name == "dense" and len(pts) == len(quality.POINTS)
    assert [p.name for p in pts] == list(quality.POINTS)  # names round-trip
    marks = {p.name: quality.preset_marks(p) for p in pts}
    assert marks["meanpool:0.998"] == ["quality (default)"] and marks["paper:0.99"] == [] and marks["paper:0.95"] == ["fast"]
    assert marks["meanpool:0.99"] == [] and marks["paper:0.99:b0.3"] == []
    b = quality.Point.parse("paper:0.99:b0.3")
    assert b.prism_knobs() == {"rule": "paper", "high_threshold": 0.99, "low_threshold": 0.99, "block_budget": 0.3}
    assert quality.parse_points(["meanpool:0.9"])[0].name == "dense"  # the reference is always measured
    with pytest.raises(ValueError, match="RULE:TOP_P"):
        quality.Point.parse("paper")
    with pytest.raises(ValueError, match="block_budget"):
        quality.Point.parse("paper:0.99:b1.5")
    with pytest.raises(ValueError, match="rule"):
        quality.Point.parse("topk:0.9")
    # the local-window candidate: parsed, named back, handed to PrismConfig, no preset's
    w = quality.Point.parse("meanpool:0.998:l2")
    assert w.name == "meanpool:0.998:l2" and w.prism_knobs()["local_blocks"] == 2 and quality.preset_marks(w) == []
    assert quality.Point.parse("paper:0.99:b0.3:l3").name == "paper:0.99:b0.3:l3"
    with pytest.raises(ValueError, match="local_blocks"):
        quality.Point.parse("meanpool:0.998:l0")
    with pytest.raises(ValueError, match="RULE:TOP_P"):
        quality.Point.parse("meanpool:0.998:l2:b0.3")  # budget first, as the names are written
    # the numerics control: FLASH_ATTN in other prefill chunks, a point of its own beside 'dense'
    c = quality.Point.parse("dense:c2048")
    assert c.name == "dense:c2048" and c.backend == "dense" and c.prism_knobs() is None and c.chunk == 2048
    assert c.describe()["max_num_batched_tokens"] == 2048 and quality.preset_marks(c) == []
    assert [p.name for p in quality.parse_points(["dense:c2048"])] == ["dense", "dense:c2048"]
    for bad in ("dense:c100", "dense:2048", "dense:c0", "dense:cx"):
        with pytest.raises(ValueError, match="multiple of 128"):
            quality.Point.parse(bad)


def test_quality_numerics_control_runs_flash_attention_in_its_own_chunks(tmp_path: Path, monkeypatch) -> None:
    """'dense:cN' runs FLASH_ATTN with max_num_batched_tokens N (the other jobs keep the sweep's),
    and its rows read as deltas against FLASH_ATTN, as a Prism point's do."""
    from benchmarks import worker

    specs: dict[str, dict] = {}
    real = worker.run_job
    monkeypatch.setattr(worker, "run_job", lambda job: (specs.__setitem__(job["name"], job["engine"]), real(job))[1])
    out = tmp_path / "res"
    assert run.main(["--dry-run", "--only", "quality", "--quality-points", "dense:c256", "--quality-lengths", "512",
                     "--out", str(out)]) == 0
    d = json.loads((out / "quality.json").read_text())
    chunks = {name: spec["max_num_batched_tokens"] for name, spec in specs.items()}
    assert chunks == {"quality-512-dense": d["settings"]["max_num_batched_tokens"], "quality-512-dense-c256": 256}
    assert d["settings"]["max_num_batched_tokens"] != 256
    assert all(spec["backend"] == "dense" and not spec.get("prism") for spec in specs.values())
    row = next(r for r in d["rows"] if r["point"] == "dense:c256")
    assert row["passkey"]["dense_correct"] is not None and row["ttft"]["ratio"] > 0
    assert all(s["documents_vs_dense"] == 2 for s in row["ppl"].values())
    md = report.quality_markdown(d)
    assert "`dense:c256`" in md and md.count("FLASH_ATTN |") >= 1


def test_gpu_lock_timed_sections_run_alone(tmp_path: Path) -> None:
    """Jobs sharing the GPU: a section under GpuLock.exclusive() overlaps no other job's section,
    also when jobs start while others already wait to time (a pool of 2 for 4 jobs)."""
    from concurrent.futures import ThreadPoolExecutor

    lock = tmp_path / "gpu.lock"
    jobs = [{"name": f"j{i}", "kind": "selftest", "units": 3, "sleep_s": 0.25, "gpu_lock": str(lock),
             "exclusive_units": [2]} for i in range(4)]
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(lambda j: common.run_job_subprocess(j, tmp_path, timeout_s=60), jobs))
    assert all(r["status"] == "ok" for r in results)
    spans = [(j["name"], r["mode"], r["start"], r["end"]) for j, res in zip(jobs, results) for r in res["rows"]]
    assert len(spans) == 12
    for name, mode, a, b in spans:
        if mode == "exclusive":
            clash = [(n2, m2) for n2, m2, a2, b2 in spans if n2 != name and a2 < b and a < b2]
            assert not clash, (name, clash)


def test_quality_dry_run_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--only quality on the tiny model: quality.json holds every (point, length) with both
    corpora's perplexity against FLASH_ATTN, density, passkeys per depth and TTFT; separate runs
    merge into one file; --report draws its table and plot."""
    out = tmp_path / "res"
    pts = "meanpool:0.998,paper:0.95,meanpool:0.99,paper:0.99:b0.3"
    assert run.main(["--dry-run", "--only", "quality", "--quality-points", pts, "--out", str(out)]) == 0
    assert set(report.load_results(out)) == {"quality"}  # no other part ran
    d = json.loads((out / "quality.json").read_text())
    names = ["dense"] + pts.split(",")
    assert [p["name"] for p in d["points"]] == names
    assert {p["name"]: p["presets"] for p in d["points"]}["meanpool:0.998"] == ["quality (default)"]
    assert all(j["status"] == "ok" for j in d["jobs"]) and len(d["jobs"]) == 5 * 2
    assert {(r["point"], r["length"]) for r in d["rows"]} == {(n, L) for n in names for L in (512, 1024)}
    assert set(d["settings"]["corpora"]) == {"fortunes", "austen"}
    for r in d["rows"]:
        assert set(r["ppl"]) == {"fortunes", "austen"}, r["point"]
        for c, s in r["ppl"].items():
            assert s["documents"] == 2 and s["documents_vs_dense"] == 2 and s["ppl"] > 1
            assert s["delta_pct_min"] <= s["delta_pct_mean"] <= s["delta_pct_max"]
            assert len(s["ppl_per_document"]) == 2
        pk = r["passkey"]
        assert pk["total"] == 2 * 5 and len(pk["per_depth"]) == 2 * 5  # kinds x depths, 1 seed
        assert pk["dense_correct"] is not None and r["ttft"]["ttft_ms"] > 0
        if r["backend"] == "prism":
            assert 0 < r["density"] <= 1 and r["ttft"]["ratio"] > 0 and "warning" not in r
            assert all(s["density"] is not None and s["prism_tokens"] > 0 for s in r["ppl"].values())
        else:
            assert r["density"] is None and all(s["delta_pct"] == 0 for s in r["ppl"].values())
    by = {(r["point"], r["length"]): r for r in d["rows"]}
    assert by[("paper:0.99:b0.3", 1024)]["density"] < 1.0  # the cap bites even on near-uniform attention
    # documents spread over each corpus, the same for every point
    starts = d["settings"]["corpora"]["austen"]["documents"]["1024"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 1024
    if HAS_MPL:
        assert (out / "quality.png").is_file()
    # a second run (another point, one length) merges into one document
    out2 = tmp_path / "res2"
    assert run.main(["--dry-run", "--only", "quality", "--quality-points", "paper:0.9", "--quality-lengths", "512",
                     "--out", str(out2)]) == 0
    # two dry runs can time their FLASH_ATTN rows alike to the microsecond: set run 1's apart so
    # the merge below shows which run's baseline each ratio uses
    q2 = json.loads((out2 / "quality.json").read_text())
    for r in q2["measured"] + q2["rows"]:
        if r["point"] == "dense":
            r["ttft"]["ttft_ms"] += 1000.0
    (out2 / "quality.json").write_text(json.dumps(q2))
    merged_dir = tmp_path / "merged"
    capsys.readouterr()
    assert run.main(["--merge-quality", str(out / "quality.json"), str(out2 / "quality.json"),
                     "--out", str(merged_dir)]) == 0
    m = json.loads((merged_dir / "quality.json").read_text())
    assert len(m["runs"]) == 2
    got = {(r["point"], r["length"]): r["run"] for r in m["rows"]}
    assert got[("paper:0.9", 512)] == 1 and got[("dense", 512)] == 1 and got[("dense", 1024)] == 0
    assert got[("meanpool:0.998", 512)] == 0 and m["settings"]["lengths"] == [512, 1024]
    # TTFT ratios stay within their run: run 0's point against run 0's FLASH_ATTN, though the
    # merged FLASH_ATTN row at 512 is run 1's
    dense_ttft = {run: {r["length"]: r["ttft"]["ttft_ms"] for r in json.loads(f.read_text())["rows"]
                        if r["point"] == "dense"} for run, f in enumerate((out / "quality.json", out2 / "quality.json"))}
    rows = {(r["point"], r["length"]): r for r in m["rows"]}
    old = rows[("meanpool:0.998", 512)]["ttft"]
    assert old["dense_ms"] == dense_ttft[0][512] != dense_ttft[1][512] and old["same_run_as_dense"]
    assert old["ratio"] == pytest.approx(old["ttft_ms"] / dense_ttft[0][512])
    assert rows[("paper:0.9", 512)]["ttft"]["dense_ms"] == dense_ttft[1][512]
    r09 = next(r for r in m["rows"] if r["point"] == "paper:0.9")
    assert r09["ppl"]["austen"]["documents_vs_dense"] == 2
    assert "### Quality against block density" in capsys.readouterr().out
    assert run.main(["--report", "--out", str(merged_dir)]) == 0
    printed = capsys.readouterr().out
    assert "`paper:0.9`" in printed and "default preset (meanpool:0.998)" in printed


def test_quality_budget_skips_jobs_without_recording_them(tmp_path: Path) -> None:
    """Jobs that --budget-s leaves no time for are listed as skipped and measure nothing (so a
    merge keeps an earlier run's numbers for them)."""
    out = tmp_path / "res"
    assert run.main(["--dry-run", "--only", "quality", "--budget-s", "1", "--quality-lengths", "512",
                     "--quality-points", "paper:0.99", "--out", str(out)]) == 1
    d = json.loads((out / "quality.json").read_text())
    assert [j["status"] for j in d["jobs"]] == ["skipped (budget)"] * 2
    assert d["measured"] == [] and d["rows"] == []
    assert "Not clean" in report.quality_markdown(d)


# -- the vLLM glue, without a GPU ------------------------------------------------------------------
def _spec(backend: str, **kw):
    spec = {"kind": "vllm", "backend": backend, "model": "/nonexistent/model", "max_model_len": 32768,
            "enforce_eager": True, "gpu_memory_utilization": 0.45, "max_num_batched_tokens": 16384,
            "max_num_seqs": 64, "hf_overrides": None, "prism": {"min_context_len": 0} if backend == "prism" else None}
    spec.update(kw)
    return spec


@pytest.mark.vllm
def test_engine_kwargs_are_vllm_engine_args() -> None:
    """Every engine argument the worker passes exists in vLLM 0.26's EngineArgs, both backends get
    the same flags, and 'prism' resolves to the plugin's backend."""
    pytest.importorskip("vllm")
    from vllm.config import AttentionConfig
    from vllm.engine.arg_utils import EngineArgs

    from benchmarks.worker import VllmEngine

    dense = VllmEngine.engine_kwargs(_spec("dense", kv_cache_memory_bytes=8 << 30))
    assert dense["kv_cache_memory_bytes"] == 8 << 30
    prism = VllmEngine.engine_kwargs(_spec("prism", hf_overrides={"max_position_embeddings": 32768},
                                           load_format="dummy", tokenizer="/tok", kv_cache_memory_bytes=8 << 30))
    EngineArgs(**dense)
    EngineArgs(**prism)
    assert "kv_cache_dtype" not in dense  # "auto": vLLM's own default
    fp8 = VllmEngine.engine_kwargs(_spec("prism", kv_cache_dtype="fp8"))
    assert fp8["kv_cache_dtype"] == "fp8" and VllmEngine.engine_kwargs(_spec("dense", kv_cache_dtype="fp8"))[
        "kv_cache_dtype"] == "fp8"
    EngineArgs(**fp8)
    assert AttentionConfig.validate_backend_before(prism["attention_backend"]).name == "CUSTOM"
    assert AttentionConfig.validate_backend_before(dense["attention_backend"]).name == "FLASH_ATTN"
    PrismConfig.from_dict(prism["additional_config"]["prism"])
    same = {k for k in dense if k not in ("attention_backend",)}
    assert {k: dense[k] for k in same if k in prism and k not in ("tokenizer",)} == \
        {k: prism[k] for k in same if k in prism and k not in ("tokenizer",)}


def _stand_in_llm(calls: list):
    """A stand-in for vllm.LLM that returns vLLM's output structures and records its calls
    (prompt sizes of generate, collective_rpc arguments)."""
    from types import SimpleNamespace

    import vllm
    from vllm.logprobs import Logprob

    class StandIn:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def generate(self, prompts, params, use_tqdm=True):
            assert isinstance(params, vllm.SamplingParams) and use_tqdm is False
            calls.append(("generate", len(prompts)))
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                plp = None
                if params.prompt_logprobs is not None:
                    plp = [None] + [{ids[t]: Logprob(logprob=-0.5), ids[t] + 1: Logprob(logprob=-9.0)}
                                    for t in range(1, len(ids))]
                outs.append(SimpleNamespace(prompt_logprobs=plp,
                                            outputs=[SimpleNamespace(token_ids=list(range(params.max_tokens)))]))
            return outs

        def collective_rpc(self, fn, timeout=None, args=(), kwargs=None):
            calls.append(("rpc", args))
            return [fn(None, *args)]

    return StandIn


@pytest.mark.vllm
def test_interleaved_speed_job_with_stand_in_llms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines side by side in one job: every engine warms up, then each timed prompt runs on
    every engine in an order rotated by the prompt's index, and each engine's rows carry its own
    label, times and (Prism) stats."""
    vllm = pytest.importorskip("vllm")
    from benchmarks import worker

    order: list = []

    class Tagged:
        def __init__(self, **kw):
            self.name = kw["attention_backend"] + ("-b" if kw.get("seed") == 1 else "")
            self.inner = _stand_in_llm([])(**kw)

        def generate(self, prompts, params, use_tqdm=True):
            order.append((self.name, prompts[0]["prompt_token_ids"][0]))
            return self.inner.generate(prompts, params, use_tqdm)

        def collective_rpc(self, *a, **kw):
            return self.inner.collective_rpc(*a, **kw)

    monkeypatch.setattr(vllm, "LLM", Tagged)
    real_kwargs = worker.VllmEngine.engine_kwargs
    monkeypatch.setattr(worker.VllmEngine, "engine_kwargs",
                        staticmethod(lambda spec: {**real_kwargs(spec), "seed": spec.get("seed", 0)}))
    engines = {"A dense": _spec("dense"), "A prism": _spec("prism"), "A dense-b": _spec("dense", seed=1)}
    prompts = {"256": [[9] * 10, [1] * 10, [2] * 10, [3] * 10]}
    res = worker.run_job({"name": "i", "kind": "engines", "engines": engines,
                          "task": {"task": "speed", "prompts": prompts}})
    assert res["errors"] == []
    timed = [o for o in order if o[1] != 9]
    assert timed == [("FLASH_ATTN", 1), ("prism", 1), ("FLASH_ATTN-b", 1),
                     ("prism", 2), ("FLASH_ATTN-b", 2), ("FLASH_ATTN", 2),
                     ("FLASH_ATTN-b", 3), ("FLASH_ATTN", 3), ("prism", 3)]
    # every engine's warm-ups (engine, then the length's) come before any timed request
    first_timed = order.index(timed[0])
    assert sorted(o[0] for o in order[:first_timed - 1]) == sorted(["FLASH_ATTN", "prism", "FLASH_ATTN-b"]
                                                                   * (worker.ENGINE_WARMUP + 1))
    # and each timed request comes right after an untimed one on the same engine (a hot burst)
    for o in timed:
        i = order.index(o)
        assert order[i - 1] == (o[0], 9), order[i - 1:i + 1]
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == set(engines) and all(r["interleaved"] and len(r["ttft_ms_all"]) == 3 for r in rows.values())
    assert "density" in rows["A prism"] and "density" not in rows["A dense"]
    assert set(res["info"]["engine_init_s_by_label"]) == set(engines)
    assert set(res["info"]["engine_warmup_ms"]) == set(engines)

    # an engine that fails (here: prism at its second timed prompt of the longer length) leaves
    # the job with its error recorded; the other engines' rows of every length still come
    order.clear()
    real_generate = Tagged.generate

    def failing(self, prompts, params, use_tqdm=True):
        if self.name == "prism" and prompts[0]["prompt_token_ids"][0] == 5:
            raise RuntimeError("out of memory")
        return real_generate(self, prompts, params, use_tqdm)

    monkeypatch.setattr(Tagged, "generate", failing)
    prompts = {"256": [[9] * 10, [1] * 10, [2] * 10], "512": [[9] * 20, [4] * 20, [5] * 20, [6] * 20]}
    res = worker.run_job({"name": "i", "kind": "engines", "engines": engines,
                          "task": {"task": "speed", "prompts": prompts}})
    assert len(res["errors"]) == 1 and "speed A prism 512" in res["errors"][0]
    got = {(r["label"], r["length"]) for r in res["rows"]}
    assert got == {(lb, 256) for lb in engines} | {("A dense", 512), ("A dense-b", 512)}
    assert all(len(r["ttft_ms_all"]) == 3 for r in res["rows"] if r["length"] == 512)


@pytest.mark.vllm
def test_vllm_quality_job_with_a_stand_in_llm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A quality job's worker path: every step sampled, perplexity documents one request at a
    time, each task's own Prism stats and tag on its rows, the timed task under the GPU lock."""
    vllm = pytest.importorskip("vllm")
    from benchmarks import worker

    calls: list = []
    monkeypatch.setattr(vllm, "LLM", _stand_in_llm(calls))
    job = {"name": "q", "kind": "engine", "engine": _spec("prism"), "sample_every": 1,
           "gpu_lock": str(tmp_path / "gpu.lock"), "tasks": [
               {"task": "ppl", "label": "x", "length": 64, "windows": [[1, 2, 3, 4], [5, 6, 7, 8]],
                "one_at_a_time": True, "stats": True, "tag": "ppl:fortunes"},
               {"task": "generate", "label": "n", "max_tokens": 2, "cases": [{"id": "a", "ids": [1, 2]}],
                "stats": True, "tag": "passkey"},
               {"task": "speed", "label": "s", "prompts": {"64": [[1] * 8, [2] * 8]}, "exclusive": True, "tag": "ttft"}]}
    res = worker.run_job(job)
    assert res["errors"] == []
    ppl, gen, speed = res["rows"]
    assert [c[1] for c in calls if c[0] == "generate"][:2] == [1, 1]  # one document per request
    assert ppl["tag"] == "ppl:fortunes" and gen["tag"] == "passkey" and speed["tag"] == "ttft"
    assert set(ppl["prism_stats"]) >= {"prism_tokens", "selected_blocks", "causal_blocks", "block_density"}
    assert "prism_stats" not in speed and "prism_stats" in res["info"]  # job stats read before the speed task resets them
    rpc = [c[1][0] for c in calls if c[0] == "rpc"]
    assert rpc[0] == "sample=1" and rpc[-5:] == ["reset", "sample=1", "collect", "sample=0", "collect"]


@pytest.mark.vllm
def test_vllm_engine_tasks_with_a_stand_in_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's vLLM path (prompt logprobs parsing, greedy outputs, TTFT loop, Prism stats
    through collective_rpc) against a stand-in LLM that returns vLLM's output structures."""
    vllm = pytest.importorskip("vllm")
    from benchmarks import worker

    from prism_vllm.stats import STATS

    calls: list = []
    monkeypatch.setattr(vllm, "LLM", _stand_in_llm(calls))
    # the startup decisions an engine would have recorded ("auto": its timing table, its layout)
    decision = {"shape": "s", "min_context_len": 53376, "rows": [{"tokens": 65536, "dense_ms": 2.0}]}
    monkeypatch.setattr(STATS, "break_even", {"s": decision})
    monkeypatch.setattr(STATS, "attend_layouts", {"s": {"layout": "head_halves"}})
    job = {"name": "t", "kind": "engine", "engine": _spec("prism"), "tasks": [
        {"task": "ppl", "label": "x", "length": 64, "windows": [[1, 2, 3, 4], [5, 6, 7]]},
        {"task": "generate", "label": "n", "max_tokens": 3, "cases": [{"id": "a", "ids": [1, 2]}]},
        {"task": "speed", "label": "s", "prompts": {"256": [[1] * 10, [2] * 10, [3] * 10]}}]}
    res = worker.run_job(job)
    assert res["errors"] == []
    ppl, gen, speed = res["rows"]
    assert ppl["logprobs"] == [[-0.5] * 3, [-0.5] * 2]
    assert gen["outputs"] == {"a": [0, 1, 2]}
    assert speed["length"] == 256 and speed["prompt_tokens"] == 10 and len(speed["ttft_ms_all"]) == 2
    assert "density" in speed  # Prism's stats were read through collective_rpc
    assert {"auto_min_context_len", "density_by_length", "shadow_steps"} <= set(speed)
    assert speed["auto_min_context_len"] == {"s": 53376} and speed["auto_break_even"] == {"s": decision}
    assert speed["attend_layouts"] == {"s": {"layout": "head_halves"}}
    # untimed engine warm-up requests first, then one warm-up and two timed requests at 256
    assert len(res["info"]["engine_warmup_ms"]) == worker.ENGINE_WARMUP
    assert sum(c[0] == "generate" for c in calls) == 2 + worker.ENGINE_WARMUP + 3
    # the job's own stats are read before the speed task resets them
    # ... and collected again after the timed requests: what served them (the stand-in serves none
    # through Prism, so every token after the warm-up is FlashAttention's or uncounted: 0 here)
    assert [c[1] for c in calls if c[0] == "rpc"] == [("collect",), ("reset",), ("sample=1",), ("collect",), ("sample=0",),
                                                      ("collect",)]
    assert speed["prism_tokens_timed"] == 0 and "flash_tokens_timed" in speed



def test_shipped_defaults_goals_from_rows() -> None:
    """Issue 11's goals read from speed rows: TTFT >= 0.98x of FLASH_ATTN at every length with the
    shipped defaults, and (Llama-3.1-8B architecture) Prism on from <= 16K and at every longer length."""
    def rows(default_ms, on):
        out = []
        for L, dense, forced, dflt, tokens in zip((8192, 16384, 32768), (10.0, 20.0, 40.0), (12.0, 15.0, 20.0),
                                                  default_ms, on):
            out += [{"model": report.LLAMA_NAME, "backend": "dense", "length": L, "ttft_ms": dense},
                    {"model": report.LLAMA_NAME, "backend": "prism", "length": L, "ttft_ms": forced, "density": 0.1},
                    {"model": report.LLAMA_NAME, "backend": "prism-default", "length": L, "ttft_ms": dflt,
                     "prism_tokens": tokens}]
        return {"llama8b": {"rows": out}}

    def goals(res):
        return {a.split(" (")[0] if a.startswith("TTFT") else a: c for a, _, c in report.goals(res)}

    g = goals(rows((10.1, 15.5, 21.0), (0, 500, 900)))
    assert g["TTFT >= 0.98x FLASH_ATTN at every length with the shipped defaults"] is True
    assert g["Prism on from <= 16K with the shipped defaults (Llama-3.1-8B architecture, budget 0.1)"] is True
    g = goals(rows((10.5, 15.5, 21.0), (0, 0, 900)))  # 0.95x at 8K; on only from 32K
    assert g["TTFT >= 0.98x FLASH_ATTN at every length with the shipped defaults"] is False
    assert g["Prism on from <= 16K with the shipped defaults (Llama-3.1-8B architecture, budget 0.1)"] is False
    # the requests after the warm-up decide what served a length where the row counts them: the
    # decision can turn Prism on after the warm-up's shadow step, or off
    res = rows((10.1, 15.5, 21.0), (0, 0, 900))
    for r, timed in zip([r for r in res["llama8b"]["rows"] if r["backend"] == "prism-default"], (0, 700, 0)):
        r["prism_tokens_timed"] = timed
    on = "Prism on from <= 16K with the shipped defaults (Llama-3.1-8B architecture, budget 0.1)"
    assert [m for a, m, _ in report.goals(res) if a == on] == ["on from 16K"] and goals(res)[on] is False  # off at 32K
    # a repeated run of the same commit must meet it too
    res = rows((10.1, 15.5, 21.0), (0, 500, 900))
    res["llama8b"]["repeats"] = [rows((10.1, 15.5, 42.0), (0, 500, 900))["llama8b"]]  # 0.95x at 32K
    assert goals(res)["TTFT >= 0.98x FLASH_ATTN at every length with the shipped defaults"] is False
    measured = [m for a, m, _ in report.goals(res) if a.startswith("TTFT >= 0.98x")]
    assert measured == ["worst 0.990x at 8K; repeat run: worst 0.952x at 32K"]
    # a second FLASH_ATTN engine (dense-b) gives the spread the goal is read against; not a verdict
    res = rows((10.1, 15.5, 21.0), (0, 500, 900))
    res["llama8b"]["rows"] += [{"model": report.LLAMA_NAME, "backend": "dense-b", "length": L, "ttft_ms": ms}
                               for L, ms in ((8192, 10.5), (16384, 19.0), (32768, 40.0))]
    (goal,) = [(m, ok) for a, m, ok in report.goals(res) if a.startswith("TTFT >= 0.98x")]
    assert goal == ("worst 0.990x at 8K; FLASH_ATTN's two engines up to 5.3% apart (16K)", True)
    res["llama8b"]["models"] = [report.LLAMA_NAME]
    md = report.markdown(res)
    assert "FLASH_ATTN again (second engine), TTFT ms" in md and "| 10.5 |" in md


def test_shipped_defaults_goal_reads_smollm2_native_run_of_the_same_commit(tmp_path) -> None:
    """SmolLM2 at its native context (speed-native.json) is the same model for "every length on
    every model": the shipped-defaults goal reads it beside speed.json when both ran at the same
    commit, and not a native run of another commit."""
    def doc(commit, lengths, dflt):
        rows = []
        for L, d in zip(lengths, dflt):
            rows += [{"model": report.SMOL_NAME, "backend": "dense", "length": L, "ttft_ms": 20.0},
                     {"model": report.SMOL_NAME, "backend": "prism", "length": L, "ttft_ms": 30.0, "density": 0.8},
                     {"model": report.SMOL_NAME, "backend": "prism-default", "length": L, "ttft_ms": d}]
        return {"commit": commit, "rows": rows}

    (tmp_path / "speed.json").write_text(json.dumps(doc("aaa", (16384, 32768), (20.0, 20.1))))
    (tmp_path / "speed-native.json").write_text(json.dumps(doc("aaa", (4096, 8192), (20.0, 25.0))))

    def goal():
        (g,) = [(m, ok) for a, m, ok in report.goals(report.load_results(tmp_path))
                if a.startswith("TTFT >= 0.98x") and "SmolLM2" in a]
        return g

    assert goal() == ("worst 0.995x at 32K; native context: worst 0.800x at 8K", False)
    native = json.loads((tmp_path / "speed-native.json").read_text())
    native["rows"].append({"model": report.SMOL_NAME, "backend": "dense-b", "length": 8192, "ttft_ms": 30.0})
    (tmp_path / "speed-native.json").write_text(json.dumps(native))
    assert goal()[0].endswith("FLASH_ATTN's two engines up to 50.0% apart (native context, 8K)")  # names its run
    (tmp_path / "speed-native.json").write_text(json.dumps(doc("bbb", (4096, 8192), (20.0, 25.0))))
    assert goal() == ("worst 0.995x at 32K", True)


def test_dry_run_quality_on_fp8_kv_cache(tmp_path: Path, engine_specs: list) -> None:
    """Issue 14's perplexity and passkeys on an fp8 cache: --only quality --kv-cache-dtype fp8 runs
    every engine of the sweep (FLASH_ATTN and Prism) on fp8 into quality-fp8.json, beside (never
    over) quality.json, and a merge refuses to mix it with a model-dtype run."""
    specs = engine_specs
    out = tmp_path / "res"
    argv = ["--dry-run", "--out", str(out), "--only", "quality", "--kv-cache-dtype", "fp8",
            "--quality-points", "paper:0.99", "--quality-lengths", "512"]
    assert run.main(argv) == 0
    assert not (out / "quality.json").exists()
    d = json.loads((out / "quality-fp8.json").read_text())
    assert d["settings"]["kv_cache_dtype"] == "fp8"
    assert {(s["backend"], s["kv_cache_dtype"]) for s in specs} == {("dense", "fp8"), ("prism", "fp8")}
    assert {(r["point"], r["length"]) for r in d["rows"]} == {("dense", 512), ("paper:0.99", 512)}
    assert all(j["name"].endswith("-fp8") for j in d["jobs"])
    md = report.markdown(report.load_results(out, "fp8"), image_dir="img")
    assert "KV cache fp8" in md and "(img/quality-fp8.png)" in md
    auto = dict(d, settings=dict(d["settings"], kv_cache_dtype="auto"))
    with pytest.raises(ValueError, match="different KV cache dtypes"):
        quality.merge_docs([d, auto])


def test_passkey_pairs_split_and_mcnemar() -> None:
    """benchmarks/passkey_pairs.py: the paired split of a point's passkeys against FLASH_ATTN's on
    the same cases, and the exact McNemar p-value (binomial on the discordant pairs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "passkey_pairs", Path(__file__).resolve().parent.parent / "benchmarks" / "passkey_pairs.py")
    pp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pp)
    assert pp.mcnemar_p(0, 0) == 1.0 and pp.mcnemar_p(2, 0) == 0.5 and pp.mcnemar_p(6, 1) == pytest.approx(0.125)
    assert pp.mcnemar_p(10, 0) == pytest.approx(2 / 1024)

    def job(point, length, correct):
        return {"point": point, "length": length,
                "passkeys": [{"id": f"single-{length}-d{i}", "correct": c} for i, c in enumerate(correct)]}

    doc = {"measured": [job("dense", 100, [1, 1, 0, 1, 0]), job("meanpool:0.998", 100, [1, 0, 1, 0, 0]),
                        job("paper:0.99", 200, [1])]}  # no FLASH_ATTN at 200: no row
    (row,) = pp.pairs(doc)
    assert (row["correct"], row["dense_correct"], row["only_dense"], row["only_point"]) == (2, 3, 2, 1)
    assert row["lost"] == ["single-100-d1", "single-100-d3"] and row["gained"] == ["single-100-d2"]
    assert row["mcnemar_p"] == pytest.approx(1.0)


def test_repeat_of_another_commit_is_not_a_repeat(tmp_path):
    """speed-repeat.json counts as a repeat of speed.json only when both ran at the same commit:
    a goal 'in every run' must not mix one commit's run with another's."""
    import json

    (tmp_path / "speed.json").write_text(json.dumps({"commit": "aaa", "rows": []}))
    (tmp_path / "speed-repeat.json").write_text(json.dumps({"commit": "bbb", "rows": [1]}))
    assert "repeats" not in report.load_results(tmp_path)["speed"]
    (tmp_path / "speed-repeat.json").write_text(json.dumps({"commit": "aaa", "rows": [1]}))
    assert report.load_results(tmp_path)["speed"]["repeats"] == [{"commit": "aaa", "rows": [1]}]
    for commit in (None, "unknown"):  # runs that do not know their commit are not known to match
        (tmp_path / "speed.json").write_text(json.dumps({"commit": commit, "rows": []}))
        (tmp_path / "speed-repeat.json").write_text(json.dumps({"commit": commit, "rows": [1]}))
        assert "repeats" not in report.load_results(tmp_path)["speed"]
    (tmp_path / "speed.json").unlink()  # a repeat without its run: nothing to attach it to
    assert "speed" not in report.load_results(tmp_path)


def test_benchmarks_keep_the_checkouts_root_behind_installed_packages() -> None:
    """``python -m benchmarks.X`` / ``python -c`` from the checkout put its root first on sys.path,
    where the top-level kernels/ folder would shadow Hugging Face's ``kernels`` package (which
    transformers imports when it is installed): importing ``benchmarks`` moves the root last, so
    ``import kernels`` finds the installed package wherever there is one."""
    import importlib.metadata
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "benchmarks.corpus", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # a module of the package runs as the benchmarks do
    probe = ("import importlib.util, json, sys; import benchmarks; s = importlib.util.find_spec('kernels'); "
             "print(json.dumps([sys.path, s.origin if s else None]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path, origin = json.loads(out.stdout.strip().splitlines()[-1])
    at_root = [i for i, p in enumerate(path) if Path(p or ".").resolve() == root]
    assert at_root == [len(path) - 1], path  # the root stays importable, behind everything else
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to shadow here; CI's fresh environment has it (transformers >= 5.25 pulls it)
    assert origin is not None and not Path(origin).is_relative_to(root / "kernels"), origin
