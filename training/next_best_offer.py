"""Next best offer: P(convert | customer, arm) per offer and for no offer, and the arm of highest uplift profit.

The decision is on uplift, never on raw propensity: incremental profit(arm) = (p_arm - p_none) * margin *
expected revenue - p_arm * cost, and no offer (profit 0) unless some offer's is positive, so a customer who
buys anyway gets no discount. The learned policy is scored off-policy on later sends (IPW, SNIPS, DR) against
the logging, uniform random, best single offer and no-offer policies, and, on simulated data, by its true
expected profit against the per-customer oracle.
"""

from __future__ import annotations

import logging

import lightgbm as lgb
import mlflow.pyfunc
import numpy as np
import pandas as pd

from features.catalog import OFFER_KINDS, service_features
from features.snapshots import profile_columns
from training import ope
from training.base import GateRule, TrainContext, TrainingError, TrainResult
from training.datasets import describe_window, exposures_dataset, split_by_time
from training.evaluate import binary_metrics
from training.matrix import FeatureMatrix

log = logging.getLogger(__name__)
MODEL_NAME = SERVICE = "next_best_offer"
CONTROL = "none"  # the arm name of a message without an offer
REVENUE_PRIOR_ORDERS = 2.0  # expected revenue shrinks the customer's AOV towards the global mean by 2 orders
MAX_WEIGHT = 10.0  # stabilized inverse-propensity training weights are clipped here
BASELINES = ("logging", "random", "best_single", "no_offer")


def derived_features(df: pd.DataFrame) -> pd.DataFrame:
    """Response-history ratios the booster would otherwise need many splits to find."""
    num = lambda c: pd.to_numeric(df[c], errors="coerce") if c in df else pd.Series(np.nan, index=df.index)  # noqa: E731
    out = pd.DataFrame(index=df.index)
    sent = sum(num(f"offers_{k}_sent_365d").fillna(0) for k in OFFER_KINDS)
    out["offers_sent_365d"] = sent
    out["redemption_rate_365d"] = num("redemptions_365d") / sent.where(sent > 0)
    for k in OFFER_KINDS[:-1]:
        s = num(f"offers_{k}_sent_365d")
        out[f"redemption_rate_{k}_365d"] = num(f"offers_{k}_redeemed_365d") / s.where(s > 0)
    out["non_offer_orders_365d"] = num("orders_365d") - num("redemptions_365d")
    out["control_share_365d"] = num("control_messages_365d") / num("messages_365d").where(num("messages_365d") > 0)
    return out


DERIVED = list(derived_features(pd.DataFrame()).columns)


def allowed_arms(channels: pd.Series | None, arm_channels: list[frozenset[str]], n: int) -> np.ndarray:
    """(n, K) whether each arm may go out on each row's channel (empty list or unknown channel = all)."""
    out = np.ones((n, len(arm_channels)), dtype=bool)
    if channels is None:
        return out
    ch = channels.astype("string").fillna("").to_numpy()
    for k, allowed in enumerate(arm_channels):
        if allowed:
            out[:, k] = np.isin(ch, list(allowed)) | (ch == "")
    return out


def incremental_profit(p: np.ndarray, revenue: np.ndarray, costs: np.ndarray, margin: float) -> np.ndarray:
    """(n, K) profit of each arm over sending no offer; column 0 (the control) is 0."""
    return (p - p[:, :1]) * margin * revenue[:, None] - p * costs[None, :]


