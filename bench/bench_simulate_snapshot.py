"""Benchmark: simulate a customer base, load it, and build one feature snapshot.

Prints, per stage, seconds, rows/s and peak memory (RSS of the process that ran the stage), and beside
each a floor measured in the same run on the same data:
  - simulate: writing the same number of event rows with pyarrow from arrays already in memory;
  - ingest:   DuckDB copying the events Parquet into a table with no validation;
  - snapshot: one GROUP BY customer_id over all loaded events (a single count and sum).
Targets (issue 2): 1,000,000 customers x 365 days simulate in under 5 minutes; one snapshot under 2 minutes.

Usage: python bench/bench_simulate_snapshot.py [--customers 1000000] [--days 365] [--workdir bench/out]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(queue: mp.Queue, fn_name: str, kwargs: dict) -> None:
    started = time.perf_counter()
    out = globals()[fn_name](**kwargs)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((time.perf_counter() - started, peak_mib, out))


def run_stage(fn_name: str, **kwargs) -> tuple[float, float, object]:
    """Run a stage in a fresh process: (seconds, peak RSS MiB, result)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn_name, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"stage {fn_name} failed with exit code {proc.exitcode}")
    return result


def stage_simulate(customers: int, days: int, out: str) -> dict:
    from features.simulate import simulate

    r = simulate(customers, days, 7, Path(out), progress=False)
    return {"events": r.n_events, "exposures": r.n_exposures}


def floor_simulate_write(rows: int, out: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    chunk = 1_000_000
    with pq.ParquetWriter(out, pa.schema([("customer_id", pa.string()), ("event_at", pa.timestamp("us", "UTC")),
                                          ("event_type", pa.string()), ("amount", pa.float64())])) as w:
        ids = pa.array(np.char.add("C", np.arange(chunk).astype(str)))
        types = pa.array(np.array(["session", "purchase"])[rng.integers(0, 2, chunk)])
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            w.write_table(pa.table({
                "customer_id": ids[:n],
                "event_at": pa.array(rng.integers(1.7e15, 1.73e15, n), pa.timestamp("us", "UTC")),
                "event_type": types[:n],
                "amount": rng.random(n),
            }))
    return {}


def stage_ingest(src: str, home: str) -> dict:
    from features.load import ingest

    report = ingest(Path(src), Path(home))
    return {t.table: t.inserted for t in report.tables}


def floor_ingest(src: str, db: str) -> dict:
    import duckdb

    con = duckdb.connect(db)
    con.execute(f"CREATE TABLE events AS SELECT * FROM read_parquet('{src}/events.parquet')")
    return {}


def stage_snapshot(home: str) -> dict:
    from engage.config import load_config
    from features.load import connect_warehouse
    from features.snapshots import build_snapshots

    con = connect_warehouse(Path(home), read_only=True)
    (r,) = build_snapshots(con, Path(home), load_config().features)
    return {"rows": r.rows}


def floor_snapshot(home: str) -> dict:
    from features.load import connect_warehouse

    con = connect_warehouse(Path(home), read_only=True)
    con.execute("SELECT customer_id, count(*), sum(amount) FROM events GROUP BY customer_id").fetchall()
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    work = args.workdir / f"sim-{args.customers}-{args.days}"
    if work.exists():
        shutil.rmtree(work)
    src, home = work / "src", work / "home"
    home.mkdir(parents=True)

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"workload: {args.customers:,} customers x {args.days} days\n")
    rows = []

    secs, mem, out = run_stage("stage_simulate", customers=args.customers, days=args.days, out=str(src))
    n_rows = out["events"] + out["exposures"]
    fsecs, fmem, _ = run_stage("floor_simulate_write", rows=out["events"], out=str(work / "floor.parquet"))
    rows.append(("simulate", secs, n_rows, mem, "pyarrow write of as many event rows", fsecs, out["events"]))

    secs, mem, loaded = run_stage("stage_ingest", src=str(src), home=str(home))
    fsecs, _, _ = run_stage("floor_ingest", src=str(src), db=str(work / "floor.duckdb"))
    rows.append(("ingest", secs, sum(loaded.values()), mem, "DuckDB copy of events, no checks", fsecs,
                 loaded.get("events", 0)))

    secs, mem, snap = run_stage("stage_snapshot", home=str(home))
    fsecs, _, _ = run_stage("floor_snapshot", home=str(home))
    rows.append(("snapshot", secs, loaded.get("events", 0), mem, "one GROUP BY over events", fsecs,
                 loaded.get("events", 0)))

    print(f"{'stage':<9} {'seconds':>8} {'rows':>12} {'rows/s':>11} {'peak MiB':>9}   floor (same run)")
    for name, s, n, m, fname, fs, fn in rows:
        print(f"{name:<9} {s:8.1f} {n:12,} {n / s:11,.0f} {m:9.0f}   {fname}: {fs:.1f}s, {fn / fs:,.0f} rows/s")
    print(f"\nsnapshot rows (customers): {snap['rows']:,}")
    print("targets: simulate < 300 s; snapshot < 120 s")


if __name__ == "__main__":
    main()
