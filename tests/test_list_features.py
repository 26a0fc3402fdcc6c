"""List features: one Feast field per hour vector, spread into the model columns the same way everywhere."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from features.catalog import INT_LISTS, LIST_FEATURES, VIEWS, model_columns, stored_features
from features.list_features import ListFeatureError, expand_frame, list_matrix
from serving.scoring import MatrixPlan, MatrixSet
from training.matrix import FeatureMatrix

ROWS = [[float(h) for h in range(24)], None, [0.5] * 24]


def test_every_hour_vector_is_one_field_of_24_named_positions():
    hour_view = {f.name: f for f in VIEWS["customer_hour_profile"]}
    assert set(LIST_FEATURES) == {n for n, f in hour_view.items() if f.dtype.endswith("_list")}
    assert len(LIST_FEATURES) == 12 and all(len(e) == 24 for e in LIST_FEATURES.values())
    assert LIST_FEATURES["email_sent_by_hour"][8] == "email_sent_hour_08"
    assert "email_sent_by_hour" in INT_LISTS and "email_hour_shares" not in INT_LISTS
    assert sum(len(v) for v in VIEWS.values()) < 128  # one Redis hash per customer stays small


def test_model_columns_and_stored_features_invert_each_other():
    features = ["segment", "email_hour_shares", "orders_365d", "push_opened_by_hour"]
    columns = model_columns(features)
    assert columns[:3] == ["segment", "email_hour_00", "email_hour_01"] and len(columns) == 2 + 48
    assert columns[-1] == "push_opened_hour_23"
    assert stored_features(columns) == features
    assert stored_features(["push_opened_hour_05", "segment"]) == ["push_opened_by_hour", "segment"]


@pytest.mark.parametrize("shape", ["python", "pandas", "arrow", "numpy"])
def test_every_input_shape_gives_the_same_matrix(shape):
    given = {
        "python": ROWS,
        "pandas": pd.Series([np.array(r) if r is not None else None for r in ROWS], dtype=object),
        "arrow": pa.array(ROWS, type=pa.list_(pa.float64())),
        "numpy": np.array([r if r is not None else [np.nan] * 24 for r in ROWS]),
    }[shape]
    m = list_matrix("email_hour_shares", given)
    assert m.shape == (3, 24) and m.dtype == np.float64
    np.testing.assert_array_equal(m[0], np.arange(24.0))
    assert np.isnan(m[1]).all()  # a customer without the row: every hour missing, not zero
    np.testing.assert_array_equal(m[2], np.full(24, 0.5))


@pytest.mark.parametrize("shape", ["python", "arrow", "numpy"])
def test_a_vector_of_the_wrong_length_is_refused_with_its_name(shape):
    short = [[1.0] * 23]
    given = {"python": short, "arrow": pa.array(short), "numpy": np.ones((1, 23))}[shape]
    with pytest.raises(ListFeatureError, match="email_hour_shares.*23.*expected 24"):
        list_matrix("email_hour_shares", given)


def test_expand_frame_puts_the_positions_where_the_list_was():
    frame = pd.DataFrame({
        "customer_id": ["a", "b"],
        "email_sent_by_hour": [list(range(24)), [1] * 24],
        "push_sent_by_hour": [[2] * 24, None],
        "segment": ["new", "dormant"],
    })
    out = expand_frame(frame)
    assert list(out.columns) == ["customer_id", *LIST_FEATURES["email_sent_by_hour"],
                                 *LIST_FEATURES["push_sent_by_hour"], "segment"]
    assert out["email_sent_hour_23"].tolist() == [23, 1] and out["email_sent_hour_23"].dtype == np.int64
    assert out["push_sent_hour_00"].iloc[0] == 2 and np.isnan(out["push_sent_hour_00"].iloc[1])
    assert expand_frame(out) is out  # nothing left to spread


def test_matrix_plan_reads_lists_as_the_training_matrix_reads_spread_columns():
    features = ["email_hour_shares", "orders_365d", "segment"]
    frame = pd.DataFrame({"email_hour_shares": ROWS, "orders_365d": [3, None, 1], "segment": ["new", None, "x"]})
    matrix = FeatureMatrix(model_columns(features)).fit(expand_frame(frame))
    expected = matrix.transform(expand_frame(frame))

    plan = MatrixPlan(matrix)
    assert plan.stored == features
    online = {"email_hour_shares": ROWS, "orders_365d": [3, None, 1], "segment": ["new", None, "x"]}
    batch = {**online, "email_hour_shares": list_matrix("email_hour_shares", ROWS)}
    np.testing.assert_array_equal(plan.build(online, 3), expected)
    np.testing.assert_array_equal(plan.build(batch, 3), expected)
    no_row = plan.build({}, 1)  # an unknown customer: everything missing
    assert np.isnan(no_row).all()


def test_matrix_plan_builds_few_and_many_rows_alike():
    features = ["email_hour_shares", "orders_365d", "segment", "email_consent"]
    frame = pd.DataFrame({"email_hour_shares": ROWS * 20, "orders_365d": [3, None, "7"] * 20,
                          "segment": ["new", None, "x"] * 20, "email_consent": [True, False, None] * 20})
    matrix = FeatureMatrix(model_columns(features)).fit(expand_frame(frame))
    plan = MatrixPlan(matrix)
    values = {c: frame[c].tolist() for c in frame.columns}
    many = plan.build(values, len(frame))  # column by column
    few = np.vstack([plan.build({k: v[i:i + 3] for k, v in values.items()}, 3) for i in range(0, len(frame), 3)])
    np.testing.assert_array_equal(many, few)
    np.testing.assert_array_equal(many, matrix.transform(expand_frame(frame)))
    spread = {**{k: v[:3] for k, v in values.items() if k != "email_hour_shares"},
              **expand_frame(frame[["email_hour_shares"]].head(3)).to_dict("list")}
    np.testing.assert_array_equal(plan.build(spread, 3), many[:3])  # element columns by their own names


def test_matrix_set_gives_each_model_its_own_plans_matrix_from_one_pass():
    # Two models sharing features, one with a list feature, and a category coded differently by each.
    values = {"email_hour_shares": ROWS, "orders_365d": [3, None, 1], "segment": ["new", None, "x"],
              "revenue_365d": [10.0, 2.5, None], "email_consent": [True, None, False]}
    first = pd.DataFrame({k: values[k] for k in ("orders_365d", "segment", "revenue_365d")})
    second = pd.DataFrame({"email_hour_shares": ROWS, "segment": ["x", "new", "zz"], "orders_365d": [1, 2, 3],
                           "email_consent": [True, False, True]})
    plans = {
        "a": MatrixPlan(FeatureMatrix(model_columns(["orders_365d", "segment", "revenue_365d"])).fit(first)),
        "b": MatrixPlan(FeatureMatrix(model_columns(["email_hour_shares", "segment", "orders_365d",
                                                     "email_consent"])).fit(expand_frame(second))),
    }
    assert plans["a"].codes["segment"] != plans["b"].codes["segment"]  # the codes are each model's own
    matrices = MatrixSet(plans)
    assert len(matrices.union) == 5  # orders and segment for a, segment again for b's codes, revenue, consent
    for n in (1, 3):
        got = matrices.build({k: v[:n] for k, v in values.items()}, n)
        assert set(got) == {"a", "b"}
        for key, plan in plans.items():
            np.testing.assert_array_equal(got[key], plan.build({k: v[:n] for k, v in values.items()}, n))
    many = {k: v * 10 for k, v in values.items()}  # past the row-wise size: each plan by column, same result
    got = matrices.build(many, 30)
    for key, plan in plans.items():
        np.testing.assert_array_equal(got[key], plan.build(many, 30))
    unknown = matrices.build({}, 1)
    assert all(np.isnan(m).all() for m in unknown.values())


def test_a_request_of_complete_vectors_fills_every_list_at_once_as_training_does():
    features = ["email_hour_shares", "push_sent_by_hour", "orders_365d"]
    frame = pd.DataFrame({"email_hour_shares": [ROWS[0], ROWS[2]], "push_sent_by_hour": [[1] * 24, list(range(24))],
                          "orders_365d": [1, 2]})
    # A model that reads some elements only, in its own column order.
    columns = [c for c in model_columns(features) if not c.endswith("_03")][::-1]
    matrix = FeatureMatrix(columns).fit(expand_frame(frame))
    plan = MatrixPlan(matrix)
    online = {c: frame[c].tolist() for c in frame.columns}
    np.testing.assert_array_equal(plan.build(online, 2), matrix.transform(expand_frame(frame)))
    np.testing.assert_array_equal(plan.build({k: v[1:] for k, v in online.items()}, 1),
                                  matrix.transform(expand_frame(frame.tail(1))))
    short = {**online, "push_sent_by_hour": [[1] * 24, [1] * 23]}
    with pytest.raises(ListFeatureError, match="push_sent_by_hour.*23"):
        plan.build(short, 2)
    narrow = {**online, "email_hour_shares": [[1.0] * 23] * 2, "push_sent_by_hour": [[1] * 23] * 2}
    with pytest.raises(ListFeatureError, match="23, expected 24"):
        plan.build(narrow, 2)
