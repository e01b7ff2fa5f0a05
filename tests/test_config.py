"""PrismConfig: defaults, band sizes, parsing from vLLM's additional_config, errors."""

import json
from types import SimpleNamespace

import pytest

from prism_vllm import PrismConfig


def test_defaults_are_the_quality_preset_on_the_papers_bands():
    cfg = PrismConfig()
    assert cfg.block_size == 128
    # mean-pooling at top-p 0.998 keeps perplexity within 1% of dense on SmolLM2 at 8K-32K
    # (benchmarks/results/quality-candidates.json); the paper's rule at 0.95 is the 'fast' preset.
    assert cfg.preset == "quality" and cfg.rule == "meanpool"
    assert (cfg.high_threshold, cfg.low_threshold) == (0.998, 0.998)
    fast = PrismConfig(preset="fast")
    assert (fast.rule, fast.high_threshold, fast.low_threshold) == ("paper", 0.95, 0.95)
    assert not cfg.calibrated and PrismConfig(rule="paper").calibrated  # one band: nothing to calibrate
    assert cfg.calibrate and cfg.keep_sink and cfg.keep_diagonal
    assert cfg.block_budget is None  # no cap: top-p alone decides, as in the paper
    assert cfg.band_dims(128) == (64, 96)
    assert cfg.band_dims(64) == (32, 48)


def test_explicit_band_dims_are_checked_against_the_rotary_dim():
    assert PrismConfig(high_band_dims=32, low_band_dims=64).band_dims(128) == (32, 64)
    with pytest.raises(ValueError, match=r"prism\.low_band_dims=96 exceeds the model's rotary dimension 64"):
        PrismConfig(low_band_dims=96).band_dims(64)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("high_threshold", 1.5, r"prism\.high_threshold=1\.5 is out of range.*\(0, 1\]"),
        ("low_threshold", 0.0, r"prism\.low_threshold=0\.0 is out of range"),
        ("low_threshold", float("nan"), r"prism\.low_threshold=nan"),
        ("block_size", 64, r"prism\.block_size=64 is not supported.*128"),
        ("high_band_dims", 33, r"prism\.high_band_dims=33 is invalid: it must be an even number"),
        ("min_context_len", -1, r"prism\.min_context_len=-1 is out of range"),
        ("min_query_len", 1, r"prism\.min_query_len=1 is out of range"),
        ("min_context_len", "autoo", r"prism\.min_context_len='autoo' is not valid: use \"auto\""),
        ("local_blocks", 0, r"prism\.local_blocks=0 is out of range: use an integer >= 1"),
        ("rule", "foo", r"prism\.rule='foo' is not a selection rule.*\(default 'meanpool' in preset 'quality'\)"),
        ("calibrate", "yes", r"prism\.calibrate='yes' has the wrong type: expected bool"),
        ("high_threshold", "0.9", r"prism\.high_threshold='0\.9' has the wrong type: expected float"),
        ("min_context_len", True, r"prism\.min_context_len=True has the wrong type: expected int"),
        ("block_budget", 0.0, r"prism\.block_budget=0\.0 is out of range.*\(0, 1\].*null for no cap"),
        ("block_budget", 1.5, r"prism\.block_budget=1\.5 is out of range"),
        ("block_budget", "10%", r"prism\.block_budget='10%' has the wrong type: expected float or null"),
        ("dense_tail", 1, r"prism\.dense_tail=1 has the wrong type: expected bool"),
    ],
    ids=lambda x: str(x)[:24],
)
def test_bad_values_name_the_field_value_and_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        PrismConfig.from_dict({field: value})


def test_local_blocks_without_the_diagonal_names_the_setting_that_conflicts():
    with pytest.raises(ValueError, match=r"local_blocks=2 needs keep_diagonal=true.*or local_blocks=1"):
        PrismConfig.from_dict({"local_blocks": 2, "keep_diagonal": False})
    with pytest.raises(ValueError, match=r"default 'paper' in preset 'fast'"):
        PrismConfig.from_dict({"preset": "fast", "rule": "nope"})


