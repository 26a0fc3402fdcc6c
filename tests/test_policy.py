"""Decision policy: packaged defaults, resolution order, env expansion, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serving.policy import DEFAULT_POLICY_FILE, Policy, PolicyError, QuietHours, load_policy, policy_path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_packaged_defaults_load_and_match_the_code_defaults():
    policy = load_policy(DEFAULT_POLICY_FILE)
    assert policy == Policy()  # the YAML documents exactly what the code assumes
    assert (policy.risk_tiers.high, policy.risk_tiers.medium) == (0.6, 0.3)
    assert list(policy.channels) == ["email", "sms", "push", "in_app"]
    assert not policy.channels["in_app"].requires_consent and policy.channels["email"].requires_consent
    assert policy.contact_caps.for_segment("potential").per_days == 7
    assert policy.contact_caps.for_segment("high_value").per_days == 14
    assert (policy.quiet_hours.start, policy.quiet_hours.end) == (21, 8)
    assert (policy.exploration.epsilon, policy.exploration.top_k) == (0.05, 3)


def test_env_vars_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("EPS", "0.2")
    path = _write(tmp_path, "exploration:\n  epsilon: ${EPS}\n")
    assert load_policy(path).exploration.epsilon == 0.2


def test_resolution_env_then_home_then_packaged(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ENGAGE_HOME", str(home))
    monkeypatch.delenv("ENGAGE_POLICY", raising=False)
    assert policy_path() == DEFAULT_POLICY_FILE
    assert load_policy() == Policy()
    (home / "policy.yaml").write_text("exploration: {epsilon: 0.1}\n")
    assert policy_path() == (home / "policy.yaml").resolve()
    assert load_policy().exploration.epsilon == 0.1
    other = tmp_path / "other.yaml"
    other.write_text("exploration: {epsilon: 0.3}\n")
    monkeypatch.setenv("ENGAGE_POLICY", str(other))
    assert policy_path() == other
    assert load_policy().exploration.epsilon == 0.3


@pytest.mark.parametrize(
    ("text", "field", "match"),
    [
        ("exploration:\n  epsilno: 0.1\n", "exploration.epsilno", "Extra inputs"),  # a typo is an error
        ("bogus: 1\n", "bogus", "Extra inputs"),
        ("exploration:\n  epsilon: lots\n", "exploration.epsilon", "valid number"),
        ("exploration:\n  top_k: 0\n", "exploration.top_k", "greater than or equal"),
        ("risk_tiers:\n  high: 0.3\n  medium: 0.5\n", "risk_tiers", "medium .* must be below"),
        ("risk_tiers:\n  high: 1.5\n", "risk_tiers.high", "less than or equal"),
        ("quiet_hours:\n  start: 9pm\n", "quiet_hours.start", "whole local hour"),
        ("quiet_hours:\n  end: '07:30'\n", "quiet_hours.end", "whole local hour"),
        ("quiet_hours:\n  start: '25:00'\n", "quiet_hours.start", "whole local hour"),
        ("quiet_hours:\n  start: '08:00'\n  end: '08:00'\n", "quiet_hours", "are equal"),
        ("send_time:\n  default_local_hour: 22\n", "(top level)", "inside quiet_hours"),
        ("channels:\n  fax: {weight: 1}\n", "channels.fax", "email"),
        ("contact_caps:\n  segments:\n    vip: {max_messages: 1, per_days: 7}\n", "contact_caps.segments", "vip"),
        ("offers:\n  OFF10: {lever: -1}\n", "offers.OFF10.lever", "greater than or equal"),
        ("offers:\n  OFF10: {segments: [loyal]}\n", "offers.OFF10.segments", "loyal"),
        ("actions:\n  by_tier: {low: discount}\n", "actions.by_tier.low", "winback"),
        ("holdout:\n  share: 0.6\n", "holdout.share", "less than or equal"),
        ("holdout:\n  share: -0.1\n", "holdout.share", "greater than or equal"),
        ("holdout:\n  share: half\n", "holdout.share", "valid number"),
        ("holdout:\n  salt: ''\n", "holdout.salt", "at least 1 character"),
    ],
)
def test_bad_policy_names_the_file_and_the_field(tmp_path, text, field, match):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert re.search(match, message), message


def test_invalid_yaml_and_missing_file_are_policy_errors(tmp_path):
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(_write(tmp_path, "risk_tiers: [unclosed\n"))
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.yaml")
    assert issubclass(PolicyError, ValueError)


def test_quiet_hours_accept_unquoted_times_and_plain_hours(tmp_path):
    # Unquoted 22:00 is the base-60 integer 1320 in YAML 1.1; it still means 22:00.
    policy = load_policy(_write(tmp_path, "quiet_hours:\n  start: 22:00\n  end: 7\n"))
    assert (policy.quiet_hours.start, policy.quiet_hours.end) == (22, 7)


def test_quiet_hours_wrap_midnight_and_can_be_turned_off(tmp_path):
    wrap = QuietHours(start="21:00", end="08:00")
    assert [h for h in range(24) if wrap.is_quiet(h)] == [0, 1, 2, 3, 4, 5, 6, 7, 21, 22, 23]
    day = QuietHours(start="12:00", end="14:00")
    assert [h for h in range(24) if day.is_quiet(h)] == [12, 13]
    off = load_policy(_write(tmp_path, "quiet_hours: null\n"))
    assert all(off.open_hours)


def test_offer_settings_override_only_the_fields_they_name(tmp_path):
    text = "offer_defaults: {segments: [dormant, at_risk], lever: 0.5}\noffers:\n  OFF20: {lever: 2}\n"
    policy = load_policy(_write(tmp_path, text))
    rule, segments, channels = policy.offer_rule("OFF20")
    assert rule.lever == 2 and segments == {"dormant", "at_risk"} and channels == frozenset()
    other, _, _ = policy.offer_rule("OFF10")  # not listed: the defaults
    assert other.lever == 0.5 and other.enabled


def test_longest_contact_cap_window_covers_the_default_and_every_segment():
    segments = {"high_value": {"max_messages": 1, "per_days": 21}, "new": {"max_messages": 2, "per_days": 3}}
    caps = Policy.model_validate({"contact_caps": {"default": {"max_messages": 1, "per_days": 7},
                                                   "segments": segments}}).contact_caps
    assert caps.longest_days == 21
    alone = Policy.model_validate({"contact_caps": {"default": {"max_messages": 1, "per_days": 30},
                                                    "segments": {}}}).contact_caps
    assert alone.longest_days == 30
