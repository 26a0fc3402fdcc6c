"""One row through a LightGBM booster on LightGBM's single-row fast path.

``Booster.predict`` builds a new predictor for every call (the parameters parsed, a configuration set up,
the input checked and copied): for one customer that setup costs more than walking the trees. A request
scores one customer on about ten boosters (churn, its SHAP values, the next-best-offer base and one per
offer), so the scoring service keeps the setup instead: LightGBM's C API does it once in a "FastConfig"
(``LGBM_BoosterPredictForMatSingleRowFastInit``) and then scores a row with
``LGBM_BoosterPredictForMatSingleRowFast``. The trees, the missing-value handling and the output are
LightGBM's own, equal to ``Booster.predict`` on the same row (``tests/test_row_predict.py``).

LightGBM locks a FastConfig while it scores, so threads can share one; the lock is released from Python
(ctypes drops the GIL during the call).
"""

from __future__ import annotations

import ctypes
from typing import Literal

import lightgbm as lgb
import numpy as np
from lightgbm.basic import _LIB, _safe_call

Kind = Literal["normal", "raw", "contrib"]
_PREDICT_TYPE = {"normal": 0, "raw": 1, "contrib": 3}  # C_API_PREDICT_NORMAL, _RAW_SCORE, _CONTRIB
_DTYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}  # C_API_DTYPE_FLOAT32, _FLOAT64

_init = _LIB.LGBM_BoosterPredictForMatSingleRowFastInit
_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int32,
                  ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
_init.restype = ctypes.c_int
_predict = _LIB.LGBM_BoosterPredictForMatSingleRowFast
_predict.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p]
_predict.restype = ctypes.c_int
_free = _LIB.LGBM_FastConfigFree
_free.argtypes = [ctypes.c_void_p]
_free.restype = ctypes.c_int


class _FastConfig:
    """A booster's single-row predictor for one output kind and input dtype."""

    def __init__(self, booster: lgb.Booster, kind: Kind, dtype: np.dtype):
        self.booster = booster  # keeps the booster (and so its C handle) alive while this exists
        self.ncol = booster.num_feature()
        self.width = self.ncol + 1 if kind == "contrib" else 1
        self.handle = ctypes.c_void_p()
        # The iterations Booster.predict uses by default: up to the best one when early stopping set it.
        _safe_call(_init(booster._handle, _PREDICT_TYPE[kind], 0, booster.best_iteration, _DTYPE[dtype],
                         self.ncol, b"num_threads=1", ctypes.byref(self.handle)))

    def __call__(self, row: np.ndarray) -> np.ndarray:
        out = np.empty(self.width, dtype=np.float64)
        out_len = ctypes.c_int64(0)
        _safe_call(_predict(self.handle, row.ctypes.data, ctypes.byref(out_len), out.ctypes.data))
        return out

    def __del__(self) -> None:
        if getattr(self, "handle", None) is not None and self.handle.value:
            _free(self.handle)
            self.handle = None


class RowPredictor:
    """``booster.predict(X, ...)`` for a one-row matrix of a single-output booster through a kept FastConfig;
    anything else goes to ``Booster.predict`` (one thread).

    Not picklable on purpose: models drop it from their state and build it again where they score.
    """

    def __init__(self, booster: lgb.Booster):
        self.booster = booster
        self._ncol = booster.num_feature()
        self._single = booster.num_model_per_iteration() == 1  # one output per row: binary and regression
        self._configs: dict[tuple[str, np.dtype], _FastConfig] = {}

    def predict(self, X: np.ndarray, kind: Kind = "normal") -> np.ndarray:
        """Like ``Booster.predict``: (rows,) scores, or (rows, features + 1) SHAP values for ``contrib``."""
        if X.ndim != 2 or X.shape[0] != 1 or X.shape[1] != self._ncol or X.dtype not in _DTYPE or not self._single:
            return self.booster.predict(X, raw_score=kind == "raw", pred_contrib=kind == "contrib", num_threads=1)
        key = (kind, X.dtype)
        config = self._configs.get(key)
        if config is None:
            config = self._configs[key] = _FastConfig(self.booster, kind, X.dtype)
        out = config(np.ascontiguousarray(X[0]))
        return out[None, :] if kind == "contrib" else out

    def __reduce__(self):
        raise TypeError("RowPredictor holds LightGBM C handles and is not picklable; pickle the booster")


__all__ = ["RowPredictor"]
