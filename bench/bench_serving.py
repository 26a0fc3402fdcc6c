"""Benchmark: the scoring API under a real uvicorn process on loopback, beside its in-process floor.

Figures (tracker issue): p50/p99 of single recommendations at a fixed rate (open loop: request i is due at
t0 + i/rate and its latency counts from then, so queueing is counted), peak sustained requests/s (closed
loop, 4 and 8 keep-alive clients), customers/s through the batch endpoint. Floors, same run, same customers,
no HTTP: the feature read + the three models (``reader.read`` + ``scorer.score``), each part alone, Feast's
``get_online_features`` for the three services, ``EngageService.recommend``, and a fixed 1 ms of Python arithmetic
(how steady the machine itself is: its p99 over its p50). GET /healthz at the same rate
gives the HTTP and client floor. Targets: p99 < 5 ms at 200 requests/s; service p50 <= 3x floor p50; no errors.

With ``--profile production`` (ENGAGE_REDIS_URL, ENGAGE_POSTGRES_URL set, the world materialized there) the
online store is Redis, the serving database PostgreSQL, and Redis's own GET round trip (redis-py, the same
client the reader uses) is measured in the same loop as the floor under the floor.

Usage: MLFLOW_TRACKING_URI=... python bench/bench_serving.py --home $ENGAGE_HOME [--rate 200] [--duration 60]
       python bench/bench_serving.py --profile production --home $ENGAGE_HOME
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
FLOOR_CALLS, SDK_CALLS, SEED, CONNS = 2000, 200, 7, 16  # CONNS: open-loop connections
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_SERVER_TIME = re.compile(rb'engage_request_duration_seconds_(sum|count)\{endpoint="/v1/recommendations"\} (\S+)')


def ms(xs) -> dict:
    a = np.asarray(xs, dtype=float) * 1e3
    return {k: float(np.percentile(a, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


# ---- a minimal keep-alive HTTP/1.1 client: pre-encoded requests, Content-Length bodies, no parsing ----------

def http_request(method: str, path: str, key: str | None = None, payload=None) -> bytes:
    body = json.dumps(payload).encode() if payload is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += (f"Authorization: Bearer {key}\r\n" if key else "") + ("Content-Type: application/json\r\n" if body else "")
    return head.encode() + b"\r\n" + body


# A request that waits this long is an error, not a latency: a server slower than the fixed rate queues
# requests, and their waiting time is what the open-loop figures measure.
CLIENT_TIMEOUT_S = 300


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head, parts = buf[:end], [buf[end + 4:]]
        size, got = int(_LENGTH.search(head)[1]), len(parts[0])
        while got < size:
            parts.append(self._recv())
            got += len(parts[-1])
        data = b"".join(parts)
        self.buf = data[size:]
        return int(head[9:12]), data[:size]

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> bytes:
        if not (chunk := self.sock.recv(1 << 20)):
            raise ConnectionError("server closed the connection")
        return chunk


# ---- load phases -----------------------------------------------------------------------------------------------

def drive(port: int, reqs: list[bytes], conns: int, rate: float | None = None, duration: float = 0) -> dict:
    """Open loop (``rate``): ``reqs[i]`` is due at t0 + i/rate and its latency counts from then, so waiting for
    the server counts (no coordinated omission). Closed loop (no rate): each connection sends its next request
    as soon as the last one is answered, for ``duration`` seconds."""
    total, counter, clock = len(reqs), itertools.count(), {}
    lat, lag, errors = [np.nan] * total, [0.0] * total, []
    ready = threading.Barrier(conns, action=lambda: clock.update(t0=time.perf_counter() + 0.01))

    def worker() -> None:
        try:
            conn = Conn(port)  # connected before the clock starts
        except OSError:
            conn = None
        ready.wait()
        t0 = clock["t0"]
        while (i := next(counter)) < total:
            due = t0 + i / rate if rate else time.perf_counter()
            if not rate and due > t0 + duration:
                return
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            lag[i] = time.perf_counter() - due  # > 0: the client was late or every connection was busy
            try:
                conn = conn or Conn(port)
                status, _ = conn.request(reqs[i])
            except (OSError, ValueError, TypeError) as exc:  # counted; the next request reconnects
                errors.append(type(exc).__name__)
                conn = None
                continue
            lat[i] = time.perf_counter() - due
            errors.extend([status] if status != 200 else [])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conns)]  # daemon: Ctrl-C ends the run
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [x for x in lat if x == x]
    return {**ms(done or [np.nan]), "requests": len(done), "errors": len(errors),
            "error_kinds": sorted(map(str, set(errors))), "rps": len(done) / (time.perf_counter() - clock["t0"]),
            "send_lag_p99_ms": ms([g for g, x in zip(lag, lat, strict=True) if x == x] or [np.nan])["p99"]}


def batch_phase(port: int, bodies: list[bytes], size: int) -> dict:
    conn, times, errors = Conn(port), [], 0
    status, data = conn.request(bodies[0])  # warm-up call, also checks the answers
    if status != 200 or len(results := json.loads(data)["results"]) != size:
        raise SystemExit(f"batch call failed: {status} {data[:300]!r}")
    cold = sum(r["cold_start"] or r["degraded"] for r in results)  # customers answered without their features
    for raw in bodies[1:]:
        start = time.perf_counter()
        status, _ = conn.request(raw)
        times.append(time.perf_counter() - start)
        errors += status != 200
    return {**ms(times), "customers_per_s": size * len(times) / sum(times), "errors": errors, "cold": cold}


def server_time(port: int) -> tuple[float, float]:
    """(sum of seconds, count) of /v1/recommendations in the server's own latency histogram."""
    with closing(Conn(port)) as conn:
        text = conn.request(http_request("GET", "/metrics"))[1]
    got = {k.decode(): float(v) for k, v in _SERVER_TIME.findall(text)}
    return got.get("sum", 0.0), got.get("count", 0.0)


