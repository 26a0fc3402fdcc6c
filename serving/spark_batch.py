"""The Spark engine of `engage score --engine spark`: the same chunk step as the local engine, on Apache Spark.

* Features: the as-of snapshot (the Feast offline source file, see ``serving/batch.py``) read with
  ``spark.read.parquet`` as a DataFrame, only the columns the models and the policy read.
* Scoring: ``mapInArrow`` (the Arrow form of ``mapInPandas``: each partition arrives as Arrow record
  batches, so booleans with nulls and strings reach the scorer exactly as the local engine's pyarrow read
  gives them) calling :func:`serving.batch.score_chunk` -- ``Scorer.score`` and ``decide`` -- with the
  champion models loaded once on the driver from the MLflow registry and shipped to the executors as a
  broadcast (the unwrapped python models pickle with their LightGBM boosters). Reason codes are added in
  a second ``mapInArrow`` for the listed customers only, as the local engine does.
* Ranking: the same keys as :func:`serving.batch.rank` (``orderBy`` with nulls last, ``row_number`` for
  the rank, one partition for the numbering), ``--top`` as a filter on the rank.
* Output: written by Spark. A ``.parquet``/``.csv`` path gets one file (one partition written to a
  temporary folder beside it, its part file renamed into place); any other path gets a Parquet directory
  (written to a temporary folder beside it, then renamed). The summary and chart come from the written
  rows' tier, segment, action and money columns, collected to the driver through Arrow.
* Decision log: once the output is in place, the driver reads the written list back (pyarrow) and appends
  its rows' decisions with :func:`serving.batch.log_decisions`, as the local engine does with its rows, so
  both engines log the same records (reading the file costs far less than recomputing the reason codes).

Master: ``--spark-master`` / ``SPARK_MASTER``, default ``local[*]``. On a cluster the executors need this
package installed (or shipped with ``--py-files``) and ENGAGE_HOME's ``feature_data/`` and the output
folder on storage every node mounts at the same path (NFS, or a shared volume on Kubernetes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from serving.batch import (
    CHUNK_SCHEMA,
    ENTITY,
    OUTPUT_FORMATS,
    OUTPUT_SCHEMA,
    REASON_SCHEMA,
    SORT_KEYS,
    BatchError,
    BatchPlan,
    BatchSummary,
    atomic_path,
    decision_log_url,
    draw_chart,
    log_decisions,
    reasons_chunk,
    score_chunk,
    summarize,
    treated_profit,
)

DEFAULT_MASTER = "local[*]"


def spark_session(master: str | None = None, shuffle_partitions: int | None = None):
    """A SparkSession for scoring (UTC session time, Arrow on, micros timestamps in Parquet)."""
    from pyspark.sql import SparkSession

    master = master or os.environ.get("SPARK_MASTER") or DEFAULT_MASTER
    if master.startswith("local"):  # executors run this interpreter (the venv that has the project)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    partitions = shuffle_partitions or int(os.environ.get("ENGAGE_SPARK_SHUFFLE_PARTITIONS", "8"))
    return (SparkSession.builder.master(master).appName("engage-score")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.shuffle.partitions", str(partitions))
            .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate())


def _spark_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "string"
    if pa.types.is_float64(t):
        return "double"
    if pa.types.is_int64(t):
        return "bigint"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_boolean(t):
        return "boolean"
    raise TypeError(f"no Spark type for {t}")


def ddl(schema: pa.Schema) -> str:
    return ", ".join(f"`{f.name}` {_spark_type(f.type)}" for f in schema)


def _ranked(spark, plan_: BatchPlan, bc):
    """The DataFrame of the list: scored, decided, filtered, ranked, top N, reason codes added."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ctx = plan_.context
    features = spark.read.parquet(str(plan_.snapshot)).select(*plan_.columns)
    if ctx.segments:
        features = features.where(F.col("segment").isin(list(ctx.segments)))

    def score_batches(batches):
        c = bc.value
        for batch in batches:
            yield from score_chunk(c, batch).to_batches()

    rows = features.mapInArrow(score_batches, ddl(CHUNK_SCHEMA))
    order = [F.col(k).desc_nulls_last() if desc else F.col(k).asc_nulls_last() for k, desc in SORT_KEYS]
    window = Window.orderBy(*order)  # one partition for the numbering: fine for lists of millions
    intended = F.coalesce(F.col("holdout") & (F.coalesce(F.col("intended_action"), F.lit("none")) != "none"),
                          F.lit(False))
    acting = (F.col("action") != F.lit("none")) | intended  # serving.batch.acting_mask
    ranked = (rows.withColumn("_acting", acting)
              .withColumn("rank", F.row_number().over(window).cast("bigint")).drop("_acting"))
    if plan_.options.top is not None:
        ranked = ranked.where(F.col("rank") <= plan_.options.top)
    if ctx.inline_reasons:  # every scored row is written: score_chunk added the reason codes
        ranked = ranked.persist()
        return ranked.select(*OUTPUT_SCHEMA.names), features, ranked
    ranked = ranked.drop("reason_codes").persist()

    def reason_batches(batches):
        c = bc.value
        for batch in batches:
            yield from reasons_chunk(c, batch, None).to_batches()

    listed = features.join(ranked.select(ENTITY), on=ENTITY, how="left_semi")
    reasons = listed.mapInArrow(reason_batches, ddl(REASON_SCHEMA))
    return ranked.join(reasons, on=ENTITY, how="left").select(*OUTPUT_SCHEMA.names), features, ranked


