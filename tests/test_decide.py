"""decide(): hand-made customers through every policy rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from serving.decide import decide
from serving.policy import Policy
from serving.types import CHANNELS, CustomerScores

NOW = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)  # a Tuesday, noon UTC
POLICY = Policy()


def curve(best: int, second: int | None = None, top: float = 0.30, base: float = 0.05) -> np.ndarray:
    """An open-rate curve: ``top`` at ``best``, a bit less at ``second``, ``base`` elsewhere."""
    c = np.full(24, base)
    if second is not None:
        c[second] = top - 0.05
    c[best] = top
    return c


def customer(**overrides) -> CustomerScores:
    """A low-risk `potential` customer in UTC, features a day old, three offers (A best), curves for email+push."""
    values = {
        "customer_id": "C1",
        "feature_timestamp": NOW - timedelta(days=1),
        "segment": "potential",
        "timezone": "UTC",
        "churn_probability": 0.1,
        "expected_value": 200.0,
        "arms": ["none", "A", "B", "C"],
        "p_convert": np.array([0.10, 0.20, 0.16, 0.12]),
        "incremental_profit": np.array([0.0, 2.0, 1.0, 0.5]),
        "arm_channels": [frozenset()] * 4,
        "open_curves": {"email": curve(14, 15, top=0.30), "push": curve(18, 19, top=0.25)},
        "supported_hours": {"email": np.ones(24, bool), "push": np.ones(24, bool)},
    }
    values.update(overrides)
    return CustomerScores(**values)


def policy(**sections) -> Policy:
    return Policy.model_validate(sections)


def rules(decision) -> set[str]:
    return {s.rule for s in decision.suppressions}


# --- consent -------------------------------------------------------------------------------------------


def test_no_email_consent_never_emails():
    d = decide(customer(consent={"email": False, "sms": True, "push": True}), POLICY, NOW)
    assert d.channel == "push"  # email has the best open rate but no consent
    email = next(c for c in d.channels if c.channel == "email")
    assert not email.eligible and email.suppressed_by == "consent"
    assert any(s.rule == "consent" and s.target == "channel:email" for s in d.suppressions)


def test_no_consent_anywhere_is_no_action():
    d = decide(customer(consent=dict.fromkeys(CHANNELS, False)), POLICY, NOW)
    assert (d.action, d.reason) == ("none", "no_consented_channel")
    assert d.channel is None and d.send_at is None and d.chosen_offer is None


def test_in_app_needs_no_consent_unless_the_policy_says_so():
    d = decide(customer(consent={}), POLICY, NOW)
    assert d.channel == "in_app"  # missing consent blocks email, sms, push; in_app needs none by default
    assert d.send_at_local.hour == 10  # no in_app curve: the policy's default local hour
    strict = policy(channels={"email": {}, "in_app": {"requires_consent": True}})
    assert decide(customer(consent={}), strict, NOW).reason == "no_consented_channel"


def test_requested_channels_narrow_the_choice():
    d = decide(customer(), POLICY, NOW, channels=["push", "fax"])
    assert d.channel == "push"
    assert [c.channel for c in d.channels] == ["push", "fax"]
    assert d.channels[1].suppressed_by == "channel_not_in_policy"


# --- contact caps --------------------------------------------------------------------------------------


def test_recent_contact_caps_the_default_segment_and_says_when_next():
    sent = NOW - timedelta(days=3)
    d = decide(customer(), POLICY, NOW, recent_contacts=[sent])
    assert (d.action, d.reason) == ("none", "contact_cap")
    detail = next(s.detail for s in d.suppressions if s.rule == "contact_cap")
    assert (sent + timedelta(days=7)).isoformat() in detail
    assert decide(customer(), POLICY, NOW, recent_contacts=[NOW - timedelta(days=8)]).action != "none"


def test_high_value_cap_is_stricter():
    contacts = [NOW - timedelta(days=10)]
    assert decide(customer(segment="potential"), POLICY, NOW, recent_contacts=contacts).action != "none"
    assert decide(customer(segment="high_value"), POLICY, NOW, recent_contacts=contacts).reason == "contact_cap"


def test_last_message_from_features_counts_with_the_time_since_the_snapshot():
    # Features 4 days old: a message 2 days before the snapshot was 6 days ago (capped), 4 days -> 8 (free).
    old = NOW - timedelta(days=4)
    assert decide(customer(feature_timestamp=old, days_since_last_message=2), POLICY, NOW).reason == "contact_cap"
    assert decide(customer(feature_timestamp=old, days_since_last_message=4), POLICY, NOW).action != "none"


def test_cap_is_configurable_per_segment():
    two_a_week = policy(contact_caps={"default": {"max_messages": 2, "per_days": 7}})
    first, second = NOW - timedelta(days=5), NOW - timedelta(days=1)
    assert decide(customer(), two_a_week, NOW, recent_contacts=[second]).action != "none"
    d = decide(customer(), two_a_week, NOW, recent_contacts=[second, first])
    assert d.reason == "contact_cap"
    assert (first + timedelta(days=7)).isoformat() in d.suppressions[-1].detail  # when the older one expires


# --- quiet hours and send hour -------------------------------------------------------------------------


def test_best_hour_inside_quiet_hours_is_never_chosen():
    d = decide(customer(open_curves={"email": curve(22, 19)}), POLICY, NOW)
    assert d.channel == "email" and d.channels[0].best_local_hour == 19
    assert d.send_at_local.hour == 19
    assert any(s.rule == "quiet_hours" and "22:00" in s.detail for s in d.suppressions)


@pytest.mark.parametrize("peak", range(24))
def test_quiet_hours_wrap_midnight(peak):
    runner_up = 13 if peak == 12 else 12
    d = decide(customer(open_curves={"email": curve(peak, runner_up)}), POLICY, NOW)
    # Default quiet hours 21:00-08:00 run across midnight: 21, 22, 23 and 0-7 are all skipped.
    assert d.send_at_local.hour == (peak if 8 <= peak < 21 else runner_up)


def test_other_quiet_hours_are_respected():
    late = policy(quiet_hours={"start": "23:00", "end": "06:00"})
    assert decide(customer(open_curves={"email": curve(22)}), late, NOW).send_at_local.hour == 22
    assert decide(customer(open_curves={"email": curve(5, 6)}), late, NOW).send_at_local.hour == 6


def test_only_supported_hours_are_chosen():
    as_mask = np.zeros(24, bool)
    as_mask[16] = True
    for supported in (as_mask, np.array([16])):
        d = decide(customer(open_curves={"email": curve(14)}, supported_hours={"email": supported}), POLICY, NOW)
        assert d.channels[0].best_local_hour == 16


def test_channel_without_an_open_hour_is_suppressed():
    night = np.zeros(24, bool)
    night[[2, 3]] = True  # the email model only ever sent at night
    d = decide(customer(supported_hours={"email": night}), POLICY, NOW)
    assert d.channel == "push"
    assert d.channels[0].suppressed_by == "quiet_hours"


# --- send_at and time zones ----------------------------------------------------------------------------


def test_send_now_inside_the_chosen_hour_else_the_next_slot():
    now = NOW.replace(hour=14, minute=20)
    assert decide(customer(), POLICY, now).send_at == now
    later = decide(customer(open_curves={"email": curve(11)}), POLICY, now)
    assert later.send_at == datetime(2025, 6, 11, 11, tzinfo=UTC)


def test_send_at_is_in_the_customers_timezone():
    d = decide(customer(timezone="Asia/Tokyo"), POLICY, NOW)  # 21:00 in Tokyo now
    assert d.send_at == datetime(2025, 6, 11, 5, tzinfo=UTC)  # 14:00 JST next day
    assert d.send_at_local.hour == 14 and d.send_at_local.utcoffset() == timedelta(hours=9)


def test_berlin_spring_forward_moves_the_utc_time():
    now = datetime(2025, 3, 29, 12, tzinfo=UTC)  # Saturday 13:00 CET; clocks go forward that night
    d = decide(customer(timezone="Europe/Berlin", open_curves={"email": curve(10)}), POLICY, now)
    assert d.send_at == datetime(2025, 3, 30, 8, tzinfo=UTC)  # 10:00 CEST (UTC+2), not 09:00 UTC
    assert d.send_at_local.hour == 10 and d.send_at_local.utcoffset() == timedelta(hours=2)


def test_new_york_nonexistent_hour_moves_forward():
    no_quiet = policy(quiet_hours=None)
    now = datetime(2025, 3, 8, 17, tzinfo=UTC)  # 12:00 EST; 02:00 does not exist on March 9
    d = decide(customer(timezone="America/New_York", open_curves={"email": curve(2)}), no_quiet, now)
    assert d.send_at == datetime(2025, 3, 9, 7, tzinfo=UTC)
    assert d.send_at_local.hour == 3  # 03:00 EDT, the first instant after the gap


def test_new_york_ambiguous_hour_takes_the_first():
    no_quiet = policy(quiet_hours=None)
    now = datetime(2025, 11, 1, 16, tzinfo=UTC)  # 12:00 EDT; 01:00 happens twice on November 2
    d = decide(customer(timezone="America/New_York", open_curves={"email": curve(1)}), no_quiet, now)
    assert d.send_at == datetime(2025, 11, 2, 5, tzinfo=UTC)  # 01:00 EDT, not 06:00 UTC (01:00 EST)
    assert d.send_at_local.utcoffset() == timedelta(hours=-4)


def test_unknown_timezone_falls_back_to_utc():
    d = decide(customer(timezone="Mars/Olympus"), POLICY, NOW)
    assert d.send_at == datetime(2025, 6, 10, 14, tzinfo=UTC)


def test_naive_now_is_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(customer(), POLICY, datetime(2025, 6, 10, 12))


# --- complaints and unsubscribes -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["days_since_complaint", "days_since_unsubscribe"])
def test_complaint_or_unsubscribe_suppresses_within_30_days_only(field):
    reason = "recent_" + field.removeprefix("days_since_")
    assert decide(customer(**{field: 29.0}, feature_timestamp=NOW), POLICY, NOW).reason == reason
    assert decide(customer(**{field: 31.0}, feature_timestamp=NOW), POLICY, NOW).action != "none"
    # 25 days as of a 3-day-old snapshot is 28 days now (suppressed); as of a 7-day-old one, 32 (not).
    assert decide(customer(**{field: 25.0}, feature_timestamp=NOW - timedelta(days=3)), POLICY, NOW).reason == reason
    assert decide(customer(**{field: 25.0}, feature_timestamp=NOW - timedelta(days=7)), POLICY, NOW).reason is None


# --- offer eligibility ---------------------------------------------------------------------------------


def test_offer_limited_to_other_segments_is_not_offered():
    d = decide(customer(), policy(offers={"A": {"segments": ["dormant"]}}), NOW)
    assert d.chosen_offer == "B"
    a = next(o for o in d.offers if o.offer_id == "A")
    assert not a.eligible and a.suppressed_by == "offer_segment"
    assert d.offers[-1].offer_id == "A"  # ineligible offers come after the eligible ones


def test_offer_on_a_channel_without_consent_is_not_offered():
    no_sms = {"email": True, "sms": False, "push": True}
    d = decide(customer(consent=no_sms, arm_channels=[frozenset(), frozenset({"sms"}), frozenset(), frozenset()]),
               POLICY, NOW)
    assert d.chosen_offer == "B" and "offer_channel" in rules(d)
    held = decide(customer(consent=no_sms), policy(offers={"A": {"channels": ["sms"]}}), NOW)
    assert held.chosen_offer == "B"


def test_the_chosen_offer_decides_the_channel():
    push_only = [frozenset(), frozenset({"push"}), frozenset(), frozenset()]
    d = decide(customer(arm_channels=push_only), POLICY, NOW)
    assert (d.chosen_offer, d.channel) == ("A", "push")  # email opens better, but A only goes by push
    assert d.channels[0].suppressed_by == "offer_channel"


@pytest.mark.parametrize(("setting", "rule"), [({"lever": 0}, "offer_held"), ({"enabled": False}, "offer_disabled")])
def test_held_or_disabled_offer_is_not_offered(setting, rule):
    d = decide(customer(), policy(offers={"A": setting}), NOW)
    assert d.chosen_offer == "B"
    assert any(s.rule == rule and s.target == "offer:A" for s in d.suppressions)


def test_offers_list_is_capped_and_eligible_first():
    d = decide(customer(), policy(offers={"A": {"enabled": False}}), NOW, max_offers=2)
    assert [(o.offer_id, o.eligible) for o in d.offers] == [("B", True), ("C", True)]
    assert [o.offer_id for o in decide(customer(), POLICY, NOW, max_offers=5).offers] == ["A", "B", "C"]


def test_no_offer_model_means_no_offers():
    d = decide(customer(p_convert=None, incremental_profit=None, arms=[]), POLICY, NOW)
    assert d.offers == [] and d.chosen_offer is None
    assert d.action == "nurture"  # low risk, nothing to upsell


# --- arbitration ---------------------------------------------------------------------------------------


def test_priority_is_expected_incremental_profit_times_context_weight_and_lever():
    d = decide(customer(churn_probability=0.45), policy(offers={"C": {"lever": 3}}), NOW)
    assert d.action == "retain"
    by_id = {o.offer_id: o for o in d.offers}
    assert by_id["A"].priority == pytest.approx(2.0 * 1.1)  # retain weight 1.1
    assert by_id["C"].priority == pytest.approx(0.5 * 1.1 * 3)
    assert by_id["A"].uplift == pytest.approx(0.10) and by_id["A"].p_convert_without == pytest.approx(0.10)


def test_lever_pushes_an_offer_up():
    assert decide(customer(), POLICY, NOW).chosen_offer == "A"
    pushed = decide(customer(), policy(offers={"B": {"lever": 2.5}}), NOW)
    assert pushed.chosen_offer == "B" and pushed.offers[0].offer_id == "B"


def test_zero_or_negative_uplift_is_never_chosen():
    # A: no uplift (profit even claims positive); B: negative uplift; C: negative profit.
    scores = customer(p_convert=np.array([0.2, 0.2, 0.15, 0.21]), incremental_profit=np.array([0.0, 0.4, -1.0, -0.2]))
    d = decide(scores, POLICY, NOW)
    assert d.chosen_offer is None
    assert d.action == "nurture"  # low risk: upsell needs a profitable offer
    retain = decide(customer(churn_probability=0.4, p_convert=scores.p_convert,
                             incremental_profit=scores.incremental_profit), POLICY, NOW)
    assert (retain.action, retain.chosen_offer, retain.propensity) == ("retain", None, 1.0)  # message, no offer


def test_customer_who_buys_anyway_gets_no_discount():
    # Converts at 90% without an offer: the small uplift does not pay for the discount.
    sure = customer(p_convert=np.array([0.90, 0.92, 0.91, 0.90]),
                    incremental_profit=np.array([0.0, 0.92 * -6.0 + 0.02 * 30, 0.91 * -4.0 + 0.01 * 30, -1.8]))
    d = decide(sure, POLICY, NOW)
    assert d.chosen_offer is None and all(o.priority <= 0 for o in d.offers)


# --- exploration ---------------------------------------------------------------------------------------


def test_exploration_propensities_match_the_draws_and_sum_to_one():
    eps, k = 0.3, 3
    explore = policy(exploration={"epsilon": eps, "top_k": k})
    chosen = [decide(customer(), explore, NOW, request_id=f"r{i}") for i in range(3000)]
    greedy_p, other_p = (1 - eps) + eps / k, eps / k
    assert greedy_p + (k - 1) * other_p == pytest.approx(1.0)
    for d in chosen:
        assert d.propensity == pytest.approx(greedy_p if d.chosen_offer == "A" else other_p)
    share = {o: sum(d.chosen_offer == o for d in chosen) / len(chosen) for o in "ABC"}
    assert share["A"] == pytest.approx(greedy_p, abs=0.03)
    assert share["B"] == pytest.approx(other_p, abs=0.02) and share["C"] == pytest.approx(other_p, abs=0.02)


def test_exploration_is_deterministic_per_request_and_customer():
    explore = policy(exploration={"epsilon": 0.5})
    first = [decide(customer(), explore, NOW, request_id=f"r{i}").chosen_offer for i in range(50)]
    again = [decide(customer(), explore, NOW, request_id=f"r{i}").chosen_offer for i in range(50)]
    assert first == again and len(set(first)) > 1


def test_exploration_stays_in_the_top_k_and_greedy_without_choice():
    explore = policy(exploration={"epsilon": 1.0, "top_k": 2})
    assert {decide(customer(), explore, NOW, request_id=str(i)).chosen_offer for i in range(200)} == {"A", "B"}
    one = customer(incremental_profit=np.array([0.0, 2.0, -1.0, -1.0]))
    d = decide(one, explore, NOW, request_id="x")
    assert (d.chosen_offer, d.propensity) == ("A", 1.0)  # a single candidate: no choice
    assert decide(customer(), policy(exploration={"epsilon": 0.0}), NOW).propensity == 1.0


# --- risk tiers and actions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "segment", "tier", "action"),
    [
        (0.6, "potential", "high", "retain"),
        (0.9, "dormant", "high", "winback"),
        (0.7, "at_risk", "high", "winback"),
        (0.59, "at_risk", "medium", "retain"),
        (0.3, "potential", "medium", "retain"),
        (0.29, "potential", "low", "upsell"),
        (None, "potential", "unknown", "nurture"),
    ],
)
def test_risk_tier_and_action(p, segment, tier, action):
    d = decide(customer(churn_probability=p, segment=segment), POLICY, NOW)
    assert (d.risk_tier, d.action) == (tier, action)
    assert d.expected_value_at_risk == (None if p is None else pytest.approx(p * 200.0))


def test_nurture_carries_no_offer_even_when_one_is_profitable():
    d = decide(customer(churn_probability=None, cold_start=True), POLICY, NOW)
    assert (d.action, d.chosen_offer, d.cold_start) == ("nurture", None, True)


def test_action_mapping_is_configurable():
    mapped = policy(actions={"by_tier": {"low": "retain"}, "by_tier_segment": {}})
    assert decide(customer(churn_probability=0.05), mapped, NOW).action == "retain"
    assert decide(customer(churn_probability=0.9, segment="dormant"), mapped, NOW).action == "retain"  # default high


# --- holdout and suppression ---------------------------------------------------------------------------


def test_holdout_is_a_stable_salted_share_of_customers():
    ids = [f"C{i:05d}" for i in range(20_000)]
    tenth = policy(holdout={"share": 0.1})
    members = {c for c in ids if tenth.holdout.contains(c)}
    assert 0.09 < len(members) / len(ids) < 0.11
    assert members == {c for c in ids if policy(holdout={"share": 0.1}).holdout.contains(c)}  # a new process agrees
    resalted = {c for c in ids if policy(holdout={"share": 0.1, "salt": "spring-test"}).holdout.contains(c)}
    assert 0.09 < len(resalted) / len(ids) < 0.11 and len(resalted & members) < len(members) / 2
    assert members <= {c for c in ids if policy(holdout={"share": 0.2}).holdout.contains(c)}  # growing keeps them
    assert not any(policy(holdout={"share": 0}).holdout.contains(c) for c in ids)


def test_holdout_member_gets_none_with_the_action_it_would_have_had():
    ids = [f"C{i}" for i in range(200)]
    half = policy(holdout={"share": 0.5})
    held = next(c for c in ids if half.holdout.contains(c))
    treated = next(c for c in ids if not half.holdout.contains(c))
    without = decide(customer(customer_id=held), policy(holdout={"share": 0}), NOW)
    assert without.action == "upsell" and without.chosen_offer == "A"  # what the control group member misses
    d = decide(customer(customer_id=held), half, NOW)
    assert (d.action, d.reason, d.holdout, d.intended_action) == ("none", "holdout", True, without.action)
    assert d.chosen_offer is None and d.channel is None and d.send_at is None and d.propensity == 1.0
    assert [o.offer_id for o in d.offers] == [o.offer_id for o in without.offers]  # scores kept for the report
    assert "holdout" in rules(d)
    other = decide(customer(customer_id=treated), half, NOW)
    assert other.action == "upsell" and not other.holdout and other.intended_action is None


def test_holdout_member_that_a_rule_stops_records_none_as_intended():
    half = policy(holdout={"share": 0.5})
    held = next(c for c in (f"C{i}" for i in range(200)) if half.holdout.contains(c))
    d = decide(customer(customer_id=held, consent={"email": False}), half, NOW, channels=["email"])
    assert (d.reason, d.intended_action) == ("holdout", "none") and "consent" in rules(d)


def test_suppressed_customer_gets_none_and_no_scores():
    d = decide(customer(churn_probability=0.9), POLICY, NOW, suppressed=True)
    assert (d.action, d.reason) == ("none", "suppressed")
    assert d.offers == [] and d.channels == [] and d.churn_probability is None and d.reasons == []
