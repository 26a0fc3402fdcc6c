"""The Engage data contract v1 (/work/shared/DATA_CONTRACT.md) as plain data.

`features.load` turns these specs into the SQL that types and checks every row;
nothing here reads files or talks to DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass

EVENT_TYPES: tuple[str, ...] = (
    "purchase",
    "session",
    "page_view",
    "email_open",
    "email_click",
    "push_open",
    "sms_click",
    "support_ticket",
    "complaint",
    "unsubscribe",
)
CHANNELS: tuple[str, ...] = ("email", "sms", "push", "in_app", "web", "phone", "store")

# Accepted spellings of a boolean, compared lower-case after trimming.
BOOL_TRUE: tuple[str, ...] = ("true", "1", "yes")
BOOL_FALSE: tuple[str, ...] = ("false", "0", "no")

# Column types a spec may use:
#   string     trimmed text; empty means missing
#   timestamp  ISO 8601; an offset is converted to UTC, no offset means UTC
#   number     a finite number
#   bool       one of BOOL_TRUE / BOOL_FALSE
#   enum       one of `allowed`, compared lower-case
#   list       `;`-separated values, each one of `allowed` when `allowed` is set
#   timezone   an IANA time zone name (zoneinfo)
TYPES: tuple[str, ...] = ("string", "timestamp", "number", "bool", "enum", "list", "timezone")

# Range checks a number column may carry.
CHECKS: tuple[str, ...] = (">= 0", "(0, 1]")


@dataclass(frozen=True)
class Column:
    """One column of a contract table.

    Attributes:
        name: lower-case column name, as in the file and in the warehouse.
        type: one of TYPES.
        required: the file must have the column and every row a non-empty value.
        default: value used when the column is absent or a value is empty.
        allowed: permitted values for `enum` and `list` columns.
        check: a range from CHECKS that a `number` must lie in.
        required_if: (column, value): the value may only be empty when that
            column holds something else (a purchase needs an amount).
    """

    name: str
    type: str = "string"
    required: bool = False
    default: str | float | bool | None = None
    allowed: tuple[str, ...] = ()
    check: str | None = None
    required_if: tuple[str, str] | None = None


@dataclass(frozen=True)
class Table:
    """One contract table.

    Attributes:
        name: table name; also the file stem (`events.csv`, `events.parquet`).
        columns: the contract columns, in warehouse order.
        key: the unique column; within one file the first valid row wins.
        required: the folder must contain this table.
        upsert: re-loading a key replaces the stored row (otherwise it is
            already loaded and left alone).
        derive_key: when the key is empty, derive it from the row's values.
        customer_ref: every row's customer_id must be a known customer.
        not_before_signup: a timestamp column that must not precede the
            customer's signup_at (the customer did not exist yet).
        extra_columns: keep columns beyond the contract as profile attributes.
    """

    name: str
    columns: tuple[Column, ...]
    key: str
    required: bool = False
    upsert: bool = False
    derive_key: bool = False
    customer_ref: bool = False
    not_before_signup: str | None = None
    extra_columns: bool = False

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


CUSTOMERS = Table(
    name="customers",
    key="customer_id",
    required=True,
    upsert=True,
    extra_columns=True,
    columns=(
        Column("customer_id", required=True),
        Column("signup_at", "timestamp", required=True),
        Column("timezone", "timezone", default="UTC"),
        Column("country"),
        Column("email_opt_in", "bool", default=True),
        Column("sms_opt_in", "bool", default=True),
        Column("push_opt_in", "bool", default=True),
    ),
)

EVENTS = Table(
    name="events",
    key="event_id",
    required=True,
    derive_key=True,
    customer_ref=True,
    not_before_signup="event_at",
    columns=(
        Column("event_id"),
        Column("customer_id", required=True),
        Column("event_at", "timestamp", required=True),
        Column("event_type", "enum", required=True, allowed=EVENT_TYPES),
        Column("channel", "enum", allowed=CHANNELS),
        Column("amount", "number", check=">= 0", required_if=("event_type", "purchase")),
        Column("offer_id"),
    ),
)

OFFERS = Table(
    name="offers",
    key="offer_id",
    upsert=True,
    columns=(
        Column("offer_id", required=True),
        Column("name", required=True),
        Column("kind", required=True),
        Column("cost", "number", required=True, check=">= 0"),
        Column("channels", "list", allowed=CHANNELS),
        Column("segments", "list"),
    ),
)

EXPOSURES = Table(
    name="exposures",
    key="exposure_id",
    customer_ref=True,
    not_before_signup="sent_at",
    columns=(
        Column("exposure_id", required=True),
        Column("customer_id", required=True),
        Column("sent_at", "timestamp", required=True),
        Column("channel", "enum", required=True, allowed=CHANNELS),
        Column("offer_id"),
        Column("propensity", "number", check="(0, 1]"),
        Column("opened_at", "timestamp"),
        Column("clicked", "bool", default=False),
        Column("converted", "bool", default=False),
        Column("revenue", "number", default=0.0, check=">= 0"),
    ),
)

# In load order: customers and offers before the tables that refer to them.
TABLES: dict[str, Table] = {t.name: t for t in (CUSTOMERS, OFFERS, EVENTS, EXPOSURES)}
