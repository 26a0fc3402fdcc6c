"""`engage forget`: after it, no store under ENGAGE_HOME (nor Redis in production) holds the customers' ids,
the API answers `none`/`suppressed` for them, batch scoring and ingest skip them, and bad input is refused.

The world is a private copy of the session's served home (warehouse, snapshots, Feast online store), with
the MLflow store copied into it, a serving database inside it, answers and feedback through the real API, and
a win-back list from the real batch scorer; then two customers are forgotten through the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from engage.cli import app as cli_app
from tests.factories import write_contract
from tests.helpers import apply_and_materialize

NOW = "2026-01-05T12:00:00Z"
API_KEY = "forget-test-api-key-0123456789"


# --- searching every store for an id ---------------------------------------------------------------------


def _pattern(ids) -> re.Pattern[bytes]:
    """An id as a whole token: C0000012 does not match inside C00000123."""
    return re.compile(rb"(?<![\w-])(?:" + b"|".join(re.escape(i.encode()) for i in ids) + rb")(?![\w-])")


def _hits(values, pattern) -> bool:
    return any(v is not None and pattern.search(v if isinstance(v, bytes) else str(v).encode()) for v in values)


def _parquet_hits(path: Path, ids, pattern) -> list[str]:
    """Columns of a Parquet file holding an id: text columns by substring (in Arrow), then the token check."""
    schema = pq.read_schema(path)
    text = [f.name for f in schema if not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
                                           or pa.types.is_temporal(f.type) or pa.types.is_boolean(f.type))]
    table, hits = pq.read_table(path, columns=text), []  # numbers, times and booleans cannot hold an id
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type):
            found = [v for i in ids for v in col.filter(pc.match_substring(col, i)).to_pylist()] if \
                not pa.types.is_binary(col.type) else col.to_pylist()
        elif pa.types.is_nested(col.type):
            found = [json.dumps(v, default=str) for v in col.to_pylist()]
        else:
            found = [str(v) for v in col.to_pylist()]
        if _hits(found, pattern):
            hits.append(f"{path}:{name}")
    return hits


def search_home(home: Path, ids) -> list[str]:
    """Where any of ``ids`` is found under ``home``: every table of every SQLite and DuckDB database, every
    column of every Parquet file, and the raw bytes of every other file (CSV, JSON, YAML, text, MLflow
    artifacts, and the database files themselves: deleted rows must not linger in them)."""
    pattern, hits = _pattern(ids), []
    for path in sorted(p for p in home.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if data.startswith(b"PAR1"):
            hits += _parquet_hits(path, ids, pattern)
            continue
        if any(i.encode() in data for i in ids) and pattern.search(data):
            hits.append(f"{path} (bytes)")
        if data.startswith(b"SQLite format 3\x00"):
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                    for column in [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]:
                        where = " OR ".join(f'instr(CAST("{column}" AS BLOB), ?) > 0' for _ in ids)
                        found = [v for (v,) in con.execute(f'SELECT "{column}" FROM "{table}" WHERE {where}',
                                                           [i.encode() for i in ids])]
                        if _hits(found, pattern):
                            hits.append(f"{path}:{table}.{column}")
            finally:
                con.close()
        elif path.suffix == ".duckdb":
            con = duckdb.connect(str(path), read_only=True)
            token = "(^|[^A-Za-z0-9_-])(" + "|".join(re.escape(i) for i in ids) + ")($|[^A-Za-z0-9_-])"
            try:
                for table, column in con.execute("SELECT table_name, column_name FROM duckdb_columns() "
                                                 "WHERE NOT internal").fetchall():
                    (n,) = con.execute(f'SELECT count(*) FROM "{table}" WHERE '
                                       f'regexp_matches(CAST("{column}" AS VARCHAR), ?)', [token]).fetchone()
                    if n:
                        hits.append(f"{path}:{table}.{column}")
            finally:
                con.close()
    return hits


def _engage(*args: str, input: str | None = None):
    return CliRunner().invoke(cli_app, list(args), input=input, catch_exceptions=False)


# --- the world ------------------------------------------------------------------------------------------


def _set_env(mp: pytest.MonkeyPatch, world) -> None:
    mp.setenv("ENGAGE_HOME", str(world.home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{world.home / 'mlruns' / 'mlflow.sqlite'}")
    mp.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(world.artifacts))
    mp.setenv("ENGAGE_SERVING_DB_URL", f"sqlite:///{world.home / 'serving' / 'serving.db'}")
    mp.setenv("ENGAGE_API_KEYS", API_KEY)
    for name in ("ENGAGE_PROFILE", "ENGAGE_SUPPRESSION_KEY", "ENGAGE_CONFIG"):
        mp.delenv(name, raising=False)


def _client(home: Path) -> TestClient:
    from serving.app import create_app
    from serving.settings import ServingSettings

    client = TestClient(create_app(ServingSettings.from_env(home, reload_interval_s=0)), raise_server_exceptions=True)
    client.headers["Authorization"] = f"Bearer {API_KEY}"
    return client


def _recommend(client: TestClient, ids: list[str]) -> dict[str, dict]:
    r = client.post("/v1/recommendations/batch", json={"requests": [{"customer_id": c, "now": NOW} for c in ids]})
    assert r.status_code == 200, r.text
    return {res["customer_id"]: res for res in r.json()["results"]}


@pytest.fixture(scope="module")
def world(served, tmp_path_factory):
    """The served world copied, used (answers, feedback, a batch list, a CSV export), then two customers
    forgotten with `engage forget`; the API client started before the forget stays open."""
    from features.snapshots import snapshot_file, snapshot_times_on_disk
    from features.store import sample_customers
    from serving.batch import BatchOptions, score

    root = tmp_path_factory.mktemp("forget")
    home = root / "home"
    shutil.copytree(served.home, home)
    (home / "mlruns").mkdir()
    shutil.copy(served.registry_db, home / "mlruns" / "mlflow.sqlite")
    shutil.copytree(served.artifacts, home / "mlruns" / "artifacts")  # searched too: input examples, MLmodel
    world = SimpleNamespace(home=home, root=root, artifacts=served.artifacts, shared=served.home,
                            src=served.home.parent / "src")
    mp = pytest.MonkeyPatch()
    _set_env(mp, world)
    try:
        customers = sample_customers(home, 40)
        world.client = client = _client(home).__enter__()
        before = _recommend(client, customers)
        acted = [c for c in customers if before[c]["exposure_id"]]
        assert len(acted) >= 3, "the sample needs customers with an action to post feedback for"
        victims, others = acted[:2], [c for c in customers if c not in acted[:2]]
        for c in acted[:3]:
            fb = {"exposure_id": before[c]["exposure_id"], "customer_id": c, "channel": before[c]["channel"],
                  "sent": True, "opened": True}
            assert client.post("/v1/feedback", json=fb).status_code == 200
        client.app.state.service.decisions.flush()

        score(home, BatchOptions(workers=1))  # every customer: a win-back list with their rows
        (home / "exports").mkdir()
        pd.read_parquet(next((home / "scores").glob("*.parquet"))).to_csv(home / "exports" / "winback.csv",
                                                                           index=False)
        assert len(search_home(home, victims)) > 10  # they are everywhere before
        latest = snapshot_file(home, snapshot_times_on_disk(home)[-1])
        shutil.copy2(latest, root / latest.name)  # a backup taken before the forget (outside the home)

        result = _engage("forget", *victims, "--yes")
        world.__dict__.update(before=before, victims=victims, others=others, forget=result, feedback_of=acted[2])
        yield world
    finally:
        if "client" in world.__dict__:
            world.client.__exit__(None, None, None)
        mp.undo()


@pytest.fixture
def env(world, monkeypatch):
    _set_env(monkeypatch, world)
    return world


# --- the forget run ------------------------------------------------------------------------------------


def test_forget_reports_each_store(env):
    out = env.forget.output
    assert env.forget.exit_code == 0, out
    for store in ("serving database (sqlite)", "online store (sqlite)", "warehouse", "feature snapshots",
                  "simulated ground truth", "win-back lists (scores/)", "other table files"):
        assert store in out
    assert "2 added, 0 already listed" in out
    assert not any(v in out for v in env.victims)  # the summary names no one


def test_nothing_of_them_remains_under_the_home(env):
    assert search_home(env.home, env.victims) == []
    shared = pq.read_table(env.shared / "ground_truth.parquet", columns=["customer_id"]).column(0).to_pylist()
    assert set(env.victims) <= set(shared)  # the shared session home was not touched


def test_others_are_kept(env):
    from features import store as fstore

    online = fstore.online_features(fstore.open_store(env.home), "churn", [*env.victims, *env.others[:3]])
    values = online.drop(columns=["customer_id"])
    assert values.iloc[:2].isna().all().all()  # nothing left for the forgotten
    assert values.iloc[2:].notna().any(axis=1).all()  # the others still have features
    with sqlite3.connect(env.home / "serving" / "serving.db") as con:  # a kept customer's feedback is there
        assert con.execute("SELECT count(*) FROM feedback WHERE customer_id = ?", [env.feedback_of]).fetchone()[0]
    assert _customers(env.home) == _customers(env.shared) - 2


def _customers(home: Path) -> int:
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM customers").fetchone()[0]
    finally:
        con.close()


def test_suppression_list_holds_keyed_hashes_only(env):
    key = env.home / "suppression.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    engine = sa.create_engine(f"sqlite:///{env.home / 'serving' / 'serving.db'}")
    try:
        with engine.connect() as con:
            rows = con.exec_driver_sql("SELECT id_hash, key_id FROM suppressions").fetchall()
    finally:
        engine.dispose()
    assert len(rows) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", h) for h, _ in rows)
    assert len({k for _, k in rows}) == 1


def _logged(home: Path, ids) -> int:
    """Decision-log rows of ``ids`` (the serving database under the home)."""
    with sqlite3.connect(home / "serving" / "serving.db") as con:
        return con.execute(f"SELECT count(*) FROM decisions WHERE customer_id IN ({','.join('?' * len(ids))})",
                           list(ids)).fetchone()[0]


def test_running_service_picks_up_the_list_on_its_registry_check(env):
    service = env.client.app.state.service
    answers = _recommend(env.client, env.victims)  # started before the forget: still the old list
    assert {a["reason"] for a in answers.values()} != {"suppressed"}
    service.decisions.flush()
    assert _logged(env.home, env.victims) == 2  # answers of that window are logged (README says so) ...
    assert env.client.post("/v1/admin/reload").status_code == 200  # the periodic check's code path
    answers = _recommend(env.client, [*env.victims, env.others[0]])
    for c in env.victims:
        assert (answers[c]["action"], answers[c]["reason"]) == ("none", "suppressed")
        assert answers[c]["exposure_id"] is None and answers[c]["offers"] == []
    assert answers[env.others[0]]["reason"] != "suppressed"
    service.decisions.flush()
    assert _logged(env.home, env.victims) == 2  # suppressed answers are not logged

    # ... and the same forget again removes them; nothing else is left to remove (it is idempotent)
    result = _engage("forget", *env.victims, "--yes")
    assert result.exit_code == 0, result.output
    assert "0 added, 2 already listed" in result.output and "2 rows/keys removed" in result.output
    assert "decisions 2, feedback 0" in result.output
    assert search_home(env.home, env.victims) == []


def test_a_new_service_answers_suppressed_and_logs_nothing_of_them(env):
    with _client(env.home) as client:
        answers = _recommend(client, [*env.victims, *env.others[:10]])
        for c in env.victims:
            assert (answers[c]["action"], answers[c]["reason"]) == ("none", "suppressed")
            assert answers[c]["churn_probability"] is None
        for c in env.others[:10]:  # everyone else scored as before
            assert answers[c]["reason"] != "suppressed" and not answers[c]["cold_start"]
            assert answers[c]["churn_probability"] == env.before[c]["churn_probability"]
        fb = {"exposure_id": env.before[env.victims[0]]["exposure_id"], "customer_id": env.victims[0],
              "channel": env.before[env.victims[0]]["channel"], "sent": True}
        assert client.post("/v1/feedback", json=fb).status_code == 404  # its decision is gone
        client.app.state.service.decisions.flush()
        assert _logged(env.home, env.others[:10]) >= 10 and _logged(env.home, env.victims) == 0


def test_batch_scoring_skips_them_even_from_a_stale_snapshot(env):
    from features.snapshots import snapshot_file, snapshot_times_on_disk
    from serving.batch import BatchOptions, score

    latest = snapshot_file(env.home, snapshot_times_on_disk(env.home)[-1])
    stale = env.root / latest.name
    shutil.copy2(stale, latest)  # restored from the backup taken before the forget
    out = env.home / "scores" / "after.parquet"
    summary = score(env.home, BatchOptions(out=out, workers=1))
    listed = pq.read_table(out).column("customer_id").to_pylist()
    assert not set(env.victims) & set(listed)
    assert summary.scored == len(listed) == pq.read_metadata(stale).num_rows - 2
    kept = pq.read_table(latest, columns=["customer_id"]).column(0).to_pylist()
    assert not set(env.victims) & set(kept)  # the stale snapshot was cleaned before scoring
    assert _logged(env.home, env.victims) == 0  # and nothing of them reached the decision log


def test_reingest_of_the_original_files_does_not_bring_them_back(env):
    result = _engage("ingest", str(env.src))
    assert result.exit_code == 0, result.output
    assert "forgotten" in result.output  # counted, without ids
    assert not any(v in result.output for v in env.victims)
    assert _customers(env.home) == _customers(env.shared) - 2
    assert search_home(env.home, env.victims) == []  # the final state, after every test above


# --- bad input, unknown ids, leftovers (a tiny home, no Feast) ---------------------------------------------


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The factories' contract folder (customers C1, C2, C3) loaded into a home with no online store."""
    src = write_contract(tmp_path / "src")
    home = tmp_path / "engage_home"
    monkeypatch.setenv("ENGAGE_HOME", str(home))
    monkeypatch.delenv("ENGAGE_SERVING_DB_URL", raising=False)
    monkeypatch.delenv("ENGAGE_SUPPRESSION_KEY", raising=False)
    monkeypatch.delenv("ENGAGE_PROFILE", raising=False)
    assert _engage("ingest", str(src)).exit_code == 0
    return SimpleNamespace(home=home, src=src)


