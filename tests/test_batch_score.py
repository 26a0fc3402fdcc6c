"""`engage score` on the local engine: ranking, filters, atomic write, churn-only models, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
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
def full(served, tmp_path_factory) -> pd.DataFrame:
    """The full scoring table of the test world (run id fixed: exploration is reproducible)."""
    import shutil

    env = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("batch")
    db = root / "mlruns.sqlite"
    shutil.copy(served.registry_db, db)
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    env.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(served.artifacts))
    try:
        result = _score(served.home, "--out", str(root / "all.parquet"), "--run-id", "run-1")
        assert result.exit_code == 0, result.output
        return pd.read_parquet(root / "all.parquet")
    finally:
        env.undo()


def _snapshot_rows(home: Path, df: pd.DataFrame) -> int:
    return pq.ParquetFile(batch.snapshot_file(home, df["as_of"].iloc[0].to_pydatetime())).metadata.num_rows


def test_full_table_is_everyone_ranked(full: pd.DataFrame, served) -> None:
    assert list(full.columns) == batch.OUTPUT_SCHEMA.names
    assert len(full) == _snapshot_rows(served.home, full) and full["customer_id"].is_unique
    assert full["rank"].tolist() == list(range(1, len(full) + 1))
    acting = full["action"] != "none"
    # Acting customers first, then by expected incremental profit, then value at risk.
    assert acting.iloc[: acting.sum()].all() and not acting.iloc[acting.sum():].any()
    profit = full.loc[acting, "expected_incremental_profit"].to_numpy()
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


def test_rows_are_the_api_decision(full: pd.DataFrame, serving_env) -> None:
    """A row is Scorer.score + decide at the as-of time, as the API computes it."""
    from features.store import open_store
    from serving.decide import decide
    from serving.models import champion_versions, load_models
    from serving.policy import load_policy
    from serving.service import registry_client

    ms = load_models(registry_client(), open_store(serving_env.home), champion_versions(registry_client()))
    as_of = full["as_of"].iloc[0].to_pydatetime()
    ids = full["customer_id"].iloc[[0, 5, len(full) // 2, len(full) - 1]].tolist()
    table = pq.read_table(batch.snapshot_file(serving_env.home, as_of))
    table = table.filter(pa_in(table, ids))
    order = table.column("customer_id").to_pylist()
    scores = ms.scorer.score(order, batch.chunk_values(table), [as_of] * len(order))
    policy = load_policy()
    for sc in scores:
        d = decide(sc, policy, as_of, request_id="run-1")
        row = full.set_index("customer_id").loc[sc.customer_id]
        assert row["action"] == d.action and row["risk_tier"] == d.risk_tier
        assert (row["best_offer"] if isinstance(row["best_offer"], str) else None) == d.chosen_offer
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
    assert len(sms) > 0 and (sms["channel"] == "sms").all() and (sms["action"] != "none").all()


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
