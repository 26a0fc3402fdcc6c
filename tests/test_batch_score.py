"""`engage score` on the local engine: ranking, control group, exposure ids, decision log, filters, atomic write,
churn-only models, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import typer
from typer.testing import CliRunner

from serving import batch
from serving.score_cli import score_command

runner = CliRunner()
_app = typer.Typer()
_app.command()(score_command)


def _score(home: Path, *args: str):
    return runner.invoke(_app, ["--home", str(home), "--workers", "1", *args])


@pytest.fixture(scope="module")
def full_run(served, tmp_path_factory):
    """The full scoring table of the test world (run id fixed: exploration is reproducible), and the decision
    log it was appended to."""
    import shutil
    from types import SimpleNamespace

    env = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("batch")
    db = root / "mlruns.sqlite"
    shutil.copy(served.registry_db, db)
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    env.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(served.artifacts))
    serving_db = f"sqlite:///{root / 'serving.db'}"
    env.setenv("ENGAGE_SERVING_DB_URL", serving_db)
    try:
        result = _score(served.home, "--out", str(root / "all.parquet"), "--run-id", "run-1")
        assert result.exit_code == 0, result.output
        return SimpleNamespace(df=pd.read_parquet(root / "all.parquet"), serving_db=serving_db, output=result.output)
    finally:
        env.undo()


@pytest.fixture(scope="module")
def full(full_run) -> pd.DataFrame:
    return full_run.df


def _decisions(url: str) -> pd.DataFrame:

    from serving.servingdb import create_serving_engine, decisions

    with create_serving_engine(url).connect() as con:
        return pd.read_sql(sa.select(decisions), con)


def _snapshot_rows(home: Path, df: pd.DataFrame) -> int:
    return pq.ParquetFile(batch.snapshot_file(home, df["as_of"].iloc[0].to_pydatetime())).metadata.num_rows


def test_full_table_is_everyone_ranked(full: pd.DataFrame, served) -> None:
    assert list(full.columns) == batch.OUTPUT_SCHEMA.names
    assert len(full) == _snapshot_rows(served.home, full) and full["customer_id"].is_unique
    assert full["rank"].tolist() == list(range(1, len(full) + 1))
    acting = full["action"] != "none"
    # Acting customers (and the control group's would-be acting ones) first, then by expected incremental profit
    # (the control group's intended), then value at risk.
    ranked = acting | (full["holdout"] & full["intended_action"].fillna("none").ne("none"))
    assert ranked.iloc[: ranked.sum()].all() and not ranked.iloc[ranked.sum():].any()
    profit = full.loc[ranked, "expected_incremental_profit"].to_numpy()
    assert (np.diff(profit) <= 1e-12).all()
    assert full.loc[~acting, "action_reason"].notna().all() and full.loc[acting, "action_reason"].isna().all()
    # Offer columns: a chosen offer has positive uplift and profit; no offer -> profit 0 when acting.
    offered = full["best_offer"].notna()
    assert (full.loc[offered, "offer_uplift"] > 0).all()
    assert (full.loc[offered, "expected_incremental_profit"] > 0).all()
    assert (full.loc[acting & ~offered, "expected_incremental_profit"] == 0).all()
    assert np.allclose(full["value_at_risk"], full["churn_probability"] * full["expected_value"])
    assert set(full["risk_tier"]) <= {"low", "medium", "high"}
    assert full.loc[acting, "send_at"].notna().all() and full.loc[acting, "channel"].notna().all()
    assert full["reason_codes"].notna().all()
    assert full[["churn_model_version", "nbo_model_version", "send_time_model_version"]].notna().all().all()


def test_control_group_is_listed_and_never_sent(full: pd.DataFrame) -> None:
    """The policy's holdout (5% by default) is in the list with action none and what it would have got."""
    from serving.policy import load_policy

    policy = load_policy()
    held = full["holdout"]
    assert held.tolist() == [policy.holdout.contains(c) for c in full["customer_id"]]
    assert 0.02 < held.mean() < 0.09
    h = full[held]
    assert (h["action"] == "none").all() and (h["action_reason"] == "holdout").all()
    # Nothing a campaign tool could send: no exposure id, channel or send time.
    assert h[["exposure_id", "channel", "send_at", "send_at_local", "expected_open_rate"]].isna().all().all()
    assert h["intended_action"].isin(["winback", "retain", "upsell", "nurture", "none"]).all()
    assert (h["intended_action"] != "none").mean() > 0.5 and full.loc[~held, "intended_action"].isna().all()
    # The offer columns say what they would have got (an offer only with an intended action).
    assert h.loc[h["best_offer"].notna(), "intended_action"].isin(["winback", "retain", "upsell"]).all()
    assert (h.loc[h["best_offer"].notna(), "expected_incremental_profit"] > 0).all()


