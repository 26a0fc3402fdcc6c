"""`engage simulate-respond`: responses drawn from the simulator's truth, contract files, feedback, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from engage.cli import app
from features import respond as rs
from features.simulate import DEFAULT_OFFERS, simulate, true_conversion_prob, true_open_prob

runner = CliRunner()
OFFERS = [None, *DEFAULT_OFFERS["offer_id"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small simulated world (its truth is what responses are drawn from)."""
    src = tmp_path_factory.mktemp("respond") / "src"
    simulate(1500, 100, 5, src, progress=False)
    return src


def make_list(truth: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """A batch list by hand: a third in the control group, the rest emailed at their true preferred hour (UTC).

    Columns as `engage score` writes them (only those responses read, plus a rank).
    """
    t = truth.reset_index(drop=True)
    n = len(t)
    held = np.arange(n) % 3 == 0
    day = as_of.normalize() + pd.Timedelta(days=1)
    send_at = day + pd.to_timedelta(t["pref_hour_email"], unit="h")
    return pd.DataFrame({
        "rank": np.arange(1, n + 1), "customer_id": t["customer_id"],
        "exposure_id": [None if h else f"X{i:06d}" for i, h in enumerate(held)],
        "action": np.where(held, "none", "retain"), "holdout": held,
        "best_offer": [OFFERS[i % len(OFFERS)] for i in range(n)],
        "channel": np.where(held, None, "email"), "send_at": send_at.where(~held), "timezone": "UTC",
        "as_of": as_of,
    })


@pytest.fixture(scope="module")
def listing(world: Path, tmp_path_factory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    truth = pd.read_parquet(world / "ground_truth.parquet")
    events = pd.read_parquet(world / "events.parquet", columns=["event_at"])
    as_of = pd.Timestamp(events["event_at"].max()).ceil("s")
    df = make_list(truth, as_of)
    path = tmp_path_factory.mktemp("lists") / "list.parquet"
    df.to_parquet(path, index=False)
    return path, df, truth.set_index("customer_id")


def _responses(listing, **kw) -> rs.Responses:
    path, _, truth = listing
    return rs.simulate_responses(rs.load_list(path), truth, **kw)


def test_outcomes_follow_the_truth(listing) -> None:
    _, df, truth = listing
    r = _responses(listing, days=7, seed=1, effect="real", send_at_recommended=0.8)
    x = r.exposures.set_index("customer_id")
    treated = df[~df["holdout"]].set_index("customer_id")
    assert r.treated == len(treated) and r.holdout == int(df["holdout"].sum())
    assert set(x.index) == set(treated.index) and x["exposure_id"].is_unique
    t = truth.loc[x.index]
    # Conversions: as many as the true probabilities of the offers sent say (within 4 standard deviations).
    p = np.zeros(len(x))
    for offer in OFFERS:
        m = (x["offer_id"].isna() if offer is None else x["offer_id"] == offer).to_numpy()
        p[m] = true_conversion_prob(t[m], offer)
    assert math.isclose(r.expected_message_conversions, p.sum())
    assert abs(x["converted"].sum() - p.sum()) < 4 * math.sqrt((p * (1 - p)).sum())
    # Opens: the true open probability at the local hour each message went out.
    q = true_open_prob(t, "email", x["local_hour"].to_numpy())
    assert abs(x["opened_at"].notna().sum() - q.sum()) < 4 * math.sqrt((q * (1 - q)).sum())
    at_pref = x["local_hour"].to_numpy() == t["pref_hour_email"].to_numpy()
    assert 0.75 < at_pref.mean() < 0.85  # --send-at-recommended 0.8; the others never at the recommended hour
    assert x.loc[~at_pref, "local_hour"].between(8, 20).all()
    assert x.loc[at_pref, "opened_at"].notna().mean() > x.loc[~at_pref, "opened_at"].notna().mean()
    # Organic orders for everybody, at the truth's daily rate.
    organic = r.events[r.events["event_id"].str.startswith("rsp:")]
    rate = truth.loc[df["customer_id"], "organic_purchase_rate"].to_numpy() * 7
    assert abs(len(organic) - rate.sum()) < 4 * math.sqrt(rate.sum()) and len(organic) == r.organic_orders
    assert organic["customer_id"].isin(df.loc[df["holdout"], "customer_id"]).any()
    # Every event inside the window; message purchases carry the offer and the revenue of the feedback.
    assert r.events["event_at"].between(r.as_of, r.end, inclusive="left").all()
    bought = r.events[r.events["event_id"].str.endswith(":purchase")].set_index("customer_id")
    assert len(bought) == x["converted"].sum()
    assert (bought["amount"] == x.loc[bought.index, "revenue"]).all() and (x["revenue"][~x["converted"]] == 0).all()
    assert bought["offer_id"].fillna("-").equals(x.loc[bought.index, "offer_id"].fillna("-").rename("offer_id"))
    assert not r.events["customer_id"][r.events["event_id"].str.startswith("fb:")].isin(
        df.loc[df["holdout"], "customer_id"]).any()


def test_no_effect_means_no_message_conversions(listing) -> None:
    real = _responses(listing, seed=1, effect="real")
    none = _responses(listing, seed=1, effect="none")
    assert not none.exposures["converted"].any() and none.exposures["revenue"].eq(0).all()
    assert not none.events["event_id"].str.endswith(":purchase").any() and none.expected_message_conversions == 0
    assert none.exposures["opened_at"].notna().sum() > 0
    # Opens and everybody's organic orders are the same draws as with a real effect.
    pd.testing.assert_frame_equal(none.events[none.events["event_id"].str.startswith("rsp:")].reset_index(drop=True),
                                  real.events[real.events["event_id"].str.startswith("rsp:")].reset_index(drop=True))
    assert none.exposures["opened_at"].equals(real.exposures["opened_at"])


def test_same_seed_same_draws_per_customer(listing, tmp_path: Path) -> None:
    path, df, truth = listing
    a, b = _responses(listing, seed=3), _responses(listing, seed=3)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert not a.events.equals(_responses(listing, seed=4).events)
    # A customer's outcome does not depend on the other rows of the list.
    half = df.iloc[::2]
    half.to_parquet(tmp_path / "half.parquet", index=False)
    c = rs.simulate_responses(rs.load_list(tmp_path / "half.parquet"), truth, seed=3)
    mine = a.events[a.events["customer_id"].isin(half["customer_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(c.events.reset_index(drop=True), mine)


def test_contract_files_load_and_feedback_is_posted_once(world: Path, listing, tmp_path: Path, monkeypatch) -> None:
    import sqlalchemy as sa

    from features.load import connect_warehouse, ingest
    from serving.decision_log import DecisionLog
    from serving.feedback_import import import_feedback
    from serving.servingdb import create_serving_engine, decisions, feedback

    path, df, _ = listing
    home = tmp_path / "home"
    ingest(world, home)
    engine = create_serving_engine(f"sqlite:///{tmp_path / 'serving.db'}")
    out = tmp_path / "responses"
    with pytest.raises(rs.RespondError, match="not in the decision log"):
        rs.respond(path, world, out=out, seed=2, engine=engine)
    assert not out.exists()
    log = DecisionLog(engine)
    for r in df[~df["holdout"]].itertuples():
        log.append({"decision_id": r.exposure_id, "request_id": "t", "exposure_id": r.exposure_id,
                    "customer_id": r.customer_id, "decided_at": r.as_of, "source": "batch", "action": r.action,
                    "chosen_offer": r.best_offer, "channel": r.channel, "send_at": r.send_at, "propensity": 1.0,
                    "cold_start": False, "degraded": False, "holdout": False})
    log.close()
    result = rs.respond(path, world, out=out, seed=2, engine=engine)
    sent = len(result.responses.exposures)
    assert result.feedback_posted == sent
    with engine.connect() as con:
        stored = pd.read_sql(sa.select(feedback), con)
        assert con.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one() == sent
    assert len(stored) == sent and stored["sent"].all()
    assert stored["converted"].sum() == result.responses.exposures["converted"].sum()
    assert math.isclose(stored["revenue"].sum(), result.responses.exposures["revenue"].sum())
    # The files load without a reject, and add every event once.
    report = ingest(out, home)
    assert all(t.rejected == 0 for t in report.tables)
    assert report.get("events").inserted == len(result.responses.events) and report.get("exposures").inserted == sent
    assert ingest(out, home).get("events").inserted == 0
    # Posting again changes nothing; importing the feedback later adds no event twice (same ids).
    rs.post_feedback(result.responses.exposures, engine)
    with engine.connect() as con:
        assert con.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one() == sent
    later = import_feedback(home, engine, now=(result.responses.end + pd.Timedelta(days=30)).to_pydatetime())
    assert later.events_inserted == 0 and later.exposures_inserted == 0
    con = connect_warehouse(home, read_only=True)
    try:
        n = con.execute("SELECT count(*) FROM events WHERE event_id LIKE 'fb:%:purchase'").fetchone()[0]
    finally:
        con.close()
    assert n == result.responses.exposures["converted"].sum()
    # An existing output folder is kept unless --overwrite.
    with pytest.raises(rs.RespondError, match="already exists"):
        rs.respond(path, world, out=out, seed=2)


def _cli(*args: str):
    return runner.invoke(app, ["simulate-respond", *args])


def test_bad_input(world: Path, listing, tmp_path: Path) -> None:
    path, df, _ = listing
    out = tmp_path / "out"
    base = ["--truth", str(world), "--out", str(out), "--no-feedback"]
    no_ids = tmp_path / "old.parquet"
    df.drop(columns=["exposure_id"]).to_parquet(no_ids, index=False)
    stranger = tmp_path / "stranger.parquet"
    df.assign(customer_id=df["customer_id"].str.replace("C", "Z")).to_parquet(stranger, index=False)
    lost = tmp_path / "lost.parquet"
    df.assign(exposure_id=None).to_parquet(lost, index=False)
    cases = [
        (["--list", str(no_ids), *base], "no exposure_id column"),
        (["--list", str(lost), *base], "have no exposure_id"),
        (["--list", str(stranger), *base], "are not in the ground truth"),
        (["--list", str(tmp_path / "missing.parquet"), *base], "no such file"),
        (["--list", str(path), "--truth", str(tmp_path), "--out", str(out), "--no-feedback"], "ground_truth.parquet"),
        (["--list", str(path), *base, "--effect", "huge"], "use real or none"),
        (["--list", str(path), *base, "--send-at-recommended", "1.5"], "--send-at-recommended 1.5 is outside [0, 1]"),
        (["--list", str(path), *base, "--days", "0"], "--days must be a whole number >= 1"),
        (["--list", str(path), *base, "--colour", "red"], "No such option"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.exit_code != 0, args
        assert message in " ".join(result.output.split()), (args, result.output)
        assert not out.exists()
    result = _cli("--list", str(path), *base)
    assert result.exit_code == 0, result.output
    assert "engage ingest" in result.output and (out / "events.parquet").exists()
