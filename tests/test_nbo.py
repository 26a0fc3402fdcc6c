"""Next-best-offer pipeline: off-policy estimators, uplift decisions, quality against the simulator's truth."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engage.config import load_config
from features.load import ingest
from tests.factories import write_contract
from training import next_best_offer as nbo
from training import ope
from training.base import MissingExposures, TrainingError
from training.context import open_context


@pytest.fixture(scope="module")
def trained(sim_home: Path):
    """Train once on the shared simulated world; keep the exposures frame and whether the plots were written."""
    captured: dict[str, pd.DataFrame] = {}
    real = nbo.exposures_dataset

    def capture(ctx, service):
        captured["df"] = real(ctx, service)
        return captured["df"]

    with pytest.MonkeyPatch.context() as mp, open_context(sim_home, load_config()) as ctx:
        mp.setattr(nbo, "exposures_dataset", capture)
        result = nbo.train(ctx)
        plots_ok = all(p.exists() and p.stat().st_size > 1000 for p in result.plots)
    return result, captured["df"], plots_ok


class _FixedModel(nbo.NextBestOfferModel):
    """The real decision code over hand-set conversion probabilities (one row of p per input row)."""

    def __init__(self, p: np.ndarray, costs: list[float], channels: list[str] | None = None):
        arms = ["none", *(f"O{k}" for k in range(1, len(costs)))]
        sets = [frozenset(c.split(";")) if c else frozenset() for c in (channels or [""] * len(costs))]
        super().__init__(None, [], np.zeros(len(arms)), None, arms, np.array(costs, float), sets, 0.3, [], 50.0)
        self.p = np.asarray(p, dtype=float)

    def prepare(self, df: pd.DataFrame) -> np.ndarray:
        return np.arange(len(df))[:, None]

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        return self.p[X[:, 0]]


def _customers(n: int, **cols) -> pd.DataFrame:
    return pd.DataFrame({"revenue_365d": [100.0] * n, "orders_365d": [2.0] * n, **cols})  # revenue 50 per order


# ---- estimators on hand-made logs ----------------------------------------------------------------------

def test_estimators_on_a_tiny_log_with_known_answers():
    arm = np.array([0, 1, 1, 2])
    propensity = np.array([0.5, 0.25, 0.25, 0.25])
    reward = np.array([1.0, 2.0, 0.0, 3.0])
    always_1 = np.tile([0.0, 1.0, 0.0], (4, 1))  # weights 0, 4, 4, 0
    q_hat = np.tile([0.0, 1.5, 0.0], (4, 1))
    assert ope.ipw(always_1, arm, propensity, reward).value == pytest.approx(8 / 4)
    assert ope.snips(always_1, arm, propensity, reward).value == pytest.approx(8 / 8)
    # DR: 1.5 everywhere, plus 4 * (2 - 1.5) and 4 * (0 - 1.5) on the two sends of arm 1.
    assert ope.dr(always_1, arm, propensity, reward, q_hat).value == pytest.approx((1.5 + 3.5 - 4.5 + 1.5) / 4)
    # A model with zero residuals makes DR its own direct estimate.
    exact = np.tile([1.0, 1.0, 3.0], (4, 1))
    exact[1, 1], exact[2, 1] = 2.0, 0.0
    assert ope.dr(always_1, arm, propensity, reward, exact).value == pytest.approx(exact[:, 1].mean())


def test_estimators_recover_a_known_policy_value_within_their_intervals():
    rng = np.random.default_rng(0)
    n, k = 40_000, 3
    x = rng.integers(0, 2, n)
    logging = np.where(x[:, None] == 1, [0.6, 0.3, 0.1], [0.2, 0.2, 0.6])  # depends on the context
    arm = (rng.random(n)[:, None] > np.cumsum(logging, axis=1)).sum(axis=1)
    mean = np.where(x[:, None] == 1, [0.2, 0.5, 0.1], [0.3, 0.1, 0.6])
    reward = (rng.random(n) < mean[np.arange(n), arm]).astype(float)
    target = np.eye(k)[np.where(x == 1, 1, 2)]  # the best arm per context
    truth = (target * mean).sum(axis=1).mean()
    wrong_model = np.full((n, k), 0.3)  # DR stays unbiased with a bad model when propensities are right
    for est in (ope.ipw(target, arm, logging[np.arange(n), arm], reward),
                ope.snips(target, arm, logging[np.arange(n), arm], reward),
                ope.dr(target, arm, logging[np.arange(n), arm], reward, wrong_model)):
        assert est.lo < truth < est.hi
        assert est.hi - est.lo < 0.05
    on = ope.mean_ci(reward)
    mix = np.tile(np.bincount(arm, minlength=k) / n, (n, 1))
    assert ope.dr_logging(arm, reward, wrong_model, mix).value == pytest.approx(on.value, abs=0.01)


def test_interval_counts_a_repeated_customer_once():
    terms = np.random.default_rng(1).normal(size=500)
    once = ope.mean_ci(terms)
    naive = ope.mean_ci(np.repeat(terms, 2))
    clustered = ope.mean_ci(np.repeat(terms, 2), clusters=np.repeat(np.arange(500), 2))
    assert naive.hi - naive.lo < 0.75 * (once.hi - once.lo)
    assert clustered.hi - clustered.lo == pytest.approx(once.hi - once.lo, rel=1e-9)


def test_logged_rewards_charge_the_offer_cost_only_on_conversion():
    sends = pd.DataFrame({"offer_id": ["A", "A", "", None], "channel": ["email"] * 4,
                          "converted": [True, False, True, False], "revenue": [100.0, 0.0, 50.0, 0.0],
                          "propensity": [0.5, None, 0.25, 0.25]})
    offers = pd.DataFrame({"offer_id": ["A"], "cost": [10.0]})
    out = ope.logged_rewards(sends, offers, margin=0.3)
    assert out["reward"].tolist() == pytest.approx([100 * 0.3 - 10, 0.0, 50 * 0.3, 0.0])
    assert out["offer_id"].tolist() == ["A", "A", None, None]
    assert out["propensity"].tolist() == pytest.approx([0.5, 0.5, 0.25, 0.25])  # A is half the email sends


# ---- decisions ----------------------------------------------------------------------------------------

def test_offer_without_uplift_is_not_chosen():
    # O1 is free but changes nothing, O2 changes nothing and costs 5, O3 lifts conversion (0.05 -> 0.08).
    p = np.array([[0.05, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.08]])
    out = _FixedModel(p, [0.0, 0.0, 5.0, 2.0]).predict(None, _customers(2))
    assert out.loc[0, "best_offer"] == "" and out.loc[0, "best_profit"] == 0.0
    assert out.loc[0, "profit_O1"] == pytest.approx(0.0) and out.loc[0, "profit_O2"] < 0
    assert out.loc[1, "best_offer"] == "O3"  # the same code does pick a real uplift
    assert out.loc[1, "profit_O3"] == pytest.approx(0.03 * 0.3 * 50 - 0.08 * 2)


def test_customer_who_buys_anyway_gets_no_discount():
    # 90% likely to buy without an offer; the discount would add 2 points and cost 6 on every purchase.
    out = _FixedModel(np.array([[0.90, 0.92]]), [0.0, 6.0]).predict(None, _customers(1))
    assert out.loc[0, "best_offer"] == ""
    assert out.loc[0, "profit_O1"] == pytest.approx(0.02 * 0.3 * 50 - 0.92 * 6)


def test_an_offer_is_only_chosen_on_its_channels():
    p = np.tile([0.05, 0.10, 0.07], (2, 1))  # O1 is best but only goes out by email
    model = _FixedModel(p, [0.0, 1.0, 1.0], channels=["", "email", ""])
    out = model.predict(None, _customers(2, channel=["email", "sms"]))
    assert list(out["best_offer"]) == ["O1", "O2"]
    assert np.isnan(out.loc[1, "profit_O1"])


# ---- the trained pipeline -----------------------------------------------------------------------------

def test_learned_policy_beats_no_offer_and_random_in_true_profit(trained):
    m = trained[0].metrics
    assert m["true_profit_policy"] > m["true_profit_no_offer"] + 0.01
    assert m["true_profit_policy"] > m["true_profit_random"] + 0.01
    assert m["true_profit_ratio_to_oracle"] > 0.1  # 2,000 customers are noisy; see the 20k-world benchmark
    assert m["true_profit_oracle"] >= max(m[f"true_profit_{p}"] for p in ("policy", "random", "best_single"))


def test_metrics_table_and_plots(trained):
    result, _, plots_ok = trained
    m = result.metrics
    assert result.gate.metric == "dr_policy_value" and result.artifacts == {}
    for policy in nbo.POLICIES:
        for est in ("ipw", "snips", "dr"):
            assert m[f"{est}_{policy}_value_lo"] <= m[f"{est}_{policy}_value"] <= m[f"{est}_{policy}_value_hi"]
    assert m["dr_no_offer_value"] <= m["dr_best_single_value"]
    assert 0.55 < m["conversion_roc_auc"] < 1
    table = result.tables["policy_values"]
    assert set(nbo.POLICIES) <= set(table["policy"])
    assert table.set_index("policy").loc["best_single", "arm"] in result.python_model.arms
    assert plots_ok and len(result.plots) == 2


def test_dr_of_the_logging_policy_is_close_to_its_on_policy_mean(trained):
    m = trained[0].metrics
    on, width = m["ipw_logging_value"], m["ipw_logging_value_hi"] - m["ipw_logging_value_lo"]
    assert abs(m["dr_logging_value"] - on) < 0.1 * width


def test_holdout_is_later_than_training_and_predict_has_every_arm(trained):
    result, df, _ = trained
    earlier = df[~df["exposure_id"].isin(result.holdout["exposure_id"])]
    assert len(earlier) > len(result.holdout) > 0
    assert earlier["event_timestamp"].max() < result.holdout["event_timestamp"].min()
    out = result.python_model.predict(None, result.input_example)
    arms = result.python_model.arms
    assert arms[0] == "none" and {f"p_convert_{a}" for a in arms} | {f"profit_{a}" for a in arms} <= set(out)
    assert set(out["best_offer"]) <= {"", *arms[1:]}
    assert ((out.filter(like="p_convert_") > 0) & (out.filter(like="p_convert_") < 1)).all().all()


def test_evaluate_on_unpickled_model_matches_train_metrics(trained):
    import cloudpickle

    result = trained[0]
    clone = cloudpickle.loads(cloudpickle.dumps(result.python_model))
    again = nbo.evaluate(clone, result.holdout)
    assert again["dr_policy_value"] == pytest.approx(result.metrics["dr_policy_value"], rel=1e-12)
    assert set(again) <= set(result.metrics)
    X = clone.prepare(result.holdout.head(3))
    assert clone.score_matrix(X).shape == (3, len(clone.arms))


def test_one_customer_scores_as_in_a_matrix(trained):
    """A request's one row goes through LightGBM's single-row fast path: the same probabilities per arm."""
    model = trained[0].python_model
    X = model.prepare(trained[0].holdout.head(60))
    singles = np.vstack([model.score_matrix(X[i:i + 1]) for i in range(len(X))])
    np.testing.assert_array_equal(singles, model.score_matrix(X))


def test_registered_model_loads_predicts_and_is_gated_on_the_same_holdout(trained, sim_home, mlflow_uri):
    import mlflow

    from training.registry import log_and_register

    result = dataclasses.replace(trained[0], plots=[])  # the plots went with the training context's workdir
    with open_context(sim_home, load_config()) as ctx:
        first = log_and_register(result, ctx, experiment="nbo-test")
        second = log_and_register(result, ctx, experiment="nbo-test")  # scores the loaded champion
    assert first.alias == "champion"
    assert second.alias == "challenger" and "does not beat" in second.reason
    assert second.champion_metrics["dr_policy_value"] == pytest.approx(result.metrics["dr_policy_value"])
    loaded = mlflow.pyfunc.load_model(f"models:/next_best_offer/{first.version}")
    example = result.input_example.copy()
    ints = example.select_dtypes(include=["integer", "bool"]).columns
    example[ints] = example[ints].astype("float64")
    assert list(loaded.predict(example)["best_offer"]) == list(result.python_model.predict(None, example)["best_offer"])


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_single_class_outcome_is_a_clear_error(sim_home, trained, monkeypatch):
    monkeypatch.setattr(nbo, "exposures_dataset", lambda ctx, service: trained[1].assign(converted=False))
    with open_context(sim_home, load_config()) as ctx, pytest.raises(TrainingError, match="only one class"):
        nbo.train(ctx)


def test_no_exposures_raises_missing_exposures(tmp_path):
    home = tmp_path / "home"
    ingest(write_contract(tmp_path / "src", exposures=None), home)
    with open_context(home, load_config()) as ctx, pytest.raises(MissingExposures):
        nbo.train(ctx)


def test_too_few_sends_is_a_training_error(tmp_path):
    home = tmp_path / "home"
    ingest(write_contract(tmp_path / "src"), home)  # two exposures
    with open_context(home, load_config()) as ctx, pytest.raises(TrainingError, match="too little data"):
        nbo.train(ctx)

