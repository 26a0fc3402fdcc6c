"""Features -> what the three champion models say about each customer (:class:`CustomerScores`).

Models score on their raw boosters with input matrices built straight from column lists
(:class:`MatrixPlan`), the same columns and category codes as ``training.matrix.FeatureMatrix`` but
without a DataFrame per request. A customer the store does not know is scored with every feature
missing (the boosters' learned default path, the send-time model's global curve): a cold start from
the global pattern, flagged as such.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np

from features.catalog import LIST_FEATURES, stored_features
from features.list_features import list_matrix
from serving.types import CHANNELS, CustomerScores
from training import ope
from training.matrix import FeatureMatrix
from training.transforms import BTYD_FEATURES, btyd_arrays

# Facts the decision policy reads besides model outputs: (feature view, feature) in the catalog.
POLICY_FEATURES = {
    "customer_rfm": ("segment", "orders_365d", "revenue_365d", "orders_lifetime", "revenue_lifetime",
                     "tenure_days", "days_since_last_purchase"),
    "customer_profile": ("timezone",),
    "customer_support": ("email_consent", "sms_consent", "push_consent", "days_since_unsubscribe",
                         "days_since_last_complaint"),
    "customer_offer_history": ("days_since_last_message", "messages_30d"),
}
CONSENT = {"email": "email_consent", "sms": "sms_consent", "push": "push_consent"}


def _float(v) -> float:
    if v is None or isinstance(v, str):
        try:
            return float(v) if v is not None else math.nan
        except ValueError:
            return math.nan
    return float(v)


def column(values: Mapping[str, Sequence], name: str, n: int) -> np.ndarray:
    """One feature as float64 (missing, or absent from ``values`` -> NaN)."""
    col = values.get(name)
    if col is None:
        return np.full(n, np.nan)
    if isinstance(col, np.ndarray):
        return col.astype(np.float64, copy=False)
    try:  # numbers, booleans and None (-> NaN) convert in one go
        return np.array(col, dtype=np.float64)
    except (TypeError, ValueError):
        return np.array([_float(v) for v in col], dtype=np.float64)


class MatrixPlan:
    """``FeatureMatrix.transform`` for column lists: same columns, order and category codes.

    ``values`` holds features by their stored names; a list feature (``features.catalog.LIST_FEATURES``)
    fills its element columns in one step, whether it arrives as a list per customer (the online read) or
    as an (n, width) array (batch scoring). An element column given by its own name is read as is.
    """

    def __init__(self, matrix: FeatureMatrix):
        self.columns = list(matrix.columns_)
        self.codes = {c: {v: float(i) for i, v in enumerate(cats)} for c, cats in matrix.categories_.items()}
        where = {name: j for j, name in enumerate(self.columns)}
        # list feature -> (positions in the list, matrix columns) of its elements this matrix reads
        self.lists: dict[str, tuple[list[int], list[int]]] = {}
        for name, elements in LIST_FEATURES.items():
            pairs = [(k, where[e]) for k, e in enumerate(elements) if e in where]
            if pairs:
                self.lists[name] = ([k for k, _ in pairs], [j for _, j in pairs])
        # All list features at once (``_fill_lists_at_once``): their element columns, and the same elements'
        # positions in the lists laid end to end, when every list has one width.
        widths = {len(LIST_FEATURES[name]) for name in self.lists}
        self._list_width = widths.pop() if len(widths) == 1 else None
        self._list_columns = [j for _, cols in self.lists.values() for j in cols]
        self._list_positions = [k * (self._list_width or 0) + p
                                for k, (positions, _) in enumerate(self.lists.values()) for p in positions]
        self.stored = stored_features(self.columns)  # the feature names to read
        in_lists = {j for _, cols in self.lists.values() for j in cols}
        self.scalars = [(j, name, self.codes.get(name)) for j, name in enumerate(self.columns) if j not in in_lists]
        self.scalar_index = [j for j, _, _ in self.scalars]

    def build(self, values: Mapping[str, Sequence], n: int) -> np.ndarray:
        if n <= ROW_WISE_MAX:  # a request's few customers: plain Python per value (MatrixSet's row path)
            solo = self.__dict__.get("_solo")
            if solo is None:
                solo = self._solo = MatrixSet({"": self})
            return solo.build(values, n)[""]
        out = np.empty((n, len(self.columns)), dtype=np.float32)
        self.fill_lists(out, values, n)
        for j, name, codes in self.scalars:
            if codes is None:
                out[:, j] = column(values, name, n)
            else:
                col = values.get(name) or [None] * n
                out[:, j] = [math.nan if v is None else codes.get(str(v), math.nan) for v in col]
        return out

    def fill_lists(self, out: np.ndarray, values: Mapping[str, Sequence], n: int) -> None:
        """The list features' element columns of ``out``."""
        if n <= ROW_WISE_MAX and self._fill_lists_at_once(out, values, n):
            return
        for name, (positions, cols) in self.lists.items():
            col = values.get(name)
            if col is None:  # not read as a list: the element columns by their own names, if given
                for j in cols:
                    out[:, j] = column(values, self.columns[j], n)
            else:
                out[:, cols] = list_matrix(name, col)[:, positions]

    def _fill_lists_at_once(self, out: np.ndarray, values: Mapping[str, Sequence], n: int) -> bool:
        """A request's few rows of every list feature in one array conversion; False (nothing written) unless
        each list feature arrived as a list of complete vectors (the online read of known customers)."""
        if not self.lists or self._list_width is None:
            return False
        given = [values.get(name) for name in self.lists]
        if any(type(col) is not list for col in given):
            return False
        try:
            block = np.array(given, dtype=np.float64)  # (lists, n, width); a None or a ragged vector raises
        except (TypeError, ValueError):
            return False
        if block.shape != (len(given), n, self._list_width):
            return False
        out[:, self._list_columns] = block.transpose(1, 0, 2).reshape(n, -1)[:, self._list_positions]
        return True


