"""training/treeshap.py: the tabulated TreeSHAP equals LightGBM's pred_contrib, and reason codes pick the top."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from training.churn import TOP_REASONS
from training.treeshap import TreeShap, TreeShapUnsupported, top_positive


def _data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Numeric columns with NaNs and exact zeros, one categorical column with missing codes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    X[rng.random(n) < 0.2, 1] = np.nan
    X[rng.random(n) < 0.3, 2] = 0.0
    X[:, 3] = rng.integers(0, 6, n)
    X[rng.random(n) < 0.1, 3] = np.nan
    X[rng.random(n) < 0.1, 4] = np.nan
    signal = X[:, 0] + np.nan_to_num(X[:, 1]) + (np.nan_to_num(X[:, 3]) % 2) - (X[:, 2] == 0) * 0.8
    y = (signal + rng.normal(size=n) > 0.5).astype(int)
    return X, y


def _booster(X, y, **params) -> lgb.Booster:
    base = {"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 20, "verbose": -1,
            "min_data_per_group": 5, "cat_smooth": 1, "seed": 1}
    return lgb.train({**base, **params}, lgb.Dataset(X, y, categorical_feature=[3]), 60)


def _missing_types(shap: TreeShap) -> set[str]:
    return {node.missing for tree in shap.trees for node in tree.nodes if node.categories is None}


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_equals_lightgbm_pred_contrib(zero_as_missing):
    X, y = _data()
    booster = _booster(X, y, zero_as_missing=zero_as_missing)
    shap = TreeShap(booster)
    # The data exercise what they should: categorical splits and the missing-value modes.
    assert any(node.categories for tree in shap.trees for node in tree.nodes)
    assert ("Zero" if zero_as_missing else "NaN") in _missing_types(shap)
    X_new, _ = _data(500, seed=1)  # rows the trees were not fitted on, categories and NaNs included
    X_new[:5, 3] = [7, -1, 2.5, np.nan, 0]  # an unseen code, a negative one, a fraction, missing
    expected = booster.predict(X_new, pred_contrib=True)[:, :-1]
    got = shap.contributions(X_new)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # SHAP values add up to the raw score minus the expected value (the bias column).
    bias = booster.predict(X_new, pred_contrib=True)[:, -1]
    np.testing.assert_allclose(got.sum(axis=1) + bias, booster.predict(X_new, raw_score=True), atol=1e-9)


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_one_row_over_the_trees_equals_lightgbm_pred_contrib(zero_as_missing):
    X, y = _data()
    booster = _booster(X, y, zero_as_missing=zero_as_missing)
    shap = TreeShap(booster)
    X_new, _ = _data(300, seed=2)
    X_new[:6, 3] = [7, -1, 2.5, np.nan, 0, np.inf]  # an unseen code, a negative one, a fraction, missing, inf
    X_new[6:9, 0] = [0.0, np.nan, -0.0]
    expected = booster.predict(X_new, pred_contrib=True)[:, :-1]
    got = np.array([shap.row_contributions(row) for row in X_new])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got, shap.contributions(X_new), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected 6 values"):
        shap.row_contributions(X_new[0, :4])


def test_too_large_trees_are_refused():
    X, y = _data()
    with pytest.raises(TreeShapUnsupported, match="splits"):
        TreeShap(_booster(X, y, num_leaves=31, min_data_in_leaf=5))


def test_wrong_width_is_refused():
    X, y = _data()
    shap = TreeShap(_booster(X, y))
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        shap.contributions(X[:, :4])


def test_top_positive_orders_and_drops_non_positive():
    contrib = np.array([[0.1, 0.5, -0.2, 0.3],
                        [-0.1, -0.2, -0.3, 0.0],
                        [0.2, 0.2, 0.0, 0.4]])
    names = ["a", "b", "c", "d"]
    assert top_positive(contrib, names, 3) == [["b", "d", "a"], [], ["d", "a", "b"]]
    assert top_positive(contrib, names, 1) == [["b"], [], ["d"]]
    assert top_positive(contrib[:0], names, 3) == []
    # One row (a scoring request's customer) takes its own path: the same answers, ties in column order.
    assert [top_positive(contrib[i:i + 1], names, 3)[0] for i in range(3)] == top_positive(contrib, names, 3)
    assert top_positive(contrib[2:3], names, 4) == [["d", "a", "b"]]


def test_churn_model_reason_codes_agree_between_single_rows_and_bulk(churn_model_and_rows):
    """The API explains one customer (the tables over the trees), batch scoring many (the tables over the rows),
    LightGBM's pred_contrib is the reference: the same codes."""
    model, X = churn_model_and_rows
    bulk = model.reasons(X)  # >= BULK_ROWS rows: the tables
    single = [model.reasons(X[i:i + 1])[0] for i in range(len(X))]  # one row at a time
    contrib = model.booster.predict(X, pred_contrib=True)[:, :-1]
    reference = top_positive(contrib, list(model.matrix.columns_), TOP_REASONS)
    # Compare where the ranking is not a near-tie (float rounding may swap those).
    gaps = -np.diff(np.sort(contrib, axis=1)[:, ::-1][:, :4], axis=1).min(axis=1)
    clear = gaps > 1e-9
    assert clear.mean() > 0.9
    assert [b for b, c in zip(bulk, clear, strict=True) if c] == [s for s, c in zip(single, clear, strict=True) if c]
    assert [b for b, c in zip(bulk, clear, strict=True) if c] == [r for r, c in zip(reference, clear, strict=True)
                                                                  if c]
    assert any(bulk)  # some customers have reasons


@pytest.fixture(scope="module")
def churn_model_and_rows():
    import pandas as pd

    from training.churn import BULK_ROWS, ChurnModel
    from training.matrix import FeatureMatrix

    X, y = _data(2000)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    matrix = FeatureMatrix(list(frame.columns)).fit(frame)
    Xm = matrix.transform(frame)
    booster = lgb.train({"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": 1},
                        lgb.Dataset(Xm, y), 80)
    model = ChurnModel(booster, matrix, np.array([-10.0, 10.0]), np.array([0.0, 1.0]), 90)
    rows = Xm[: 4 * BULK_ROWS]
    assert model.warm() is not None
    return model, rows
