"""features.load: contract files in, warehouse tables and rejects out.

Each test writes its own tiny folder, for example (CSV):

    customers.csv                         events.csv
    customer_id,signup_at,timezone        event_id,customer_id,event_at,event_type,channel,amount
    C1,2024-01-01T00:00:00Z,UTC           e1,C1,2024-02-01T10:00:00Z,purchase,web,10
    C2,2024-01-01T00:00:00Z,Asia/Tokyo    e2,C2,2024-02-02T10:00:00Z,session,web,
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from features.load import WAREHOUSE_FILE, ContractError, connect_warehouse, ingest, warehouse_path

CUSTOMERS = """\
customer_id,signup_at,timezone
C1,2024-01-01T00:00:00Z,UTC
C2,2024-01-01T00:00:00Z,Asia/Tokyo
"""
EVENTS = """\
event_id,customer_id,event_at,event_type,channel,amount
e1,C1,2024-02-01T10:00:00Z,purchase,web,10
e2,C2,2024-02-02T10:00:00Z,session,web,
"""
TABLES = ("customers", "events", "offers", "exposures")


def write(folder: Path, **tables: str) -> Path:
    """Write each table's CSV text to folder/<table>.csv (customers and events default to the above)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {"customers": CUSTOMERS, "events": EVENTS, **tables}.items():
        if text is not None:
            (folder / f"{name}.csv").write_text(text)
    return folder


def query(home: Path, sql: str) -> list[tuple]:
    with contextlib.closing(connect_warehouse(home, read_only=True)) as con:
        return con.execute(sql).fetchall()


def rejects(home: Path, table: str) -> list[tuple[int, str, dict]]:
    rows = query(home, f"SELECT row_number, reason, original FROM rejects WHERE table_name = '{table}' ORDER BY 1")
    return [(n, reason, json.loads(original)) for n, reason, original in rows]


def snapshot(home: Path) -> dict[str, list[tuple]]:
    """Every warehouse table's full contents, in a stable order."""
    return {t: query(home, f"SELECT * FROM {t} ORDER BY ALL") for t in (*TABLES, "profile_columns", "rejects", "loads")}


def contents(home: Path) -> dict[str, list[tuple]]:
    """The data tables without load bookkeeping (loaded_at, load ids, file names)."""
    return {t: query(home, f"SELECT * EXCLUDE (loaded_at) FROM {t} ORDER BY ALL") for t in TABLES} | {
        "profile_columns": query(home, "SELECT * FROM profile_columns ORDER BY ALL"),
        "rejects": query(home, "SELECT table_name, row_number, reason FROM rejects ORDER BY ALL"),
    }


def one_reject(home: Path, table: str) -> tuple[int, str, dict]:
    found = rejects(home, table)
    assert len(found) == 1, found
    return found[0]


def test_good_folder_loads_every_table(tmp_path: Path) -> None:
    src = write(
        tmp_path / "in",
        offers="offer_id,name,kind,cost,channels,segments\nO1,Ten off,discount,5,Email; push,vip\n",
        exposures="exposure_id,customer_id,sent_at,channel,offer_id,propensity,opened_at,clicked,converted,revenue\n"
        "x1,C1,2024-02-01T09:00:00Z,email,O1,0.5,2024-02-01T10:00:00Z,YES,1,10\n"
        "x2,C2,2024-02-01T09:00:00Z,push,,,,,,\n",
    )
    report = ingest(src, tmp_path / "home")
    assert [(t.table, t.rows, t.inserted, t.rejected) for t in report.tables] == [
        ("customers", 2, 2, 0),
        ("offers", 1, 1, 0),
        ("events", 2, 2, 0),
        ("exposures", 2, 2, 0),
    ]
    assert warehouse_path(tmp_path / "home") == tmp_path / "home" / WAREHOUSE_FILE
    home = tmp_path / "home"
    assert query(home, "SELECT offer_id, cost, channels, segments FROM offers") == [("O1", 5.0, "email;push", "vip")]
    assert query(home, "SELECT exposure_id, propensity, clicked, converted, revenue FROM exposures ORDER BY 1") == [
        ("x1", 0.5, True, True, 10.0),
        ("x2", None, False, False, 0.0),  # defaults
    ]
    assert query(home, "SELECT email_opt_in, sms_opt_in, push_opt_in FROM customers WHERE customer_id = 'C1'") == [
        (True, True, True)
    ]
    assert "customers" in report.format_table() and "already loaded" in report.format_table()