ROW_WISE_MAX = 16  # MatrixPlan.build fills up to this many rows value by value: numpy per column costs more


class MatrixSet:
    """Several models' :class:`MatrixPlan` matrices from one pass over a request's values.

    The three models read mostly the same features (churn 95 scalar columns, next-best-offer 92, send-time 56;
    99 distinct): for a request's few customers each distinct (feature, category codes) is converted once and
    the models' matrices are column selections of that one row block. Bigger inputs build each plan by column.
    """

    def __init__(self, plans: Mapping[str, MatrixPlan]):
        self.plans = dict(plans)
        where: dict[tuple, int] = {}
        self.union: list[tuple[str, dict[str, float] | None]] = []
        self.takes: dict[str, list[int]] = {}
        for key, plan in self.plans.items():
            take = []
            for _, name, codes in plan.scalars:
                ident = (name, None if codes is None else tuple(codes.items()))
                if ident not in where:
                    where[ident] = len(self.union)
                    self.union.append((name, codes))
                take.append(where[ident])
            self.takes[key] = take

    def build(self, values: Mapping[str, Sequence], n: int) -> dict[str, np.ndarray]:
        """``{model: plan.build(values, n)}``, the same matrices."""
        if n > ROW_WISE_MAX:
            return {key: plan.build(values, n) for key, plan in self.plans.items()}
        cols = [(values.get(name), codes) for name, codes in self.union]
        rows = [[_cell(col, i, codes) for col, codes in cols] for i in range(n)]
        block = np.array(rows, dtype=np.float64).reshape(n, len(cols))
        out = {}
        for key, plan in self.plans.items():
            X = np.empty((n, len(plan.columns)), dtype=np.float32)
            plan.fill_lists(X, values, n)
            X[:, plan.scalar_index] = block[:, self.takes[key]]
            out[key] = X
        return out


def _cell(col, i: int, codes: dict[str, float] | None) -> float:
    """Row ``i`` of one column as :meth:`MatrixPlan.build` stores it by column (missing -> NaN, a category -> its
    code)."""
    if col is None:
        return math.nan
    v = col[i]
    if v is None:
        return math.nan
    if codes is not None:
        return codes.get(str(v), math.nan)
    return v if type(v) in _NUMBERS else _float(v)  # numbers go to the array as they are


