"""One real uvicorn process (`engage serve`) driven over HTTP on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from features.store import sample_customers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(serving_env):
    port = _free_port()
    env = {**os.environ, "ENGAGE_HOME": str(serving_env.home), "ENGAGE_RELOAD_INTERVAL_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "engage.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # start-up loads three models: allow a minute on a busy machine
            if proc.poll() is not None:
                raise AssertionError(f"engage serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("engage serve did not become ready")
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_recommend_feedback_and_graceful_shutdown_over_http(server, serving_env):
    proc, base = server
    headers = {"Authorization": f"Bearer {serving_env.api_key}"}
    ids = sample_customers(serving_env.home, 60)
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        assert client.post("/v1/recommendations", json={"customer_id": ids[0]}).status_code == 200
        batch = client.post("/v1/recommendations/batch", json={"requests": [{"customer_id": c} for c in ids]})
        assert batch.status_code == 200
        acted = [r for r in batch.json()["results"] if r["action"] != "none"]
        assert len(acted) >= 10

    # Many clients post feedback at once, each exposure several times: every ack is stored exactly once.
    posts = [{"exposure_id": r["exposure_id"], "customer_id": r["customer_id"], "channel": r["channel"],
              "sent": True, "opened": k % 2 == 1} for r in acted for k in range(3)]

    def post(body: dict) -> int:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            return c.post("/v1/feedback", json=body).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(post, posts))
    assert codes == [200] * len(posts)

    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM (or 0)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    engine = sa.create_engine(serving_env.serving_db)
    with engine.connect() as con:
        assert con.execute(sa.text("SELECT count(*) FROM feedback")).scalar() == len(acted)
        assert con.execute(sa.text("SELECT count(*) FROM feedback WHERE opened")).scalar() == len(acted)
        # every answer reached the decision log by the time the process exited (flushed on shutdown)
        assert con.execute(sa.text("SELECT count(*) FROM decisions")).scalar() == 1 + len(ids)