def _or_none(x):
    return None if x is None or pd.isna(x) else x


def test_exposure_ids_are_deterministic_and_logged(full_run, serving_env, tmp_path: Path) -> None:
    full = full_run.df
    acting = full["action"] != "none"
    assert full.loc[acting, "exposure_id"].notna().all() and full.loc[~acting, "exposure_id"].isna().all()
    assert full.loc[acting, "exposure_id"].is_unique
    versions = {"churn": full["churn_model_version"].iloc[0], "next_best_offer": full["nbo_model_version"].iloc[0],
                "send_time": full["send_time_model_version"].iloc[0]}
    key = batch._id_key(full["as_of"].iloc[0].to_pydatetime(), versions, "run-1")
    row = full[acting].iloc[0]
    assert row["exposure_id"] == batch.exposure_id(key, row["customer_id"])
    # Every listed decision is in the decision log, as the list says, with the control group's intended offer.
    log = _decisions(full_run.serving_db).set_index("customer_id").loc[full["customer_id"]]
    assert len(log) == len(full) and (log["source"] == "batch").all() and (log["request_id"] == "run-1").all()
    assert log["exposure_id"].fillna("-").tolist() == full["exposure_id"].fillna("-").tolist()
    assert log["holdout"].astype(bool).tolist() == full["holdout"].tolist()
    assert log["action"].tolist() == full["action"].tolist()
    assert (pd.to_datetime(log["decided_at"], utc=True) == full["as_of"].iloc[0]).all()
    sent = pd.to_datetime(log["send_at"], utc=True).tolist()
    assert sent == pd.to_datetime(full["send_at"], utc=True).tolist() and full["send_at"].notna().sum() > 10
    held, payload = full["holdout"].to_numpy(), log["payload"].to_numpy()
    assert [p["intended_action"] for p in payload[held]] == full.loc[held, "intended_action"].tolist()
    assert [p["intended_offer"] for p in payload[held]] == full.loc[held, "best_offer"].tolist()
    assert log["chosen_offer"].to_numpy()[held].tolist() == [None] * held.sum()
    # The payload (JSON written in bulk) says what the list says, row by row; a missing number is null.
    for (_, r), p in zip(full.iterrows(), payload, strict=True):
        assert p["rank"] == r["rank"] and p["risk_tier"] == r["risk_tier"] and p["segment"] == r["segment"]
        assert p["churn_probability"] == r["churn_probability"]
        assert p["expected_value_at_risk"] == _or_none(r["value_at_risk"])
        assert p["expected_open_rate"] == _or_none(r["expected_open_rate"])
        assert p["reasons"] == (r["reason_codes"].split(";") if r["reason_codes"] else [])
        assert p["send_at_local"] == r["send_at_local"] and p["intended_action"] == r["intended_action"]
        offers = [] if r["best_offer"] is None else [{
            "offer_id": r["best_offer"], "uplift": _or_none(r["offer_uplift"]),
            "expected_incremental_profit": _or_none(r["expected_incremental_profit"]), "chosen": not r["holdout"]}]
        assert p["offers"] == offers and p["channels"] == []
        reason = r["action_reason"]
        assert p["suppressions"] == ([] if reason is None else [{"rule": reason, "target": "action", "detail": reason}])
    assert "decision log: " in full_run.output
    # A re-run of the same job (default run id: derived, not random) gives the same ids and logs nothing twice.
    out_a, out_b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (out_a, out_b):
        result = _score(serving_env.home, "--out", str(out), "--top", "200")
        assert result.exit_code == 0, result.output
    a, b = pd.read_parquet(out_a), pd.read_parquet(out_b)
    assert a["run_id"].iloc[0].startswith("batch-") and a.equals(b)
    assert len(_decisions(serving_env.serving_db)) == 200
    result = _score(serving_env.home, "--out", str(out_a), "--top", "300", "--overwrite")
    assert result.exit_code == 0 and len(_decisions(serving_env.serving_db)) == 300


