"""The scoring API in-process (TestClient over the real app, models, Feast store and serving database)."""

from __future__ import annotations

import sqlite3
import sys
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from features.store import sample_customers
from serving.app import create_app
from serving.settings import ServingSettings

NOW = "2026-01-05T12:00:00Z"


@pytest.fixture
def settings(serving_env) -> ServingSettings:
    return ServingSettings.from_env(serving_env.home, reload_interval_s=0)


@pytest.fixture
def client(settings, serving_env):
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        yield c


@pytest.fixture(scope="module")
def customers(served) -> list[str]:
    return sample_customers(served.home, 30)


def _metric(client, sample: str) -> float:
    """The value of one sample line of /metrics (0 when absent). Values are shared by every app in this
    process (multiprocess mode, see serving/metrics.py), so tests compare before and after."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _recommend(client, customer_id: str, **body):
    return client.post("/v1/recommendations", json={"customer_id": customer_id, "now": NOW, **body})


# ---- auth -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer wrong-key-0123456789abcdef", "Basic abc", "Bearer "])
def test_v1_endpoints_need_a_valid_api_key(client, customers, header):
    client.headers.pop("Authorization")
    headers = {"Authorization": header} if header else {}
    for method, path, body in (("post", "/v1/recommendations", {"customer_id": customers[0]}),
                               ("post", "/v1/recommendations/batch", {"requests": [{"customer_id": customers[0]}]}),
                               ("post", "/v1/feedback", {}), ("get", "/v1/models", None),
                               ("post", "/v1/admin/reload", None)):
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"] == "unauthorized"


def test_health_endpoints_need_no_key(client):
    client.headers.pop("Authorization")
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and set(ready.json()["models"]) == {"churn", "next_best_offer", "send_time"}
    assert "engage_requests_total" in client.get("/metrics").text


def test_settings_refuse_missing_or_short_keys(serving_env, monkeypatch):
    monkeypatch.setenv("ENGAGE_API_KEYS", "")
    with pytest.raises(ValueError, match="no API key"):
        ServingSettings.from_env(serving_env.home)
    monkeypatch.setenv("ENGAGE_API_KEYS", "short")
    with pytest.raises(ValueError, match="at least 16"):
        ServingSettings.from_env(serving_env.home)


def test_settings_read_the_flush_period_from_the_environment_and_refuse_bad_ones(serving_env, monkeypatch):
    monkeypatch.setenv("ENGAGE_DECISION_FLUSH_S", "1.5")
    assert ServingSettings.from_env(serving_env.home).decision_flush_s == 1.5
    for bad in ("0", "-1", "61", "soon"):
        monkeypatch.setenv("ENGAGE_DECISION_FLUSH_S", bad)
        with pytest.raises(ValueError, match="decision_flush_s"):
            ServingSettings.from_env(serving_env.home)


def test_settings_read_the_thread_switch_interval_and_refuse_bad_ones(serving_env, monkeypatch):
    assert ServingSettings.from_env(serving_env.home).gil_switch_ms == 1.0
    monkeypatch.setenv("ENGAGE_GIL_SWITCH_MS", "0.5")
    assert ServingSettings.from_env(serving_env.home).gil_switch_ms == 0.5
    for bad in ("0", "0.05", "-1", "101", "fast"):
        monkeypatch.setenv("ENGAGE_GIL_SWITCH_MS", bad)
        with pytest.raises(ValueError, match="gil_switch_ms"):
            ServingSettings.from_env(serving_env.home)


def test_the_service_runs_with_its_switch_interval_and_gives_the_old_one_back(serving_env):
    before = sys.getswitchinterval()
    settings = ServingSettings.from_env(serving_env.home, reload_interval_s=0, gil_switch_ms=0.7)
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        assert sys.getswitchinterval() == pytest.approx(0.0007)
    assert sys.getswitchinterval() == before


# ---- recommendations ------------------------------------------------------------------------------

def test_recommendation_answers_every_question(client, customers):
    r = _recommend(client, customers[0], max_offers=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["customer_id"] == customers[0] and body["request_id"]
    assert 0.0 <= body["churn_probability"] <= 1.0
    assert body["risk_tier"] in {"low", "medium", "high"}
    assert body["segment"] in {"high_value", "potential", "new", "at_risk", "dormant"}
    assert body["action"] in {"winback", "retain", "nurture", "upsell", "none"}
    assert body["model_versions"] == {"churn": "1", "next_best_offer": "1", "send_time": "1"}
    assert len(body["offers"]) <= 2
    for offer in body["offers"]:
        assert offer["uplift"] == pytest.approx(offer["p_convert_with"] - offer["p_convert_without"])
    eligible = [o["priority"] for o in body["offers"] if o["eligible"]]
    assert eligible == sorted(eligible, reverse=True)
    assert body["cold_start"] is False and body["degraded"] is False
    if body["action"] != "none":
        assert body["exposure_id"] and body["channel"]
        send_at = datetime.fromisoformat(body["send_at"])
        local = datetime.fromisoformat(body["send_at_local"])
        assert send_at == local and send_at >= datetime.fromisoformat(NOW)
        assert not (local.hour >= 21 or local.hour < 8), "default quiet hours are 21:00-08:00 local"


def test_quiet_hours_hold_across_customers_and_timezones(client, customers):
    seen_zones = set()
    for cid in customers:
        body = _recommend(client, cid).json()
        if body["action"] == "none":
            assert body["reason"], body
            continue
        local = datetime.fromisoformat(body["send_at_local"])
        seen_zones.add(local.utcoffset())
        assert 8 <= local.hour < 21
        assert local == datetime.fromisoformat(body["send_at"]).astimezone(local.tzinfo)
    assert len(seen_zones) > 1, "the sample should span several timezones"


def test_unknown_customer_gets_a_cold_start_answer(client):
    before = _metric(client, "engage_cold_starts_total")
    body = _recommend(client, "never-seen-customer").json()
    assert body["cold_start"] is True and body["degraded"] is False
    assert body["segment"] == "new" and body["churn_probability"] is None and body["reason_codes"] == []
    assert body["feature_timestamp"] is None
    assert _metric(client, "engage_cold_starts_total") == before + 1


def test_batch_answers_each_customer_like_single_calls(client, customers):
    ids = customers[:5] + ["never-seen-customer"]
    r = client.post("/v1/recommendations/batch", json={"requests": [{"customer_id": c, "now": NOW} for c in ids]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["customer_id"] for x in results] == ids
    for cid, batch in zip(ids, results, strict=True):
        single = _recommend(client, cid).json()
        for key in ("churn_probability", "risk_tier", "segment", "reason_codes", "cold_start"):
            assert batch[key] == single[key], key
        assert [o["offer_id"] for o in batch["offers"]] == [o["offer_id"] for o in single["offers"]]


def test_batch_over_the_limit_is_413(client, customers):
    r = client.post("/v1/recommendations/batch", json={"requests": [{"customer_id": customers[0]}] * 1001})
    assert r.status_code == 413 and "at most 1000" in r.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({}, "customer_id"),
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "   "}, "customer_id"),
    ({"customer_id": "x" * 65}, "customer_id"),
    ({"customer_id": 42}, "customer_id"),
    ({"customer_id": "C1", "channels": ["fax"]}, "channels.0"),
    ({"customer_id": "C1", "channels": []}, "channels"),
    ({"customer_id": "C1", "channels": ["email", "email"]}, "channels"),
    ({"customer_id": "C1", "now": "yesterday"}, "now"),
    ({"customer_id": "C1", "now": "9999-12-31T23:59:59Z"}, "now"),
    ({"customer_id": "C1", "max_offers": -1}, "max_offers"),
    ({"customer_id": "C1", "max_offers": 11}, "max_offers"),
    ({"customer_id": "C1", "max_offers": "three"}, "max_offers"),
    ({"customer_id": "C1", "colour": "red"}, "colour"),
])
def test_bad_recommendation_bodies_name_the_field(client, body, field):
    r = client.post("/v1/recommendations", json=body)
    assert r.status_code == 422, r.text
    assert field in [d["field"] for d in r.json()["detail"]], r.json()


def test_malformed_json_and_wrong_shapes_are_4xx_without_traces(client):
    r = client.post("/v1/recommendations", content=b'{"customer_id": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text
    assert client.post("/v1/recommendations", json=["C1"]).status_code == 422
    assert client.post("/v1/recommendations/batch", json={"requests": []}).status_code == 422
    assert client.post("/v1/recommendations/batch", json={"requests": "C1"}).status_code == 422


def test_requested_channels_are_the_only_candidates(client, customers):
    for cid in customers[:10]:
        body = _recommend(client, cid, channels=["in_app"]).json()
        assert body["channel"] in (None, "in_app")
        assert {c["channel"] for c in body["channels"]} <= {"in_app"}


def test_naive_now_is_utc(settings, serving_env, customers, tmp_path):
    # Exploration off: with it, each request draws on its own request id and may explore to another offer,
    # hence another channel and send time, whatever the clock says.
    policy = tmp_path / "policy.yaml"
    policy.write_text("exploration: {epsilon: 0.0}\n")
    ids = ("request_id", "exposure_id")
    with TestClient(create_app(settings.model_copy(update={"policy_path": policy}))) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        answers = [(_recommend(c, cid, now="2026-01-05T12:00:00").json(),
                    _recommend(c, cid, now="2026-01-05T13:00:00+01:00").json()) for cid in customers[:5]]
    assert any(a["send_at"] is not None for a, _ in answers)
    for a, b in answers:
        assert {k: v for k, v in a.items() if k not in ids} == {k: v for k, v in b.items() if k not in ids}


# ---- degraded, reload, not ready ------------------------------------------------------------------

def _online_db(home) -> sqlite3.Connection:
    return sqlite3.connect(home / "feast" / "online_store.db")


def test_unreadable_online_store_gives_degraded_answers_then_recovers(client, customers, serving_env):
    con = _online_db(serving_env.home)
    tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'") if "rfm" in t]
    assert tables
    before = _metric(client, "engage_degraded_answers_total")
    con.execute(f'ALTER TABLE "{tables[0]}" RENAME TO hidden_for_test')
    con.commit()
    try:
        r = _recommend(client, customers[0])
        assert r.status_code == 200
        assert r.json()["degraded"] is True and r.json()["cold_start"] is False
        assert _metric(client, "engage_degraded_answers_total") == before + 1
    finally:
        con.execute(f'ALTER TABLE hidden_for_test RENAME TO "{tables[0]}"')
        con.commit()
        con.close()
    assert _recommend(client, customers[0]).json()["degraded"] is False


def _add_version(serving_env, name: str, source: str | None = None) -> str:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{serving_env.registry_db}")
    champ = c.get_model_version_by_alias(name, "champion")
    mv = c.create_model_version(name, source or champ.source, run_id=champ.run_id, tags=champ.tags)
    return str(mv.version)


def test_reload_picks_up_a_newly_promoted_model(client, customers, serving_env):
    from training.registry import promote

    new = _add_version(serving_env, "churn")
    before = _recommend(client, customers[0]).json()
    assert before["model_versions"]["churn"] == "1"
    promote("churn", new)
    r = client.post("/v1/admin/reload").json()
    assert r == {"changed": True, "error": None, "versions": {"churn": new, "next_best_offer": "1", "send_time": "1"}}
    after = _recommend(client, customers[0]).json()
    assert after["model_versions"]["churn"] == new
    assert after["churn_probability"] == pytest.approx(before["churn_probability"])  # same model, new version
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["churn"]["version"] == new and models["churn"]["feature_service"] == "churn"


def test_failed_reload_keeps_serving_the_last_good_models(client, customers, serving_env, tmp_path):
    from training.registry import promote

    before = _metric(client, 'engage_model_reloads_total{result="failed"}')
    broken = _add_version(serving_env, "send_time", source=str(tmp_path / "no-such-model"))
    promote("send_time", broken)
    r = client.post("/v1/admin/reload").json()
    assert r["changed"] is False and r["error"] and r["versions"]["send_time"] == "1"
    assert _recommend(client, customers[0]).json()["model_versions"]["send_time"] == "1"
    assert client.get("/v1/models").json()["last_error"]
    assert _metric(client, 'engage_model_reloads_total{result="failed"}') == before + 1


def test_periodic_check_reloads_by_itself(serving_env, customers):
    from serving.models import wait_until
    from training.registry import promote

    settings = ServingSettings.from_env(serving_env.home, reload_interval_s=0.2)
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        promote("churn", _add_version(serving_env, "churn"))
        assert wait_until(lambda: c.get("/v1/models").json()["models"][0]["version"] == "2", 10)


def test_no_models_means_not_ready_and_503(serving_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with TestClient(create_app(ServingSettings.from_env(serving_env.home, reload_interval_s=0))) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "no models loaded" in ready.json()["detail"]
        r = c.post("/v1/recommendations", json={"customer_id": "C1"})
        assert r.status_code == 503 and r.json()["error"] == "not_ready" and "engage train" in r.json()["detail"]


# ---- feature freshness and partial model sets -----------------------------------------------------

def test_answers_say_how_old_their_features_are_and_old_views_are_dropped(client, customers):
    fresh = _recommend(client, customers[0]).json()
    stamp = datetime.fromisoformat(fresh["feature_timestamp"])
    assert fresh["stale_features"] is False and fresh["stale_views"] == []
    assert 0 < fresh["feature_age_seconds"] <= (datetime.fromisoformat(NOW) - stamp).total_seconds() + 1e-6
    before = _metric(client, "engage_stale_answers_total")
    # 40 days later every view is past the default limit (the views' Feast TTL, 35 days): scored without them
    later = (stamp + timedelta(days=40)).isoformat()
    old = _recommend(client, customers[0], now=later).json()
    assert old["stale_features"] is True and len(old["stale_views"]) >= 5 and "customer_rfm" in old["stale_views"]
    assert old["cold_start"] is False and old["feature_age_seconds"] is None
    assert old["segment"] == "new" and old["churn_probability"] is not None  # the missing-feature defaults
    assert _metric(client, "engage_stale_answers_total") == before + 1


def test_a_view_limit_from_the_config_drops_that_view_only(serving_env, customers, tmp_path, monkeypatch):
    config = tmp_path / "engage.yaml"
    config.write_text("serving:\n  feature_max_age_days: {customer_support: 0.5}\n")
    monkeypatch.setenv("ENGAGE_CONFIG", str(config))
    with TestClient(create_app(ServingSettings.from_env(serving_env.home, reload_interval_s=0))) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        body = _recommend(c, customers[0]).json()  # NOW is days after the features: support is stale
        assert body["stale_features"] is True and body["stale_views"] == ["customer_support"]
        stamp = datetime.fromisoformat(body["feature_timestamp"])
        early = _recommend(c, customers[0], now=(stamp + timedelta(hours=1)).isoformat()).json()
        assert early["stale_features"] is False and early["feature_age_seconds"] == pytest.approx(3600)
        # the other views still answer: same segment (customer_rfm), a churn score from the rest
        assert body["segment"] == early["segment"] and body["churn_probability"] is not None
    config.write_text("serving:\n  feature_max_age_days: {customer_sport: 2}\n")
    from engage.config import ConfigError
    from serving.service import EngageService

    with pytest.raises(ConfigError, match="unknown feature view.*customer_sport"):
        EngageService(ServingSettings.from_env(serving_env.home, reload_interval_s=0))


def test_serve_prints_an_example_that_answers_from_fresh_features(client, serving_env, capsys, tmp_path,
                                                                   monkeypatch):
    import json
    import re

    from serving.cli import _print_example

    settings = ServingSettings.from_env(serving_env.home)
    _print_example(settings, "127.0.0.1", 8000)
    body = json.loads(re.search(r"-d '(\{.*?\})'", capsys.readouterr().out).group(1))
    assert "now" in body  # the test world's features are from long before today: ask as of then
    answer = client.post("/v1/recommendations", json=body).json()
    assert answer["stale_features"] is False and answer["cold_start"] is False
    config = tmp_path / "engage.yaml"
    config.write_text("serving:\n  feature_max_age_days: {default: 100000}\n")
    monkeypatch.setenv("ENGAGE_CONFIG", str(config))
    _print_example(settings, "127.0.0.1", 8000)
    body = json.loads(re.search(r"-d '(\{.*?\})'", capsys.readouterr().out).group(1))
    assert set(body) == {"customer_id"}  # features within their limit: no date needed


def test_answers_keep_coming_while_a_materialization_runs(client, customers, serving_env):
    import threading

    from features.store import materialize, open_store

    done, errors = threading.Event(), []

    def run() -> None:
        try:  # the same latest snapshot again, in small batches so it lasts
            materialize(open_store(serving_env.home), serving_env.home, batch_rows=50)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=run)
    writer.start()
    answers = []
    while not done.is_set() or not answers:
        answers.append(_recommend(client, customers[len(answers) % len(customers)]))
    writer.join()
    assert not errors, errors
    assert len(answers) > 3 and all(r.status_code == 200 for r in answers)
    assert not any(r.json()["degraded"] or r.json()["cold_start"] for r in answers)


def test_a_churn_only_model_set_still_answers_and_says_what_is_missing(serving_env, customers):
    from serving.service import registry_client

    registry = registry_client()
    for name in ("next_best_offer", "send_time"):
        registry.delete_registered_model_alias(name, "champion")
    with TestClient(create_app(ServingSettings.from_env(serving_env.home, reload_interval_s=0))) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        answers = [_recommend(c, cid).json() for cid in customers]
    assert all(a["missing_models"] == ["next_best_offer", "send_time"] for a in answers)
    assert all(a["model_versions"] == {"churn": "1"} and a["offers"] == [] and a["chosen_offer"] is None
               for a in answers)
    assert all(a["churn_probability"] is not None and a["reason_codes"] for a in answers)
    timed = [a for a in answers if a["action"] != "none"]
    assert timed and all(datetime.fromisoformat(a["send_at_local"]).hour == 10 for a in timed)  # policy default


# ---- feedback and the decision log ----------------------------------------------------------------

def _sent(customer_id: str, exposure_id: str, channel: str, **extra) -> dict:
    return {"exposure_id": exposure_id, "customer_id": customer_id, "channel": channel, "sent": True,
            "sent_at": "2026-01-05T18:00:00Z", **extra}


def _an_action(client, customers) -> dict:
    for cid in customers:
        body = _recommend(client, cid).json()
        if body["action"] != "none":
            return body
    raise AssertionError("no customer in the sample got an action")


def test_feedback_is_stored_once_and_merges(client, customers, serving_env):
    rec = _an_action(client, customers)
    fb = _sent(rec["customer_id"], rec["exposure_id"], rec["channel"], offer_id=rec["chosen_offer"])
    first = client.post("/v1/feedback", json=fb)
    assert first.status_code == 200, first.text
    assert first.json() == {"exposure_id": rec["exposure_id"], "stored": True, "duplicate": False}
    again = client.post("/v1/feedback", json={**fb, "opened": True, "opened_at": "2026-01-05T19:00:00Z",
                                              "converted": True, "revenue": 42.5})
    assert again.json()["duplicate"] is True
    engine = sa.create_engine(serving_env.serving_db)
    with engine.connect() as con:
        rows = con.execute(sa.text("SELECT sent, opened, converted, revenue, propensity FROM feedback "
                                   "WHERE exposure_id = :e"), {"e": rec["exposure_id"]}).all()
    assert len(rows) == 1
    assert tuple(rows[0])[:4] == (1, 1, 1, 42.5) and rows[0][4] == pytest.approx(rec["propensity"])


@pytest.mark.parametrize("change, status", [
    ({"exposure_id": "not-an-exposure"}, 404),
    ({"customer_id": "someone-else"}, 409),
    ({"sent": False, "converted": True}, 422),
    ({"sent": False, "opened": True}, 422),
    ({"revenue": -1}, 422),
    ({"revenue": 10.0}, 422),  # revenue without a conversion
    ({"channel": "fax"}, 422),
    ({"exposure_id": ""}, 422),
])
def test_bad_feedback_is_refused_and_nothing_stored(client, customers, serving_env, change, status):
    rec = _an_action(client, customers)
    fb = {**_sent(rec["customer_id"], rec["exposure_id"], rec["channel"]), **change}
    r = client.post("/v1/feedback", json=fb)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    with sa.create_engine(serving_env.serving_db).connect() as con:
        assert con.execute(sa.text("SELECT count(*) FROM feedback")).scalar() == 0


def test_every_answer_is_in_the_decision_log(settings, serving_env, customers):
    app = create_app(settings)
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        singles = [_recommend(c, cid).json() for cid in customers[:4]]
        batch = c.post("/v1/recommendations/batch", json={"requests": [{"customer_id": x} for x in customers[4:7]]})
    # leaving the client ran the lifespan's shutdown, which flushes the log
    with sa.create_engine(serving_env.serving_db).connect() as con:
        rows = con.execute(sa.text("SELECT request_id, customer_id, exposure_id, action, source, model_versions "
                                   "FROM decisions")).all()
    assert len(rows) == 7
    by_customer = {r.customer_id: r for r in rows}
    for s in singles:
        row = by_customer[s["customer_id"]]
        assert (row.request_id, row.exposure_id, row.action, row.source) == (
            s["request_id"], s["exposure_id"], s["action"], "api")
    assert {r.source for r in rows if r.request_id == batch.json()["request_id"]} == {"batch_api"}


def test_openapi_documents_the_v1_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/recommendations", "/v1/recommendations/batch", "/v1/feedback", "/v1/models",
            "/v1/admin/reload", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]


def test_send_at_is_the_next_slot_at_the_local_hour(client, customers):
    for cid in customers[:10]:
        body = _recommend(client, cid).json()
        if body["action"] == "none":
            continue
        now = datetime.fromisoformat(NOW)
        send_at = datetime.fromisoformat(body["send_at"])
        assert send_at.tzinfo is not None and send_at.utcoffset().total_seconds() == 0
        assert now <= send_at <= now + timedelta(hours=25), "the next slot at a local hour is within a day"


def test_holdout_members_get_none_and_the_log_records_the_assignment(serving_env, customers, tmp_path, monkeypatch):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("holdout:\n  share: 0.5\n  salt: api-test\n")
    monkeypatch.setenv("ENGAGE_POLICY", str(policy_file))
    from serving.policy import load_policy

    members = {c for c in customers if load_policy(policy_file).holdout.contains(c)}
    assert 0 < len(members) < len(customers)
    with TestClient(create_app(ServingSettings.from_env(serving_env.home, reload_interval_s=0))) as c:
        c.headers["Authorization"] = f"Bearer {serving_env.api_key}"
        answers = c.post("/v1/recommendations/batch",
                         json={"requests": [{"customer_id": x, "now": NOW} for x in customers]}).json()["results"]
    for a in answers:
        if a["customer_id"] in members:
            assert (a["action"], a["reason"], a["holdout"], a["exposure_id"]) == ("none", "holdout", True, None)
            assert a["intended_action"] in ("winback", "retain", "nurture", "upsell", "none")
            assert a["chosen_offer"] is None and a["send_at"] is None
        else:
            assert a["holdout"] is False and a["reason"] != "holdout" and a["intended_action"] is None
    assert any(a["intended_action"] not in (None, "none") for a in answers)  # the group would have been acted on
    with sa.create_engine(serving_env.serving_db).connect() as con:
        logged = dict(con.execute(sa.text("SELECT customer_id, holdout FROM decisions")).all())
    assert {c for c, held in logged.items() if held} == members