def test_int_thresholds_are_accepted_as_floats():
    cfg = PrismConfig.from_dict({"high_threshold": 1})
    assert cfg.high_threshold == 1.0 and isinstance(cfg.high_threshold, float)


def test_unknown_fields_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown prism setting\(s\) \['treshold'\].*high_threshold"):
        PrismConfig.from_dict({"treshold": 0.9})


def test_non_mapping_is_rejected_with_an_example():
    with pytest.raises(ValueError, match="must be a JSON object"):
        PrismConfig.from_dict([0.9])


def test_from_vllm_config_reads_additional_config():
    vc = SimpleNamespace(additional_config={"prism": {"low_threshold": 0.9, "min_context_len": 0}})
    cfg = PrismConfig.from_vllm_config(vc)
    assert cfg.low_threshold == 0.9 and cfg.min_context_len == 0 and cfg.high_threshold == 0.998  # the preset's
    assert PrismConfig.from_vllm_config(SimpleNamespace(additional_config={})) == PrismConfig()
    assert PrismConfig.from_vllm_config(SimpleNamespace(additional_config=None)) == PrismConfig()


def test_frozen_and_hashable():
    cfg = PrismConfig()
    with pytest.raises(Exception):
        cfg.block_size = 64  # type: ignore[misc]
    assert hash(cfg) == hash(PrismConfig.from_dict(cfg.to_dict()))


def test_every_field_has_a_docstring():
    docs = PrismConfig.field_docs()
    assert set(docs) == set(PrismConfig().to_dict())
    assert all(len(d) > 20 for d in docs.values())


def test_block_budget_accepts_an_int_one_as_float():
    assert PrismConfig.from_dict({"block_budget": 1}).block_budget == 1.0
    assert PrismConfig.from_dict({"block_budget": None}).block_budget is None