# --- files that cannot be loaded ---------------------------------------------------------------


def test_missing_required_file_is_a_contract_error(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "customers.csv").write_text(CUSTOMERS)
    with pytest.raises(ContractError, match=r"events\.csv or events\.parquet is required"):
        ingest(src, tmp_path / "home")


@pytest.mark.parametrize("name", ["events.json", "events.xlsx", "Events.TXT"])
def test_wrong_extension_is_a_contract_error(tmp_path: Path, name: str) -> None:
    src = write(tmp_path / "in", events=None)
    (src / name).write_text("{}")
    with pytest.raises(ContractError, match=f"{name}: not CSV/Parquet"):
        ingest(src, tmp_path / "home")


def test_csv_and_parquet_of_one_table_is_a_contract_error(tmp_path: Path) -> None:
    src = write(tmp_path / "in")
    pq.write_table(pacsv.read_csv(src / "events.csv"), src / "events.parquet")
    with pytest.raises(ContractError, match="events.csv and events.parquet are the same table"):
        ingest(src, tmp_path / "home")


def test_missing_required_column_names_column_and_file(tmp_path: Path) -> None:
    src = write(tmp_path / "in", events="event_id,customer_id,event_at\ne1,C1,2024-02-01\n")
    with pytest.raises(ContractError, match=r"events\.csv: required column event_type missing"):
        ingest(src, tmp_path / "home")


@pytest.mark.parametrize("name", ["events.csv", "events.parquet"])
def test_empty_file_is_a_contract_error(tmp_path: Path, name: str) -> None:
    src = write(tmp_path / "in", events=None)
    (src / name).write_bytes(b"")
    with pytest.raises(ContractError, match=f"{name}: the file is empty"):
        ingest(src, tmp_path / "home")


def test_file_without_header_is_a_contract_error(tmp_path: Path) -> None:
    src = write(tmp_path / "in", events="\n\n")
    with pytest.raises(ContractError, match="events.csv: no header row"):
        ingest(src, tmp_path / "home")


def test_header_only_file_loads_no_rows(tmp_path: Path) -> None:
    src = write(tmp_path / "in", events="event_id,customer_id,event_at,event_type\n")
    report = ingest(src, tmp_path / "home")
    assert (report.get("events").rows, report.get("customers").inserted) == (0, 2)


def test_corrupt_parquet_is_a_contract_error(tmp_path: Path) -> None:
    src = write(tmp_path / "in", events=None)
    (src / "events.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    with pytest.raises(ContractError, match="events.parquet: not a readable Parquet file"):
        ingest(src, tmp_path / "home")


# --- bad rows: rejected with a reason, the good rows load --------------------------------------


def load_events(tmp_path: Path, events: str):
    home = tmp_path / "home"
    report = ingest(write(tmp_path / "in", events=events), home).get("events")
    return home, report


def test_unparsable_timestamp_is_rejected_with_column_and_value(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type\ne1,C1,2024-02-01T10:00:00Z,session\ne2,C1,yesterday,session\n",
    )
    assert (report.accepted, report.rejected) == (1, 1)
    assert one_reject(home, "events")[:2] == (2, "event_at 'yesterday' is not an ISO 8601 timestamp")
    assert query(home, "SELECT event_id FROM events") == [("e1",)]


def test_unknown_event_type_is_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type\ne1,C1,2024-02-01,Session\ne2,C1,2024-02-01,buy\n",
    )
    assert (report.accepted, report.rejected) == (1, 1)
    assert one_reject(home, "events")[1].startswith("event_type 'buy' is not one of purchase, session, page_view")
    assert query(home, "SELECT event_type FROM events") == [("session",)]  # matched lower-case


def test_unknown_channel_is_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type,channel\ne1,C1,2024-02-01,session,web\ne2,C1,2024-02-01,session,fax\n",
    )
    assert report.rejected == 1
    assert one_reject(home, "events")[1].startswith("channel 'fax' is not one of email, sms")


