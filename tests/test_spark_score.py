"""`engage score --engine spark` in Spark local mode: the same rows as the local engine, row for row, and the
same records in the decision log."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from serving import batch

pytest.importorskip("pyspark")


@pytest.fixture(scope="module")
def spark():
    from serving.spark_batch import spark_session

    session = spark_session("local[2]", shuffle_partitions=2)
    yield session
    session.stop()


def _plan(home: Path, out: Path, **kw) -> batch.BatchPlan:
    """A plan whose decisions go to a database of its own (``<out>.db``), to compare the engines' logs."""
    from serving.servingdb import create_serving_engine

    plan = batch.plan(home, batch.BatchOptions(out=out, run_id="spark-run", workers=1, **kw), directory_ok=True)
    plan.engine = create_serving_engine(f"sqlite:///{out.with_name(out.name + '.db')}")
    return plan


def _log(plan: batch.BatchPlan) -> pd.DataFrame:
    import sqlalchemy as sa

    from serving.servingdb import decisions

    with plan.engine.connect() as con:
        df = pd.read_sql(sa.select(decisions).order_by(decisions.c.decision_id), con)
    return df.assign(payload=df["payload"].map(repr))


def test_spark_equals_local(serving_env, spark, tmp_path: Path) -> None:
    from serving.spark_batch import run_spark

    local_plan, spark_plan = _plan(serving_env.home, tmp_path / "local.parquet"), _plan(serving_env.home,
                                                                                        tmp_path / "spark.parquet")
    local, _ = batch.run_local(local_plan)
    summary = run_spark(spark_plan, spark=spark)
    got = pd.read_parquet(tmp_path / "spark.parquet")
    want = local.to_pandas()
    assert summary.listed == len(want) == summary.scored == summary.logged
    assert summary.holdout == int(want["holdout"].sum()) > 0
    assert (tmp_path / "spark.png").stat().st_size > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    pd.testing.assert_frame_equal(_log(spark_plan), _log(local_plan), check_exact=True)


def test_spark_filters_top_and_folder(serving_env, spark, tmp_path: Path) -> None:
    from serving.spark_batch import run_spark

    kw = {"min_churn": 0.3, "segments": ("dormant", "at_risk", "potential"), "top": 40}
    local_plan = _plan(serving_env.home, tmp_path / "local.parquet", **kw)
    local, _ = batch.run_local(local_plan)
    run_spark(_plan(serving_env.home, tmp_path / "spark_dir", **kw), spark=spark)
    got = pd.read_parquet(tmp_path / "spark_dir").sort_values("rank").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, local.to_pandas(), check_exact=True)
    csv_plan = _plan(serving_env.home, tmp_path / "spark.csv", **kw)
    summary = run_spark(csv_plan, spark=spark)
    csv = pd.read_csv(tmp_path / "spark.csv")
    assert csv["customer_id"].tolist() == local.column("customer_id").to_pylist()
    # The decisions logged from the CSV read back are the local engine's (floats as CSV keeps them).
    assert summary.logged == 40
    a, b = _log(csv_plan), _log(local_plan)
    pd.testing.assert_frame_equal(a.drop(columns=["payload", "propensity"]), b.drop(columns=["payload", "propensity"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