def _suppressed_count(home: Path) -> int:
    db = home / "serving" / "serving.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        has = con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'suppressions'").fetchone()[0]
        return con.execute("SELECT count(*) FROM suppressions").fetchone()[0] if has else 0


def test_unknown_id_is_refused_and_changes_nothing(tiny):
    result = _engage("forget", "C1", "NOBODY", "--yes")
    assert result.exit_code == 2
    assert "unknown customer id: NOBODY" in result.output and "--allow-unknown" in result.output
    assert _suppressed_count(tiny.home) == 0
    assert search_home(tiny.home, ["C1"])  # C1 was not forgotten either


def test_allow_unknown_suppresses_an_id_before_it_is_ever_loaded(tiny):
    customers = pd.DataFrame({"customer_id": ["C9"], "signup_at": ["2025-01-01T00:00:00Z"]})
    events = pd.DataFrame({"customer_id": ["C9", "C9"], "event_at": ["2025-02-01T00:00:00Z", "bad"],
                           "event_type": ["purchase", "session"], "amount": ["5", ""]})
    later = write_contract(tiny.home.parent / "later", customers=customers, events=events, offers=None,
                           exposures=None)
    result = _engage("forget", "C9", "--yes", "--allow-unknown")
    assert result.exit_code == 0, result.output
    assert "1 unknown to every store" in result.output
    result = _engage("ingest", str(later))
    assert result.exit_code == 0, result.output
    assert "forgotten" in result.output
    assert search_home(tiny.home, ["C9"]) == []  # not loaded, and its bad row is not in rejects