def _single_file(df, out: Path, tmp: Path) -> None:
    """Write ``df`` in rank order as one file at ``tmp`` (Spark writes a folder; its part file is moved)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.spark-", dir=out.parent))
    try:
        one = df.repartition(1).sortWithinPartitions("rank")
        if out.suffix.lower() == ".csv":
            (one.write.mode("overwrite").option("header", True).option("timestampFormat", "yyyy-MM-dd'T'HH:mm:ss'Z'")
             .csv(str(folder / "data")))
            parts = sorted((folder / "data").glob("part-*.csv"))
        else:
            one.write.mode("overwrite").parquet(str(folder / "data"))
            parts = sorted((folder / "data").glob("part-*.parquet"))
        if len(parts) != 1:
            raise BatchError(f"Spark wrote {len(parts)} part files, expected one")
        os.replace(parts[0], tmp)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _directory(df, out: Path) -> None:
    """Write ``df`` as a Parquet directory (rank order) beside ``out``, then rename it into place."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        df.orderBy("rank").write.mode("overwrite").parquet(str(tmp))
        if out.exists():  # --overwrite was checked by the plan
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_spark(plan_: BatchPlan, master: str | None = None, spark=None) -> BatchSummary:
    """Score ``plan_`` on Spark and write the list; see the module docstring."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    own = spark is None
    try:
        spark = spark or spark_session(master)
    except Exception as exc:  # no Java, bad master URL
        raise BatchError(f"cannot start Spark: {type(exc).__name__}: {exc}") from exc
    bc = spark.sparkContext.broadcast(plan_.context)
    out = plan_.out
    try:
        final, features, ranked = _ranked(spark, plan_, bc)
        scored = features.count()
        with contextlib.ExitStack() as stack:
            png = stack.enter_context(atomic_path(plan_.chart)) if plan_.chart is not None else None
            if out.suffix.lower() in OUTPUT_FORMATS:
                tmp = stack.enter_context(atomic_path(out))
                _single_file(final, out, tmp)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                _directory(final, out)
            cols = (ranked.orderBy("rank").select("risk_tier", "segment", "action", "holdout", "churn_probability",
                                                  "value_at_risk", F.col("expected_incremental_profit"))
                    .toPandas())
            if png is not None:
                draw_chart(cols["churn_probability"].to_numpy(float),
                           treated_profit(cols["expected_incremental_profit"].to_numpy(float),
                                          cols["holdout"].to_numpy(bool)),
                           cols["value_at_risk"].to_numpy(float), png)
        ranked.unpersist()
    finally:
        bc.unpersist()
        if own and not (master or os.environ.get("SPARK_MASTER") or DEFAULT_MASTER).startswith("local"):
            spark.stop()
    logged = log_decisions(plan_, read_written(out)) if plan_.engine is not None else None
    data = {k: cols[k].tolist() for k in ("risk_tier", "segment", "action")}
    data |= {k: cols[k].to_numpy(float) for k in ("value_at_risk", "expected_incremental_profit")}
    data["holdout"] = cols["holdout"].to_numpy(bool)
    summary = summarize(data, engine="spark", plan_=plan_, scored=scored, seconds=time.perf_counter() - started,
                        out=out)
    summary.logged = logged
    summary.decision_log = decision_log_url(plan_.engine) if plan_.engine is not None else None
    return summary


def read_written(out: Path) -> pa.Table:
    """The list Spark wrote (a Parquet file or directory, or a CSV file), in :data:`OUTPUT_SCHEMA`."""
    if out.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        types = {f.name: f.type for f in OUTPUT_SCHEMA}
        table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
    return table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
