"""Configuration: validated, env-expanded, and clear about what is wrong."""

from __future__ import annotations

import pytest

from engage.config import ConfigError, config_path, load_config
from engage.settings import DEFAULT_HOME, resolve_home


def test_packaged_defaults_load():
    cfg = load_config()
    assert cfg.features.segments.high_value_min_orders_365d == 5
    assert cfg.features.snapshot_every_days == 7


def test_env_vars_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("TTL", "14")
    path = tmp_path / "engage.yaml"
    path.write_text("features:\n  snapshot_ttl_days: ${TTL}\n")
    assert load_config(path).features.snapshot_ttl_days == 14


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("features:\n  segmnets: {}\n", "segmnets"),  # a typo is an error, not silently ignored
        ("features:\n  snapshot_ttl_days: -3\n", "snapshot_ttl_days"),
        ("features:\n  segments:\n    at_risk_min_recency_days: 200\n", "below dormant"),
        ("features: [unclosed\n", "not valid YAML"),
        ("serving:\n  feature_max_age_days: {customer_sport: 2}\n", "unknown feature view.*customer_sport"),
        ("serving:\n  feature_max_age_days: {customer_rfm: 0}\n", "customer_rfm must be a positive"),
        ("serving:\n  feature_max_age_days: {default: soon}\n", "feature_max_age_days"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "engage.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_feature_age_limits_default_to_the_feast_ttl_and_can_be_set_per_view(tmp_path):
    assert set(load_config().feature_max_ages().values()) == {35}
    path = tmp_path / "engage.yaml"
    ttl = "features: {snapshot_ttl_days: 20}\n"
    path.write_text(ttl + "serving:\n  feature_max_age_days: {default: 2, customer_profile: 30}\n")
    ages = load_config(path).feature_max_ages()
    assert ages["customer_profile"] == 30 and ages["customer_rfm"] == 2 and len(ages) == 6
    path.write_text(ttl + "serving:\n  feature_max_age_days: {customer_rfm: 1.5}\n")
    ages = load_config(path).feature_max_ages()
    assert ages["customer_rfm"] == 1.5 and ages["customer_support"] == 20


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_config_path_prefers_env_then_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    assert config_path(home).name == "default_config.yaml"
    (home / "engage.yaml").write_text("{}\n")
    assert config_path(home) == home / "engage.yaml"
    monkeypatch.setenv("ENGAGE_CONFIG", str(tmp_path / "other.yaml"))
    assert config_path(home) == tmp_path / "other.yaml"


def test_home_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGAGE_HOME", str(tmp_path / "from_env"))
    assert resolve_home(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert resolve_home() == (tmp_path / "from_env").resolve()
    monkeypatch.delenv("ENGAGE_HOME")
    assert resolve_home() == DEFAULT_HOME
