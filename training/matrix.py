"""Feast feature frames to the float matrix a booster scores, the same way in training and serving."""

from __future__ import annotations

import numpy as np
import pandas as pd


class FeatureMatrix:
    """Turns a frame of Feast features into a float32 matrix with a fixed column order.

    Numbers and booleans pass through (missing stays NaN, which LightGBM handles); strings become
    category codes learned at fit (an unseen category is NaN). Follows scikit-learn conventions:
    parameters in ``__init__``, learned state ends in ``_``.

    Args:
        features: the feature columns, in order (a model's feature service list).
        exclude: columns never used as model inputs even if listed (identifiers, timestamps).
    """

    def __init__(self, features: list[str], exclude: tuple[str, ...] = ("customer_id", "event_timestamp")):
        self.features = features
        self.exclude = exclude

    def fit(self, df: pd.DataFrame) -> FeatureMatrix:
        missing = [f for f in self.features if f not in df.columns]
        if missing:
            raise ValueError(f"feature frame lacks columns {missing[:5]}")
        self.columns_ = [f for f in self.features if f not in self.exclude]
        self.categories_: dict[str, list[str]] = {}
        for col in self.columns_:
            s = df[col]
            if s.dtype == object or isinstance(s.dtype, pd.StringDtype) or isinstance(s.dtype, pd.CategoricalDtype):
                if not s.dropna().map(lambda v: isinstance(v, bool)).all():
                    self.categories_[col] = sorted(str(v) for v in s.dropna().unique())
        return self

    @property
    def categorical_(self) -> list[str]:
        return [c for c in self.columns_ if c in self.categories_]

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        out = np.empty((len(df), len(self.columns_)), dtype=np.float32)
        for j, col in enumerate(self.columns_):
            s = df[col] if col in df.columns else pd.Series(np.nan, index=df.index)
            if col in self.categories_:
                codes = pd.Categorical(s.astype("string"), categories=self.categories_[col]).codes
                out[:, j] = np.where(codes < 0, np.nan, codes)
            else:
                out[:, j] = pd.to_numeric(s.astype("float64", errors="ignore"), errors="coerce")
        return out

    def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
        return self.fit(df).transform(df)
