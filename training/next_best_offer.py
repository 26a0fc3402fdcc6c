"""Next best offer: P(convert | customer, arm) for each offer and for no offer, and the arm of highest uplift profit.

The decision is on uplift, never on raw propensity: incremental profit(arm) = (p_arm - p_none) * margin *
expected revenue - p_arm * cost, and no offer (profit 0) unless an offer's is positive, so a customer who buys
anyway gets no discount. The learned policy is scored off-policy on later sends (IPW, SNIPS, DR; ``ope.py``)
against the logging, uniform random, best single offer and no-offer policies, and on simulated data by its
true expected profit against the per-customer oracle.
"""

from __future__ import annotations

import logging
import time

import lightgbm as lgb
import mlflow.pyfunc
import numpy as np
import pandas as pd

from features.catalog import model_columns, service_features
from features.snapshots import profile_columns, to_utc
from features.store import historical_features
from training import ope
from training.base import GateRule, TrainContext, TrainingError, TrainResult
from training.datasets import describe_window, ensure_snapshots, exposures_dataset, split_by_time
from training.evaluate import binary_metrics
from training.matrix import FeatureMatrix
from training.row_predict import RowPredictor
from training.transforms import zero_missing

log = logging.getLogger(__name__)
MODEL_NAME = SERVICE = "next_best_offer"
CONTROL = "none"  # the arm name of a message without an offer
POLICIES = ("policy", "logging", "random", "best_single", "no_offer")
REVENUE_PRIOR_ORDERS = 2.0  # the customer's AOV is shrunk towards the global mean as if by 2 orders at it
MAX_WEIGHT = 10.0  # clip of the stabilized inverse-propensity training weights
MIN_ARM_SENDS, MIN_ARM_CONVERSIONS = 50, 5  # an offer with less training data is never recommended
PATIENCE = 30
NUM_THREADS = 1  # two threads were 4-15x slower when other jobs share the two cores; one is ~1.4x slower alone
BASE_PARAMS = {"min_data_in_leaf": 100, "lambda_l2": 10.0}  # num_leaves from the config
# Per-arm departures from the shared base: small trees whose leaves hold >= 1/10 of the arm's sends.
ARM_PARAMS = {"num_leaves": 4, "lambda_l2": 100.0}
ARM_LEAF_SHARE = 10


