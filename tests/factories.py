"""Tiny hand-written contract folders for tests.

``write_contract(dir)`` writes, as CSV:

    customers: C1 (signed up 2024-01-01, America/New_York, sms unsubscribed later, push opted out),
               C2 (2025-05-20, Asia/Tokyo, no sms consent), C3 (2025-07-01, UTC); extra columns
               age_band and household_size become profile attributes
    events:    purchases, opens, a session, a complaint and an sms unsubscribe in May-June 2025
    offers:    OFF10 (discount, cost 5), SHIP (free_shipping, cost 3)
    exposures: x1 (C1, email, OFF10, opened, converted), x2 (C2, push, control, opened after 2025-06-01)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

CUSTOMERS = pd.DataFrame(
    {
        "customer_id": ["C1", "C2", "C3"],
        "signup_at": ["2024-01-01T00:00:00Z", "2025-05-20T00:00:00Z", "2025-07-01T00:00:00Z"],
        "timezone": ["America/New_York", "Asia/Tokyo", "UTC"],
        "country": ["US", "JP", "GB"],
        "email_opt_in": ["true", "true", "true"],
        "sms_opt_in": ["true", "false", "true"],
        "push_opt_in": ["false", "true", "true"],
        "age_band": ["25-34", "35-44", ""],
        "household_size": ["2", "", "1"],
    }
)

EVENTS = pd.DataFrame(
    [
        ("e1", "C1", "2025-05-01T13:00:00Z", "purchase", "web", "40", ""),
        ("e2", "C1", "2025-05-25T13:00:00Z", "purchase", "web", "60", "OFF10"),
        ("e3", "C1", "2025-05-28T23:30:00Z", "email_open", "email", "", ""),  # 19:30 in New York
        ("e4", "C2", "2025-05-30T01:00:00Z", "session", "in_app", "", ""),  # 10:00 in Tokyo
        ("e5", "C2", "2025-05-31T02:00:00Z", "complaint", "phone", "", ""),
        ("e6", "C1", "2025-05-29T10:00:00Z", "unsubscribe", "sms", "", ""),
        ("e7", "C1", "2025-06-10T10:00:00Z", "purchase", "web", "99", ""),
        ("e8", "C3", "2025-07-02T10:00:00Z", "purchase", "store", "15", ""),
    ],
    columns=["event_id", "customer_id", "event_at", "event_type", "channel", "amount", "offer_id"],
)

OFFERS = pd.DataFrame(
    {
        "offer_id": ["OFF10", "SHIP"],
        "name": ["10% off", "Free shipping"],
        "kind": ["discount", "free_shipping"],
        "cost": ["5", "3"],
        "channels": ["", "email;push"],
        "segments": ["", ""],
    }
)

EXPOSURES = pd.DataFrame(
    [
        ("x1", "C1", "2025-05-20T12:00:00Z", "email", "OFF10", "0.5", "2025-05-20T14:00:00Z", "true", "true", "60"),
        ("x2", "C2", "2025-05-31T12:00:00Z", "push", "", "0.5", "2025-06-02T12:00:00Z", "false", "false", "0"),
    ],
    columns=[
        "exposure_id", "customer_id", "sent_at", "channel", "offer_id", "propensity",
        "opened_at", "clicked", "converted", "revenue",
    ],
)


def write_contract(
    folder: Path,
    *,
    customers: pd.DataFrame = CUSTOMERS,
    events: pd.DataFrame = EVENTS,
    offers: pd.DataFrame | None = OFFERS,
    exposures: pd.DataFrame | None = EXPOSURES,
) -> Path:
    """Write the tables as CSV files into ``folder`` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"customers": customers, "events": events, "offers": offers, "exposures": exposures}
    for name, df in tables.items():
        if df is not None:
            df.to_csv(folder / f"{name}.csv", index=False)
    return folder