_NUMBERS = frozenset((float, int, bool))


def _texts(values: Mapping[str, Sequence], name: str, n: int, default: str) -> list[str]:
    """A text column as strings (missing or empty -> ``default``)."""
    col = values.get(name)
    if col is None:
        return [default] * n
    return [default if v is None or v == "" else str(v) for v in col]


def _optionals(x: np.ndarray) -> list[float | None]:
    """Floats as a list, NaN -> None."""
    return [None if v != v else v for v in np.asarray(x, dtype=np.float64).tolist()]


def _best_hours(curves: np.ndarray, supported: np.ndarray, hours: tuple[int, ...]) -> list[tuple]:
    """Per row of (rows, 24) open-rate curves: (the best supported hour among ``hours`` or None, its rate, the
    best supported hour of all); ``supported`` is the send-time model's (24,) bool mask. The first of equal hours
    wins, as in ``serving.decide``."""
    window = np.zeros(24, dtype=bool)
    window[list(hours)] = True
    allowed = supported & window
    rows = np.arange(len(curves))
    free = np.where(supported, curves, -np.inf).argmax(axis=1).tolist()
    if not allowed.any():
        return [(None, None, f) for f in free]
    best = np.where(allowed, curves, -np.inf).argmax(axis=1)
    return list(zip(best.tolist(), curves[rows, best].tolist(), free, strict=True))