def best_arms(profit: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Index of the allowed arm of highest profit; the control unless an offer's is strictly positive."""
    masked = np.where(allowed, profit, -np.inf)
    masked[:, 0] = 0.0
    best = masked.argmax(axis=1)
    return np.where(masked[np.arange(len(best)), best] > 0, best, 0)


class NextBestOfferModel(mlflow.pyfunc.PythonModel):
    """LightGBM conversion models per arm (or one with the arm as input), with the offer catalog and margin.

    ``predict`` takes rows of the ``next_best_offer`` feature service (plus an optional ``channel``)
    and returns ``best_offer`` ("" = no offer), ``best_profit``, ``p_convert_<arm>`` and ``profit_<arm>``
    per arm (``none`` is the control). Serving can call ``prepare`` once and ``score_matrix`` on the matrix.
    """

    def __init__(self, boosters: list[lgb.Booster], learner: str, matrix: FeatureMatrix, arms: list[str],
                 costs: np.ndarray, arm_channels: list[frozenset[str]], margin: float, features: list[str],
                 revenue_prior: float):
        self.boosters = boosters
        self.learner = learner  # "t": one booster per arm; "s": one booster with the arm as last column
        self.matrix = matrix
        self.arms = arms
        self.costs = np.asarray(costs, dtype=float)
        self.arm_channels = arm_channels
        self.margin = margin
        self.features = features
        self.revenue_prior = revenue_prior

    def prepare(self, df: pd.DataFrame) -> np.ndarray:
        df = df.reset_index(drop=True)
        return self.matrix.transform(pd.concat([df, derived_features(df)], axis=1))

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        """(rows, arms) conversion probabilities; arm 0 is the control."""
        if self.learner == "t":
            return np.column_stack([b.predict(X, num_threads=1) for b in self.boosters])
        cols = [np.column_stack([X, np.full(len(X), k, dtype=np.float32)]) for k in range(len(self.arms))]
        return np.column_stack([self.boosters[0].predict(c, num_threads=1) for c in cols])

    def expected_revenue(self, df: pd.DataFrame) -> np.ndarray:
        """Revenue given conversion: last-year AOV shrunk towards the global mean revenue per conversion."""
        rev = pd.to_numeric(df.get("revenue_365d"), errors="coerce").fillna(0).to_numpy(float)
        orders = pd.to_numeric(df.get("orders_365d"), errors="coerce").fillna(0).to_numpy(float)
        return (rev + REVENUE_PRIOR_ORDERS * self.revenue_prior) / (orders + REVENUE_PRIOR_ORDERS)

    def allowed(self, df: pd.DataFrame) -> np.ndarray:
        return allowed_arms(df["channel"] if "channel" in df else None, self.arm_channels, len(df))

    def reward_matrix(self, df: pd.DataFrame, p: np.ndarray | None = None) -> np.ndarray:
        """(rows, arms) predicted reward of a send: p * (margin * revenue - cost)."""
        p = self.score_matrix(self.prepare(df)) if p is None else p
        return p * (self.margin * self.expected_revenue(df)[:, None] - self.costs[None, :])

    def decide(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.reset_index(drop=True)
        p = self.score_matrix(self.prepare(df))
        profit = incremental_profit(p, self.expected_revenue(df), self.costs, self.margin)
        allowed = self.allowed(df)
        best = best_arms(profit, allowed)
        out = pd.DataFrame({"best_offer": [self.arms[k] if k else "" for k in best],
                            "best_profit": profit[np.arange(len(df)), best]})
        for k, arm in enumerate(self.arms):
            out[f"p_convert_{arm}"] = p[:, k]
        for k, arm in enumerate(self.arms):
            out[f"profit_{arm}"] = np.where(allowed[:, k], profit[:, k], np.nan)
        return out

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.decide(model_input)


def offer_catalog(con) -> pd.DataFrame:
    """The offers table: ``offer_id, cost`` and ``channels`` as a frozenset (empty = every channel)."""
    offers = con.execute("SELECT offer_id, cost, channels FROM offers ORDER BY offer_id").df()
    if offers.empty:
        raise TrainingError("the offers table is empty: load offers.csv/.parquet (or the default catalog)")
    offers["cost"] = pd.to_numeric(offers["cost"], errors="coerce").fillna(0.0).astype(float)
    offers["channels"] = [frozenset(c.strip() for c in str(v or "").split(";") if c.strip())
                          for v in offers["channels"]]
    return offers


def with_outcomes(df: pd.DataFrame, offers: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Adds ``arm`` (0 = control, -1 = an offer not in the catalog), ``offer_cost``, ``reward``, and fills
    missing propensities with the arm's share of the channel's sends (then OPE is only approximate)."""
    df = df.reset_index(drop=True).copy()
    index = {o: k + 1 for k, o in enumerate(offers["offer_id"])}
    offer = df["offer_id"].astype("string").fillna("").replace("", pd.NA)
    df["arm"] = [0 if pd.isna(o) else index.get(o, -1) for o in offer]
    df["offer_cost"] = offer.map(dict(zip(offers["offer_id"], offers["cost"], strict=True))).astype(float).fillna(0.0)
    converted = df["converted"].astype(bool).to_numpy()
    df["reward"] = converted * (pd.to_numeric(df["revenue"]).fillna(0).to_numpy() * margin - df["offer_cost"])
    prop = pd.to_numeric(df["propensity"], errors="coerce")
    if prop.isna().any():
        share = df.groupby(["channel", "arm"])["arm"].transform("size") / df.groupby("channel")["arm"].transform("size")
        log.warning("%d sends have no logged propensity: using the arm's share of the channel", prop.isna().sum())
        prop = prop.fillna(share)
    df["propensity"] = prop.clip(lower=1e-3)
    return df


def _params(tcfg, seed_offset: int = 0) -> dict:
    return {
        "objective": "binary", "learning_rate": tcfg.learning_rate, "num_leaves": min(tcfg.num_leaves, 15),
        "min_data_in_leaf": 100, "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1,
        "lambda_l2": 10.0, "seed": tcfg.seed + seed_offset, "deterministic": True, "num_threads": 2,
        "verbose": -1,
    }


def _fit(X: np.ndarray, y: np.ndarray, w: np.ndarray, is_val: np.ndarray, params: dict, rounds: int,
         names: list[str], cats: list[int]) -> lgb.Booster:
    """Early-stop on the validation rows, then refit on all rows for the best number of rounds."""
    dfit = lgb.Dataset(X[~is_val], y[~is_val], weight=w[~is_val], feature_name=names, categorical_feature=cats,
                       free_raw_data=False)
    dval = lgb.Dataset(X[is_val], y[is_val], weight=w[is_val], reference=dfit)
    probe = lgb.train(params, dfit, num_boost_round=rounds, valid_sets=[dval],
                      callbacks=[lgb.early_stopping(30, verbose=False)])
    dall = lgb.Dataset(X, y, weight=w, feature_name=names, categorical_feature=cats)
    return lgb.train(params, dall, num_boost_round=max(1, probe.best_iteration or rounds))


def fit_model(train_df: pd.DataFrame, features: list[str], offers: pd.DataFrame, tcfg,
              learner: str = "t") -> NextBestOfferModel:
    """Fit the conversion model(s) on training sends (already passed through ``with_outcomes``)."""
    train_df = train_df[train_df["arm"] >= 0].reset_index(drop=True)
    full = pd.concat([train_df, derived_features(train_df)], axis=1)
    matrix = FeatureMatrix(features + DERIVED).fit(full)
    X = matrix.transform(full)
    y = train_df["converted"].astype(bool).to_numpy().astype(float)
    arm = train_df["arm"].to_numpy()
    n_arms = len(offers) + 1
    # Stabilized inverse-propensity weights: within an arm the logging policy's preferences (which depend
    # on observed attributes) are undone, while each arm keeps its share of the data.
    share = np.bincount(arm, minlength=n_arms) / len(arm)
    w = np.minimum(share[arm] / train_df["propensity"].to_numpy(), MAX_WEIGHT)
    w = w / w.mean()
    rng = np.random.default_rng(tcfg.seed)
    customers = train_df["customer_id"].unique()
    val_ids = rng.choice(customers, size=max(1, len(customers) // 5), replace=False)
    is_val = train_df["customer_id"].isin(set(val_ids)).to_numpy()
    cats = [matrix.columns_.index(c) for c in matrix.categorical_]
    if learner == "t":
        boosters = []
        for k in range(n_arms):
            m = arm == k
            if len(np.unique(y[m])) < 2 or m.sum() < 50:
                raise TrainingError(f"too few sends or only one class of outcome for arm "
                                    f"'{([CONTROL] + list(offers['offer_id']))[k]}' ({m.sum()} sends)")
            boosters.append(_fit(X[m], y[m], w[m], is_val[m], _params(tcfg, k), tcfg.num_boost_round,
                                 matrix.columns_, cats))
    else:
        Xa = np.column_stack([X, arm.astype(np.float32)])
        boosters = [_fit(Xa, y, w, is_val, _params(tcfg), tcfg.num_boost_round, matrix.columns_ + ["arm"],
                         cats + [X.shape[1]])]
    revenue_prior = float(train_df.loc[y > 0, "revenue"].mean()) if (y > 0).any() else 0.0
    return NextBestOfferModel(boosters, learner, matrix, [CONTROL] + list(offers["offer_id"]),
                              np.r_[0.0, offers["cost"].to_numpy(float)],
                              [frozenset(), *offers["channels"]], tcfg.margin, features, revenue_prior)


def _logged_arms(model: NextBestOfferModel, hold: pd.DataFrame) -> np.ndarray:
    """The logged arm of each send in ``model``'s arm order; an offer the model does not know is arm K."""
    index = {o: k for k, o in enumerate(model.arms) if k}
    offer = hold["offer_id"].astype("string").fillna("")
    return np.array([0 if o == "" else index.get(o, len(model.arms)) for o in offer], dtype=np.intp)


def off_policy(model: NextBestOfferModel, holdout: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame, dict]:
    """OPE metrics, the per-policy table and the scores behind them, for ``model`` on held-out sends."""
    hold = holdout.reset_index(drop=True)
    n, k = len(hold), len(model.arms)
    p = model.score_matrix(model.prepare(hold))
    profit = incremental_profit(p, model.expected_revenue(hold), model.costs, model.margin)
    allowed = np.column_stack([model.allowed(hold), np.zeros(n, dtype=bool)])  # extra column: unknown offers
    q = np.column_stack([model.reward_matrix(hold, p), np.zeros(n)])
    arm = _logged_arms(model, hold)
    reward, prop = hold["reward"].to_numpy(float), hold["propensity"].to_numpy(float)
    cust = hold["customer_id"].to_numpy()
    choice = best_arms(profit, allowed[:, :k])
    policies = {"policy": np.eye(k + 1)[choice], "random": ope.uniform(allowed), "no_offer": ope.constant(0, allowed)}
    always = {f"always_{a}": ope.constant(j, allowed) for j, a in enumerate(model.arms) if j}
    table = ope.policy_table({**policies, **always}, arm, prop, reward, q, cust)
    singles = table[table["policy"].isin(["no_offer", *always])]
    best = singles.loc[singles["dr"].idxmax()]
    best_arm = 0 if best["policy"] == "no_offer" else model.arms.index(best["policy"].removeprefix("always_"))
    table = pd.concat([table, best.to_frame().T.assign(policy="best_single")], ignore_index=True)
    # The logging policy scores itself with weight 1; its DR direct part uses the arm mix per channel.
    channel = hold["channel"].astype("string").fillna("")
    onehot = pd.DataFrame(np.eye(k + 1)[arm])
    mix = onehot.groupby(channel.to_numpy()).transform("mean").to_numpy()
    on = ope.mean_ci(reward, cust)
    dr_log = ope.dr_logging(arm, reward, q, mix, cust)
    table = pd.concat([table, pd.DataFrame([{"policy": "logging", "ipw": on.value, "ipw_lo": on.lo, "ipw_hi": on.hi,
                                             "snips": on.value, "snips_lo": on.lo, "snips_hi": on.hi,
                                             "dr": dr_log.value, "dr_lo": dr_log.lo, "dr_hi": dr_log.hi}])],
                      ignore_index=True)
    metrics: dict[str, float] = {}
    for _, row in table[table["policy"].isin(("policy", *BASELINES))].iterrows():
        for est in ("ipw", "snips", "dr"):
            for suffix in ("", "_lo", "_hi"):
                metrics[f"{est}_{row['policy']}_value{suffix}"] = float(row[est + suffix])
    metrics["policy_offer_share"] = float((choice > 0).mean())
    metrics["best_single_arm"] = float(best_arm)
    known = arm < k
    y = hold["converted"].astype(bool).to_numpy()[known]
    if len(np.unique(y)) == 2:
        m = binary_metrics(y, p[known.nonzero()[0], arm[known]], prefix="conversion_")
        metrics.update({key: m[key] for key in ("conversion_roc_auc", "conversion_log_loss", "conversion_brier")})
    arm_of = {"best_single": model.arms[best_arm], "no_offer": CONTROL}
    table.insert(1, "arm", [arm_of.get(pol, pol.removeprefix("always_") if pol in always else "")
                            for pol in table["policy"]])
    return metrics, table, {"p": p, "profit": profit, "choice": choice, "best_arm": best_arm}


def evaluate(model: NextBestOfferModel, holdout: pd.DataFrame) -> dict[str, float]:
    """Holdout metrics of any next-best-offer model version on the same sends (``dr_policy_value`` gates)."""
    return off_policy(model, holdout)[0]


def true_profit_metrics(model: NextBestOfferModel, df: pd.DataFrame, best_arm: int,
                        logging_mix: np.ndarray) -> tuple[dict[str, float], dict]:
    """True expected profit per customer of the learned policy and the baselines, from the simulator's truth.

    Args:
        df: one row per customer: the service features at ``truth_at`` plus ``true_aov`` and
            ``p_convert_<arm>`` for every arm of the model. No channel: every offer is allowed.
        best_arm: the best single arm chosen on the holdout.
        logging_mix: (n, K) probabilities of the logging policy per customer.
    """
    p_true = df[[f"p_convert_{a}" for a in model.arms]].to_numpy(float)
    true = incremental_profit(p_true, df["true_aov"].to_numpy(float), model.costs, model.margin)
    p = model.score_matrix(model.prepare(df))
    profit = incremental_profit(p, model.expected_revenue(df), model.costs, model.margin)
    choice = best_arms(profit, np.ones_like(profit, dtype=bool))
    rows = np.arange(len(df))
    oracle = float(true.max(axis=1).mean())
    metrics = {
        "true_profit_policy": float(true[rows, choice].mean()),
        "true_profit_oracle": oracle,
        "true_profit_random": float(true.mean(axis=1).mean()),
        "true_profit_best_single": float(true[:, best_arm].mean()),
        "true_profit_no_offer": 0.0,
        "true_profit_logging": float((logging_mix * true).sum(axis=1).mean()),
        "true_offer_share": float((choice > 0).mean()),
    }
    metrics["true_profit_ratio_to_oracle"] = metrics["true_profit_policy"] / oracle if oracle > 0 else float("nan")
    uplift = {"predicted": (p[:, 1:] - p[:, :1]).mean(axis=0), "true": (p_true[:, 1:] - p_true[:, :1]).mean(axis=0)}
    return metrics, uplift
