"""training/row_predict.py: LightGBM's single-row fast path gives what Booster.predict gives, row by row."""

from __future__ import annotations

import pickle

import lightgbm as lgb
import numpy as np
import pytest

from training.row_predict import RowPredictor


def _data(n: int = 1500, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Numbers with NaNs and exact zeros, and a categorical column with unseen and missing codes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    X[rng.random(n) < 0.25, 1] = np.nan
    X[rng.random(n) < 0.3, 2] = 0.0
    X[:, 3] = rng.integers(0, 5, n)
    X[rng.random(n) < 0.1, 3] = np.nan
    y = (X[:, 0] + np.nan_to_num(X[:, 1]) + (np.nan_to_num(X[:, 3]) % 2) + rng.normal(size=n) > 0.5).astype(int)
    return X, y


def _booster(X, y) -> lgb.Booster:
    params = {"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 20, "verbose": -1, "seed": 1,
              "min_data_per_group": 5, "cat_smooth": 1}
    return lgb.train(params, lgb.Dataset(X, y, categorical_feature=[3]), 50)


@pytest.mark.parametrize("kind", ["normal", "raw", "contrib"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_row_equals_booster_predict(kind, dtype):
    X, y = _data()
    booster = _booster(X, y)
    rows = RowPredictor(booster)
    Xd = X.astype(dtype)
    Xd[0, 3] = 9  # a category the trees never saw
    Xd[1] = np.nan  # every feature missing: the cold-start row
    fast = np.concatenate([rows.predict(Xd[i:i + 1], kind) for i in range(300)])
    expected = booster.predict(Xd[:300], raw_score=kind == "raw", pred_contrib=kind == "contrib")
    assert fast.shape == expected.shape
    np.testing.assert_array_equal(fast, expected)


def test_stops_at_the_best_iteration_like_booster_predict():
    X, y = _data()
    booster = _booster(X, y)
    booster.best_iteration = 20  # what early stopping leaves: Booster.predict stops there by default
    rows = RowPredictor(booster)
    fast = np.concatenate([rows.predict(X[i:i + 1], "raw") for i in range(100)])
    np.testing.assert_array_equal(fast, booster.predict(X[:100], raw_score=True))
    assert not np.array_equal(fast, booster.predict(X[:100], raw_score=True, num_iteration=-1))


def test_other_shapes_go_to_booster_predict():
    X, y = _data()
    booster = _booster(X, y)
    rows = RowPredictor(booster)
    np.testing.assert_array_equal(rows.predict(X[:50]), booster.predict(X[:50]))
    ints = np.nan_to_num(X[:1]).astype(np.int64)  # a dtype the fast path does not take
    np.testing.assert_array_equal(rows.predict(ints), booster.predict(ints))
    with pytest.raises(Exception, match="number of features"):  # LightGBM's own check, not a wrong answer
        rows.predict(X[:1, :4])


def test_is_not_pickled_with_a_model():
    X, y = _data()
    rows = RowPredictor(_booster(X, y))
    rows.predict(X[:1])
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(rows)