class NextBestOfferModel(mlflow.pyfunc.PythonModel):
    """Conversion probability per arm: a shared LightGBM base for all sends plus, per arm, a fitted
    intercept and a small booster of departures from it (logit scale); with the offer catalog and margin.

    ``predict`` takes rows of the ``next_best_offer`` feature service (plus an optional ``channel``) and
    returns ``best_offer`` ("" = no offer), ``best_profit``, ``p_convert_<arm>`` and ``profit_<arm>`` per arm
    (``none`` is the control). Serving can call ``prepare`` once, then ``score_matrix`` on the matrix.
    """

    def __init__(self, base: lgb.Booster, arm_boosters: list[lgb.Booster], offsets: np.ndarray,
                 matrix: FeatureMatrix, arms: list[str], costs: np.ndarray, arm_channels: list[frozenset[str]],
                 margin: float, features: list[str], revenue_prior: float):
        self.base = base
        self.arm_boosters = arm_boosters
        self.offsets = np.asarray(offsets, dtype=float)
        self.matrix = matrix
        self.arms = arms
        self.costs = np.asarray(costs, dtype=float)
        self.arm_channels = arm_channels
        self.margin = margin
        self.features = features
        self.revenue_prior = revenue_prior

    def prepare(self, df: pd.DataFrame) -> np.ndarray:
        return self.matrix.transform(df.reset_index(drop=True))

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        """(rows, arms) conversion probabilities; arm 0 is the control."""
        base, *arms = self._rows()
        shared = base.predict(X, "raw")
        raw = np.column_stack([shared + c + b.predict(X, "raw") for c, b in zip(self.offsets, arms, strict=True)])
        return 1.0 / (1.0 + np.exp(-raw))

    def _rows(self) -> list[RowPredictor]:
        """The base and arm boosters behind LightGBM's single-row fast path, made on first use."""
        rows = self.__dict__.get("_row_predictors")
        if rows is None:
            rows = self.__dict__["_row_predictors"] = [RowPredictor(b) for b in (self.base, *self.arm_boosters)]
        return rows

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_row_predictors", None)  # C handles, made again where the model scores
        return state

    def expected_revenue(self, df: pd.DataFrame) -> np.ndarray:
        """Revenue given conversion: last-year AOV shrunk towards the global mean revenue per conversion."""
        def col(name: str) -> np.ndarray:
            s = df[name] if name in df else pd.Series(np.nan, index=df.index)
            return pd.to_numeric(s, errors="coerce").to_numpy(float)

        return self.revenue_from(col("revenue_365d"), col("orders_365d"))

    def revenue_from(self, revenue_365d: np.ndarray, orders_365d: np.ndarray) -> np.ndarray:
        """:meth:`expected_revenue` on float arrays (NaN = missing = 0), for serving without frames."""
        revenue, orders = zero_missing(revenue_365d), zero_missing(orders_365d)
        return (revenue + REVENUE_PRIOR_ORDERS * self.revenue_prior) / (orders + REVENUE_PRIOR_ORDERS)

    def allowed(self, df: pd.DataFrame) -> np.ndarray:
        return ope.allowed_arms(df["channel"] if "channel" in df else None, self.arm_channels, len(df))

    def reward_matrix(self, df: pd.DataFrame, p: np.ndarray) -> np.ndarray:
        """(rows, arms) predicted reward of a send: p * (margin * revenue - cost)."""
        return p * (self.margin * self.expected_revenue(df)[:, None] - self.costs[None, :])

    def decide(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.reset_index(drop=True)
        p = self.score_matrix(self.prepare(df))
        profit = ope.incremental_profit(p, self.expected_revenue(df), self.costs, self.margin)
        allowed = self.allowed(df)
        best = ope.best_arms(profit, allowed)
        out = {"best_offer": [self.arms[k] if k else "" for k in best], "best_profit": profit[np.arange(len(df)), best]}
        out |= {f"p_convert_{a}": p[:, k] for k, a in enumerate(self.arms)}
        out |= {f"profit_{a}": np.where(allowed[:, k], profit[:, k], np.nan) for k, a in enumerate(self.arms)}
        return pd.DataFrame(out)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.decide(model_input)


def offer_catalog(con) -> pd.DataFrame:
    """The offers table: ``offer_id, cost`` and ``channels`` as a frozenset (empty = every channel)."""
    offers = con.execute("SELECT offer_id, cost, channels FROM offers ORDER BY offer_id").df()
    offers["cost"] = pd.to_numeric(offers["cost"], errors="coerce").fillna(0.0).astype(float)
    offers["channels"] = [frozenset(c.strip() for c in str(v or "").split(";") if c.strip())
                          for v in offers["channels"]]
    return offers


def _params(tcfg, extra: dict, seed_offset: int) -> dict:
    return {"objective": "binary", "learning_rate": tcfg.learning_rate, "feature_fraction": 0.8,
            "bagging_fraction": 0.8, "bagging_freq": 1, **extra, "seed": tcfg.seed + seed_offset,
            "deterministic": True, "num_threads": NUM_THREADS, "verbose": -1}


def _fit(X: np.ndarray, y: np.ndarray, w: np.ndarray, init: np.ndarray, is_val: np.ndarray, params: dict,
         rounds: int, names: list[str], cats: list[int]) -> lgb.Booster:
    """Early-stop on the validation rows, then refit on all rows for the best number of rounds."""
    if not is_val.any() or is_val.all():  # too few customers for a customer split: hold out every 5th send
        is_val = np.arange(len(y)) % 5 == 0

    def data(m: np.ndarray | slice, **kw) -> lgb.Dataset:
        return lgb.Dataset(X[m], y[m], weight=w[m], init_score=init[m], feature_name=names,
                           categorical_feature=cats, **kw)

    dfit = data(~is_val, free_raw_data=False)
    probe = lgb.train(params, dfit, num_boost_round=rounds, valid_sets=[data(is_val, reference=dfit)],
                      callbacks=[lgb.early_stopping(PATIENCE, verbose=False)])
    return lgb.train(params, data(slice(None)), num_boost_round=max(1, probe.best_iteration or rounds))


def _intercept(y: np.ndarray, w: np.ndarray, offset: np.ndarray) -> float:
    """The constant c maximizing the weighted logistic likelihood of ``y`` with logits ``offset + c``."""
    c = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(offset + c)))
        step = float((w * (y - p)).sum()) / max(float((w * p * (1 - p)).sum()), 1e-12)
        c += step
        if abs(step) < 1e-9:
            break
    return c


