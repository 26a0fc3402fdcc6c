"""The simulator: contract-shaped output, internal consistency, and ground truth that is right."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features import _simworld
from features import simulate as sim
from features.simulate import CHANNELS, DEFAULT_OFFERS, simulate, true_conversion_prob, true_open_prob

N, DAYS, HORIZON, SEED = 3000, 120, 90, 11
START = pd.Timestamp(sim.DEFAULT_START)
END = START + pd.Timedelta(days=DAYS)
TABLES = ("customers", "events", "offers", "exposures", "ground_truth")
CONTRACT_COLUMNS = {
    "customers": ["customer_id", "signup_at", "timezone", "country", "email_opt_in", "sms_opt_in",
                  "push_opt_in"],
    "events": ["event_id", "customer_id", "event_at", "event_type", "channel", "amount", "offer_id"],
    "offers": ["offer_id", "name", "kind", "cost", "channels", "segments"],
    "exposures": ["exposure_id", "customer_id", "sent_at", "channel", "offer_id", "propensity",
                  "opened_at", "clicked", "converted", "revenue"],
}
EVENT_TYPES = {"purchase", "session", "page_view", "email_open", "email_click", "push_open", "sms_click",
               "support_ticket", "complaint", "unsubscribe"}
EVENT_CHANNELS = {"email", "sms", "push", "in_app", "web", "phone", "store"}


def _read(folder: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(folder / f"{name}.parquet") for name in TABLES}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """3,000 customers over 120 days, in chunks of 1,000 (so chunking is exercised)."""
    out = tmp_path_factory.mktemp("world")
    simulate(N, DAYS, SEED, out, chunk_size=1000, horizon_days=HORIZON, progress=False)
    return _read(out)


def _local_hour(frame: pd.DataFrame, column: str) -> pd.Series:
    """Local clock hour computed independently of the simulator, with pandas' tz database."""
    hour = pd.Series(-1, index=frame.index)
    for tz, rows in frame.groupby("timezone"):
        hour.loc[rows.index] = rows[column].dt.tz_convert(tz).dt.hour
    return hour


def test_same_seed_gives_identical_tables_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        simulate(300, 40, seed, tmp_path / name, chunk_size=128, progress=False)
    for table in TABLES:
        a, b, c = (pq.read_table(tmp_path / name / f"{table}.parquet") for name in "abc")
        assert a.equals(b), table
        if table != "offers":
            assert not a.equals(c), table


def test_tables_have_the_contract_columns_and_types(world):
    for name, columns in CONTRACT_COLUMNS.items():
        assert list(world[name].columns[: len(columns)]) == columns
    assert list(world["customers"].columns[7:]) == ["age_band", "household_size", "loyalty_member"]
    customers, events, exposures = world["customers"], world["events"], world["exposures"]
    for frame, column in ((customers, "signup_at"), (events, "event_at"), (exposures, "sent_at"),
                          (exposures, "opened_at")):
        assert str(frame[column].dtype) == "datetime64[us, UTC]"
    assert customers["customer_id"].is_unique and customers["customer_id"].str.fullmatch(r"C\d{7}").all()
    assert events["event_id"].is_unique and exposures["exposure_id"].is_unique
    assert set(events["event_type"]) == EVENT_TYPES
    assert set(events["channel"].dropna()) <= EVENT_CHANNELS
    assert set(exposures["channel"]) == set(CHANNELS)
    known = set(customers["customer_id"])
    assert set(events["customer_id"]) <= known and set(exposures["customer_id"]) <= known
    assert set(exposures["offer_id"].dropna()) == set(DEFAULT_OFFERS["offer_id"])
    assert world["offers"].equals(DEFAULT_OFFERS)


