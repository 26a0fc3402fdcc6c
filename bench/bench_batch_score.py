"""Batch scoring benchmark: every customer of an ENGAGE_HOME, end to end, beside the floor.

    python bench/bench_batch_score.py --home /path/to/home1m [--workers 2] [--top 100000] [--spark]
        [--decision-log postgresql://user@host:5432/db]

Each run's decisions go to an empty SQLite database of its own in the output folder, or, with
``--decision-log`` (the production profile's serving database), to an empty schema of its own in that
PostgreSQL database, dropped at the end.
Needs the home's warehouse (ingested) and champions in the registry MLFLOW_TRACKING_URI points at (models
trained on a smaller world are fine: the feature lists match). The as-of snapshot is built first when
missing (timed apart: `engage features build` does the same).

Figures:
- local engine, full table: offline snapshot read, three models, policy (decide per customer), rank,
  reason codes for every row, atomic Parquet write and chart -> customers/s;
- local engine, a win-back list (``--top``): the same but reason codes only for the listed rows;
- floor, same run: the boosters' raw ``predict`` (churn, next-best-offer base and per-arm) over the same
  feature matrices, LightGBM's default threads;
- Spark engine in local mode (``--spark``), full table.
Targets: the full local job >= 1/3 of the floor's throughput, and 1,000,000 customers in < 90 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

warnings.filterwarnings("ignore")


def floor(plan_) -> tuple[float, int]:
    """Seconds of the boosters' raw predict over the snapshot's matrices (matrix building not timed)."""
    from serving.batch import chunk_values
    from training.transforms import btyd_arrays

    scorer = plan_.context.scorer
    table = pq.read_table(plan_.snapshot, columns=plan_.columns)
    n = table.num_rows
    values = chunk_values(table)
    btyd = btyd_arrays(values["orders_lifetime"], values["tenure_days"], values["days_since_last_purchase"],
                       float(scorer.churn.horizon_days))
    X_churn = scorer.plans["churn"].build({**values, **btyd}, n)
    X_nbo = scorer.plans["nbo"].build(values, n) if scorer.nbo is not None else None
    reason_codes_cost(scorer.churn, X_churn)
    started = time.perf_counter()
    scorer.churn.booster.predict(X_churn)
    if X_nbo is not None:
        scorer.nbo.base.predict(X_nbo, raw_score=True)
        for b in scorer.nbo.arm_boosters:
            b.predict(X_nbo, raw_score=True)
    return time.perf_counter() - started, n


def reason_codes_cost(churn, X: np.ndarray) -> None:
    """Microseconds per customer of the churn SHAP values: LightGBM's pred_contrib against the tables."""
    rows = X[:2_000]
    started = time.perf_counter()
    churn.booster.predict(rows, pred_contrib=True, num_threads=1)
    lgb_us = (time.perf_counter() - started) / len(rows) * 1e6
    shap = churn.warm()
    rows = X[:50_000]
    started = time.perf_counter()
    shap.contributions(rows)
    table_us = (time.perf_counter() - started) / len(rows) * 1e6
    print(f"churn SHAP values, one thread: LightGBM pred_contrib {lgb_us:.0f} us/customer, tabulated TreeSHAP "
          f"{table_us:.1f} us/customer ({churn.booster.num_trees()} trees)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=0, help="local engine processes (0 = one per CPU)")
    ap.add_argument("--top", type=int, default=100_000, help="size of the win-back list run (0 = skip)")
    ap.add_argument("--spark", action="store_true", help="also run the Spark engine (local[*])")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--decision-log", default=None, metavar="URL",
                    help="a PostgreSQL database for the decision log (a schema per run); default: SQLite files")
    args = ap.parse_args()
    try:
        run(args)
    finally:
        _drop_schemas(args.decision_log)


