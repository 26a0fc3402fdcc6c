"""`engage report` end to end on the simulator: score with a control group, simulate the responses, load them,
and measure treated against holdout -- a positive profit when messages work, none when they do nothing.

Power: the simulator's messages are worth little per customer. With the session champions on the 12,000-
customer world below, about 8,700 customers are in the experiment (half in the control group); messages convert
about 2.6% of the treated on top of their organic orders, a true expected profit of about 0.36 per treated
customer (computed from the truth in the first test). Over a 2-day window (message conversions land within a day
of the send; a longer window only adds organic noise) the standard error of the difference is about 0.07, so the
real effect is about 5 standard errors: its interval clears zero with a probability above 99.9%, whatever the
seed (respond seeds 1-4 gave z = 4.2, 4.8, 6.2, 5.1). Without an effect, everybody's outcome is an organic draw
keyed by customer and seed, independent of the models' decisions, so the fixed seed fixes the result (seeds 1-4:
z = 0.25, -0.07, 0.92, 0.37). The session world's 2,000 customers (about 1,500 in the experiment) would leave
the real effect within about 2 standard errors, which is why this module simulates a bigger world and scores it
with the session's models.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from engage.cli import app
from serving import batch

runner = CliRunner()
CUSTOMERS, DAYS, WORLD_SEED = 12_000, 200, 23
WINDOW = "2"  # simulate-respond --days and report --attribution-days
RESPOND_SEED = "2"


@pytest.fixture(scope="module")
def experiment(served, tmp_path_factory):
    """A bigger simulated world, loaded, scored by the session champions under a policy with a 50% control
    group; the list, and the plan that wrote it (its decisions are logged per setting)."""
    from features.load import ingest
    from features.simulate import simulate
    from features.truth import store_ground_truth

    root = tmp_path_factory.mktemp("report")
    env = pytest.MonkeyPatch()
    registry = root / "mlruns.sqlite"
    shutil.copy(served.registry_db, registry)
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry}")
    env.setenv("ENGAGE_MLFLOW_ARTIFACTS", str(root / "artifacts"))
    (root / "policy.yaml").write_text("holdout:\n  share: 0.5\n  salt: report-test\n")
    env.setenv("ENGAGE_POLICY", str(root / "policy.yaml"))
    try:
        src, base = root / "src", root / "base"
        simulate(CUSTOMERS, DAYS, WORLD_SEED, src, progress=False)
        ingest(src, base)
        store_ground_truth(src, base)
        models = batch.load_champions(served.home)  # checked against the session's feature store
        plan = batch.plan(base, batch.BatchOptions(out=root / "list.parquet", run_id="report-test", workers=1,
                                                   chart=False, log_decisions=False), models=models)
        ranked, summary = batch.run_local(plan)
        yield SimpleNamespace(root=root, src=src, base=base, list=root / "list.parquet", plan=plan, ranked=ranked,
                              summary=summary, registry=f"sqlite:///{registry}")
    finally:
        env.undo()


def _log_decisions(exp, url: str) -> None:
    from serving.servingdb import create_serving_engine

    exp.plan.engine = create_serving_engine(url)
    assert batch.log_decisions(exp.plan, exp.ranked) == exp.ranked.num_rows


def _invoke(args: list[str], env: dict[str, str]):
    return runner.invoke(app, args, env=env)


def _run(exp, effect: str) -> SimpleNamespace:
    """One setting through the commands: simulate-respond, ingest, report (in a copy of the loaded world)."""
    folder = exp.root / effect
    home = folder / "home"
    shutil.copytree(exp.base, home)
    db = f"sqlite:///{folder / 'serving.db'}"
    _log_decisions(exp, db)
    env = {"ENGAGE_HOME": str(home), "ENGAGE_SERVING_DB_URL": db}
    responses = folder / "responses"
    result = _invoke(["simulate-respond", "--list", str(exp.list), "--truth", str(exp.src), "--days", WINDOW,
                      "--seed", RESPOND_SEED, "--effect", effect, "--out", str(responses)], env)
    assert result.exit_code == 0, result.output
    result = _invoke(["ingest", str(responses)], env)
    assert result.exit_code == 0, result.output
    result = _invoke(["report", "--attribution-days", WINDOW], env)
    assert result.exit_code == 0, result.output
    client = MlflowClient(exp.registry)
    runs = client.search_runs([client.get_experiment_by_name("engage-report").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    return SimpleNamespace(home=home, db=db, env=env, output=result.output, run=runs[0], client=client,
                           responses=pd.read_parquet(responses / "exposures.parquet"))


@pytest.fixture(scope="module")
def real(experiment) -> SimpleNamespace:
    return _run(experiment, "real")


@pytest.fixture(scope="module")
def no_effect(experiment) -> SimpleNamespace:
    return _run(experiment, "none")


def _diff(run, name: str) -> tuple[float, float, float]:
    m = run.data.metrics
    return m[f"diff_{name}"], m[f"diff_{name}_low"], m[f"diff_{name}_high"]


def test_messages_that_work_show_a_positive_profit(real, experiment) -> None:
    from features.respond import load_truth
    from features.simulate import true_conversion_prob

    value, low, high = _diff(real.run, "profit")
    assert low > 0, (value, low, high)
    assert _diff(real.run, "conversion")[1] > 0 and real.run.data.tags["profit_verdict"] == "positive"
    m = real.run.data.metrics
    assert m["customers_treated"] > 4000 and m["customers_holdout"] > 4000
    assert m["customers_feedback"] == len(real.responses) == m["customers_treated"]
    # The estimate is where the truth puts it: the true expected profit of the messages per treated customer
    # (a little high: a few conversions fall after the window), within three standard errors.
    x = real.responses.merge(load_truth(experiment.src), left_on="customer_id", right_index=True)
    costs = pd.read_parquet(experiment.src / "offers.parquet").set_index("offer_id")["cost"].to_dict()
    p = pd.Series(0.0, index=x.index)
    for offer, part in x.groupby(x["offer_id"].fillna("none")):
        p[part.index] = true_conversion_prob(part, None if offer == "none" else offer)
    truth = (p * (x["true_aov"] * 0.3 - x["offer_id"].map(costs).fillna(0.0))).sum() / m["customers_treated"]
    se = (high - low) / (2 * 1.959964)
    assert abs(value - truth) < 3 * se, (value, truth, se)
    # What a person sees: the summary, the page (charts inlined), the MLflow run with the page and the charts.
    text = " ".join(real.output.split())
    assert "treated - holdout" in text and "positive" in text and "MLflow run" in text
    pages = list((real.home / "reports").glob("report-*.html"))
    assert len(pages) == 1 and re.fullmatch(r"report-\d{4}-\d{2}-\d{2}\.html", pages[0].name)
    page = pages[0].read_text()
    assert page.count("data:image/png;base64,") == 6 and "Incremental profit per customer" in page
    for section in ("Churn rate per risk tier", "Offer uplift", "Send time", "Engagement KPIs", "repurchase rate"):
        assert section in page
    assert not [p for p in (real.home / "reports").iterdir() if p.name.startswith(".")]
    artifacts = {a.path for a in real.client.list_artifacts(real.run.info.run_id)}
    assert pages[0].name in artifacts
    charts = {a.path for a in real.client.list_artifacts(real.run.info.run_id, "charts")}
    assert {f"charts/{n}.png" for n in ("outcomes", "difference", "churn_by_tier", "offers", "send_time",
                                        "funnel")} <= charts


def test_messages_that_do_nothing_show_no_effect(no_effect) -> None:
    value, low, high = _diff(no_effect.run, "profit")
    assert low < 0 < high, (value, low, high)
    assert no_effect.run.data.tags["profit_verdict"] == "no measurable effect"
    c = _diff(no_effect.run, "conversion")
    assert c[1] < 0 < c[2]
    assert not no_effect.responses["converted"].any()
    assert "no measurable effect" in " ".join(no_effect.output.split())


def test_report_tables_follow_the_data(real) -> None:
    """Churn per tier, offers, send time and KPIs, recomputed by the report function on the same data."""
    from serving import report as rp
    from serving.servingdb import create_serving_engine

    r = rp.build(real.home, create_serving_engine(real.db), since=None, until=None, attribution_days=2, margin=0.3,
                 horizon_days=90)
    assert math.isclose(r.difference["profit"].value, _diff(real.run, "profit")[0])
    assert set(r.tiers["group"]) == {"treated", "holdout"} and r.tiers["churn_rate"].between(0, 1).all()
    assert "attribution window" in r.churn_window
    # Messages sent at the recommended hour (80%) open more often than the others.
    s = r.send_time.set_index("sent_in")
    assert s.loc["recommended hour", "messages"] > 3 * s.loc["other hours", "messages"]
    assert s.loc["recommended hour", "open_rate"] > s.loc["other hours", "open_rate"]
    k = r.kpis.set_index(["kpi", "group"])["value"]
    assert k["reach rate", "treated"] == 1.0 and 0 < k["click rate", "treated"] < k["open rate", "treated"] < 1
    assert k["churn rate", "treated"] < k["churn rate", "holdout"]
    # Offers: every offer sent is in the table; the realised uplift of the most used one is positive.
    sent = real.responses["offer_id"].fillna(rp.NO_OFFER).value_counts()
    offers = r.offers.set_index("offer")
    assert set(offers.index) == set(sent.index) and offers.loc[sent.index[0], "treated"] == sent.iloc[0]
    assert offers.loc[sent.index[0], "realised_uplift"] > 0 and offers["predicted_uplift"].notna().all()


def test_period_filters(real, experiment) -> None:
    as_of = experiment.plan.as_of
    inside = _invoke(["report", "--attribution-days", WINDOW, "--no-mlflow", "--since", f"{as_of:%Y-%m-%dT%H:%M:%S}Z",
                      "--out", str(real.home / "inside.html")], real.env)
    assert inside.exit_code == 0, inside.output
    assert (real.home / "inside.html").exists()
    before = _invoke(["report", "--until", f"{as_of:%Y-%m-%dT%H:%M:%S}Z", "--out", str(real.home / "before.html")],
                     real.env)
    assert before.exit_code != 0 and "no decisions before" in " ".join(before.output.split())
    assert not (real.home / "before.html").exists()


def test_no_decisions_or_no_feedback(experiment, tmp_path: Path) -> None:
    from serving.servingdb import create_serving_engine

    client = MlflowClient(experiment.registry)

    def report_runs() -> int:
        exp = client.get_experiment_by_name("engage-report")
        return len(client.search_runs([exp.experiment_id])) if exp else 0

    runs = report_runs()
    home = tmp_path / "home"
    env = {"ENGAGE_HOME": str(home), "ENGAGE_SERVING_DB_URL": f"sqlite:///{tmp_path / 'missing.db'}"}
    result = _invoke(["report"], env)
    assert result.exit_code != 0 and "no decision log yet" in " ".join(result.output.split())
    env["ENGAGE_SERVING_DB_URL"] = f"sqlite:///{tmp_path / 'empty.db'}"
    create_serving_engine(env["ENGAGE_SERVING_DB_URL"])
    result = _invoke(["report"], env)
    assert result.exit_code != 0 and "no decisions at all in the decision log" in " ".join(result.output.split())
    # Decisions, but no feedback yet.
    env = {"ENGAGE_HOME": str(experiment.base), "ENGAGE_SERVING_DB_URL": f"sqlite:///{tmp_path / 'logged.db'}"}
    _log_decisions(experiment, env["ENGAGE_SERVING_DB_URL"])
    result = _invoke(["report"], env)
    assert result.exit_code != 0 and "no feedback yet" in " ".join(result.output.split())
    assert not (home / "reports").exists() and not (experiment.base / "reports").exists()
    assert report_runs() == runs


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "2026-02-01", "--until", "2026-01-01"], "is not before --until"),
    (["--since", "yesterday"], "is not a timestamp"),
    (["--out", "report.txt"], "use an .html file"),
    (["--attribution-days", "0"], "--attribution-days must be at least 1"),
    (["--colour", "red"], "No such option"),
])
def test_bad_options(args: list[str], message: str, tmp_path: Path) -> None:
    result = _invoke(["report", *args], {"ENGAGE_HOME": str(tmp_path / "home"),
                                         "ENGAGE_SERVING_DB_URL": f"sqlite:///{tmp_path / 'none.db'}"})
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
    assert not list(tmp_path.rglob("*.html"))