def test_customers_mix_old_and_new_signups_and_consistent_countries(world):
    customers = world["customers"]
    before = (customers["signup_at"] < START).mean()
    assert 0.65 < before < 0.75
    assert customers["signup_at"].min() >= START - pd.Timedelta(days=3 * 365 + 1)
    assert customers["signup_at"].max() < END
    expected = dict(zip(_simworld.TIMEZONES, _simworld.TZ_COUNTRY, strict=True))
    for tz, rows in customers.groupby("timezone"):
        assert set(rows["country"].fillna("none")) == {expected[tz] or "none"}
    assert customers["timezone"].nunique() == len(_simworld.TIMEZONES)
    assert customers["email_opt_in"].mean() > customers["sms_opt_in"].mean()


def test_nothing_happens_before_signup_or_outside_the_window(world):
    signup = world["customers"].set_index("customer_id")["signup_at"]
    events, exposures = world["events"], world["exposures"]
    assert (events["event_at"] > events["customer_id"].map(signup)).all()
    assert (exposures["sent_at"] > exposures["customer_id"].map(signup)).all()
    assert events["event_at"].min() >= START and events["event_at"].max() < END
    assert exposures["sent_at"].min() >= START and exposures["opened_at"].max() < END


def test_purchases_have_positive_amounts_and_other_events_none(world):
    events = world["events"]
    purchase = events["event_type"] == "purchase"
    assert (events.loc[purchase, "amount"] > 0).all()
    assert events.loc[~purchase, "amount"].isna().all()
    assert events.loc[~purchase, "offer_id"].isna().all()


def test_send_hours_are_spread_over_the_day_in_local_time(world):
    exposures = world["exposures"].merge(world["customers"][["customer_id", "timezone"]])
    hours = _local_hour(exposures, "sent_at")
    # 06:00-22:59 local; a DST switch can shift a send by an hour.
    assert hours.between(5, 23).all() and hours.between(6, 22).mean() > 0.99
    assert hours.value_counts(normalize=True).max() < 0.1


def test_propensities_are_the_logging_policy_probabilities(world):
    exposures = world["exposures"].merge(world["customers"][["customer_id", "signup_at", "loyalty_member"]])
    assert ((exposures["propensity"] > 0) & (exposures["propensity"] <= 1)).all()
    day_start = START + (exposures["sent_at"] - START).dt.floor("D")
    is_new = (day_start - exposures["signup_at"]) < pd.Timedelta(days=_simworld.NEW_CUSTOMER_DAYS)
    channel = exposures["channel"].map({c: i for i, c in enumerate(CHANNELS)})
    probs = _simworld.policy_probs(exposures["loyalty_member"], is_new, channel)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    arm = exposures["offer_id"].map({o: i for i, o in enumerate(_simworld.OFFER_IDS, start=1)}).fillna(0)
    np.testing.assert_allclose(exposures["propensity"], probs[np.arange(len(arm)), arm.astype(int)])
    # Not uniform, and the control arm is used.
    assert exposures["propensity"].std() > 0.02
    assert exposures["offer_id"].isna().mean() > 0.1
    # GUIDE may not go out by SMS (offers.channels), so the policy never sends it there.
    assert not ((exposures["channel"] == "sms") & (exposures["offer_id"] == "GUIDE")).any()


def test_conversions_are_purchase_events_with_the_offer(world):
    exposures, events = world["exposures"], world["events"]
    assert (exposures.loc[~exposures["converted"], "revenue"] == 0).all()
    converted = exposures[exposures["converted"]]
    assert len(converted) > 100 and (converted["revenue"] > 0).all()
    purchases = events[events["event_type"] == "purchase"]
    keys = ["customer_id", "channel", "amount"]
    matched = converted.rename(columns={"revenue": "amount"}).merge(
        purchases, on=keys, suffixes=("_x", "_e"), validate="one_to_one")
    assert len(matched) == len(converted)
    assert matched["offer_id_x"].fillna("").eq(matched["offer_id_e"].fillna("")).all()
    assert ((matched["event_at"] >= matched["sent_at"])
            & (matched["event_at"] - matched["sent_at"] < pd.Timedelta(days=1))).all()


