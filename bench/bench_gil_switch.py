"""Benchmark: what the thread switch interval does to the tail of one worker's answers, in process.

One ``EngageService`` answers single recommendations on the main thread at a fixed rate (open loop: each
request's latency counts from when it was due), while its decision log flushes in the background as in
``engage serve``. Blocks of ``--block`` requests alternate between switch intervals (``--intervals``, ms), so
that the VM's own slow and fast minutes hit every setting alike. Printed per interval: p50, p90, p99, max.

The service sets ``ENGAGE_GIL_SWITCH_MS`` (1 ms) at start-up; Python's default is 5 ms. A request that arrives
while the flush thread holds the GIL waits up to the interval before it runs.

Usage: MLFLOW_TRACKING_URI=... python bench/bench_gil_switch.py --home $ENGAGE_HOME [--rate 200] [--blocks 16]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=os.environ.get("ENGAGE_HOME"))
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second")
    ap.add_argument("--blocks", type=int, default=16, help="blocks of requests, the intervals in turn")
    ap.add_argument("--block", type=int, default=400, help="requests per block")
    ap.add_argument("--intervals", default="5,1", help="switch intervals to compare, ms, comma-separated")
    ap.add_argument("--with-batch", type=int, default=0, metavar="N",
                    help="also answer a batch of N customers every second on a second thread, as concurrent "
                         "POST /v1/recommendations/batch calls run on the server's thread pool")
    args = ap.parse_args()
    if args.home is None or not args.home.is_dir():
        raise SystemExit("--home: an ENGAGE_HOME with a materialized store and champion models")
    try:
        intervals = [float(x) / 1000 for x in args.intervals.split(",")]
    except ValueError:
        raise SystemExit(f"--intervals {args.intervals!r}: milliseconds, comma-separated (e.g. 5,1)") from None
    if not intervals or any(not 1e-4 <= s <= 0.1 for s in intervals) or args.rate <= 0 or args.blocks < 1:
        raise SystemExit("--intervals between 0.1 and 100 ms, --rate > 0, --blocks >= 1")
    warnings.filterwarnings("ignore")
    os.environ["ENGAGE_HOME"] = str(args.home)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, [0])  # as bench_serving pins one worker

    import pyarrow.parquet as pq
    from bench_serving import as_of

    from features.snapshots import ENTITY, snapshot_file, snapshot_times_on_disk
    from serving.schemas import RecommendationRequest
    from serving.service import EngageService
    from serving.settings import ServingSettings

    stamps = snapshot_times_on_disk(args.home)
    if not stamps:
        raise SystemExit(f"no snapshots under {args.home}: run `engage features build`")
    ids = pq.read_table(snapshot_file(args.home, stamps[-1]), columns=[ENTITY])[ENTITY].to_pylist()
    total = args.blocks * args.block
    when = as_of(str(args.home))
    pick = np.random.default_rng(7).integers(0, len(ids), total + 300)
    reqs = [RecommendationRequest(customer_id=ids[i], **when) for i in pick]
    with tempfile.TemporaryDirectory(prefix="engage-bench-gil-") as tmp:
        svc = EngageService(ServingSettings(home=args.home, api_keys=["x" * 32], reload_interval_s=0,
                                            serving_db_url=f"sqlite:///{Path(tmp) / 'serving.db'}"))
        svc.start()
        gc.collect()
        gc.freeze()
        for r in reqs[:300]:  # warm-up
            svc.recommend([r])
        lat: dict[float, list[float]] = {s: [] for s in intervals}
        before = sys.getswitchinterval()
        period, i = 1 / args.rate, 300
        stop = threading.Event()
        batches = [0]

        def batch_calls() -> None:
            chunk = reqs[:args.with_batch]
            while not stop.wait(1.0):
                svc.recommend(chunk, "batch_api")
                batches[0] += 1

        worker = threading.Thread(target=batch_calls, daemon=True) if args.with_batch else None
        if worker:
            worker.start()
        try:
            for block in range(args.blocks):
                switch = intervals[block % len(intervals)]
                sys.setswitchinterval(switch)
                t0 = time.perf_counter()
                for k in range(args.block):
                    due = t0 + k * period
                    if (wait := due - time.perf_counter()) > 0:
                        time.sleep(wait)
                    svc.recommend([reqs[i]])
                    i += 1
                    lat[switch].append(time.perf_counter() - due)
        finally:
            stop.set()
            if worker:
                worker.join()
            sys.setswitchinterval(before)
            svc.close()
    beside = f"; beside them {batches[0]} batch calls of {args.with_batch} customers, one a second"
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.rate:g} requests/s in process, {args.blocks} blocks of {args.block}"
          + (beside if args.with_batch else ""))
    print("| switch interval | requests | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for switch, values in lat.items():
        a = np.asarray(values) * 1e3
        print(f"| {switch * 1e3:g} ms | {len(a):,} | {np.percentile(a, 50):.2f} | {np.percentile(a, 90):.2f} | "
              f"{np.percentile(a, 99):.2f} | {a.max():.1f} |")


if __name__ == "__main__":
    main()