def test_negative_and_non_numeric_amounts_are_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type,amount\n"
        "e1,C1,2024-02-01,purchase,12.5\ne2,C1,2024-02-01,purchase,-3\ne3,C1,2024-02-01,purchase,12 EUR\n",
    )
    assert (report.accepted, report.rejected) == (1, 2)
    assert [r[1] for r in rejects(home, "events")] == ["amount '-3' is negative", "amount '12 EUR' is not a number"]


def test_purchase_without_amount_is_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type,amount\ne1,C1,2024-02-01,purchase,\ne2,C1,2024-02-01,session,\n",
    )
    assert (report.accepted, report.rejected) == (1, 1)
    assert one_reject(home, "events")[:2] == (1, "amount is required when event_type is 'purchase'")


def test_event_for_unknown_customer_is_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type\ne1,C1,2024-02-01,session\ne2,C9,2024-02-01,session\n",
    )
    assert (report.accepted, report.rejected) == (1, 1)
    assert one_reject(home, "events")[1] == "customer_id 'C9' is not in customers"


def test_customers_already_in_the_warehouse_count_as_known(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ingest(write(tmp_path / "first"), home)
    later = write(
        tmp_path / "later",
        customers="customer_id,signup_at\nC3,2024-01-01\n",
        events="event_id,customer_id,event_at,event_type\ne9,C1,2024-03-01,session\ne10,C3,2024-03-01,session\n",
    )
    assert ingest(later, home).get("events").inserted == 2


def test_event_before_signup_is_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path, "event_id,customer_id,event_at,event_type\ne1,C1,2023-12-31T23:00:00Z,session\n"
    )
    assert report.rejected == 1
    assert one_reject(home, "events")[1] == (
        "event_at 2023-12-31 23:00:00 is before the customer's signup_at 2024-01-01 00:00:00 "
        "(the customer did not exist yet)"
    )


def test_empty_required_value_is_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path, "event_id,customer_id,event_at,event_type\ne1,C1,2024-02-01,session\ne2, ,2024-02-01,session\n"
    )
    assert report.rejected == 1
    assert one_reject(home, "events")[1] == "customer_id is empty"


def test_every_problem_of_a_row_is_in_its_reason(tmp_path: Path) -> None:
    home, _ = load_events(tmp_path, "event_id,customer_id,event_at,event_type\ne1,C9,soon,buy\n")
    reason = one_reject(home, "events")[1]
    assert "event_at 'soon'" in reason and "event_type 'buy'" in reason and "customer_id 'C9'" in reason


def test_duplicate_event_id_in_file_first_wins_and_reload_adds_nothing(tmp_path: Path) -> None:
    events = (
        "event_id,customer_id,event_at,event_type\n"
        "e1,C1,2024-02-01,session\ne1,C2,2024-02-02,session\ne2,C1,2024-02-01,session\n"
    )
    home, report = load_events(tmp_path, events)
    assert (report.accepted, report.inserted, report.rejected) == (2, 2, 1)
    assert one_reject(home, "events")[:2] == (2, "duplicate event_id 'e1' (row 1 has it first)")
    assert query(home, "SELECT customer_id FROM events WHERE event_id = 'e1'") == [("C1",)]

    again = ingest(tmp_path / "in", home).get("events")
    assert (again.accepted, again.inserted, again.already_loaded) == (2, 0, 2)
    assert query(home, "SELECT count(*) FROM events") == [(2,)]


def test_duplicate_of_a_rejected_row_is_not_a_duplicate(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path, "event_id,customer_id,event_at,event_type\ne1,C1,never,session\ne1,C1,2024-02-01,session\n"
    )
    assert (report.inserted, report.rejected) == (1, 1)
    assert one_reject(home, "events")[0] == 1