def test_opens_and_clicks_are_mirrored_as_events(world):
    exposures, events = world["exposures"], world["events"]
    counts = events["event_type"].value_counts()
    opened = exposures["opened_at"].notna()
    assert counts["email_open"] == (opened & (exposures["channel"] == "email")).sum()
    assert counts["push_open"] == (opened & (exposures["channel"] == "push")).sum()
    assert counts["email_click"] == (exposures["clicked"] & (exposures["channel"] == "email")).sum()
    assert counts["sms_click"] == (exposures["clicked"] & (exposures["channel"] == "sms")).sum()
    assert not (exposures["clicked"] & ~opened).any()
    assert (exposures.loc[opened, "opened_at"] >= exposures.loc[opened, "sent_at"]).all()


def test_no_exposure_on_a_channel_after_unsubscribing_from_it(world):
    unsubs = world["events"][world["events"]["event_type"] == "unsubscribe"]
    assert len(unsubs) > 5 and unsubs["channel"].isin(["email", "sms", "push"]).all()
    first = unsubs.groupby(["customer_id", "channel"])["event_at"].min().rename("unsub_at").reset_index()
    later = world["exposures"].merge(first, on=["customer_id", "channel"])
    assert not (later["sent_at"] > later["unsub_at"]).any()
    customers = world["customers"].set_index("customer_id")
    for channel in ("email", "sms", "push"):
        who = first.loc[first["channel"] == channel, "customer_id"]
        assert not customers.loc[who, f"{channel}_opt_in"].any()


def test_ground_truth_ranges(world):
    truth = world["ground_truth"]
    assert truth["customer_id"].tolist() == world["customers"]["customer_id"].tolist()
    assert (truth["truth_at"] == START + pd.Timedelta(days=DAYS - HORIZON - 1)).all()
    probs = ["true_churn_prob", "open_base_email", "p_convert_none"] + [
        c for c in truth.columns if c.startswith(("open_base_", "p_convert_"))]
    for column in probs:
        assert truth[column].dropna().between(0, 1).all(), column
    for channel in CHANNELS:
        for kind in ("pref_hour", "best_hour"):
            assert truth[f"{kind}_{channel}"].between(0, 23).all()
        curve = np.stack([true_open_prob(truth, channel, h) for h in range(24)], axis=1)
        alive_rows = truth["open_base_" + channel] > 0
        assert (curve.argmax(axis=1)[alive_rows] == truth.loc[alive_rows, f"best_hour_{channel}"]).all()
    assert set(truth["response_type"]) == set(_simworld.RESPONSE_TYPES)
    assert (truth["true_aov"] > 0).all()
    # Undefined exactly for customers who sign up at or after truth_at.
    signup = world["customers"]["signup_at"]
    assert truth["true_churn_prob"].isna().equals(signup >= truth["truth_at"])
    assert (truth.loc[~truth["alive_at_truth"] & truth["true_churn_prob"].notna(), "true_churn_prob"] == 1).all()
    lost = truth["response_type"] == "lost_cause"
    assert (truth.loc[lost, [f"p_convert_{o}" for o in ["none", *_simworld.OFFER_IDS]]] == 0).all().all()


def test_true_churn_prob_matches_who_really_made_no_purchase(world):
    truth = world["ground_truth"].dropna(subset=["true_churn_prob"])
    t = truth["truth_at"].iloc[0]
    purchases = world["events"][world["events"]["event_type"] == "purchase"]
    in_horizon = purchases[(purchases["event_at"] > t) & (purchases["event_at"] <= t + pd.Timedelta(days=HORIZON))]
    churned = ~truth["customer_id"].isin(in_horizon["customer_id"])
    p = truth["true_churn_prob"]
    assert p[churned].mean() > p[~churned].mean() + 0.2
    # Calibrated: the ground truth is the exact probability, so the mean matches the
    # observed churn rate up to sampling noise.
    se = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(p.mean() - churned.mean()) < 4 * se


