"""Engage configuration: YAML, expanded with environment variables, validated by pydantic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG_FILE = Path(__file__).with_name("default_config.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegmentConfig(_Strict):
    """Thresholds of the RFM segments (defaults follow common retail practice)."""

    new_max_tenure_days: int = Field(30, ge=0, description="Customers younger than this are `new`.")
    high_value_max_recency_days: int = Field(30, ge=0, description="`high_value` needs a purchase this recent.")
    high_value_min_orders_365d: int = Field(5, ge=1, description="`high_value` needs this many orders in a year.")
    high_value_spend_quantile: float = Field(
        0.8, gt=0, lt=1, description="`high_value` needs last-year spend at or above this quantile."
    )
    at_risk_min_recency_days: int = Field(60, ge=1, description="A repeat buyer silent this long is `at_risk`.")
    dormant_min_recency_days: int = Field(180, ge=1, description="No purchase for this long is `dormant`.")

    @model_validator(mode="after")
    def _ordered(self) -> SegmentConfig:
        if self.at_risk_min_recency_days >= self.dormant_min_recency_days:
            raise ValueError("at_risk_min_recency_days must be below dormant_min_recency_days")
        return self


class FeatureConfig(_Strict):
    """How behavioural features are computed and served."""

    segments: SegmentConfig = SegmentConfig()
    snapshot_ttl_days: int = Field(35, ge=1, description="Feast TTL of a snapshot for point-in-time lookups.")
    snapshot_every_days: int = Field(7, ge=1, description="Cadence of snapshot series built for training.")


class TrainingConfig(_Strict):
    """How the churn, next-best-offer and send-time models are trained and gated."""

    horizon_days: int = Field(90, ge=1, description="Churn horizon H: no purchase in (T, T+H] is churn.")
    churn_on: Literal["purchase", "activity"] = Field("purchase", description="What counts as not churned.")
    snapshot_every_days: int = Field(7, ge=1, description="Cadence of training snapshot times.")
    max_snapshots: int = Field(26, ge=2, description="Use at most this many of the latest snapshot times.")
    holdout_share: float = Field(
        0.25, gt=0, lt=1, description="Share of the latest snapshot times (or sends) kept for the holdout."
    )
    recency_half_life_days: float = Field(
        120.0, gt=0, description="Sample weight halves for every this many days a snapshot is older."
    )
    min_rows: int = Field(200, ge=10, description="Fewer training rows than this is an error.")
    margin: float = Field(0.3, gt=0, le=1, description="Gross margin on revenue, for incremental profit.")
    num_boost_round: int = Field(400, ge=10, description="LightGBM rounds before early stopping.")
    learning_rate: float = Field(0.05, gt=0, le=1, description="LightGBM learning rate.")
    num_leaves: int = Field(31, ge=2, description="LightGBM leaves per tree.")
    seed: int = Field(7, description="Seed for every random choice in training.")


class MonitorConfig(_Strict):
    """When `engage monitor` raises an alert (population stability index: PSI)."""

    psi_alert: float = Field(0.2, gt=0, description="A feature's or score's PSI above this is an alert.")
    psi_warn: float = Field(0.1, gt=0, description="A PSI above this (and not above psi_alert) is a warning.")
    missing_jump: float = Field(
        0.1, gt=0, le=1, description="A feature's missing share moving by more than this is an alert."
    )
    churn_rate_jump_points: float = Field(
        5.0, gt=0, le=100, description="Daily mean churn score this many points away from the reference ..."
    )
    consecutive_days: int = Field(3, ge=1, le=60, description="... on this many consecutive days is an alert.")
    churn_rate_days: int = Field(7, ge=1, le=90, description="Daily churn-score means shown (the last N days).")
    calibration_gap: float = Field(
        0.05, gt=0, le=1, description="Predicted mean churn vs the observed rate, once the horizon has passed."
    )
    ignore_features: tuple[str, ...] = Field(
        ("tenure_days", "history_days", "days_since_first_purchase", "utc_offset_hours"),
        description="Features reported but never alerted on: ones that move with the calendar by construction.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> MonitorConfig:
        if self.psi_warn > self.psi_alert:
            raise ValueError("psi_warn must not be above psi_alert")
        if self.consecutive_days > self.churn_rate_days:
            raise ValueError("consecutive_days must not be above churn_rate_days")
        return self


class ServingConfig(_Strict):
    """The scoring service's reading of the online store."""

    feature_max_age_days: dict[str, float] = Field(
        default_factory=dict,
        description="Per feature view (its name without _fv, or `default` for the rest): online features older "
                    "than this many days at the request's time are treated as missing and the answer is flagged "
                    "stale. Views not listed (and no `default`) get features.snapshot_ttl_days, their Feast TTL.",
    )

    @model_validator(mode="after")
    def _known_views(self) -> ServingConfig:
        from features.catalog import VIEWS

        unknown = sorted(set(self.feature_max_age_days) - set(VIEWS) - {"default"})
        if unknown:
            raise ValueError(f"feature_max_age_days: unknown feature view(s) {', '.join(unknown)} "
                             f"(known: default, {', '.join(VIEWS)})")
        bad = sorted(k for k, v in self.feature_max_age_days.items() if not v > 0)
        if bad:
            raise ValueError(f"feature_max_age_days: {', '.join(bad)} must be a positive number of days")
        return self

    def max_age_days(self, view: str, ttl_days: float) -> float:
        """The age limit of a feature view (``view`` without the _fv suffix)."""
        ages = self.feature_max_age_days
        return ages.get(view, ages.get("default", ttl_days))


class EngageConfig(_Strict):
    """All of Engage's tunable settings."""

    features: FeatureConfig = FeatureConfig()
    training: TrainingConfig = TrainingConfig()
    monitor: MonitorConfig = MonitorConfig()
    serving: ServingConfig = ServingConfig()

    def feature_max_ages(self) -> dict[str, float]:
        """Age limit in days of every feature view (names without _fv)."""
        from features.catalog import VIEWS

        return {v: self.serving.max_age_days(v, self.features.snapshot_ttl_days) for v in VIEWS}


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid."""


def config_path(home: Path) -> Path:
    """``$ENGAGE_CONFIG`` if set, else ``<home>/engage.yaml`` if it exists, else the packaged defaults."""
    explicit = os.environ.get("ENGAGE_CONFIG")
    if explicit:
        return Path(explicit)
    local = home / "engage.yaml"
    return local if local.exists() else DEFAULT_CONFIG_FILE


def read_yaml(path: Path, what: str, error: type[Exception]) -> dict:
    """A YAML file with ``${VARS}`` expanded from the environment; unreadable or invalid -> ``error``
    whose message names ``what`` (config, policy) and the file."""
    try:
        return yaml.safe_load(os.path.expandvars(Path(path).read_text())) or {}
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc


def load_config(path: Path | None = None) -> EngageConfig:
    """Read and validate a config file (the packaged defaults when ``path`` is None)."""
    path = path or DEFAULT_CONFIG_FILE
    raw = read_yaml(path, "config", ConfigError)
    try:
        return EngageConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config {path} is invalid:\n{exc}") from exc