def test_top_keeps_the_control_groups_share(serving_env, tmp_path: Path) -> None:
    """A short list keeps a control group ranked by intended profit: same share, same kind of customers."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("holdout:\n  share: 0.3\n")
    out = tmp_path / "top.parquet"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ENGAGE_POLICY", str(policy))
        result = _score(serving_env.home, "--out", str(out), "--top", "400", "--run-id", "r")
    assert result.exit_code == 0, result.output
    top = pd.read_parquet(out)
    held = top["holdout"]
    assert 0.22 < held.mean() < 0.38 and "control group (holdout: action none)" in result.output
    assert (top.loc[held, "intended_action"] != "none").all() and (top.loc[~held, "action"] != "none").all()
    treated, control = top.loc[~held, "expected_incremental_profit"], top.loc[held, "expected_incremental_profit"]
    assert abs(treated.mean() - control.mean()) < 0.25 * treated.mean()
    assert not pd.read_parquet(out, columns=["exposure_id"])["exposure_id"][held.to_numpy()].notna().any()


def test_rows_are_the_api_decision(full: pd.DataFrame, serving_env) -> None:
    """A row is Scorer.score + decide at the as-of time, as the API computes it."""
    from features.store import open_store
    from serving.decide import decide
    from serving.models import champion_versions, load_models
    from serving.policy import load_policy
    from serving.service import registry_client

    ms = load_models(registry_client(), open_store(serving_env.home), champion_versions(registry_client()))
    as_of = full["as_of"].iloc[0].to_pydatetime()
    held = full.index[full["holdout"]]
    ids = full["customer_id"].iloc[[0, 5, len(full) // 2, len(full) - 1, held[0], held[-1]]].tolist()
    table = pq.read_table(batch.snapshot_file(serving_env.home, as_of))
    table = table.filter(pa_in(table, ids))
    order = table.column("customer_id").to_pylist()
    scores = ms.scorer.score(order, batch.chunk_values(table), [as_of] * len(order))
    policy = load_policy()
    open_policy = policy.model_copy(update={"holdout": policy.holdout.model_copy(update={"share": 0.0})})
    for sc in scores:
        d = decide(sc, policy, as_of, request_id="run-1")
        row = full.set_index("customer_id").loc[sc.customer_id]
        assert row["action"] == d.action and row["risk_tier"] == d.risk_tier and row["holdout"] == d.holdout
        # The control group's offer columns: what the policy would have chosen.
        offered = decide(sc, open_policy, as_of, request_id="run-1").chosen_offer if d.holdout else d.chosen_offer
        assert (row["best_offer"] if isinstance(row["best_offer"], str) else None) == offered
        assert math.isclose(row["churn_probability"], d.churn_probability, rel_tol=1e-12)
        assert row["reason_codes"] == ";".join(d.reasons)
        if d.send_at is not None:
            assert row["send_at"].to_pydatetime() == d.send_at and row["channel"] == d.channel


def pa_in(table, ids):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(table.column("customer_id"), value_set=pa.array(ids))


def test_offline_read_equals_feast_historical_features(full: pd.DataFrame, served) -> None:
    """The snapshot the engine reads in bulk is what Feast's point-in-time join returns at the as-of time."""
    from features.store import historical_features, open_store

    as_of = full["as_of"].iloc[0]
    ids = full["customer_id"].iloc[:4].tolist()
    entity = pd.DataFrame({"customer_id": ids, "event_timestamp": [as_of] * len(ids)})
    feast = historical_features(open_store(served.home), "churn", entity).set_index("customer_id").loc[ids]
    table = pq.read_table(batch.snapshot_file(served.home, as_of.to_pydatetime()))
    mine = table.filter(pa_in(table, ids)).to_pandas().set_index("customer_id").loc[ids]
    cols = [c for c in feast.columns if c in mine.columns and c != "event_timestamp"]
    assert len(cols) > 20
    pd.testing.assert_frame_equal(mine[cols], feast[cols], check_dtype=False)