def test_open_rate_is_highest_at_the_true_best_hour(world):
    exposures = world["exposures"].merge(world["customers"][["customer_id", "timezone"]])
    exposures = exposures[exposures["sent_at"] < END - pd.Timedelta(days=1)]  # opens not censored
    truth = world["ground_truth"].set_index("customer_id")
    hour = _local_hour(exposures, "sent_at")
    best = pd.Series(0, index=exposures.index)
    for channel in CHANNELS:
        rows = exposures["channel"] == channel
        best[rows] = exposures.loc[rows, "customer_id"].map(truth[f"best_hour_{channel}"])
    distance = (hour - best).abs() % 24
    distance = np.minimum(distance, 24 - distance)
    opened = (exposures["opened_at"] - exposures["sent_at"]) < pd.Timedelta(hours=24)
    at_best, far = opened[distance == 0], opened[distance >= 4]
    assert len(at_best) > 300
    assert at_best.mean() > 1.5 * far.mean()


def test_persuadables_convert_more_with_an_offer_and_lost_causes_never(world):
    exposures = world["exposures"].merge(world["ground_truth"][["customer_id", "response_type"]])
    persuadable = exposures[exposures["response_type"] == "persuadable"]
    with_offer = persuadable.loc[persuadable["offer_id"].notna(), "converted"].mean()
    without = persuadable.loc[persuadable["offer_id"].isna(), "converted"].mean()
    assert with_offer > 3 * without
    assert not exposures.loc[exposures["response_type"] == "lost_cause", "converted"].any()
    sure = exposures[exposures["response_type"] == "sure_thing"]
    assert sure["converted"].mean() > with_offer / 4  # sure things buy with or without an offer


def test_truth_helpers(world):
    truth = world["ground_truth"]
    hours = np.arange(len(truth)) % 24
    np.testing.assert_allclose(
        true_open_prob(truth, "email", hours),
        [true_open_prob(truth.iloc[[i]], "email", h)[0] for i, h in enumerate(hours[:50])] + list(
            true_open_prob(truth.iloc[50:], "email", hours[50:])))
    assert (true_open_prob(truth, "push", truth["pref_hour_push"].to_numpy())
            == truth["open_base_push"]).all()
    np.testing.assert_array_equal(true_conversion_prob(truth, None), truth["p_convert_none"])
    np.testing.assert_array_equal(true_conversion_prob(truth, "OFF20"), truth["p_convert_OFF20"])
    with pytest.raises(ValueError, match="offer_id 'NOPE'"):
        true_conversion_prob(truth, "NOPE")
    with pytest.raises(ValueError, match="channel 'fax'"):
        true_open_prob(truth, "fax", 9)


def test_truth_helpers_reproduce_how_messages_on_the_truth_day_were_sampled():
    truth_day = DAYS - HORIZON
    cal = _simworld.build_calendar(START, DAYS)
    world = sim._World(cal, DAYS, truth_day, HORIZON)
    rng = np.random.default_rng(5)
    tr = _simworld.draw_traits(rng, 2000, DAYS, cal.start_us)
    log = _simworld.run_state_process(rng, tr, DAYS, truth_day)
    truth = sim._truth_table(tr, log, world, sim._id_bytes(b"C", np.arange(1, 2001), 7)).to_pandas()
    msg = log.messages
    on_truth_day = msg["day"] == truth_day
    cust, channel = msg["customer"][on_truth_day], msg["channel"][on_truth_day]
    assert len(cust) > 50
    hour = rng.integers(0, 24, len(cust))
    p_open, p_convert = sim._message_probabilities(tr, cal, cust, msg["day"][on_truth_day], channel,
                                                   msg["alive"][on_truth_day], hour)
    rows = truth.iloc[cust].reset_index(drop=True)
    for c, name in enumerate(CHANNELS):
        sel = channel == c
        np.testing.assert_allclose(p_open[sel], true_open_prob(rows[sel], name, hour[sel]), rtol=1e-12)
    for arm, offer_id in enumerate([None, *_simworld.OFFER_IDS]):
        np.testing.assert_allclose(p_convert[:, arm], true_conversion_prob(rows, offer_id), rtol=1e-12)