@pytest.mark.parametrize("args, message", [
    ((), "no customer ids given"),
    (("  ", "--from-file", "{empty}"), "no customer ids given"),
    (("--from-file", "{missing}"), "cannot read the id file"),
    (("--from-file", "{folder}"), "cannot read the id file"),
    (("--from-file", "{binary}"), "cannot read the id file"),
])
def test_bad_input_is_a_clear_error(tiny, tmp_path, args, message):
    files = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "missing.txt", "folder": tmp_path,
             "binary": tmp_path / "ids.bin"}
    files["empty"].write_text("# nobody\n\n")
    files["binary"].write_bytes(b"\xff\xfe\x00C1")
    result = _engage("forget", *(a.format(**files) for a in args), "--yes")
    assert result.exit_code == 2
    assert message in result.output
    assert _suppressed_count(tiny.home) == 0


def test_forget_asks_for_confirmation_without_yes(tiny):
    result = _engage("forget", "C1")
    assert result.exit_code == 2 and "--yes" in result.output
    assert search_home(tiny.home, ["C1"])


def test_ids_from_a_file_and_text_files_it_does_not_edit(tiny, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# requests of this week\nC2\n\n  C3  \n")
    (tiny.home / "notes").mkdir()
    (tiny.home / "notes" / "ticket.json").write_text(json.dumps({"customer": "C2", "asked": "2026-01-02"}))
    (tiny.home / "notes" / "other.txt").write_text("C22 is someone else\n")
    result = _engage("forget", "--from-file", str(ids), "--yes")
    assert result.exit_code == 1
    assert "still found" in result.output and "ticket.json" in result.output and "other.txt" not in result.output
    assert "2 added" in result.output
    assert search_home(tiny.home, ["C2", "C3"]) == [f"{tiny.home / 'notes' / 'ticket.json'} (bytes)"]
    assert search_home(tiny.home, ["C1"])


# --- the production profile: Redis online store ----------------------------------------------------------


def _redis_customers(client, claim: bytes) -> set[str]:
    """The customer of every key in the db: Feast's key is the serialized entity key + the project name."""
    from feast.infra.key_encoding_utils import deserialize_entity_key

    out = set()
    for key in client.scan_iter(count=1000):
        if key == claim:
            continue
        assert key.endswith(b"engage"), key
        entity = deserialize_entity_key(key[: -len(b"engage")], entity_key_serialization_version=3)
        assert list(entity.join_keys) == ["customer_id"]
        out.add(entity.entity_values[0].string_val)
    return out


@pytest.mark.needs_service
def test_production_profile_removes_their_redis_keys(served, redis_db, pg_database, tmp_path, monkeypatch):
    from features.snapshots import snapshot_file, snapshot_times_on_disk
    from serving.servingdb import create_serving_engine, feedback

    home = tmp_path / "home"
    latest = snapshot_times_on_disk(served.home)[-1]
    snap = pq.read_table(snapshot_file(served.home, latest))
    snap = snap.slice(0, 60)  # a small online store: 60 customers are enough to tell keys apart
    snapshot_file(home, latest).parent.mkdir(parents=True)
    pq.write_table(snap, snapshot_file(home, latest))
    shutil.copy(served.home / "warehouse.duckdb", home / "warehouse.duckdb")
    customers = snap.column("customer_id").to_pylist()
    victims, others = customers[:2], customers[2:]
    for k, v in {"ENGAGE_HOME": str(home), "ENGAGE_PROFILE": "production", "ENGAGE_REDIS_URL": redis_db.url,
                 "ENGAGE_POSTGRES_URL": pg_database.url}.items():
        monkeypatch.setenv(k, v)
    for name in ("ENGAGE_SERVING_DB_URL", "ENGAGE_SUPPRESSION_KEY"):
        monkeypatch.delenv(name, raising=False)

    apply_and_materialize(home)
    assert _redis_customers(redis_db.client, redis_db.claim) == set(customers)
    engine = create_serving_engine(pg_database.url.replace('postgresql://', 'postgresql+psycopg://'))
    try:
        with engine.begin() as c:
            c.execute(feedback.insert(), [{"exposure_id": f"x-{cid}", "customer_id": cid, "sent": True,
                                           "received_at": "2026-01-01T00:00:00Z",
                                           "updated_at": "2026-01-01T00:00:00Z"} for cid in customers[:4]])

        result = _engage("--profile", "production", "forget", *victims, "--yes")
        assert result.exit_code == 0, result.output
        assert "online store (redis)" in result.output and "serving database (postgresql)" in result.output

        assert _redis_customers(redis_db.client, redis_db.claim) == set(others)  # scanned and decoded
        with engine.connect() as c:
            kept = set(c.execute(sa.select(feedback.c.customer_id)).scalars())
            hashes = c.exec_driver_sql("SELECT id_hash FROM suppressions").scalars().all()
        assert kept == set(customers[2:4]) and len(hashes) == 2 and not set(hashes) & set(victims)
        assert search_home(home, victims) == []
        assert pa.types.is_string(pq.read_schema(snapshot_file(home, latest)).field("customer_id").type)
    finally:
        engine.dispose()