def test_filters_and_top(full: pd.DataFrame, serving_env, tmp_path: Path) -> None:
    out = tmp_path / "list.parquet"
    result = _score(serving_env.home, "--out", str(out), "--run-id", "run-1", "--min-churn", "0.3",
                    "--segment", "dormant", "--segment", "at_risk", "--top", "25")
    assert result.exit_code == 0, result.output
    got = pd.read_parquet(out)
    want = full[(full["churn_probability"] >= 0.3) & full["segment"].isin(["dormant", "at_risk"])].head(25)
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    assert got["rank"].tolist() == list(range(1, len(got) + 1))
    assert (tmp_path / "list.png").stat().st_size > 0
    assert "customers scored" in result.output and "value at risk" in result.output

    out = tmp_path / "sms.csv"
    result = _score(serving_env.home, "--out", str(out), "--run-id", "run-1", "--channel", "sms")
    assert result.exit_code == 0, result.output
    sms = pd.read_csv(out)
    treated, held = sms[~sms["holdout"]], sms[sms["holdout"]]
    assert len(treated) > 0 and (treated["channel"] == "sms").all() and (treated["action"] != "none").all()
    # The control group's members who would have got an sms are listed too (nothing to send them).
    assert len(held) > 0 and held["channel"].isna().all() and (held["intended_action"] != "none").all()