def test_utc_offsets_are_exact_across_daylight_saving_switches():
    cal = _simworld.build_calendar(START, 365)
    rng = np.random.default_rng(0)
    t_us = cal.start_us + rng.integers(0, 365 * _simworld.DAY_US, 4000)
    tz = rng.integers(0, len(_simworld.TIMEZONES), len(t_us))
    # Include the instants right around each 2025 switch (US, EU, Sydney).
    switches = ["2025-03-09T07:00", "2025-03-30T01:00", "2025-04-05T16:00", "2025-10-04T16:00",
                "2025-10-26T01:00", "2025-11-02T06:00"]
    edges = [pd.Timestamp(x, tz="UTC").value // 1000 + delta for x in switches for delta in (-1, 0, 1)]
    t_us = np.r_[t_us, np.repeat(edges, len(_simworld.TIMEZONES))]
    tz = np.r_[tz, np.tile(np.arange(len(_simworld.TIMEZONES)), len(edges))]
    expected = [datetime.fromtimestamp(t / 1e6, ZoneInfo(_simworld.TIMEZONES[k])).hour
                for t, k in zip(t_us.tolist(), tz.tolist(), strict=True)]
    np.testing.assert_array_equal(_simworld.local_hour(cal, tz, t_us), expected)


def test_csv_output_has_the_same_rows_with_offset_timestamps(tmp_path):
    pq_run = simulate(200, 30, 5, tmp_path / "pq", progress=False)
    csv_run = simulate(200, 30, 5, tmp_path / "csv", fmt="csv", progress=False)
    assert (csv_run.n_events, csv_run.n_exposures) == (pq_run.n_events, pq_run.n_exposures)
    for name in ("customers", "events", "offers", "exposures"):
        frame = pd.read_csv(csv_run.files[name])
        assert len(frame) == len(pd.read_parquet(pq_run.files[name])), name
        assert csv_run.files[name].suffix == ".csv"
    events = pd.read_csv(csv_run.files["events"])
    assert events["event_at"].str.endswith("+00:00").all()
    parsed = pd.to_datetime(events["event_at"], format="ISO8601")
    assert parsed.equals(pd.read_parquet(pq_run.files["events"])["event_at"].astype(parsed.dtype))
    assert csv_run.files["ground_truth"].suffix == ".parquet" and csv_run.files["ground_truth"].exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_customers": 0}, "n_customers must be a whole number >= 1"),
    ({"days": 0}, "days must be a whole number >= 1"),
    ({"days": 2.5}, "days must be a whole number"),
    ({"fmt": "xlsx"}, "fmt must be 'parquet' or 'csv'"),
    ({"start": "the first of may"}, "is not an ISO-8601 timestamp"),
    ({"chunk_size": 0}, "chunk_size must be"),
    ({"horizon_days": -1}, "horizon_days must be"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    args = {"n_customers": 10, "days": 10, "seed": 1, "out_dir": tmp_path / "out"} | kwargs
    with pytest.raises(ValueError, match=message):
        simulate(**args, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failure_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    real = sim._simulate_chunk
    calls = []

    def fail_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "_simulate_chunk", fail_on_second_chunk)
    with pytest.raises(RuntimeError, match="boom"):
        simulate(100, 10, 1, tmp_path, chunk_size=50, progress=False)
    assert os.listdir(tmp_path) == []


def test_start_without_offset_is_utc_and_other_offsets_convert(tmp_path):
    a = simulate(50, 5, 2, tmp_path / "a", start="2025-03-01T00:00:00", progress=False)
    b = simulate(50, 5, 2, tmp_path / "b", start="2025-03-01T01:00:00+01:00", progress=False)
    ta, tb = (pq.read_table(r.files["events"]) for r in (a, b))
    assert ta.equals(tb)
    assert pd.read_parquet(a.files["events"])["event_at"].min() >= pd.Timestamp("2025-03-01", tz="UTC")