def test_readme_configuration_table_is_the_docstrings():
    """README's table is PrismConfig.markdown_table() (regenerate it when a field changes)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- config:begin", 1)[1].split("-->", 1)[1].split("<!-- config:end -->", 1)[0]
    assert block.strip() == PrismConfig.markdown_table().strip()


# ------------------------------------------------------------------ presets
from prism_vllm.config import DEFAULT_PRESET, PRESETS  # noqa: E402

PRESET_FIELDS = sorted({k for p in PRESETS.values() for k in p})


def _preset_values(cfg):
    return {k: getattr(cfg, k) for k in PRESET_FIELDS}


def test_presets_include_quality_as_default_and_fast():
    assert DEFAULT_PRESET == "quality" and {"quality", "fast"} <= set(PRESETS)
    assert PrismConfig().preset == "quality"
    assert _preset_values(PrismConfig()) == PRESETS["quality"]
    # Every preset sets the same fields, so switching presets never leaves a field behind.
    assert all(set(p) == set(PRESET_FIELDS) for p in PRESETS.values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fills_its_fields_with_plain_values(name):
    cfg = PrismConfig.from_dict({"preset": name})
    assert _preset_values(cfg) == PRESETS[name]
    assert isinstance(cfg.high_threshold, float) and isinstance(cfg.low_threshold, float)
    assert cfg.preset_overrides() == {}


def test_explicit_fields_override_the_preset_in_any_order():
    cfg = PrismConfig.from_dict({"high_threshold": 0.97, "preset": "fast"})
    assert cfg.high_threshold == 0.97
    assert cfg.low_threshold == PRESETS["fast"]["low_threshold"]
    assert cfg.preset_overrides() == {"high_threshold": 0.97}
    assert PrismConfig(preset="fast", high_threshold=0.97) == cfg


def test_explicit_null_block_budget_overrides_a_preset_cap():
    # null is "no cap", not "use the preset": a user can always switch a preset's cap off.
    assert PrismConfig.from_dict({"preset": "fast", "block_budget": None}).block_budget is None
    assert PrismConfig.from_dict({"preset": "fast", "block_budget": 0.5}).block_budget == 0.5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_has_effective_values_and_round_trips(name):
    cfg = PrismConfig.from_dict({"preset": name, "low_threshold": 0.999})
    d = cfg.to_dict()
    assert d["preset"] == name and d["low_threshold"] == 0.999
    assert {k: d[k] for k in PRESET_FIELDS if k != "low_threshold"} == {
        k: v for k, v in PRESETS[name].items() if k != "low_threshold"}
    assert PrismConfig.from_dict(d) == cfg and hash(PrismConfig.from_dict(d)) == hash(cfg)


@pytest.mark.parametrize("bad", ["turbo", "Quality", "", 1, None])
def test_unknown_preset_names_the_valid_ones(bad):
    with pytest.raises(ValueError, match=r"prism\.preset=.* is not a preset; valid presets: 'quality', 'fast'"):
        PrismConfig.from_dict({"preset": bad})


def test_preset_values_are_validated_like_explicit_ones():
    with pytest.raises(ValueError, match=r"prism\.high_threshold='x' has the wrong type.*from the preset"):
        PrismConfig(preset="fast", high_threshold="x")


def test_additional_config_and_serve_flag_select_a_preset():
    from prism_vllm.server.cli import plan_serve, prism_flag_names

    vc = SimpleNamespace(additional_config={"prism": {"preset": "fast"}})
    assert _preset_values(PrismConfig.from_vllm_config(vc)) == PRESETS["fast"]
    assert prism_flag_names()["--prism-preset"] == "preset"
    plan = plan_serve(["m", "--prism-preset", "fast", "--additional-config", '{"prism": {"low_threshold": 0.97}}'])
    merged = json.loads(plan.argv[plan.argv.index("--additional-config") + 1])
    assert merged["prism"] == {"preset": "fast", "low_threshold": 0.97}
    cfg = PrismConfig.from_dict(merged["prism"])
    assert cfg.low_threshold == 0.97 and cfg.high_threshold == PRESETS["fast"]["high_threshold"]


def test_serve_help_lists_the_preset_flag_with_its_presets():
    from prism_vllm.server.cli import serve_help

    text = serve_help()
    assert "--prism-preset STR" in text and "'fast'" in text


# ------------------------------------------------------------------ rule
def test_meanpool_rule_is_plain_mean_pooling_through_the_product_path():
    """rule='meanpool' reaches the reference (and the kernels, which read the same bands and
    PrismParams) as one all-dims band without calibration: the same selection as
    prism_vllm.rules' mean-pool rule, which the CPU quality study measured."""
    import torch

    from prism_vllm import reference as R
    from prism_vllm import rules
    from prism_vllm.kernels import PrismParams
    from prism_vllm.rope import RopeLayout, prism_bands

    gen = torch.Generator().manual_seed(0)
    qp, kp = torch.randn(5, 4, 64, generator=gen), torch.randn(9, 2, 64, generator=gen)
    layout = RopeLayout(64, 64, True)
    cfg = PrismConfig(rule="meanpool", high_threshold=0.9, low_threshold=0.9)
    got = R.select_blocks(qp, kp, 4, prism_bands(layout, cfg), cfg, seq_len=9 * 128)
    paper = PrismConfig(rule="paper", high_threshold=0.9, low_threshold=0.9)
    want = rules.select_blocks_rule(qp, kp, 4, prism_bands(layout, paper), paper, seq_len=9 * 128, rule="meanpool")
    assert torch.equal(got, want)
    assert not torch.equal(got, R.select_blocks(qp, kp, 4, prism_bands(layout, paper), paper, seq_len=9 * 128))
    params = PrismParams.make(bands=prism_bands(layout, cfg), scale=0.125, config=cfg, device="cpu")
    assert not params.calibrate and bool(params.band_high.all()) and bool(params.band_low.all())


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"prism\.rule='topk'.*'paper', 'meanpool'"):
        PrismConfig(rule="topk")