def test_churn_only_champion(serving_env, tmp_path: Path) -> None:
    from serving.service import registry_client

    client = registry_client()
    for name in ("next_best_offer", "send_time"):
        client.delete_registered_model_alias(name, "champion")
    out = tmp_path / "churn.parquet"
    result = _score(serving_env.home, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "no next-best-offer champion" in result.output
    df = pd.read_parquet(out)
    for col in ("best_offer", "offer_uplift", "expected_incremental_profit", "send_at", "send_at_local",
                "nbo_model_version", "send_time_model_version"):
        assert df[col].isna().all(), col
    assert df["note"].str.contains("no next-best-offer champion").all()
    acting = df[df["action"] != "none"]
    assert (np.diff(acting["value_at_risk"].to_numpy()) <= 1e-12).all()


def test_atomic_write_leaves_nothing_on_failure(serving_env, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "list.parquet"

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(batch, "draw_chart", broken)
        result = _score(serving_env.home, "--out", str(out))
    assert result.exit_code != 0 and "No space left" in result.output
    assert not out.exists() and not (tmp_path / "list.png").exists()
    assert _decisions(serving_env.serving_db).empty  # decisions are logged only once the list is in place
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out.write_text("old list")
    result = _score(serving_env.home, "--out", str(out), "--overwrite", "--top", "3")
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(("args", "message"), [
    (["--as-of", "2001-01-01T00:00:00Z"], "outside the data"),
    (["--as-of", "2099-01-01T00:00:00Z"], "outside the data"),
    (["--segment", "vip"], "unknown segment"),
    (["--channel", "fax"], "unknown channel"),
    (["--min-churn", "1.5"], "outside [0, 1]"),
    (["--engine", "hadoop"], "unknown engine"),
])
def test_bad_input(serving_env, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out" / "list.parquet"
    result = _score(serving_env.home, "--out", str(out), *args)
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
    assert not out.parent.exists()


def test_existing_output_and_unwritable_folder(serving_env, tmp_path: Path) -> None:
    out = tmp_path / "list.parquet"
    out.write_text("keep me")
    result = _score(serving_env.home, "--out", str(out))
    assert result.exit_code != 0 and "--overwrite" in result.output and out.read_text() == "keep me"
    result = _score(serving_env.home, "--out", "/proc/engage-test/list.parquet")
    assert result.exit_code != 0 and "cannot write" in result.output
    result = _score(serving_env.home, "--out", str(tmp_path / "list.json"))
    assert result.exit_code != 0 and ".parquet or .csv" in result.output


def test_decision_log_unreachable(serving_env, tmp_path: Path, monkeypatch) -> None:
    """A decision log that cannot be opened stops the run before scoring; one that fails after the list is
    written says so, and the same command logs the decisions when run again."""
    out = tmp_path / "list.parquet"
    monkeypatch.setenv("ENGAGE_SERVING_DB_URL", "sqlite:////proc/engage-test/serving.db")
    result = _score(serving_env.home, "--out", str(out))
    assert result.exit_code != 0 and "cannot open the decision log" in result.output and not out.exists()
    monkeypatch.setenv("ENGAGE_SERVING_DB_URL", serving_env.serving_db)

    # The database refuses the 31st row of the list: the one transaction leaves none of the 50 logged.
    from serving.servingdb import create_serving_engine

    engine = create_serving_engine(serving_env.serving_db)
    with engine.begin() as con:
        con.exec_driver_sql("CREATE TRIGGER refuse_31st BEFORE INSERT ON decisions "
                            "WHEN (SELECT count(*) FROM decisions) >= 30 BEGIN SELECT RAISE(ABORT, 'disk quota'); END")
    result = _score(serving_env.home, "--out", str(out), "--top", "50")
    text = " ".join(result.output.split())
    assert result.exit_code != 0 and "its 50 decisions did not reach the decision log" in text, result.output
    assert "disk quota" in text and "--overwrite" in text
    assert out.exists() and _decisions(serving_env.serving_db).empty
    with engine.begin() as con:
        con.exec_driver_sql("DROP TRIGGER refuse_31st")
    result = _score(serving_env.home, "--out", str(out), "--top", "50", "--overwrite")
    assert result.exit_code == 0 and len(_decisions(serving_env.serving_db)) == 50
    result = _score(serving_env.home, "--out", str(tmp_path / "quiet.parquet"), "--top", "60", "--no-log")
    assert result.exit_code == 0 and len(_decisions(serving_env.serving_db)) == 50


def test_no_champion(served, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    out = tmp_path / "list.parquet"
    result = _score(served.home, "--out", str(out))
    assert result.exit_code != 0 and "no churn champion" in result.output and not out.exists()


def test_workers_agree(serving_env, tmp_path: Path) -> None:
    """Chunks over two processes give the same list as one process."""
    one = batch.plan(serving_env.home, batch.BatchOptions(out=tmp_path / "a.parquet", workers=1, run_id="r",
                                                          chunk_size=500, chart=False))
    two = batch.plan(serving_env.home, batch.BatchOptions(out=tmp_path / "b.parquet", workers=2, run_id="r",
                                                          chunk_size=500, chart=False))
    a, _ = batch.run_local(one)
    b, _ = batch.run_local(two)
    assert a.equals(b)


def test_batch_ids_are_the_customer_behind_a_run_prefix_or_a_hash_when_too_long() -> None:
    import pyarrow as pa

    from serving import batch_log

    key, other = batch._id_key(pd.Timestamp("2026-01-01", tz="UTC").to_pydatetime(), {"churn": "1"}, "run-1"), "k2"
    e, d = batch_log.exposure_id(key, "C0000042"), batch_log.decision_id(key, "C0000042")
    assert e.endswith("-C0000042") and d.endswith("-C0000042") and e != d  # each kind its own prefix
    assert len(e) == batch_log.RUN_PREFIX_HEX + 1 + len("C0000042")
    assert e == batch_log.exposure_id(key, "C0000042")  # deterministic: a re-run gives the same id
    assert batch_log.exposure_id(other, "C0000042") != e  # another run, another id
    ids = [f"C{i:07d}" for i in (5, 17, 200)]
    assert sorted(batch_log.decision_id(key, c) for c in ids) == [batch_log.decision_id(key, c) for c in ids]
    # A customer id too long for the column with the prefix: a 32-hex hash (no "-", so never a readable id).
    long_id = "x" * 60
    assert len(batch_log.decision_id(key, long_id)) == 32 and "-" not in batch_log.decision_id(key, long_id)
    assert batch_log.exposure_id(key, long_id).endswith(long_id)  # exposure ids have room for 64 characters
    assert len(batch_log.decision_id(key, "y" * 47)) == 64  # the longest readable decision id fits its column
    # The Arrow form gives the same ids, with or without long ones among them.
    for given in (ids, [*ids, long_id]):
        assert batch_log.decision_ids(key, pa.array(given)).to_pylist() == [batch_log.decision_id(key, c)
                                                                             for c in given]