def test_derived_event_id_is_stable_across_reloads_and_formats(tmp_path: Path) -> None:
    events = (
        "customer_id,event_at,event_type,amount\n"
        "C1,2024-02-01T11:00:00+01:00,purchase,10.50\nC1,2024-02-01T10:00:00Z,purchase,10.5\nC2,2024-02-01,session,\n"
    )
    home, report = load_events(tmp_path, events)
    # The first two rows are the same purchase once normalised (UTC, 10.5).
    assert (report.inserted, report.rejected) == (2, 1)
    assert one_reject(home, "events")[1].startswith("duplicate of row 1 (no event_id; same customer_id, event_at")
    ids = query(home, "SELECT event_id FROM events ORDER BY 1")
    assert all(len(i) == 32 for (i,) in ids)

    assert ingest(tmp_path / "in", home).get("events").inserted == 0
    other = tmp_path / "parquet"
    other.mkdir()
    pq.write_table(pacsv.read_csv(tmp_path / "in" / "customers.csv"), other / "customers.parquet")
    pq.write_table(
        pa.table(
            {
                "customer_id": ["C1", "C2"],
                "event_at": pa.array([1706781600, 1706745600], pa.timestamp("s", tz="UTC")),
                "event_type": ["purchase", "session"],
                "amount": [10.5, None],
            }
        ),
        other / "events.parquet",
    )
    home2 = tmp_path / "home2"
    ingest(other, home2)
    assert query(home2, "SELECT event_id FROM events ORDER BY 1") == ids


def test_timezone_that_is_not_iana_is_rejected(tmp_path: Path) -> None:
    home = tmp_path / "home"
    customers = "customer_id,signup_at,timezone\nC1,2024-01-01,europe/berlin\nC2,2024-01-01,CEST\nC3,2024-01-01,\n"
    report = ingest(write(tmp_path / "in", customers=customers, events="customer_id,event_at,event_type\n"), home)
    assert (report.get("customers").accepted, report.get("customers").rejected) == (2, 1)
    assert one_reject(home, "customers")[:2] == (
        2,
        "timezone 'CEST' is not an IANA time zone name (like Europe/Berlin or UTC)",
    )
    assert query(home, "SELECT customer_id, timezone FROM customers ORDER BY 1") == [
        ("C1", "Europe/Berlin"),
        ("C3", "UTC"),  # empty -> default
    ]


def test_propensity_outside_0_1_is_rejected(tmp_path: Path) -> None:
    exposures = "exposure_id,customer_id,sent_at,channel,propensity\n" + "".join(
        f"x{i},C1,2024-02-01,email,{p}\n" for i, p in enumerate(["0.2", "1", "0", "1.5", "-0.1", ""])
    )
    home = tmp_path / "home"
    report = ingest(write(tmp_path / "in", exposures=exposures), home).get("exposures")
    assert (report.accepted, report.rejected) == (3, 3)
    assert [r[1] for r in rejects(home, "exposures")] == [
        "propensity '0' is not in (0, 1]",
        "propensity '1.5' is not in (0, 1]",
        "propensity '-0.1' is not in (0, 1]",
    ]
    assert query(home, "SELECT propensity FROM exposures ORDER BY 1") == [(0.2,), (1.0,), (None,)]


def test_exposure_and_offer_rules(tmp_path: Path) -> None:
    home = tmp_path / "home"
    offers = (
        "offer_id,name,kind,cost,channels\n"
        "O1,A,discount,1,email\nO2,B,points,-1,\nO3,C,points,,\nO4,D,points,2,email;fax\n"
    )
    exposures = (
        "exposure_id,customer_id,sent_at,channel,revenue,clicked\n"
        "x1,C1,2024-02-01,email,-5,true\nx2,C1,2024-02-01,,0,true\nx3,C1,2024-02-01,sms,0,maybe\n"
    )
    report = ingest(write(tmp_path / "in", offers=offers, exposures=exposures), home)
    assert [r[1] for r in rejects(home, "offers")] == [
        "cost '-1' is negative",
        "cost is empty",
        "channels 'email;fax' has fax, not one of email, sms, push, in_app, web, phone, store",
    ]
    assert [r[1] for r in rejects(home, "exposures")] == [
        "revenue '-5' is negative",
        "channel is empty",
        "clicked 'maybe' is not a boolean (true/false, 1/0, yes/no)",
    ]
    assert report.get("exposures").accepted == 0


# --- bookkeeping ---------------------------------------------------------------------------------


