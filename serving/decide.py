"""One decision for one customer: scores + policy + the moment -> :class:`~serving.types.Decision`.

1. Channels: the request's channels (or all policy channels) that the policy sends on, with consent (a
   consent of False always blocks; ``requires_consent`` channels need True) and at least one send hour:
   outside quiet hours and, when the channel has an open-rate curve, among its ``supported_hours``.
   None left -> action ``none``, reason ``no_consented_channel`` (``quiet_hours`` if consent was there).
2. A complaint or unsubscribe within the policy's days (``days_since_X`` is as of the feature timestamp;
   the time since is added) -> ``none``, ``recent_complaint`` / ``recent_unsubscribe``. The segment's
   contact cap, counting the last message from the features and ``recent_contacts`` -> ``none``,
   ``contact_cap``, with the time the next contact is allowed.
3. Risk tier from the churn probability (``unknown`` without one); action from the policy's tier (and
   segment) mapping. ``upsell`` without a positive-priority offer becomes ``nurture``; actions in
   ``actions.without_offer`` (``nurture``) never carry an offer; ``winback``/``retain`` go without one when
   none is positive.
4. Offers (every arm but the control; none without a next-best-offer model): enabled, lever > 0, segment,
   and a channel allowed by the policy and the catalog among step 1's. Priority = P(respond) x value x
   context weight x lever, where P(respond) x value = expected incremental profit. Ranked by priority,
   eligible first, at most ``max_offers`` (ineligible ones only fill spare room). The chosen offer is the
   best with positive priority and uplift, except with probability epsilon, when it is drawn uniformly
   from the top_k of them by a hash of (request_id, customer_id); ``propensity`` is the probability of
   that choice.
5. Channel: among step 1's channels the chosen offer allows, the highest expected open rate at the best
   allowed hour x channel weight (channels with a curve before channels without one).
6. ``send_at``: now if the local hour is the chosen one, else the next HH:00 local, in UTC (a nonexistent
   local time moves forward, an ambiguous one takes the first).
7. Holdout: a member of the policy's control group (salted hash of the customer id) gets ``none``, reason
   ``holdout``, keeping the scores and the action steps 1-6 chose in ``intended_action``. A customer on the
   suppression list (``suppressed=True``) gets ``none``, reason ``suppressed``, before any step.
Every rule that removes something adds a :class:`~serving.types.Suppression`; ``expected_value_at_risk`` is
churn probability x expected value. ``now`` must be timezone-aware. No pandas: about 50 us per call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from serving.policy import Policy
from serving.types import CONTROL_ARM, ChannelScore, CustomerScores, Decision, OfferScore, Suppression

_DAY = 86400.0


@lru_cache(maxsize=1024)
def _zone(name: str) -> tzinfo:
    """The timezone of an IANA name; UTC when the name is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return UTC