def fit_model(train_df: pd.DataFrame, features: list[str], offers: pd.DataFrame, tcfg) -> NextBestOfferModel:
    """Fit the conversion model on training sends (passed through ``ope.logged_rewards``).

    Model choice, measured on two 20,000-customer simulated worlds (true profit / per-customer oracle,
    same weights and early stopping): one booster per arm (T-learner) 0.31 / 0.31, one booster with the
    arm as a categorical input (S-learner) 0.30 / 0.28, this shared base with per-arm intercepts and small
    departure boosters 0.38 / 0.33. The T-learner relearns the conversion level from each arm's share of
    the data, and the difference of separately fitted models is mostly noise; the S-learner seldom splits
    on the arm and washes uplift out. Here the level is learned once from every send, and each arm adds its
    mean effect (exact, by a 1-D logistic fit) and only what its own sends support beyond it.
    """
    y = train_df["converted"].astype(bool).to_numpy()
    offer = train_df["offer_id"].astype("string").fillna(CONTROL)
    sends, wins = offer.value_counts(), offer[y].value_counts()
    keep = [o for o in offers["offer_id"]
            if o != CONTROL and sends.get(o, 0) >= MIN_ARM_SENDS and wins.get(o, 0) >= MIN_ARM_CONVERSIONS]
    dropped = sorted(set(offers["offer_id"]) - set(keep))
    if dropped:
        log.warning("offers with under %d sends or %d conversions in training are never recommended: %s",
                    MIN_ARM_SENDS, MIN_ARM_CONVERSIONS, ", ".join(dropped))
    if sends.get(CONTROL, 0) < MIN_ARM_SENDS or wins.get(CONTROL, 0) < MIN_ARM_CONVERSIONS:
        raise TrainingError(f"uplift needs a control arm: the training sends have {sends.get(CONTROL, 0)} messages "
                            f"without an offer and {wins.get(CONTROL, 0)} conversions among them "
                            f"(need {MIN_ARM_SENDS} and {MIN_ARM_CONVERSIONS})")
    arms = [CONTROL, *keep]
    rows = offer.isin(arms).to_numpy()
    train_df, y = train_df[rows].reset_index(drop=True), y[rows].astype(float)
    arm = offer[rows].map({a: k for k, a in enumerate(arms)}).to_numpy(int)
    matrix = FeatureMatrix(model_columns(features)).fit(train_df)
    X = matrix.transform(train_df)
    # Stabilized inverse-propensity weights: within an arm they undo the logging policy's preferences (which
    # depend on observed attributes), while each arm keeps its share of the data.
    share = np.bincount(arm, minlength=len(arms)) / len(arm)
    w = np.minimum(share[arm] / train_df["propensity"].to_numpy(float), MAX_WEIGHT)
    w = w / w.mean()
    customers = train_df["customer_id"].unique()
    val_ids = np.random.default_rng(tcfg.seed).choice(customers, size=max(1, len(customers) // 5), replace=False)
    is_val = train_df["customer_id"].isin(set(val_ids)).to_numpy()
    cats = [matrix.columns_.index(c) for c in matrix.categorical_]
    rate = float(np.average(y, weights=w))
    start = np.full(len(y), np.log(rate / (1 - rate)))
    params = _params(tcfg, {"num_leaves": tcfg.num_leaves, **BASE_PARAMS}, 0)
    base = _fit(X, y, w, start, is_val, params, tcfg.num_boost_round, matrix.columns_, cats)
    raw = base.predict(X, raw_score=True)
    offsets, boosters = np.zeros(len(arms)), []
    for k in range(len(arms)):
        m = arm == k
        offsets[k] = _intercept(y[m], w[m], raw[m])
        params = _params(tcfg, {**ARM_PARAMS, "min_data_in_leaf": max(50, m.sum() // ARM_LEAF_SHARE)}, k + 1)
        boosters.append(_fit(X[m], y[m], w[m], raw[m] + offsets[k], is_val[m], params, tcfg.num_boost_round,
                             matrix.columns_, cats))
    catalog = offers.set_index("offer_id").loc[keep]
    revenue_prior = float(train_df.loc[y > 0, "revenue"].mean())
    return NextBestOfferModel(base, boosters, offsets, matrix, arms, np.r_[0.0, catalog["cost"].to_numpy(float)],
                              [frozenset(), *catalog["channels"]], tcfg.margin, features, revenue_prior)


def _logged_arms(model: NextBestOfferModel, offer_id: pd.Series) -> np.ndarray:
    """Each send's logged arm in ``model``'s order; an offer the model does not know is the extra arm K."""
    index = {a: k for k, a in enumerate(model.arms)}
    return offer_id.astype("string").fillna(CONTROL).map(lambda o: index.get(o, len(model.arms))).to_numpy(np.intp)


def off_policy(model: NextBestOfferModel, holdout: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame, dict]:
    """OPE metrics, the per-policy table and the scores behind them, for ``model`` on held-out sends."""
    hold = holdout.reset_index(drop=True)
    n = len(hold)
    p = model.score_matrix(model.prepare(hold))
    profit = ope.incremental_profit(p, model.expected_revenue(hold), model.costs, model.margin)
    allowed = model.allowed(hold)
    choice = ope.best_arms(profit, allowed)
    # One extra arm column for sends of offers this model does not know: no policy picks it, q_hat 0.
    q = np.column_stack([model.reward_matrix(hold, p), np.zeros(n)])
    arm = _logged_arms(model, hold["offer_id"])
    table, best_arm = ope.evaluate_policies(
        choice, q, np.column_stack([allowed, np.zeros(n, dtype=bool)]), arm, hold["propensity"].to_numpy(float),
        hold["reward"].to_numpy(float), hold["channel"].astype("string").fillna("").to_numpy(),
        hold["customer_id"].to_numpy(), [*model.arms, "unknown"])
    metrics = ope.flat_metrics(table, POLICIES)
    metrics["policy_offer_share"] = float((choice > 0).mean())
    known = arm < len(model.arms)
    y = hold["converted"].astype(bool).to_numpy()[known]
    if len(np.unique(y)) == 2:
        m = binary_metrics(y, p[known.nonzero()[0], arm[known]], prefix="conversion_")
        metrics |= {key: m[key] for key in ("conversion_roc_auc", "conversion_log_loss", "conversion_brier")}
    return metrics, table, {"p": p, "choice": choice, "best_arm": best_arm}


def evaluate(model: NextBestOfferModel, holdout: pd.DataFrame) -> dict[str, float]:
    """Holdout metrics of any next-best-offer model version on the same sends (``dr_policy_value`` gates)."""
    return off_policy(model, holdout)[0]


def _truth_frame(ctx: TrainContext, model: NextBestOfferModel) -> pd.DataFrame | None:
    """Service features at ``truth_at`` of the customers signed up by then, with their true response."""
    truth = ctx.truth
    need = ["true_aov", *(f"p_convert_{a}" for a in model.arms)]
    if truth is None or "truth_at" not in truth or any(c not in truth for c in need):
        return None
    truth_at = to_utc(pd.Timestamp(truth["truth_at"].iloc[0]))
    if truth_at >= ctx.as_of:
        log.info("ground truth at %s is not before the data cutoff %s: no true-profit metrics", truth_at, ctx.as_of)
        return None
    ensure_snapshots(ctx, [truth_at])
    entity = pd.DataFrame({"customer_id": truth["customer_id"], "event_timestamp": pd.Timestamp(truth_at)})
    feats = historical_features(ctx.store, SERVICE, entity)
    feats = feats[feats[model_columns(model.features)].notna().any(axis=1)].drop(columns="event_timestamp")
    return feats.merge(truth[["customer_id", *need]], on="customer_id", validate="one_to_one")


def _logging_mix(model: NextBestOfferModel, df: pd.DataFrame, train_df: pd.DataFrame) -> np.ndarray:
    """(n, K) logging-policy probabilities per customer: the simulator's own policy table when the data came
    from it (loyalty and newness from the features, channels in their share of the sends), else the arm mix."""
    from features import _simworld as sim  # only reached with the simulator's ground truth

    if sorted(sim.OFFER_IDS) != sorted(model.arms[1:]) or "attr_loyalty_member" not in df:
        offer = train_df["offer_id"].astype("string").fillna(CONTROL)
        mix = offer.value_counts(normalize=True).reindex(model.arms, fill_value=0.0).to_numpy(float)
        return np.tile(mix / mix.sum(), (len(df), 1))
    channels = train_df["channel"].value_counts(normalize=True).reindex(list(sim.CHANNELS), fill_value=0.0)
    loyal = df["attr_loyalty_member"].astype("string").str.lower().eq("true").fillna(False).to_numpy(np.intp)
    new = (pd.to_numeric(df["tenure_days"], errors="coerce") < sim.NEW_CUSTOMER_DAYS).to_numpy(np.intp)
    probs = np.einsum("c,nca->na", channels.to_numpy(float), sim.POLICY_PROBS[loyal, new])
    return probs[:, [0, *(1 + sim.OFFER_IDS.index(a) for a in model.arms[1:])]]


def true_profit(ctx: TrainContext, model: NextBestOfferModel, best_arm: int,
                train_df: pd.DataFrame) -> tuple[dict[str, float], dict]:
    """True expected profit per customer at ``truth_at`` of the learned policy, the oracle and the baselines.

    No channel is known there, so every offer is allowed to every policy.
    """
    df = _truth_frame(ctx, model)
    if df is None or df.empty:
        return {}, {}
    p_true = df[[f"p_convert_{a}" for a in model.arms]].to_numpy(float)
    true = ope.incremental_profit(p_true, df["true_aov"].to_numpy(float), model.costs, model.margin)
    p = model.score_matrix(model.prepare(df))
    choice = ope.best_arms(ope.incremental_profit(p, model.expected_revenue(df), model.costs, model.margin),
                           np.ones(p.shape, dtype=bool))
    metrics = ope.true_profit_metrics(true, choice, best_arm, _logging_mix(model, df, train_df))
    return metrics, {"predicted": _uplift(p), "true": _uplift(p_true)}


def _uplift(p: np.ndarray) -> np.ndarray:
    """Mean p_arm - p_none per offer."""
    return (p[:, 1:] - p[:, :1]).mean(axis=0)


def train(ctx: TrainContext) -> TrainResult:
    tcfg = ctx.cfg.training
    offers = offer_catalog(ctx.con)
    df = ope.logged_rewards(exposures_dataset(ctx, SERVICE), offers, tcfg.margin)
    train_df, hold_df = split_by_time(df, tcfg.holdout_share, tcfg.min_rows)
    y = train_df["converted"].astype(bool)
    if y.nunique() < 2:
        raise TrainingError(f"only one class in the training sends' `converted` (every one of {len(y)} sends "
                            f"{'converted' if y.iloc[0] else 'did not convert'}): the offer model needs both; "
                            "load a longer campaign log")
    features = service_features(SERVICE, profile_columns(ctx.con))
    started = time.perf_counter()
    model = fit_model(train_df, features, offers, tcfg)
    fit_seconds = time.perf_counter() - started
    metrics, table, scores = off_policy(model, hold_df)
    truth_metrics, uplift = true_profit(ctx, model, scores["best_arm"], train_df)
    metrics |= truth_metrics | {"fit_seconds": fit_seconds}
    w = ctx.workdir
    series = {"predicted (held-out sends)": _uplift(scores["p"])}
    if uplift:
        series |= {f"{kind} (customers at truth_at)": v for kind, v in uplift.items()}
    plots = [ope.policy_value_plot(table, POLICIES, w / "nbo_policy_values.png"),
             ope.uplift_plot(model.arms[1:], series, w / "nbo_uplift_by_offer.png")]
    return TrainResult(
        model_name=MODEL_NAME,
        feature_service=SERVICE,
        features=features,
        python_model=model,
        artifacts={},
        input_example=hold_df[[*model_columns(features), "channel"]].head(5).reset_index(drop=True),
        params={"learner": "shared base + per-arm intercept and departures", "arms": ",".join(model.arms),
                "margin": tcfg.margin, "max_ipw_weight": MAX_WEIGHT, "train_sends": len(train_df),
                "base_rounds": model.base.current_iteration(), "num_leaves": tcfg.num_leaves,
                **{f"base_{k}": v for k, v in BASE_PARAMS.items()},
                **{f"arm_{k}": v for k, v in ARM_PARAMS.items()}, "learning_rate": tcfg.learning_rate,
                "seed": tcfg.seed, "revenue_prior": round(model.revenue_prior, 4)},
        metrics=metrics,
        gate=GateRule(metric="dr_policy_value"),
        holdout=hold_df,
        evaluate=evaluate,
        holdout_description=f"sends {describe_window(hold_df)}",
        plots=plots,
        tables={"policy_values": table},
        tags={"decision": "incremental profit over no offer", "best_single_offer": model.arms[scores["best_arm"]]},
    )