class Scorer:
    """Scores customers with a bundle of loaded models (any of them may be missing)."""

    def __init__(self, churn=None, nbo=None, send_time=None, versions: Mapping[str, str] | None = None,
                 default_segment: str = "new"):
        self.churn, self.nbo, self.send_time = churn, nbo, send_time
        if churn is not None:
            churn.warm()  # the reason codes' SHAP tables (about a second) at load, not in the first request
        self.versions = dict(versions or {})
        self.default_segment = default_segment
        self.plans = {key: MatrixPlan(m.matrix) for key, m in (("churn", churn), ("nbo", nbo), ("send_time", send_time))
                      if m is not None}
        self.matrices = MatrixSet(self.plans)
        if send_time is not None:
            self.supported = {ch: send_time.allowed_hours(ch) for ch in send_time.channels}

    def churn_reasons(self, values: Mapping[str, Sequence], n: int) -> list[list[str]]:
        """The churn reason codes :meth:`score` gives, alone (empty lists without a churn model)."""
        if self.churn is None:
            return [[] for _ in range(n)]
        horizon = float(getattr(self.churn, "horizon_days", 90))
        btyd = btyd_arrays(*(column(values, name, n) for name in (
            "orders_lifetime", "tenure_days", "days_since_last_purchase")), horizon)
        return self.churn.reasons(self.plans["churn"].build({**values, **btyd}, n))

    def score(self, customer_ids: Sequence[str], values: Mapping[str, Sequence],
              timestamps: Sequence[datetime | None], degraded: bool = False, *,
              reasons: bool = True, open_hours: Sequence[int] | None = None) -> list[CustomerScores]:
        """Model outputs for each customer; ``values`` holds feature columns (None = missing).

        ``reasons=False`` leaves ``churn_reasons`` empty (batch scoring adds them with :meth:`churn_reasons`
        to the rows it writes only: they cost far more than the scores). ``open_hours`` (the policy's hours
        outside quiet hours, ascending) fills ``best_hours`` for the whole matrix at once, which a policy with
        those hours reads instead of searching each customer's curves (batch scoring; the same hours come out,
        ``tests/test_batch_score.py`` checks rows against the API's answers).
        """
        n = len(customer_ids)
        num = {name: column(values, name, n) for name in (
            "orders_365d", "revenue_365d", "orders_lifetime", "revenue_lifetime", "tenure_days",
            "days_since_last_purchase", "days_since_unsubscribe", "days_since_last_complaint",
            "days_since_last_message", "messages_30d")}
        horizon = float(getattr(self.churn, "horizon_days", 90))
        btyd = btyd_arrays(num["orders_lifetime"], num["tenure_days"], num["days_since_last_purchase"], horizon)
        churn_p, codes = np.full(n, np.nan), [[] for _ in range(n)]
        matrices = self.matrices.build({**values, **btyd}, n)  # the BTYD features are churn inputs
        if self.churn is not None:
            X = matrices["churn"]
            churn_p = self.churn.score_matrix(X)
            if reasons:
                codes = self.churn.reasons(X)
        p = profit = None
        if self.nbo is not None:
            X = matrices["nbo"]
            p = self.nbo.score_matrix(X)
            revenue = self.nbo.revenue_from(num["revenue_365d"], num["orders_365d"])
            profit = ope.incremental_profit(p, revenue, self.nbo.costs, self.nbo.margin)
            order_value = revenue
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                order_value = np.nan_to_num(num["revenue_lifetime"] / num["orders_lifetime"], nan=0.0, posinf=0.0)
        expected_value = btyd["btyd_purchase_rate"] * btyd["btyd_p_alive"] * horizon * order_value
        curves: dict[str, np.ndarray] = {}
        if self.send_time is not None:
            X = matrices["send_time"]
            curves = self.send_time.open_curves(X)
        # Per-customer values as Python lists first: one conversion per column, not one per customer.
        consent = {ch: [v is not False for v in values[CONSENT[ch]]] if CONSENT.get(ch) in values else None
                   for ch in CHANNELS}
        segments = _texts(values, "segment", n, self.default_segment)
        zones = _texts(values, "timezone", n, "UTC")
        unsubscribed, complained, messaged, churn_list = (_optionals(a) for a in (
            num["days_since_unsubscribe"], num["days_since_last_complaint"], num["days_since_last_message"], churn_p))
        messages = np.nan_to_num(num["messages_30d"]).astype(np.int64).tolist()
        values_list = expected_value.astype(np.float64).tolist()
        arms = list(self.nbo.arms) if self.nbo is not None else []
        arm_channels = list(self.nbo.arm_channels) if self.nbo is not None else []
        supported = self.supported if self.send_time is not None else {}
        # Model outputs as plain lists, one conversion per matrix: decide reads them value by value.
        p_rows = p.tolist() if p is not None else None
        profit_rows = profit.tolist() if profit is not None else None
        best_rows: dict[str, list] = {}
        curve_rows: Mapping[str, np.ndarray | list]
        hours = tuple(open_hours) if open_hours is not None else None
        if hours is not None:
            best_rows = {ch: _best_hours(c, self.supported[ch], hours) for ch, c in curves.items()}
            curve_rows = curves  # a row view per customer: the policy reads best_rows
        else:
            curve_rows = {ch: c.tolist() for ch, c in curves.items()}
        out = []
        for i, cid in enumerate(customer_ids):
            found = timestamps[i] is not None
            out.append(CustomerScores(
                customer_id=cid,
                cold_start=not found and not degraded,
                degraded=degraded,
                feature_timestamp=timestamps[i],
                segment=segments[i],
                timezone=zones[i],
                consent={ch: True if c is None else c[i] for ch, c in consent.items()},
                days_since_unsubscribe=unsubscribed[i],
                days_since_complaint=complained[i],
                days_since_last_message=messaged[i],
                messages_30d=messages[i],
                churn_probability=churn_list[i],
                churn_reasons=codes[i],
                expected_value=values_list[i],
                arms=arms,
                p_convert=p_rows[i] if p_rows is not None else None,
                incremental_profit=profit_rows[i] if profit_rows is not None else None,
                arm_channels=arm_channels,
                open_curves={ch: c[i] for ch, c in curve_rows.items()},
                best_hours={ch: b[i] for ch, b in best_rows.items()},
                best_hours_for=hours if best_rows else None,
                supported_hours=supported,
                model_versions=self.versions,
            ))
        return out


__all__ = ["BTYD_FEATURES", "MatrixPlan", "MatrixSet", "POLICY_FEATURES", "Scorer", "column"]