def test_rows_equal_accepted_plus_rejected_for_every_table(tmp_path: Path) -> None:
    src = write(
        tmp_path / "in",
        customers=CUSTOMERS + "C2,2024-01-01,UTC\n,2024-01-01,UTC\n",
        events=EVENTS + "e3,C7,2024-02-01,session,,\n",
        offers="offer_id,name,kind,cost\nO1,A,discount,1\nO2,B,discount,x\n",
        exposures="exposure_id,customer_id,sent_at,channel\nx1,C1,2024-02-01,email\nx2,C1,2024-02-01,pigeon\n",
    )
    for _ in range(2):
        report = ingest(src, tmp_path / "home")
        for t in report.tables:
            assert t.rows == t.accepted + t.rejected, t
            assert t.accepted == t.inserted + t.already_loaded, t
            assert t.rejected >= 1, t
    loads = query(tmp_path / "home", "SELECT table_name, sum(rows), sum(accepted + rejected) FROM loads GROUP BY 1")
    assert all(rows == total for _, rows, total in loads) and len(loads) == 4


def test_rejects_keep_the_original_values_and_a_reason(tmp_path: Path) -> None:
    home, _ = load_events(
        tmp_path,
        'Event_ID,customer_id,event_at,event_type,amount,note\ne1,C1,2024-02-01,purchase,-1.50,"a, quoted ""note"""\n',
    )
    row, reason, original = one_reject(home, "events")
    assert (row, reason) == (1, "amount '-1.50' is negative")
    assert original == {
        "Event_ID": "e1",
        "customer_id": "C1",
        "event_at": "2024-02-01",
        "event_type": "purchase",
        "amount": "-1.50",
        "note": 'a, quoted "note"',
    }
    assert query(home, "SELECT source_file FROM rejects") == [(str(tmp_path / "in" / "events.csv"),)]


def test_csv_with_bom_and_windows_line_endings(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "customers.csv").write_bytes(b"\xef\xbb\xbf" + CUSTOMERS.replace("\n", "\r\n").encode())
    (src / "events.csv").write_bytes(
        b"\xef\xbb\xbf" + (EVENTS + "e3,C1,2024-02-01,buy,web,\n").replace("\n", "\r\n").encode()
    )
    home = tmp_path / "home"
    report = ingest(src, home)
    assert report.get("customers").inserted == 2 and report.get("events").inserted == 2
    assert query(home, "SELECT customer_id, timezone FROM customers ORDER BY 1") == [
        ("C1", "UTC"),
        ("C2", "Asia/Tokyo"),
    ]
    row, reason, original = one_reject(home, "events")
    assert original["event_id"] == "e3" and original["channel"] == "web" and original["amount"] is None
    assert reason.startswith("event_type 'buy'")


def test_ragged_csv_rows_are_padded_or_rejected(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type,channel\n"
        'e1,C1,2024-02-01,session\ne2,C1,2024-02-01,session,web,surplus\ne3,C1,2024-02-01,session,"multi\nline"\n',
    )
    assert (report.rows, report.inserted, report.rejected) == (3, 1, 2)
    assert [r[:2] for r in rejects(home, "events")] == [
        (2, "the row has more fields than the header"),
        (3, "channel 'multi\nline' is not one of email, sms, push, in_app, web, phone, store"),
    ]


def test_a_line_starting_with_hash_is_data_not_a_comment(tmp_path: Path) -> None:
    home, report = load_events(tmp_path, "event_id,customer_id,event_at,event_type\n#1,C1,2024-02-01,session\n")
    assert report.inserted == 1 and query(home, "SELECT event_id FROM events") == [("#1",)]