def run(args: argparse.Namespace) -> None:
    os.environ["ENGAGE_HOME"] = str(args.home)

    from serving import batch

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="engage-bench-score-"))
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}")

    started = time.perf_counter()
    as_of = batch.resolve_as_of(args.home, None)
    existed = batch.snapshot_file(args.home, as_of).exists()
    batch.ensure_snapshot(args.home, as_of)
    print(f"snapshot at {as_of:%Y-%m-%d %H:%M:%S}Z: {'present' if existed else 'built'} "
          f"({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    _fresh_log(out_dir, "full", args.decision_log)
    opts = batch.BatchOptions(out=out_dir / "full.parquet", overwrite=True, workers=args.workers, run_id="bench")
    plan_ = batch.plan(args.home, opts)
    print(f"plan + model load: {time.perf_counter() - started:.1f} s; models {plan_.context.versions}; "
          f"{len(plan_.columns)} columns read")

    _, full = batch.run_local(plan_)
    print(f"local engine, full table: {full.scored:,} customers in {full.seconds:.1f} s = {full.rate:,.0f}/s")
    print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in full.stages.items()))

    rate_top = None
    if args.top:
        _fresh_log(out_dir, "top", args.decision_log)
        opts_top = batch.BatchOptions(out=out_dir / "top.parquet", overwrite=True, workers=args.workers,
                                      run_id="bench", top=args.top)
        _, top = batch.run_local(batch.plan(args.home, opts_top, models=_models(plan_)))
        rate_top = top.rate
        print(f"local engine, top {args.top:,} list: {top.scored:,} customers in {top.seconds:.1f} s = "
              f"{top.rate:,.0f}/s")
        print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in top.stages.items()))

    seconds, n = floor(plan_)
    floor_rate = n / seconds
    print(f"floor (boosters' raw predict, default threads): {n:,} rows in {seconds:.1f} s = {floor_rate:,.0f}/s")

    spark_rate = None
    if args.spark:
        from serving.spark_batch import run_spark

        _fresh_log(out_dir, "spark", args.decision_log)
        opts_spark = batch.BatchOptions(out=out_dir / "spark.parquet", overwrite=True, run_id="bench")
        s = run_spark(batch.plan(args.home, opts_spark, directory_ok=True, models=_models(plan_)))
        spark_rate = s.rate
        print(f"spark engine (local[*]), full table: {s.scored:,} customers in {s.seconds:.1f} s = {s.rate:,.0f}/s")

    print()
    print("| run | customers/s | ratio to floor | seconds per 1M |")
    print("|---|---:|---:|---:|")
    rows = [("local, full table", full.rate), ("local, top list", rate_top), ("spark local[*], full", spark_rate),
            ("floor: boosters' predict", floor_rate)]
    for name, rate in rows:
        if rate:
            print(f"| {name} | {rate:,.0f} | {rate / floor_rate:.3f} | {1e6 / rate:.1f} |")
    print(f"target: full local job >= 1/3 floor ({floor_rate / 3:,.0f}/s): "
          f"{'met' if full.rate >= floor_rate / 3 else 'NOT met'}; 1M in < 90 s ({1e6 / 90:,.0f}/s): "
          f"{'met' if full.rate >= 1e6 / 90 else 'NOT met'}")
    print(f"outputs in {out_dir}")
    np.seterr(all="ignore")


_SCHEMAS: list[str] = []


def _fresh_log(out_dir: Path, run: str, pg_url: str | None) -> None:
    """Each run logs its decisions into an empty database of its own (the same run id in one database would
    make the later runs' inserts skip rows already there): a SQLite file, or a new schema in ``pg_url``."""
    if pg_url is None:
        os.environ["ENGAGE_SERVING_DB_URL"] = f"sqlite:///{(out_dir / f'decisions-{run}.db').resolve()}"
        return
    from serving.servingdb import create_serving_engine

    schema = f"engage_bench_{run}_{os.getpid()}"
    engine = create_serving_engine(pg_url, create=False)
    with engine.begin() as con:
        con.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        con.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine.dispose()
    _SCHEMAS.append(schema)
    sep = "&" if "?" in pg_url else "?"
    os.environ["ENGAGE_SERVING_DB_URL"] = f"{pg_url}{sep}options=-csearch_path%3D{schema}"


def _drop_schemas(pg_url: str | None) -> None:
    if pg_url is None or not _SCHEMAS:
        return
    from serving.servingdb import create_serving_engine

    engine = create_serving_engine(pg_url, create=False)
    with engine.begin() as con:
        for schema in _SCHEMAS:
            con.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    engine.dispose()


def _models(plan_):
    """The loaded ModelSet of a plan, for the next plans of the same run (no reload)."""
    from types import SimpleNamespace

    ctx = plan_.context
    return SimpleNamespace(scorer=ctx.scorer, versions=ctx.versions)


if __name__ == "__main__":
    main()
