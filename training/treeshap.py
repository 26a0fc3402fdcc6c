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
        self._flatten()

    def _flatten(self) -> None:
        """Every tree's nodes and tables as flat arrays, for :meth:`row_contributions` (which needs none
        without trees)."""
        if not self.trees:
            return
        nodes = [(t, k, node) for t, tree in enumerate(self.trees) for k, node in enumerate(tree.nodes)]
        self._node_feature = np.array([n.feature for _, _, n in nodes], dtype=np.intp)
        self._threshold = np.array([n.threshold if n.categories is None else 0.0 for _, _, n in nodes])
        self._default_left = np.array([n.default_left for _, _, n in nodes])
        self._nan_kind = np.array([n.categories is None and n.missing == "NaN" for _, _, n in nodes])
        self._zero_kind = np.array([n.categories is None and n.missing == "Zero" for _, _, n in nodes])
        # Categorical nodes: a table of (node, code) -> goes left, its last column (no code) False.
        categorical = [(i, n) for i, (_, _, n) in enumerate(nodes) if n.categories is not None]
        self._cat_nodes = np.array([i for i, _ in categorical], dtype=np.intp)
        self._cat_feature = np.array([n.feature for _, n in categorical], dtype=np.intp)
        codes = max((max(n.categories, default=0) for _, n in categorical), default=0) + 1
        self._cat_left = np.zeros((len(categorical), codes + 1), dtype=bool)
        for r, (_, n) in enumerate(categorical):
            self._cat_left[r, [c for c in n.categories if c >= 0]] = True
        self._bit = np.array([1 << k for _, k, _ in nodes], dtype=np.intp)
        self._tree_start = np.cumsum([0] + [len(tree.nodes) for tree in self.trees[:-1]]).astype(np.intp)
        # Table entries: tree t's row for code c and its j-th feature sit at base[t] + c * width[t] + j.
        widths = [len(tree.features) for tree in self.trees]
        bases = np.cumsum([0] + [tree.table.size for tree in self.trees[:-1]]).astype(np.intp)
        self._flat_table = np.concatenate([tree.table.ravel() for tree in self.trees])
        self._entry_tree = np.repeat(np.arange(len(self.trees), dtype=np.intp), widths)
        self._entry_offset = np.concatenate([bases[t] + np.arange(w, dtype=np.intp) for t, w in enumerate(widths)])
        self._entry_width = np.repeat(np.array(widths, dtype=np.intp), widths)
        self._entry_feature = np.concatenate([tree.features for tree in self.trees]).astype(np.intp)

    def row_contributions(self, x: np.ndarray) -> np.ndarray:
        """(num_features,) SHAP values of one row: :meth:`contributions` vectorized over the trees instead of
        the rows (a scoring request's one customer: a few NumPy calls instead of a pass per tree)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.num_features:
            raise ValueError(f"expected {self.num_features} values, got {x.shape[0]}")
        if not self.trees:
            return np.zeros(self.num_features)
        v = x[self._node_feature]
        isnan = np.isnan(v)
        filled = np.where(isnan, 0.0, v)
        le = filled <= self._threshold
        zero = np.abs(filled) <= K_ZERO
        left = np.where(self._nan_kind, (le & ~isnan) | (isnan & self._default_left),
                        np.where(self._zero_kind & zero, self._default_left, le))
        if len(self._cat_nodes):  # as _goes_left: a non-negative code (truncated) in the node's set
            value = x[self._cat_feature]
            none = self._cat_left.shape[1] - 1  # the column of "no such code": NaN, negative, unseen, infinity
            with np.errstate(invalid="ignore"):
                code = np.where((value >= 0) & (value < none), value, none).astype(np.intp)
            left[self._cat_nodes] = self._cat_left[np.arange(len(code)), code]
        code = np.add.reduceat(np.where(left, self._bit, 0), self._tree_start)
        values = self._flat_table[self._entry_offset + code[self._entry_tree] * self._entry_width]
        return np.bincount(self._entry_feature, weights=values, minlength=self.num_features)

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
    if n == 1:  # one customer: a stable sort keeps equal values in column order, as below
        row = contrib[0]
        return [[names[j] for j in np.argsort(-row, kind="stable")[:k].tolist() if row[j] > 0]]
    part = np.argpartition(-contrib, k - 1, axis=1)[:, :k] if k < f else np.tile(np.arange(f), (n, 1))
    vals = np.take_along_axis(contrib, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    part, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
    return [[names[j] for j, v in zip(row, vrow, strict=True) if v > 0]
            for row, vrow in zip(part.tolist(), vals.tolist(), strict=True)]