def test_failing_load_leaves_the_warehouse_as_it_was(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ingest(
        write(
            tmp_path / "first",
            events=EVENTS + "e3,C9,2024-02-01,session,,\n",
            offers="offer_id,name,kind,cost\nO1,A,b,1\n",
        ),
        home,
    )
    before = snapshot(home)
    second = write(
        tmp_path / "second",
        customers="customer_id,signup_at,tier\nC1,2020-01-01,gold\nC5,2024-01-01,silver\n",
        events=EVENTS + "e4,C5,2024-02-01,session,,\n",
        offers="offer_id,name,kind,cost\nO1,B,c,2\n",
        exposures="exposure_id,customer_id,sent_at\nx1,C1,2024-02-01\n",  # no channel column
    )
    with pytest.raises(ContractError, match="exposures.csv: required column channel missing"):
        ingest(second, home)
    assert snapshot(home) == before

    # A file that only fails while its rows are read (inside the transaction) changes nothing either.
    (second / "exposures.csv").unlink()
    (second / "events.csv").unlink()
    good = pacsv.read_csv(tmp_path / "first" / "events.csv")
    pq.write_table(good, second / "events.parquet", row_group_size=1)
    data = bytearray((second / "events.parquet").read_bytes())
    data[20:60] = b"\xff" * 40  # corrupt the first data page, keep the footer
    (second / "events.parquet").write_bytes(bytes(data))
    with pytest.raises(ContractError, match="events.parquet"):
        ingest(second, home)
    assert snapshot(home) == before


@pytest.mark.parametrize("as_text", [True, False], ids=["text-columns", "typed-columns"])
def test_parquet_and_csv_give_the_same_warehouse(tmp_path: Path, as_text: bool) -> None:
    customers = CUSTOMERS + "C3,2024-01-01T02:00:00+02:00,Europe/Paris\n"
    events = EVENTS + "e3,C3,2024-03-01T00:00:00-05:00,page_view,web,\ne4,C3,2024-03-01,bogus,web,\n"
    offers = "offer_id,name,kind,cost,channels\nO1,Ten,discount,5,email\n"
    exposures = "exposure_id,customer_id,sent_at,channel,propensity,clicked\nx1,C1,2024-02-01,email,0.25,true\n"
    csv_dir = write(tmp_path / "csv", customers=customers, events=events, offers=offers, exposures=exposures)
    pq_dir = tmp_path / "parquet"
    pq_dir.mkdir()
    for name in TABLES:
        # Either every column as text, or with the types pyarrow infers (numbers, booleans).
        table = pacsv.read_csv(csv_dir / f"{name}.csv")
        if as_text:
            table = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema]))
        pq.write_table(table, pq_dir / f"{name}.parquet")
    ingest(csv_dir, tmp_path / "home_csv")
    ingest(pq_dir, tmp_path / "home_pq")
    assert contents(tmp_path / "home_csv") == contents(tmp_path / "home_pq")
    assert query(tmp_path / "home_pq", "SELECT count(*) FROM events") == [(3,)]


def test_native_parquet_types_load(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array([1, 2], pa.int64()),
                "signup_at": pa.array([0, 0], pa.timestamp("us")),
                "email_opt_in": [True, False],
                "sms_opt_in": pa.array([1, 0], pa.int8()),
                "score": [0.5, float("nan")],
            }
        ),
        src / "customers.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "customer_id": ["1", "2", "2"],
                "event_at": pa.array([86400, 86400, 86400], pa.timestamp("s", tz="Europe/Berlin")),
                "event_type": ["purchase", "purchase", "session"],
                "amount": pa.array([1, -1, None], pa.int32()),
            }
        ),
        src / "events.parquet",
    )
    home = tmp_path / "home"
    report = ingest(src, home)
    assert report.get("customers").inserted == 2
    assert query(home, "SELECT customer_id, email_opt_in, sms_opt_in, score FROM customers ORDER BY 1") == [
        ("1", True, True, 0.5),
        ("2", False, False, None),
    ]
    assert (report.get("events").inserted, report.get("events").rejected) == (2, 1)
    assert one_reject(home, "events")[1] == "amount '-1' is negative"
    assert {r for (r,) in query(home, "SELECT CAST(event_at AS VARCHAR) FROM events")} == {"1970-01-02 00:00:00"}


def test_pandas_timezone_aware_parquet_loads(tmp_path: Path) -> None:
    """pandas writes tz-aware datetimes as nanosecond TIMESTAMPTZ columns: they load as UTC."""
    import pandas as pd

    src = tmp_path / "in"
    src.mkdir()
    pd.DataFrame({"customer_id": ["C1"], "signup_at": pd.to_datetime(["2024-01-01T00:00:00Z"])}).to_parquet(
        src / "customers.parquet")
    pd.DataFrame({"customer_id": ["C1"], "event_at": pd.to_datetime(["2024-02-01T12:00:00+02:00"]),
                  "event_type": ["session"]}).to_parquet(src / "events.parquet")
    home = tmp_path / "home"
    report = ingest(src, home)
    assert (report.get("events").inserted, report.get("events").rejected) == (1, 0)
    assert query(home, "SELECT CAST(event_at AS VARCHAR) FROM events") == [("2024-02-01 10:00:00",)]