# ---- the in-process floor: a spawned child on the server's core, run before the server starts -----------------

def as_of(home: str) -> dict:
    """``{"now": ...}`` an hour after the store's features when they are past their age limit today (a simulated
    world's), so requests take the normal path instead of the stale-features one; else nothing."""
    from serving.cli import _as_of_for_old_features

    when = _as_of_for_old_features(Path(home))
    return {"now": when} if when else {}


def fixed_work(n: int) -> int:
    """A fixed block of pure-Python arithmetic: no I/O, no allocation to speak of, the same every call. Its spread
    from call to call is the machine's (other tenants, frequency, interrupts), not the code's."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def calibrate_fixed_work(target_s: float = 1e-3) -> int:
    """The loop count that takes about ``target_s`` here (median of a few calls)."""
    n = 20_000
    took = []
    for _ in range(30):
        start = time.perf_counter()
        fixed_work(n)
        took.append(time.perf_counter() - start)
    return max(1, int(n * target_s / float(np.median(took))))


def floor(home: str, n_sample: int, batch_size: int, db_url: str, cpus: list[int] | None) -> dict:
    if cpus:
        os.sched_setaffinity(0, cpus)
    import pyarrow.parquet as pq

    from features.snapshots import ENTITY, snapshot_file, snapshot_times_on_disk
    from features.store import open_store
    from serving.models import ModelManager
    from serving.schemas import RecommendationRequest
    from serving.scoring import column
    from serving.service import EngageService, registry_client
    from serving.settings import ServingSettings
    from training.transforms import btyd_arrays

    if not (stamps := snapshot_times_on_disk(Path(home))):
        raise SystemExit(f"no snapshots under {home}: run `engage features build`")
    all_ids = pq.read_table(snapshot_file(Path(home), stamps[-1]), columns=[ENTITY])[ENTITY].to_pylist()
    pick = np.random.default_rng(SEED).choice(len(all_ids), min(n_sample, len(all_ids)), replace=False)
    ids = [all_ids[i] for i in pick]
    store = open_store(Path(home))
    manager = ModelManager(store, registry_client)
    if (error := manager.reload()[1]) or not manager.current.ready:
        raise SystemExit(f"no champion models loaded: {error or 'none registered'} (MLFLOW_TRACKING_URI?)")
    reader, sc = manager.current.reader, manager.current.scorer

    names = ("read_score", "read", "models", "service", "feast_sdk")  # each its own customers (cold reads alike)
    mine = {k: [ids[(n * len(names) + j) % len(ids)] for n in range(FLOOR_CALLS)] for j, k in enumerate(names)}
    inputs = {}  # the models' input matrices, built as Scorer.score builds them
    for cid in mine["models"]:
        v = reader.read([cid]).values
        num = {k: column(v, k, 1) for k in ("orders_lifetime", "tenure_days", "days_since_last_purchase")}
        btyd = btyd_arrays(*num.values(), float(getattr(sc.churn, "horizon_days", 90)))
        inputs[cid] = {k: p.build({**v, **btyd} if k == "churn" else v, 1) for k, p in sc.plans.items()}

    def predict(cid: str) -> None:
        x = inputs[cid]
        if sc.churn is not None:
            sc.churn.score_matrix(x["churn"]), sc.churn.reasons(x["churn"])
        if sc.nbo is not None:
            sc.nbo.score_matrix(x["nbo"])
        if sc.send_time is not None:  # every channel's curve in one call, as Scorer.score asks
            sc.send_time.open_curves(x["send_time"])

    def read_score(batch: list[str]) -> None:
        rows = reader.read(batch)
        sc.score(batch, rows.values, rows.timestamps)

    services = [store.get_feature_service(m.feature_service) for m in manager.current.models.values()]
    svc = EngageService(ServingSettings(home=Path(home), api_keys=["x" * 32], reload_interval_s=0,
                                        serving_db_url=db_url))
    reqs = {c: RecommendationRequest(customer_id=c, **as_of(home)) for c in mine["service"]}
    steps = {"read": lambda c: reader.read([c]), "models": predict, "read_score": lambda c: read_score([c]),
             "service": lambda c: svc.recommend([reqs[c]]),
             "feast_sdk": lambda c: [store.get_online_features(features=fs, entity_rows=[{ENTITY: c}]).to_dict()
                                     for fs in services]}
    redis = getattr(reader.online_store, "_client", None) if store.config.online_store.type == "redis" else None
    if redis is not None:  # the network floor of the production profile: one GET round trip
        redis.set(b"engage:bench:probe", b"x")
        steps["redis_get"] = lambda c: redis.get(b"engage:bench:probe")
        mine["redis_get"] = mine["read"]
    if getattr(reader, "_fast", None) is not None:  # what the one-read path replaces: Feast's per-view reads
        steps["per_view_read"] = lambda c: reader.read_per_view([c])
        mine["per_view_read"] = mine["read"]
    work_n = calibrate_fixed_work()  # about 1 ms, interleaved with the rest: how steady this machine is
    steps["fixed_work"] = lambda c: fixed_work(work_n)
    mine["fixed_work"] = mine["read"]
    times: dict[str, list[float]] = {k: [] for k in steps}
    svc.start()
    try:  # interleaved per customer, so that other load on the machine hits every figure alike
        for n in range(FLOOR_CALLS):
            for name, fn in steps.items():
                if name != "feast_sdk" or n % (FLOOR_CALLS // SDK_CALLS) == 0:
                    start = time.perf_counter()
                    fn(mine[name][n])
                    times[name].append(time.perf_counter() - start)
    finally:
        svc.close()
    res = {k: {**ms(v[len(v) // 10:]), "calls": len(v) - len(v) // 10} for k, v in times.items()}  # 1st tenth: warm-up
    per_customer = []
    for k in range(3):  # three batches: the median seconds per customer
        chunk = ids[k * batch_size:(k + 1) * batch_size] or ids[:batch_size]
        start = time.perf_counter()
        read_score(chunk)
        per_customer.append((time.perf_counter() - start) / len(chunk))
    res["batch_customers_per_s"] = 1 / float(np.median(per_customer))
    return {"ids": ids, "floor": res, "models": manager.current.versions}


# ---- the server ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workers: int, port: int, env: dict, log: Path, cpus: list[int] | None) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "engage"), "serve", "--port", str(port), "--workers", str(workers),
           "--log-level", "warning"]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{tail(log)}")
        try:
            with closing(Conn(port)) as conn:
                if conn.request(http_request("GET", "/readyz"))[0] == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server was not ready after {timeout_s:g} s:\n{tail(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def online_customers(home: Path) -> int | None:
    """Distinct entity keys of the profile view in the SQLite online store (None for other stores)."""
    if not (db := home / "feast" / "online_store.db").exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'") if "profile" in t]
        return con.execute(f'SELECT count(DISTINCT entity_key) FROM "{tables[0]}"').fetchone()[0] if tables else None


# ---- main ------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=os.environ.get("ENGAGE_HOME"))
    for name, default in (("rate", 200.0), ("duration", 60.0), ("peak-duration", 20.0), ("batch-size", 1000),
                          ("batches", 20), ("port", 0), ("workers", 1), ("customers-sample", 20_000)):
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="server on the first CPU, load generator on the second (default: when possible)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", choices=("embedded", "production"), default=os.environ.get("ENGAGE_PROFILE"),
                        help="production: Redis online store, PostgreSQL serving database (ENGAGE_REDIS_URL, "
                             "ENGAGE_POSTGRES_URL)")
    args = parser.parse_args()
    production = args.profile == "production"
    if args.profile:
        os.environ["ENGAGE_PROFILE"] = args.profile  # the floor's child process and the server inherit it
    if args.home is None:
        parser.error("--home or ENGAGE_HOME is required")
    home, work, key = args.home.resolve(), Path(tempfile.mkdtemp(prefix="bench-serving-")), secrets.token_urlsafe(32)
    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) >= 2 and args.workers == 1
    server_cpus, client_cpus = ([cores[0]], [cores[1]]) if pin else (None, None)
    machine = {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
               "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
               "load_before": os.getloadavg(), "server_cpus": server_cpus, "client_cpus": client_cpus}
    print(f"machine: {machine['host']} {platform.machine()}, {machine['cores']} cores, {machine['ram_gib']} GiB, "
          f"Python {machine['python']}; load average {machine['load_before'][0]:.2f}")
    print(f"home: {home}; profile {args.profile or 'embedded'}; customers in the online store: "
          f"{online_customers(home) or 'n/a (not SQLite)'}")
    print(f"pinning: server on CPU {server_cpus}, load generator on CPU {client_cpus}" if server_cpus else
          "pinning: none (--no-pin, fewer than 2 cores, or --workers > 1)")

    print("in-process floor ...", flush=True)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # a fresh process, off the client
        floor_db = None if production else f"sqlite:///{work}/floor.db"  # production: PostgreSQL
        got = pool.submit(floor, str(home), args.customers_sample, args.batch_size, floor_db, server_cpus).result()
    ids, fl = got["ids"], got["floor"]
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)

    port = args.port or free_port()
    env = {**os.environ, "ENGAGE_HOME": str(home), "ENGAGE_API_KEYS": key, "ENGAGE_RELOAD_INTERVAL_S": "0"}
    if not production:
        env["ENGAGE_SERVING_DB_URL"] = f"sqlite:///{work}/serving.db"
    rng = np.random.default_rng(SEED)
    when = as_of(str(home))
    if when:
        print(f"the store's features are past their age limit today: requests ask as of {when['now']}", flush=True)
    single = [http_request("POST", "/v1/recommendations", key, {"customer_id": c, **when}) for c in ids]
    pick = lambda n: [single[j] for j in rng.integers(len(single), size=int(n))]  # noqa: E731
    size = min(args.batch_size, len(ids))
    bodies = [http_request("POST", "/v1/recommendations/batch", key, {"requests": [
        {"customer_id": ids[j], **when} for j in rng.choice(len(ids), size, replace=False)]})
        for _ in range(args.batches + 1)]
    print(f"starting `engage serve` on 127.0.0.1:{port} (log: {work / 'server.log'}) ...", flush=True)
    proc = start_server(args.workers, port, env, work / "server.log", server_cpus)
    res: dict = {}
    try:
        wait_ready(proc, port, work / "server.log")
        gc.collect()
        gc.freeze()
        gc.disable()  # the load generator's own GC pauses would land in the latencies
        print("warm-up 5 s, HTTP floor, fixed rate, peak, batch ...", flush=True)
        drive(port, pick(args.rate * 5), CONNS, args.rate)
        res["healthz"] = drive(port, [http_request("GET", "/healthz")] * int(args.rate * min(args.duration, 15)),
                               CONNS, args.rate)
        before = server_time(port)
        res["fixed_rate"] = fr = drive(port, pick(args.rate * args.duration), CONNS, args.rate)
        after = server_time(port)
        fr["server_mean_ms"] = 1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1)  # one worker's view
        for n in (4, 8):
            res[f"peak_{n}"] = drive(port, pick(5000 * args.peak_duration), n, duration=args.peak_duration)  # < 5000/s
        res["batch"] = batch_phase(port, bodies, size)
    finally:
        gc.enable()
        stop_server(proc)
        for db in work.glob("*.db*"):  # the decisions logged by the run; the server log stays
            db.unlink()
    machine["load_after"] = os.getloadavg()

    base, b = fl["read_score"], res["batch"]
    targets = {f"p99 < 5 ms at {args.rate:g}/s": fr["p99"] < 5,
               "service p50 <= 3x floor p50": fr["p50"] <= 3 * base["p50"],
               "zero errors": sum(r["errors"] for r in res.values()) == 0}
    rows = [(f"HTTP floor: GET /healthz at {args.rate:g}/s", res["healthz"], f"{res['healthz']['rps']:.0f}/s"),
            (f"POST /v1/recommendations at {args.rate:g}/s, {args.duration:g} s", fr,
             f"p90 {fr['p90']:.2f}, {fr['rps']:.1f}/s, {fr['p50'] / base['p50']:.1f}x floor p50, server-side mean "
             f"{fr['server_mean_ms']:.2f} ms, send lag p99 {fr['send_lag_p99_ms']:.2f} ms {fr['error_kinds'] or ''}"),
            *((f"peak, closed loop, {n} clients", res[f"peak_{n}"], f"{res[f'peak_{n}']['rps']:.0f} requests/s")
              for n in (4, 8)),
            (f"batch, {args.batches} calls of {size}, per call", b, f"{b['customers_per_s']:,.0f} customers/s "
             f"(floor read+score {fl['batch_customers_per_s']:,.0f}/s); cold or degraded {b['cold']}/{size}"),
            ("in-process: EngageService.recommend", fl["service"], "+ policy, recent sends, decision log"),
            ("in-process floor: feature read + 3 models", base, "reader.read + scorer.score"),
            ("  feature read alone", fl["read"], "every view in one read, as the service reads"),
            ("  the three models alone", fl["models"], "on prebuilt input matrices"),
            ("  Feast SDK get_online_features", fl["feast_sdk"],
             f"{len(got['models'])} services, {fl['feast_sdk']['calls']} calls"),
            *((("  Redis GET round trip", fl["redis_get"], "redis-py, the reader's client: the network floor"),)
              if "redis_get" in fl else ()),
            *((("  Feast online_read per view", fl["per_view_read"], "the read the one-read path replaces"),)
              if "per_view_read" in fl else ()),
            ("machine: a fixed 1 ms of Python arithmetic", fl["fixed_work"],
             f"p99/p50 {fl['fixed_work']['p99'] / fl['fixed_work']['p50']:.2f}: the VM's own spread, no I/O")]
    print(f"\nmodels: {got['models']}; customers drawn from {len(ids):,} (seed {SEED}); "
          f"load average after {machine['load_after'][0]:.2f}\n")
    line = "{:<48} {:>8} {:>8} {:>8} {:>7}   {}"
    print(line.format("figure", "p50 ms", "p99 ms", "max ms", "errors", ""))
    for name, r, more in rows:
        print(line.format(name, f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{r['max']:.1f}", r.get("errors", ""), more))
    print("\ntargets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "http": res, "floor": fl, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
