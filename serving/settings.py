"""Scoring-service settings, from the environment (``ENGAGE_*``) or passed explicitly (tests)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engage.settings import resolve_home

# How often the decision log's buffer is written: small, frequent flushes hold the GIL from fewer requests for
# less long than large, rare ones (README, BENCHMARKS.md).
DECISION_FLUSH_S = 0.05


class ServingSettings(BaseModel):
    """What ``engage serve`` needs besides MLflow (``MLFLOW_TRACKING_URI``) and the feature store."""

    model_config = ConfigDict(extra="forbid")

    home: Path = Field(description="ENGAGE_HOME: the feature store, serving database and decision log live here")
    api_keys: list[str] = Field(description="accepted bearer tokens (ENGAGE_API_KEYS, comma-separated)")
    policy_path: Path | None = Field(None, description="decision policy YAML (ENGAGE_POLICY); default: packaged")
    reload_interval_s: float = Field(30.0, ge=0, description="registry check period (ENGAGE_RELOAD_INTERVAL_S); 0=off")
    serving_db_url: str | None = Field(None, description="feedback and decision log database (ENGAGE_SERVING_DB_URL)")
    decision_flush_s: float = Field(DECISION_FLUSH_S, gt=0, le=60,
                                    description="decision log flush s (ENGAGE_DECISION_FLUSH_S)")
    max_batch: int = Field(1000, ge=1, le=10_000, description="customers per batch call; more is answered 413")
    gil_switch_ms: float = Field(1.0, ge=0.1, le=100, description="thread switch interval, ms (ENGAGE_GIL_SWITCH_MS)")

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        keys = [k.strip() for k in keys if k.strip()]
        if not keys:
            raise ValueError("no API key: set ENGAGE_API_KEYS to one or more comma-separated keys "
                             "(`engage serve --generate-key` makes one)")
        short = [k for k in keys if len(k) < 16]
        if short:
            raise ValueError("API keys must be at least 16 characters (use `engage serve --generate-key`)")
        return keys

    @classmethod
    def from_env(cls, home: Path | str | None = None, **overrides) -> ServingSettings:
        env = os.environ
        values: dict = {
            "home": resolve_home(home),
            "api_keys": env.get("ENGAGE_API_KEYS", "").split(","),
            "policy_path": env.get("ENGAGE_POLICY") or None,
            "serving_db_url": env.get("ENGAGE_SERVING_DB_URL") or None,
        }
        if env.get("ENGAGE_RELOAD_INTERVAL_S"):
            values["reload_interval_s"] = env["ENGAGE_RELOAD_INTERVAL_S"]
        if env.get("ENGAGE_DECISION_FLUSH_S"):
            values["decision_flush_s"] = env["ENGAGE_DECISION_FLUSH_S"]
        if env.get("ENGAGE_GIL_SWITCH_MS"):
            values["gil_switch_ms"] = env["ENGAGE_GIL_SWITCH_MS"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
