"""Exact TreeSHAP for LightGBM boosters of small trees, vectorized over rows.

LightGBM's ``predict(pred_contrib=True)`` runs path-dependent TreeSHAP one row at a time: for the churn model
(a couple of hundred 7-leaf trees) 100-250 us per customer, which would be most of a nightly batch run over
a million customers. This module computes the same values another way, fast for many rows at once
(``bench/bench_batch_score.py`` prints both costs).

Path-dependent TreeSHAP explains a tree by the game ``f(S) = sum over leaves l of v_l * prod over the
features j on l's path of (o_j if j in S else z_j)``, where ``o_j`` is 1 when the row goes the path's way at
every split on ``j`` and 0 otherwise, and ``z_j`` is the product of the path's child/parent data counts at
those splits (LightGBM's covers are data counts). Its Shapley values are, per leaf and per feature ``i`` on
the path (``d`` features on the path, ``Q`` the others)::

    v_l * (o_i - z_i) * sum over S subset of Q of |S|! (d - |S| - 1)! / d! * prod_{j in S} o_j * prod_{j in Q - S} z_j

Everything but the ``o_j`` is fixed by the tree, and the ``o_j`` follow from the row's decision at each of
the tree's internal nodes. A tree with ``m`` internal nodes therefore has at most ``2**m`` distinct SHAP
vectors: :class:`TreeShap` tabulates them once per tree (``m <= max_nodes``; the churn model's trees have 6),
and explaining rows is then, per tree, the node decisions as bits, one table lookup and one add.
The result equals ``pred_contrib`` up to float rounding (``tests/test_treeshap.py`` checks it on numeric,
categorical and missing values under every missing-value mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

K_ZERO = 1e-35  # LightGBM's kZeroThreshold: |x| at or below it counts as zero for missing_type Zero


class TreeShapUnsupported(ValueError):
    """The booster has a tree too large to tabulate (or a model kind this module does not handle)."""


@dataclass(frozen=True)
class _Node:
    feature: int
    threshold: float
    categories: frozenset[int] | None  # a categorical split: these codes go left
    default_left: bool
    missing: str  # "None", "Zero" or "NaN"
    count: float
    left: object
    right: object


@dataclass(frozen=True)
class _Leaf:
    value: float
    count: float


@dataclass(frozen=True)
class _Tree:
    nodes: list[_Node]  # internal nodes; bit k of a row's code = it goes left at nodes[k]
    features: np.ndarray  # the tree's distinct split features (model column indexes)
    table: np.ndarray  # (2**len(nodes), len(features)): the SHAP values for each code
    columns: list[np.ndarray]  # the table's columns, contiguous


def _parse(node: dict, nodes: list[_Node], leaves: list[tuple[_Leaf, list[tuple[int, bool]]]],
           path: list[tuple[int, bool]]):
    if "leaf_index" in node or "split_feature" not in node:
        leaf = _Leaf(float(node.get("leaf_value", 0.0)), float(node.get("leaf_count", 0.0)))
        leaves.append((leaf, list(path)))
        return leaf
    index = len(nodes)
    nodes.append(None)  # type: ignore[arg-type]  # placeholder: children are parsed first
    categorical = node["decision_type"] == "=="
    cats = frozenset(int(c) for c in str(node["threshold"]).split("||")) if categorical else None
    path.append((index, True))
    left = _parse(node["left_child"], nodes, leaves, path)
    path[-1] = (index, False)
    right = _parse(node["right_child"], nodes, leaves, path)
    path.pop()
    nodes[index] = _Node(int(node["split_feature"]), 0.0 if categorical else float(node["threshold"]), cats,
                         bool(node.get("default_left", False)), str(node.get("missing_type", "None")),
                         float(node["internal_count"]), left, right)
    return nodes[index]


def _count(x) -> float:
    return x.count


def _tabulate(nodes: list[_Node], leaves: list[tuple[_Leaf, list[tuple[int, bool]]]]) -> _Tree:
    m = len(nodes)
    codes = np.arange(2 ** m)
    goes_left = ((codes[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)  # (2**m, m)
    features = np.array(sorted({n.feature for n in nodes}), dtype=np.int64)
    column = {f: k for k, f in enumerate(features.tolist())}
    table = np.zeros((2 ** m, len(features)))
    for leaf, path in leaves:
        # Per distinct feature on the path: o_j per code (all its splits go the path's way), z_j (count ratios).
        ones: dict[int, np.ndarray] = {}
        zeros: dict[int, float] = {}
        for k, went_left in path:
            node = nodes[k]
            child = node.left if went_left else node.right
            same_way = goes_left[:, k] if went_left else ~goes_left[:, k]
            f = node.feature
            ones[f] = ones[f] & same_way if f in ones else same_way
            zeros[f] = zeros.get(f, 1.0) * (_count(child) / node.count if node.count > 0 else 0.0)
        feats = list(ones)
        d = len(feats)
        if d == 0:
            continue
        weights = np.array([math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d) for s in range(d)])
        o = {f: ones[f].astype(np.float64) for f in feats}
        for i in feats:
            coef = np.zeros((2 ** m, d))  # coefficient of t**s in prod over j != i of (z_j + o_j t)
            coef[:, 0] = 1.0
            for j in feats:
                if j == i:
                    continue
                shifted = np.zeros_like(coef)
                shifted[:, 1:] = coef[:, :-1] * o[j][:, None]
                coef = coef * zeros[j] + shifted
            table[:, column[i]] += leaf.value * (o[i] - zeros[i]) * (coef @ weights)
    return _Tree(nodes, features, table, [np.ascontiguousarray(table[:, c]) for c in range(len(features))])


class TreeShap:
    """SHAP values of a LightGBM booster (raw score, one output) for many rows; see the module docstring."""

    def __init__(self, booster, max_nodes: int = 10):
        model = booster.dump_model()
        if model.get("num_tree_per_iteration", 1) != 1:
            raise TreeShapUnsupported("only single-output models are supported")
        self.num_features = int(model["max_feature_idx"]) + 1
        self.trees: list[_Tree] = []
        for info in model["tree_info"]:
            nodes: list[_Node] = []
            leaves: list[tuple[_Leaf, list[tuple[int, bool]]]] = []
            _parse(info["tree_structure"], nodes, leaves, [])
            if len(nodes) > max_nodes:
                raise TreeShapUnsupported(f"a tree has {len(nodes)} splits (at most {max_nodes} are tabulated)")
            if nodes:
                self.trees.append(_tabulate(nodes, leaves))

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """(n, num_features) SHAP values of the raw score, as ``pred_contrib`` without its bias column."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.num_features:
            raise ValueError(f"expected a (n, {self.num_features}) matrix, got {X.shape}")
        n = X.shape[0]
        cols = np.ascontiguousarray(X.T)  # feature-major: every column read below is contiguous
        isnan = np.isnan(cols)
        filled = np.where(isnan, 0.0, cols)  # LightGBM reads NaN as 0 unless the split's missing type is NaN
        out = np.zeros((self.num_features, n))
        code = np.empty(n, dtype=np.intp)
        bit = np.empty(n, dtype=np.intp)
        for tree in self.trees:
            code[:] = 0
            for k, node in enumerate(tree.nodes):
                f = node.feature
                np.left_shift(_goes_left(node, cols[f], filled[f], isnan[f]), k, out=bit)
                code |= bit
            for c, f in enumerate(tree.features.tolist()):
                out[f] += tree.columns[c][code]
        return out.T