def test_timestamps_with_offsets_become_utc(tmp_path: Path) -> None:
    home, report = load_events(
        tmp_path,
        "event_id,customer_id,event_at,event_type\n"
        "e1,C1,2024-02-01T12:00:00+02:00,session\ne2,C1,2024-02-01T12:00:00-0530,session\n"
        "e3,C1,2024-02-01 12:00:00,session\ne4,C1,2024-02-01T12:00:00.250Z,session\n",
    )
    assert report.inserted == 4
    assert query(home, "SELECT event_id, CAST(event_at AS VARCHAR) FROM events ORDER BY 1") == [
        ("e1", "2024-02-01 10:00:00"),
        ("e2", "2024-02-01 17:30:00"),
        ("e3", "2024-02-01 12:00:00"),  # no offset: UTC
        ("e4", "2024-02-01 12:00:00.25"),
    ]
    assert query(
        home,
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'events' AND column_name = 'event_at'",
    ) == [("TIMESTAMP",)]


def test_extra_customer_columns_become_profile_columns(tmp_path: Path) -> None:
    home = tmp_path / "home"
    customers = (
        "customer_id,signup_at,Lifetime Value,tier,zip\nC1,2024-01-01,120.5,gold,\nC2,2024-01-01,,silver,12345\n"
    )
    ingest(write(tmp_path / "in", customers=customers), home)
    assert query(home, "SELECT name, kind FROM profile_columns ORDER BY 1") == [
        ("lifetime_value", "numeric"),
        ("tier", "categorical"),
        ("zip", "numeric"),
    ]
    assert query(home, "SELECT customer_id, lifetime_value, tier FROM customers ORDER BY 1") == [
        ("C1", 120.5, "gold"),
        ("C2", None, "silver"),
    ]
    # A later load keeps the kind: text in a numeric column is a bad row, not a new type.
    later = write(
        tmp_path / "later", customers="customer_id,signup_at,lifetime_value\nC1,2024-01-01,lots\nC3,2024-01-01,7\n"
    )
    report = ingest(later, home).get("customers")
    assert (report.inserted, report.rejected) == (1, 1)
    assert one_reject(home, "customers")[1] == "lifetime_value 'lots' is not a number"
    types = dict(
        query(home, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'customers'")
    )
    assert (types["lifetime_value"], types["tier"]) == ("DOUBLE", "VARCHAR")


def test_reloading_a_customer_updates_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ingest(
        write(tmp_path / "first", customers=CUSTOMERS.replace("timezone", "timezone,tier").replace("UTC", "UTC,gold")),
        home,
    )
    changed = "customer_id,signup_at,timezone,sms_opt_in\nC1,2024-01-01,Europe/Berlin,no\nC3,2024-01-01,UTC,yes\n"
    report = ingest(write(tmp_path / "second", customers=changed), home).get("customers")
    assert (report.inserted, report.already_loaded) == (1, 1)
    # The file's values replace the stored ones; a profile column the file lacks keeps its value.
    assert query(home, "SELECT customer_id, timezone, sms_opt_in, tier FROM customers ORDER BY 1") == [
        ("C1", "Europe/Berlin", False, "gold"),
        ("C2", "Asia/Tokyo", True, None),
        ("C3", "UTC", True, None),
    ]


def test_load_without_offers_leaves_offers_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ingest(write(tmp_path / "first", offers="offer_id,name,kind,cost\nO1,A,discount,1\n"), home)
    ingest(write(tmp_path / "second"), home)
    assert query(home, "SELECT offer_id FROM offers") == [("O1",)]


def test_gzipped_csv_loads(tmp_path: Path) -> None:
    src = write(tmp_path / "in", events=None)
    (src / "events.csv.gz").write_bytes(gzip.compress(EVENTS.encode()))
    assert ingest(src, tmp_path / "home").get("events").inserted == 2
