"""Property-based fuzz of the scoring API from its own OpenAPI schema (schemathesis): no input gives a 5xx."""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from serving.app import create_app
from serving.settings import ServingSettings


def test_no_input_gives_a_server_error(serving_env):
    app = create_app(ServingSettings.from_env(serving_env.home, reload_interval_s=0))
    headers = {"Authorization": f"Bearer {serving_env.api_key}"}
    with TestClient(app):  # runs the lifespan: models loaded, decision log started
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "POST /v1/recommendations", "POST /v1/recommendations/batch", "POST /v1/feedback"}
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def call(case) -> None:
                response = case.call(headers=headers)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
                if 400 <= response.status_code < 500:
                    assert response.json()["error"] and "Traceback" not in response.text

            call()