def _draw(request_id: str, customer_id: str) -> tuple[float, float]:
    """Two reproducible uniforms in [0, 1) from the request and customer."""
    digest = hashlib.blake2b(f"{request_id}\x1f{customer_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:], "big") / 2**64


# (id(supported), hours) -> (supported, allowed hours): the send-time model's masks are the same few arrays for
# every customer; the entry keeps its array alive, so the id cannot be reused while it is cached.
_ALLOWED: dict[tuple[int, tuple[int, ...]], tuple[object, list[int]]] = {}


def _allowed(hours: Sequence[int], supported: np.ndarray | None) -> list[int]:
    """The ``hours`` that are supported (a (24,) bool mask or an array of hours; None = all)."""
    if supported is None:
        return list(hours)
    key = (id(supported), tuple(hours))
    hit = _ALLOWED.get(key)
    if hit is not None and hit[0] is supported:
        return hit[1]
    if len(_ALLOWED) > 256:
        _ALLOWED.clear()
    allowed = _allowed_uncached(hours, supported)
    _ALLOWED[key] = (supported, allowed)
    return allowed


def _allowed_uncached(hours: Sequence[int], supported: np.ndarray) -> list[int]:
    arr = np.asarray(supported)
    if arr.dtype == bool:
        mask = arr.tolist()
        return [h for h in hours if mask[h]]
    chosen = {int(h) % 24 for h in arr.tolist()}
    return [h for h in hours if h in chosen]


def _floats(values) -> list[float]:
    """Scores as a list of plain floats (faster than numpy on a few values); lists pass through."""
    return values if type(values) is list else values.tolist()


def _best_hour(scores: CustomerScores, channel: str, policy: Policy) -> tuple[int | None, float | None]:
    """Best allowed local hour on a channel and its open rate (rate None without a curve)."""
    curve = scores.open_curves.get(channel)
    if curve is None:
        return policy.send_time.default_local_hour, None
    if scores.best_hours_for is not None and scores.best_hours_for == policy.open_hour_list:
        found = scores.best_hours.get(channel)
        if found is not None:
            return found[0], found[1]
    hours = _allowed(policy.open_hour_list, scores.supported_hours.get(channel))
    if not hours:
        return None, None
    rates = _floats(curve)
    hour = max(hours, key=rates.__getitem__)
    return hour, rates[hour]


def _channels(scores: CustomerScores, policy: Policy, requested: Sequence[str] | None,
              sup: list[Suppression]) -> tuple[list[ChannelScore], dict[str, ChannelScore], bool]:
    """Step 1: a score per candidate channel, the eligible ones by name, and whether any had consent."""
    out: list[ChannelScore] = []
    eligible: dict[str, ChannelScore] = {}
    consented = False
    for ch in dict.fromkeys(requested) if requested is not None else policy.channels:
        rule = policy.channels.get(ch)  # type: ignore[call-overload]
        if rule is None:
            out.append(ChannelScore(ch, False, suppressed_by="channel_not_in_policy"))
            sup.append(Suppression("channel_not_in_policy", f"channel:{ch}", f"the policy does not send on {ch}"))
            continue
        given = scores.consent.get(ch)
        if given is False or (rule.requires_consent and given is not True):
            out.append(ChannelScore(ch, False, suppressed_by="consent"))
            sup.append(Suppression("consent", f"channel:{ch}", f"no consent to contact on {ch}"))
            continue
        consented = True
        hour, rate = _best_hour(scores, ch, policy)
        if hour is None:
            out.append(ChannelScore(ch, False, suppressed_by="quiet_hours"))
            sup.append(Suppression("quiet_hours", f"channel:{ch}", f"no supported {ch} hour outside quiet hours"))
            continue
        score = ChannelScore(ch, True, best_local_hour=hour, expected_open_rate=rate)
        out.append(score)
        eligible[ch] = score
    return out, eligible, consented


def _blocking_rule(scores: CustomerScores, policy: Policy, now: datetime,
                   recent_contacts: Sequence[datetime]) -> tuple[str, str] | None:
    """Step 2: (rule, detail) when a complaint, an unsubscribe or the contact cap stops every message."""
    ts = scores.feature_timestamp
    elapsed = max((now - ts).total_seconds() / _DAY, 0.0) if ts is not None else 0.0
    s = policy.suppression
    for rule, since, window in (("recent_complaint", scores.days_since_complaint, s.complaint_days),
                                ("recent_unsubscribe", scores.days_since_unsubscribe, s.unsubscribe_days)):
        if since is not None and since + elapsed < window:
            return rule, f"{rule.split('_')[1]} {since + elapsed:.1f} days ago (policy: none within {window:g} days)"
    cap = policy.contact_caps.for_segment(scores.segment)
    contacts = [t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in recent_contacts]
    if ts is not None and scores.days_since_last_message is not None:
        contacts.append(ts - timedelta(days=scores.days_since_last_message))
    start = now - timedelta(days=cap.per_days)
    inside = sorted(t for t in contacts if t > start)
    if len(inside) >= cap.max_messages:
        nxt = (inside[len(inside) - cap.max_messages] + timedelta(days=cap.per_days)).astimezone(UTC)
        return "contact_cap", (f"{len(inside)} message(s) in the last {cap.per_days:g} days (cap {cap.max_messages} "
                               f"for {scores.segment}); next contact allowed at {nxt.isoformat()}")
    return None


def _offers(scores: CustomerScores, policy: Policy, eligible: dict[str, ChannelScore],
            sup: list[Suppression]) -> list[tuple[OfferScore, float, frozenset[str]]]:
    """Step 4 before the action: every offer with its profit x lever and the channels it may use."""
    arms, p, profit = scores.arms, scores.p_convert, scores.incremental_profit
    if p is None or profit is None or CONTROL_ARM not in arms:
        return []
    p_list, profit_list = _floats(p), _floats(profit)
    p0 = p_list[arms.index(CONTROL_ARM)]
    names = frozenset(eligible)
    out = []
    for k, arm in enumerate(arms):
        if arm == CONTROL_ARM:
            continue
        rule, segments, channels = policy.offer_rule(arm)
        catalog = scores.arm_channels[k] if k < len(scores.arm_channels) else frozenset()
        allowed = names & channels if channels else names
        if catalog:
            allowed = allowed & catalog
        if not rule.enabled:
            blocked: tuple[str, str] | None = ("offer_disabled", "is disabled by the policy")
        elif rule.lever <= 0:
            blocked = ("offer_held", "is held by the policy (lever 0)")
        elif segments and scores.segment not in segments:
            blocked = ("offer_segment", f"is not offered to segment {scores.segment}")
        elif not allowed:
            blocked = ("offer_channel", "is not allowed on any eligible channel")
        else:
            blocked = None
        score = OfferScore(arm, p_list[k], p0, p_list[k] - p0, profit_list[k], 0.0)
        if blocked:
            score.eligible, score.suppressed_by = False, blocked[0]
            sup.append(Suppression(blocked[0], f"offer:{arm}", f"{arm} {blocked[1]}"))
        out.append((score, rule.lever, allowed))
    return out


def _send_at(now: datetime, zone: tzinfo, hour: int) -> datetime:
    """The next start of ``hour`` local (now when inside it), in UTC."""
    local = now.astimezone(zone)
    if local.hour == hour:
        return now
    day = local.date() if hour > local.hour else local.date() + timedelta(days=1)
    # fold=0: an ambiguous time is its first occurrence, a nonexistent one uses the offset before the gap,
    # which lands after the gap (02:00 -> 03:00 on a spring-forward night).
    at = datetime(day.year, day.month, day.day, hour, tzinfo=zone).astimezone(UTC)
    return at if at > now else at + timedelta(days=1)


def decide(scores: CustomerScores, policy: Policy, now: datetime, *, channels: Sequence[str] | None = None,
           max_offers: int = 3, recent_contacts: Sequence[datetime] = (), request_id: str = "",
           suppressed: bool = False) -> Decision:
    """Decide what to do for one customer at ``now`` (timezone-aware); see the module docstring.

    ``suppressed`` (the customer asked to be forgotten): ``none``, reason ``suppressed``, nothing scored shown.
    A member of the policy's holdout group gets ``none``, reason ``holdout``, with ``holdout`` set and the
    action the policy would have taken in ``intended_action`` (``none`` too when a rule stopped it).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if max_offers < 0:
        raise ValueError("max_offers must be >= 0")
    now = now.astimezone(UTC)
    if suppressed:
        return _suppressed(scores)
    decision = _decide(scores, policy, now, channels, max_offers, recent_contacts, request_id)
    if policy.holdout.contains(scores.customer_id):
        _hold_out(decision, policy)
    return decision


def _suppressed(scores: CustomerScores) -> Decision:
    return Decision(
        customer_id=scores.customer_id, action="none", reason="suppressed", churn_probability=None,
        risk_tier="unknown", segment=scores.segment, reasons=[], offers=[], chosen_offer=None, channel=None,
        send_at=None, send_at_local=None, expected_open_rate=None, propensity=1.0, channels=[],
        suppressions=[Suppression("suppressed", "action", "the customer is on the suppression list")],
        cold_start=scores.cold_start, degraded=scores.degraded, feature_timestamp=None, model_versions={},
    )


def _hold_out(decision: Decision, policy: Policy) -> None:
    """Turn a decision into its control-group form, keeping what would have been done."""
    decision.holdout, decision.intended_action = True, decision.action
    decision.action, decision.reason = "none", "holdout"
    decision.chosen_offer = decision.channel = decision.send_at = decision.send_at_local = None
    decision.expected_open_rate, decision.propensity = None, 1.0
    decision.suppressions.append(Suppression(
        "holdout", "action", f"in the control group ({policy.holdout.share:.0%} of customers by a salted hash)"))


def _decide(scores: CustomerScores, policy: Policy, now: datetime, channels: Sequence[str] | None,
            max_offers: int, recent_contacts: Sequence[datetime], request_id: str) -> Decision:
    p_churn = scores.churn_probability
    tier = policy.risk_tiers.tier(p_churn)
    sup: list[Suppression] = []
    channel_scores, eligible, consented = _channels(scores, policy, channels, sup)
    decision = Decision(
        customer_id=scores.customer_id, action="none", reason=None, churn_probability=p_churn, risk_tier=tier,
        segment=scores.segment, reasons=list(scores.churn_reasons), offers=[], chosen_offer=None, channel=None,
        send_at=None, send_at_local=None, expected_open_rate=None, propensity=1.0, channels=channel_scores,
        suppressions=sup, cold_start=scores.cold_start, degraded=scores.degraded,
        feature_timestamp=scores.feature_timestamp, model_versions=dict(scores.model_versions),
        expected_value_at_risk=None if p_churn is None else p_churn * scores.expected_value,
    )
    if not eligible:
        decision.reason = "quiet_hours" if consented else "no_consented_channel"
        sup.append(Suppression(decision.reason, "action", "no channel is left to send on"))
        return decision
    blocked = _blocking_rule(scores, policy, now, recent_contacts)
    if blocked:
        decision.reason = blocked[0]
        sup.append(Suppression(blocked[0], "action", blocked[1]))
        return decision

    offers = _offers(scores, policy, eligible, sup)
    action = policy.actions.action_for(tier, scores.segment)
    weight = getattr(policy.arbitration.context_weights, action)
    for score, lever, _ in offers:
        score.priority = score.expected_incremental_profit * weight * lever
    offers.sort(key=lambda o: (not o[0].eligible, -o[0].priority))
    positive = [o for o in offers if o[0].eligible and o[0].priority > 0 and o[0].uplift > 0]
    if action == "upsell" and not positive:
        action = "nurture"
    decision.action = action
    decision.offers = [o[0] for o in offers[:max_offers]]

    chosen = None
    if positive and action not in policy.actions.without_offer:
        top = positive[: policy.exploration.top_k]
        eps, k = policy.exploration.epsilon, len(top)
        u_explore, u_pick = _draw(request_id, scores.customer_id)
        index = min(int(u_pick * k), k - 1) if u_explore < eps else 0
        chosen = top[index]
        decision.chosen_offer = chosen[0].offer_id
        decision.propensity = 1.0 if k == 1 else (1 - eps) + eps / k if index == 0 else eps / k

    best, best_key = None, (False, -1.0)
    for score in channel_scores:
        if not score.eligible:
            continue
        if chosen is not None and score.channel not in chosen[2]:
            score.eligible, score.suppressed_by = False, "offer_channel"
            sup.append(Suppression("offer_channel", f"channel:{score.channel}",
                                   f"offer {chosen[0].offer_id} is not sent on {score.channel}"))
            continue
        rate = score.expected_open_rate
        key = (rate is not None, (1.0 if rate is None else rate) * policy.channels[score.channel].weight)
        if best is None or key > best_key:
            best, best_key = score, key
    if best is None:  # cannot happen: an eligible offer allows at least one eligible channel
        raise RuntimeError("no channel left for the chosen offer")
    zone = _zone(scores.timezone)
    decision.channel, decision.expected_open_rate = best.channel, best.expected_open_rate
    decision.send_at = _send_at(now, zone, best.best_local_hour)  # type: ignore[arg-type]
    decision.send_at_local = decision.send_at.astimezone(zone)
    _note_quiet_best(scores, policy, best, sup)
    return decision


def _note_quiet_best(scores: CustomerScores, policy: Policy, chosen: ChannelScore, sup: list[Suppression]) -> None:
    """Record when the channel's best supported hour was inside quiet hours and another hour was taken."""
    curve = scores.open_curves.get(chosen.channel)
    if curve is None or policy.quiet_hours is None:
        return
    found = scores.best_hours.get(chosen.channel)
    if found is not None:
        free = found[2]
    else:
        rates = _floats(curve)
        free = max(_allowed(range(24), scores.supported_hours.get(chosen.channel)), key=rates.__getitem__)
    if free != chosen.best_local_hour and not policy.open_hours[free]:
        sup.append(Suppression("quiet_hours", f"channel:{chosen.channel}",
                               f"best hour {free:02d}:00 is inside quiet hours; sending at "
                               f"{chosen.best_local_hour:02d}:00 local"))
