"""`engage retrain`: snapshot, Feast, train all with the gate, and the reload of a scoring service running on
loopback (a real uvicorn server over HTTP); the reload's failure modes and bad input."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from engage.cli import app

runner = CliRunner()
KEY = "retrain-test-key-0123456789"
# A world without exposures: `train all` trains churn and skips the two models that learn from the campaign log,
# which keeps this end-to-end run small. A 30-day horizon and 8 snapshots fit its 200 days.
CONFIG = "training:\n  horizon_days: 30\n  max_snapshots: 8\n  num_boost_round: 100\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A loaded world, its MLflow store, and `engage serve`'s app on a loopback port (no champion yet)."""
    import uvicorn

    from features.load import ingest
    from features.simulate import simulate
    from serving.app import create_app
    from serving.settings import ServingSettings

    root = tmp_path_factory.mktemp("retrain")
    src, home = root / "src", root / "home"
    simulate(600, 200, 5, src, progress=False)
    (src / "exposures.parquet").unlink()
    ingest(src, home)
    (home / "engage.yaml").write_text(CONFIG)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns.sqlite'}")
    mp.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(root / "artifacts"))
    mp.setenv("ENGAGE_API_KEYS", KEY)
    mp.delenv("ENGAGE_CONFIG", raising=False)
    mp.delenv("ENGAGE_SERVICE_URL", raising=False)
    settings = ServingSettings(home=home, api_keys=[KEY], serving_db_url=f"sqlite:///{root / 'serving.db'}",
                               reload_interval_s=0)  # only POST /v1/admin/reload moves it
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the scoring service did not start"
        yield SimpleNamespace(home=home, url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        mp.undo()


def _served(env) -> dict[str, str]:
    response = httpx.get(f"{env.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 200
    return {m["name"]: m["version"] for m in response.json()["models"]}


def test_retrain_trains_gates_and_reloads_the_running_service(env):
    from features.snapshots import snapshot_times_on_disk
    from features.store import online_features, open_store, sample_customers

    assert _served(env) == {}
    result = runner.invoke(app, ["retrain", "--home", str(env.home), "--service-url", env.url])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "churn version 1 -> champion: first version of this model" in out
    assert "skipped next_best_offer" in out and "skipped send_time" in out  # no exposures: said, not failed
    assert "moved: churn champion (none) -> v1" in out
    assert f"reloaded: the service at {env.url} now serves churn v1" in out
    assert _served(env) == {"churn": "1"}  # without waiting for a registry check (reload_interval_s=0)
    # The snapshot at the as-of time was built and materialized: the online store answers for a customer.
    last = snapshot_times_on_disk(env.home)[-1]
    assert f"snapshot at {last:%Y-%m-%d %H:%M:%S}Z" in out
    row = online_features(open_store(env.home), "churn", sample_customers(env.home, 1))
    assert row["orders_lifetime"].notna().all()


def test_reload_only_when_moved_and_its_failures(env):
    from training.retrain import EXIT_NOT_RELOADED, reload_if_moved

    moved = {"churn": (None, "1")}
    lines, code = reload_if_moved({}, env.url, KEY, True)
    assert (lines, code) == (["no champion moved: nothing to reload"], 0)
    lines, code = reload_if_moved(moved, None, KEY, True)
    assert code == 0 and "no service URL configured" in lines[-1] and "skipping the reload" in lines[-1]
    lines, code = reload_if_moved(moved, env.url, "not-the-key-0123456789", True)
    assert code == EXIT_NOT_RELOADED == 4 and "refused the API key" in lines[-1]
    nobody = f"http://127.0.0.1:{_free_port()}"
    lines, code = reload_if_moved(moved, nobody, KEY, True)
    assert code == 4 and lines[-1].startswith("warning: reload failed") and "unreachable" in lines[-1]
    lines, code = reload_if_moved(moved, nobody, KEY, False)  # a warning, not a failure, by default
    assert code == 0 and "unreachable" in lines[-1]
    lines, code = reload_if_moved(moved, env.url + "/", KEY, True)
    assert code == 0 and lines[-1].startswith("reloaded:")


@pytest.mark.parametrize(("args", "message"), [
    (["--as-of", "2031-01-01"], "outside the data"),
    (["--as-of", "next week"], "is not a timestamp"),
])
def test_bad_as_of_fails_clearly_and_builds_nothing(env, args, message):
    from features.snapshots import snapshot_times_on_disk

    before = snapshot_times_on_disk(env.home)
    result = runner.invoke(app, ["retrain", "--home", str(env.home), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert snapshot_times_on_disk(env.home) == before


def test_no_data_fails_clearly(env, tmp_path: Path):
    result = runner.invoke(app, ["retrain", "--home", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no data loaded" in result.output