def _goes_left(node: _Node, x: np.ndarray, filled: np.ndarray, isnan: np.ndarray) -> np.ndarray:
    """LightGBM's decision (``Tree::Decision``) at one node for a column of values."""
    if node.categories is not None:
        ok = ~isnan & (x >= 0)
        codes = np.where(ok, np.trunc(filled), -1).astype(np.int64)
        return ok & np.isin(codes, list(node.categories))
    if node.missing == "NaN":
        left = x <= node.threshold  # False for NaN
        return left | isnan if node.default_left else left
    if node.missing == "Zero":
        zero = np.abs(filled) <= K_ZERO
        left = filled <= node.threshold
        return np.where(zero, node.default_left, left)
    return filled <= node.threshold


def top_positive(contrib: np.ndarray, names: list[str], k: int) -> list[list[str]]:
    """Per row, the names of the ``k`` largest positive contributions, largest first (ties: column order)."""
    n, f = contrib.shape
    if n == 0:
        return []
    k = min(k, f)
    part = np.argpartition(-contrib, k - 1, axis=1)[:, :k] if k < f else np.tile(np.arange(f), (n, 1))
    vals = np.take_along_axis(contrib, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    part, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
    return [[names[j] for j, v in zip(row, vrow, strict=True) if v > 0]
            for row, vrow in zip(part.tolist(), vals.tolist(), strict=True)]
