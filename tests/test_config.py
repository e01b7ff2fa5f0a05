"""PrismConfig: defaults, band sizes, parsing from vLLM's additional_config, errors."""

from types import SimpleNamespace

import pytest

from prism_vllm import PrismConfig


def test_defaults_match_the_paper():
    cfg = PrismConfig()
    assert cfg.block_size == 128
    assert (cfg.high_threshold, cfg.low_threshold) == (0.95, 0.95)
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
    assert cfg.low_threshold == 0.9 and cfg.min_context_len == 0 and cfg.high_threshold == 0.95
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
