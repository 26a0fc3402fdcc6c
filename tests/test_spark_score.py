"""`engage score --engine spark` in Spark local mode: the same rows as the local engine, row for row."""

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
    return batch.plan(home, batch.BatchOptions(out=out, run_id="spark-run", workers=1, **kw), directory_ok=True)


def test_spark_equals_local(serving_env, spark, tmp_path: Path) -> None:
    from serving.spark_batch import run_spark

    local, _ = batch.run_local(_plan(serving_env.home, tmp_path / "local.parquet"))
    summary = run_spark(_plan(serving_env.home, tmp_path / "spark.parquet"), spark=spark)
    got = pd.read_parquet(tmp_path / "spark.parquet")
    want = local.to_pandas()
    assert summary.listed == len(want) == summary.scored
    assert (tmp_path / "spark.png").stat().st_size > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_spark_filters_top_and_folder(serving_env, spark, tmp_path: Path) -> None:
    from serving.spark_batch import run_spark

    kw = {"min_churn": 0.3, "segments": ("dormant", "at_risk", "potential"), "top": 40}
    local, _ = batch.run_local(_plan(serving_env.home, tmp_path / "local.parquet", **kw))
    run_spark(_plan(serving_env.home, tmp_path / "spark_dir", **kw), spark=spark)
    got = pd.read_parquet(tmp_path / "spark_dir").sort_values("rank").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, local.to_pandas(), check_exact=True)
    run_spark(_plan(serving_env.home, tmp_path / "spark.csv", **kw), spark=spark)
    csv = pd.read_csv(tmp_path / "spark.csv")
    assert csv["customer_id"].tolist() == local.column("customer_id").to_pylist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
